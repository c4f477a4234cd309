"""Trio adapter: the HTTP API's routes, scopes and audit log (connections are :mod:`purged.net.http_server`).

Routes: ``POST /v1/purge``, ``GET /v1/purge/{id}[?wait=S]``, ``POST /sys/purge/`` (change-propagation),
``PURGE /path`` with a Host header (operators' curl), ``GET /metrics``, ``GET /healthz``, and in a fleet
``GET /v1/fleet`` and ``DELETE /v1/fleet/{daemon}`` (scope ``admin``: retire a daemon). In a fleet (:mod:`purged.net.fleet`) accepted batches are published to the stream, and a
fleet id (``s1234``) answers for every daemon. Every error is JSON
``{"error": reason, "detail": ...}`` with its status. Body decoding and URL validation live in the core
(:mod:`purged.core.ingest`), tokens and scopes in :mod:`purged.core.auth`; this module maps requests to them.

With tokens (``auth.tokens_file``) the scope a route needs is checked from the request head, before its body
is read (:meth:`API.check_head`); ``"priority": "high"`` in a body also needs ``purge:high``. Each accepted batch
is one ``purged.audit`` log line (rate-limited per token or client; never the token itself).
"""

from __future__ import annotations

import ipaddress
import json
import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import unquote

import trio

from ..core.admission import Admitted, Refused
from ..core.auth import Token, TokenTable, authorize, require
from ..core.errors import InvalidURL, PurgedError
from ..core.fleet import is_fleet_id
from ..core.ingest import decode_purge_body, decode_resource_changes
from ..core.limits import TokenBucket
from ..core.urls import validate_host

if TYPE_CHECKING:
    from ..config import Limits
    from ..core.batches import BatchStatus

log = logging.getLogger("purged.http")
audit_log = logging.getLogger("purged.audit")

OPEN_PATHS = ("/healthz", "/metrics")  # open without a token unless auth.protect_metrics; the connection reserve
AUDIT_RATE, AUDIT_BURST = 1.0, 10.0  # audit lines per second per token (or client), saved up to the burst
MAX_AUDIT_KEYS = 1000


class Purges(Protocol):
    """What the API needs of the engine (``purged.net.driver.Driver`` provides it)."""

    async def accept(self, urls: list[Any], source: str, *, client: str | None = None,
                     priority: str = "bulk", token: Token | None = None) -> Admitted: ...
    def batch_status(self, batch_id: str) -> BatchStatus | None: ...
    async def wait_batch(self, batch_id: str, timeout: float) -> BatchStatus | None: ...


class FleetPort(Protocol):
    """What the API needs of the fleet (``purged.net.fleet.Fleet`` provides it)."""

    async def accept(self, urls: list[Any], source: str, *, client: str | None = None,
                     priority: str = "bulk", token: Token | None = None) -> Admitted: ...
    async def status(self, fleet_id: str, wait: float) -> dict: ...
    async def fleet_json(self) -> dict: ...
    async def retire(self, daemon: str) -> dict: ...


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
    token: Token | None = None  # the token that authorised it (None: the API has no tokens)
    client: str = field(default="")  # the peer's address without the port

    def __post_init__(self) -> None:
        if not self.client:
            self.client = self.peer.rpartition(":")[0] or self.peer


@dataclass
class Response:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: list | None = None
    reason: str = ""  # an error's reason, as in its JSON body: counted in purged_api_refused_total


def json_response(status: int, data: Any, headers: list | None = None) -> Response:
    reason = data.get("error", "") if status >= 400 and isinstance(data, dict) else ""
    return Response(status, json.dumps(data, separators=(",", ":")).encode() + b"\n", headers=headers,
                    reason=reason)


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
                 metrics: Callable[[str], tuple[bytes, str]], tokens: TokenTable | None = None,
                 allow: tuple = (), protect_metrics: bool = False, fleet: FleetPort | None = None):
        self.purges = purges
        self.fleet = fleet  # None: one daemon alone; else batches are published and ids are fleet ids
        self.limits = limits
        self.health = health
        self.metrics = metrics
        self.tokens = tokens  # None: no auth.tokens_file (loopback or allow_anonymous); replaced on SIGHUP
        self.allow = allow  # listen.http_allow networks; (): every address
        self.protect_metrics = protect_metrics
        self.stopping = trio.Event()  # set on SIGTERM: answer what is in progress, take nothing new
        self.active = 0  # requests whose head has arrived and whose answer is not sent yet
        self.connections = 0  # open connections over every listener (limits.max_connections)
        self.audit = Audit()
        self.refused: dict[tuple[int, str], int] = {}  # (status, reason) -> answers; reasons are fixed names

    def count_refusal(self, resp: Response) -> None:
        """Count an answer >= 400 by status and reason (``purged_api_refused_total``)."""
        key = (resp.status, resp.reason or "other")
        self.refused[key] = self.refused.get(key, 0) + 1

    def allowed(self, host: str) -> bool:
        """Is a client at ``host`` inside ``listen.http_allow``?"""
        if not self.allow:
            return True
        try:
            ip = ipaddress.ip_address(host.partition("%")[0])
        except ValueError:
            return False
        if ip.version == 6 and ip.ipv4_mapped is not None:  # a dual-stack listener: ::ffff:10.1.2.3
            ip = ip.ipv4_mapped
        return any(ip in net for net in self.allow)

    def check_head(self, req: Request, *, over_capacity: bool = False) -> None:
        """What the head alone decides, before any body is read: the address allow-list (403), the connection
        cap (503 but for /healthz and /metrics), then the token and the scope the route needs (401/403)."""
        if not self.allowed(req.client):
            raise HTTPError(403, "forbidden_address", f"{req.client} is not in listen.http_allow")
        if over_capacity and req.path not in OPEN_PATHS:
            raise HTTPError(503, "too_many_connections",
                            f"over limits.max_connections ({self.limits.max_connections}); retry later",
                            [("Retry-After", "1")])
        if self.tokens is None:
            return
        scopes = _route_scopes(req, self.protect_metrics)
        if scopes is not None:
            req.token = authorize(self.tokens, req.headers.get("authorization"), *scopes)

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
        if path == "/v1/fleet":
            self._allow(req, "GET")
            if self.fleet is None:
                raise HTTPError(404, "no_fleet", "this daemon has no bus: it is not part of a fleet")
            return json_response(200, await self.fleet.fleet_json())
        if path.startswith("/v1/fleet/"):
            self._allow(req, "DELETE")
            if self.fleet is None:
                raise HTTPError(404, "no_fleet", "this daemon has no bus: it is not part of a fleet")
            return json_response(200, await self.fleet.retire(unquote(path[len("/v1/fleet/"):])))
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
        if priority == "high":
            require(req.token, "purge:high")
        try:
            # With a journal, this returns once the batch is as durable as `durability` promises (or raises a
            # 503 JournalError): the 2xx the caller answers is that promise (docs/durability.md).
            intake = self.fleet if self.fleet is not None else self.purges
            admitted = await intake.accept(urls, source, client=req.client, priority=priority, token=req.token)
        except Refused as exc:
            headers = [] if exc.retry_after is None else [("Retry-After", str(max(1, round(exc.retry_after))))]
            raise HTTPError(exc.status, exc.reason, exc.detail, headers) from None
        if admitted.receipt is not None:
            self.audit.accepted(req, admitted.receipt, source, priority, trio.current_time())
        return admitted

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
                # The head is read as latin-1; a non-ASCII Host is UTF-8 (curl sends it so), and IDNA-encoding
                # its latin-1 reading would purge another host.
                host = host.encode("latin-1").decode("utf-8")
            except UnicodeDecodeError:
                raise HTTPError(400, "bad_host", "Host header: not UTF-8") from None
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
        if self.fleet is not None and is_fleet_id(batch_id):
            return json_response(200, await self.fleet.status(batch_id, wait))
        if self.purges.batch_status(batch_id) is None:
            raise HTTPError(404, "unknown_batch", f"no batch {batch_id!r} (unknown, or too old to remember)")
        status = await self.purges.wait_batch(batch_id, wait)
        if status is None:
            raise HTTPError(404, "unknown_batch", f"batch {batch_id!r} was forgotten while waiting")
        return json_response(200, status_json(status))


def _route_scopes(req: Request, protect_metrics: bool) -> tuple[str, ...] | None:
    """The scopes of which a token needs one for this request; () any known token; None no token at all."""
    path = req.path
    if req.method == "PURGE":
        return ("purge:high",)
    if path == "/v1/purge" or path in ("/sys/purge/", "/sys/purge"):
        return ("purge",)
    if path.startswith("/v1/purge/") or path == "/v1/fleet":
        return ("read", "purge", "purge:high")
    if path.startswith("/v1/fleet/"):
        return ("admin",)
    if path in OPEN_PATHS:
        return ("read",) if protect_metrics else None
    return ()


class Audit:
    """One ``purged.audit`` line per accepted batch: id, client address, token name, URL count, priority.
    A token (or, without one, a client address) gets ``AUDIT_BURST`` lines and then ``AUDIT_RATE`` a second;
    batches past that are counted and the next line it gets reports them (``suppressed_batches``,
    ``suppressed_urls``), so a bulk source cannot flood the log and nothing goes unrecorded."""

    def __init__(self) -> None:
        self._keys: OrderedDict[str, list] = OrderedDict()  # key -> [bucket, suppressed batches, urls]

    def accepted(self, req: Request, receipt: Any, source: str, priority: str, now: float) -> None:
        name = req.token.name if req.token is not None else None
        key = f"token:{name}" if name is not None else f"client:{req.client}"
        state = self._keys.pop(key, None) or [TokenBucket(AUDIT_RATE, AUDIT_BURST, now), 0, 0]
        self._keys[key] = state
        if len(self._keys) > MAX_AUDIT_KEYS:
            self._keys.popitem(last=False)
        bucket = state[0]
        if bucket.admit(1, now) is not None:
            state[1] += 1
            state[2] += receipt.accepted
            return
        record = {"event": "batch_accepted", "id": receipt.batch_id, "client": req.client, "token": name,
                  "source": source, "urls": receipt.accepted, "coalesced": receipt.coalesced, "priority": priority}
        if state[1]:
            record |= {"suppressed_batches": state[1], "suppressed_urls": state[2]}
            state[1] = state[2] = 0
        audit_log.info("audit %s", json.dumps(record, separators=(",", ":")))

