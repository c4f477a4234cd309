"""Trio adapter: the HTTP API, served with h11 on trio streams.

Routes: ``POST /v1/purge``, ``GET /v1/purge/{id}[?wait=S]``, ``POST /sys/purge/`` (change-propagation),
``PURGE /path`` with a Host header (operators' curl), ``GET /metrics``, ``GET /healthz``. Every error is JSON
``{"error": reason, "detail": ...}`` with its status. Body decoding and URL validation live in the core
(:mod:`purged.core.ingest`); this module only moves bytes and maps errors to statuses.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import parse_qs, urlsplit

import h11
import trio

from ..core.admission import Admitted, Refused
from ..core.errors import InvalidURL, PurgedError
from ..core.ingest import decode_purge_body, decode_resource_changes
from ..core.urls import validate_host

if TYPE_CHECKING:
    from ..config import Limits
    from ..core.batches import BatchStatus

log = logging.getLogger("purged.http")

IDLE_TIMEOUT = 75.0  # keep-alive connections idle longer than this are closed
READ_TIMEOUT = 30.0  # a request (headers and body) must arrive within this
MAX_HEADER_BYTES = 64 * 1024
STOP_GRACE = 10.0  # on stop, requests already being read or handled get this long to be answered


class Purges(Protocol):
    """What the API needs of the engine (``purged.net.driver.Driver`` provides it)."""

    async def accept(self, urls: list[Any], source: str, *, client: str | None = None,
                     priority: str = "bulk") -> Admitted: ...
    def batch_status(self, batch_id: str) -> BatchStatus | None: ...
    async def wait_batch(self, batch_id: str, timeout: float) -> BatchStatus | None: ...


class HTTPError(PurgedError):
    """An API error: answered as JSON with ``status`` and ``reason``."""

    def __init__(self, status: int, reason: str, detail: str = "", headers: list | None = None):
        super().__init__(detail or reason, reason=reason, status=status)
        self.headers = headers or []


@dataclass
class Request:
    method: str
    target: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]  # lower-case names; repeated headers joined with ","
    body: bytes
    peer: str


@dataclass
class Response:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: list | None = None


def json_response(status: int, data: Any, headers: list | None = None) -> Response:
    return Response(status, json.dumps(data, separators=(",", ":")).encode() + b"\n", headers=headers)


def error_response(exc: PurgedError) -> Response:
    headers = getattr(exc, "headers", None)
    return json_response(exc.status, {"error": exc.reason, "detail": exc.detail or exc.reason}, headers)


def status_json(status: BatchStatus) -> dict:
    return asdict(status)


def health_json(health: dict) -> dict:
    """``/healthz``: the daemon's health with each node's state as JSON (seconds rounded to ms)."""
    nodes = {name: asdict(state) | {"oldest_pending_seconds": round(state.oldest_pending_seconds, 3)}
             for name, state in health["nodes"].items()}
    return health | {"nodes": nodes}


class API:
    """Routes requests to the purges port, the health and the metrics. Holds no purge state."""

    def __init__(self, purges: Purges, limits: Limits, *, health: Callable[[], dict],
                 metrics: Callable[[str], tuple[bytes, str]]):
        self.purges = purges
        self.limits = limits
        self.health = health
        self.metrics = metrics
        self.stopping = trio.Event()  # set on SIGTERM: answer what is in progress, take nothing new
        self.active = 0  # requests whose head has arrived and whose answer is not sent yet

    async def handle(self, req: Request) -> Response:
        path = req.path
        if req.method == "PURGE":  # any path: operators purge /v1/purge on their sites too
            return await self._purge_one(req)
        if path == "/v1/purge":
            self._allow(req, "POST")
            return await self._purge_batch(req)
        if path.startswith("/v1/purge/"):
            self._allow(req, "GET")
            return await self._status(req, path[len("/v1/purge/") :])
        if path in ("/sys/purge/", "/sys/purge"):
            self._allow(req, "POST")
            return await self._sys_purge(req)
        if path == "/metrics":
            self._allow(req, "GET")
            body, content_type = self.metrics(req.headers.get("accept", ""))
            return Response(200, body, content_type)
        if path == "/healthz":
            self._allow(req, "GET")
            return json_response(200, health_json(self.health()))
        raise HTTPError(404, "not_found", f"no route for {path}")

    @staticmethod
    def _allow(req: Request, *methods: str) -> None:
        if req.method not in methods and not (req.method == "HEAD" and "GET" in methods):
            allow = ", ".join(methods)
            raise HTTPError(405, "method_not_allowed", f"{req.method} {req.path}: use {allow}", [("Allow", allow)])

    async def _admit(self, req: Request, urls: list[Any], source: str, priority: str) -> Admitted:
        try:
            # With a journal, this returns once the batch is as durable as `durability` promises (or raises a
            # 503 JournalError): the 2xx the caller answers is that promise (docs/durability.md).
            return await self.purges.accept(urls, source, client=req.peer.rpartition(":")[0], priority=priority)
        except Refused as exc:
            headers = [] if exc.retry_after is None else [("Retry-After", str(max(1, round(exc.retry_after))))]
            raise HTTPError(exc.status, exc.reason, exc.detail, headers) from None

    async def _accept(
        self, req: Request, urls: list[Any], source: str, status: int, priority: str = "bulk"
    ) -> Response:
        admitted = await self._admit(req, urls, source, priority)
        if admitted.receipt is None:
            detail = "no valid URL in the batch" if urls else "the batch is empty"
            return json_response(
                400, {"error": "no_valid_urls", "detail": detail, "accepted": 0, "rejected": admitted.rejected}
            )
        receipt = admitted.receipt
        return json_response(
            status,
            {
                "id": receipt.batch_id,
                "accepted": receipt.accepted,
                "coalesced": receipt.coalesced,
                "rejected": admitted.rejected,
            },
        )

    async def _purge_batch(self, req: Request) -> Response:
        decoded = decode_purge_body(req.headers.get("content-type"), req.body, self.limits.max_urls_per_batch)
        return await self._accept(req, decoded.urls, "http", 202, decoded.priority)

    async def _sys_purge(self, req: Request) -> Response:
        uris = decode_resource_changes(req.body, self.limits.max_urls_per_batch)
        return await self._accept(req, uris, "changeprop", 201)

    async def _purge_one(self, req: Request) -> Response:
        target = req.target
        if target.startswith("/"):
            host = req.headers.get("host", "")
            try:
                url = "http://" + validate_host(host) + target
            except InvalidURL as exc:
                raise HTTPError(400, exc.reason, f"Host header: {exc.detail}") from None
        else:
            url = target  # absolute-form request target: PURGE http://host/path
        admitted = await self._admit(req, [url], "purge", "high")
        if admitted.receipt is None:  # the one URL was rejected: answer with its reason
            rejected = admitted.rejected[0]
            raise HTTPError(400, rejected["reason"], rejected["detail"])
        receipt = admitted.receipt
        return json_response(
            202, {"id": receipt.batch_id, "accepted": receipt.accepted, "coalesced": receipt.coalesced,
                  "rejected": []}
        )

    async def _status(self, req: Request, batch_id: str) -> Response:
        wait = 0.0
        if "wait" in req.query:
            try:
                wait = float(req.query["wait"][-1])
            except ValueError:
                raise HTTPError(400, "bad_wait", "wait must be a number of seconds") from None
            if not 0 <= wait < float("inf"):
                raise HTTPError(400, "bad_wait", "wait must be a non-negative number of seconds")
        wait = min(wait, self.limits.max_wait)
        if self.purges.batch_status(batch_id) is None:
            raise HTTPError(404, "unknown_batch", f"no batch {batch_id!r} (unknown, or too old to remember)")
        status = await self.purges.wait_batch(batch_id, wait)
        if status is None:
            raise HTTPError(404, "unknown_batch", f"batch {batch_id!r} was forgotten while waiting")
        return json_response(200, status_json(status))


async def _send(conn: h11.Connection, stream: trio.abc.Stream, resp: Response, head_only: bool) -> None:
    headers = [
        ("Content-Type", resp.content_type),
        ("Content-Length", str(len(resp.body))),
        ("Server", "purged"),
    ] + list(resp.headers or [])
    data = conn.send(h11.Response(status_code=resp.status, headers=headers))
    if not head_only:
        data += conn.send(h11.Data(data=resp.body))
    data += conn.send(h11.EndOfMessage())
    await stream.send_all(data)


async def _next_event(conn: h11.Connection, stream: trio.abc.Stream) -> Any:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        # Large reads: a 10k-URL batch is ~0.5 MB, and while senders are busy every read costs a scheduling round.
        data = await stream.receive_some(1 << 20)
        conn.receive_data(data)


async def _read_request(
    conn: h11.Connection, stream: trio.abc.Stream, api: API, peer: str, counted: list[bool]
) -> Request | None:
    with trio.move_on_after(IDLE_TIMEOUT) as idle:
        event = await _next_event(conn, stream)
    if idle.cancelled_caught or isinstance(event, h11.ConnectionClosed):
        return None
    assert isinstance(event, h11.Request)
    api.active += 1  # the caller decrements once it answered: ``counted`` says this request was counted
    counted[0] = True
    headers: dict[str, str] = {}
    for name, value in event.headers:
        key = name.decode("latin-1")
        text = value.decode("latin-1")
        headers[key] = f"{headers[key]},{text}" if key in headers else text
    method = event.method.decode("ascii")
    target = event.target.decode("latin-1")
    split = urlsplit(target)
    path = split.path if target.startswith("/") else target
    limit = api.limits.max_body_bytes
    if method in ("POST", "PUT") and "content-length" not in headers and "transfer-encoding" not in headers:
        raise HTTPError(411, "length_required", "send a Content-Length (or chunked) body")
    length = headers.get("content-length", "0")
    if length.isdigit() and int(length) > limit:
        raise HTTPError(413, "body_too_large", f"body of {length} bytes, the limit is {limit}")
    body = bytearray()
    with trio.fail_after(READ_TIMEOUT):
        while True:
            ev = await _next_event(conn, stream)
            if isinstance(ev, h11.Data):
                body += ev.data
                if len(body) > limit:
                    raise HTTPError(413, "body_too_large", f"body over {limit} bytes")
            elif isinstance(ev, h11.EndOfMessage):
                break
            else:
                return None
    return Request(method, target, path, parse_qs(split.query), headers, bytes(body), peer)


async def _serve_connection(stream: trio.SocketStream, api: API) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
    try:
        host, port = stream.socket.getpeername()[:2]
        peer = f"{host}:{port}"
    except OSError:
        peer = "?"
    try:
        while not api.stopping.is_set():
            counted = [False]  # set once the request's head arrived: it is in ``api.active`` until answered
            try:
                if not await _exchange(conn, stream, api, peer, counted):
                    return
            finally:
                if counted[0]:
                    api.active -= 1
            conn.start_next_cycle()
    except (trio.BrokenResourceError, trio.ClosedResourceError, h11.LocalProtocolError, OSError):
        return
    except Exception:
        log.exception("unexpected error serving %s", peer)
    finally:
        await stream.aclose()


async def _exchange(conn: h11.Connection, stream: trio.abc.Stream, api: API, peer: str, counted: list[bool]) -> bool:
    """Read one request and answer it; False when the connection must end."""
    head_only = False
    try:
        req = await _read_request(conn, stream, api, peer, counted)
        if req is None:
            return False
        head_only = req.method == "HEAD"
        resp = await api.handle(req)
    except PurgedError as exc:
        resp = error_response(exc)
    except h11.RemoteProtocolError as exc:
        if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return False
        resp = error_response(HTTPError(exc.error_status_hint, "bad_request", str(exc)))
    except trio.TooSlowError:
        resp = error_response(HTTPError(408, "request_timeout", "request body took too long"))
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        return False
    except Exception:  # a bug: answer it rather than drop the connection, and say where
        log.exception("unexpected error handling a request from %s", peer)
        resp = error_response(HTTPError(500, "internal_error", "unexpected error; see the daemon's log"))
    if resp.status >= 400 and resp.status not in (404, 429):
        log.info("%s -> %d %s", peer, resp.status, resp.body[:200].decode(errors="replace"))
    if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
        return False
    if conn.their_state is not h11.DONE or api.stopping.is_set():
        # Answered before the body was read (the stream is unusable), or the daemon is stopping.
        resp.headers = list(resp.headers or []) + [("Connection", "close")]
    await _send(conn, stream, resp, head_only)
    return conn.our_state is not h11.MUST_CLOSE and conn.their_state is h11.DONE


async def serve_http(
    api: API, host: str, port: int, *, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED
) -> None:
    """Serve the API until cancelled or ``api.stopping`` is set; ``task_status.started(listeners)`` once bound.

    On stop the listeners close at once, requests in progress get up to ``STOP_GRACE`` seconds to be answered
    (with ``Connection: close``), and idle keep-alive connections are closed: no request that reached us is
    cut off mid-way.
    """
    listeners = await trio.open_tcp_listeners(port, host=host)
    async with trio.open_nursery() as handlers:
        async with trio.open_nursery() as acceptor:
            acceptor.start_soon(
                partial(trio.serve_listeners, lambda s: _serve_connection(s, api), listeners, handler_nursery=handlers)
            )
            task_status.started(listeners)
            await api.stopping.wait()
            acceptor.cancel_scope.cancel()
        with trio.move_on_after(STOP_GRACE):
            while api.active:
                await trio.sleep(0.01)
        handlers.cancel_scope.cancel()
