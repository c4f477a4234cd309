"""Trio adapter: HTTP/1.1 connections for the API, with h11 over trio streams (plain TCP or TLS).

Connection hygiene (guarantee 7, issue 12), each a per-connection deadline so that one slow client never
delays the others:

- the request head must arrive within ``limits.header_timeout`` (a new connection: from its accept, TLS
  handshake included; a keep-alive one: from the first byte of the next request, after up to
  ``IDLE_TIMEOUT`` idle); a client that trickles bytes (slowloris) is closed when its deadline passes;
- the body must arrive, and the response be taken, within ``limits.body_timeout`` (408 / closed);
- a head larger than ``MAX_HEADER_BYTES`` is a 431; ``Content-Length`` with ``Transfer-Encoding`` is a 400 and
  the connection is closed (RFC 9112 §6.1; h11 would read the body as chunked);
- past ``limits.max_connections`` open connections a request is answered 503 and its connection closed,
  except ``/healthz`` and ``/metrics``, which a reserve of ``CONNECTION_RESERVE`` more connections still
  serves; past the reserve a connection is closed at once. Accept errors for lack of descriptors (EMFILE)
  pause accepting briefly and are logged at most once a minute;
- a connection answered before its request was read to the end (413, 431, a malformed request) is half-closed
  and drained for up to ``LINGER`` seconds before it is closed, so that the answer is not lost to a reset.
"""

from __future__ import annotations

import errno
import logging
import ssl
from functools import partial
from typing import Any
from urllib.parse import parse_qs, urlsplit

import h11
import trio

from ..core.errors import PurgedError
from .http_api import API, HTTPError, Request, Response, error_response
from .ratelog import RateLimitedLog

log = logging.getLogger("purged.http")

IDLE_TIMEOUT = 75.0  # keep-alive connections idle longer than this (between requests) are closed
MAX_HEADER_BYTES = 64 * 1024
STOP_GRACE = 10.0  # on stop, requests already being read or handled get this long to be answered
CONNECTION_RESERVE = 64  # connections past max_connections that may still ask /healthz or /metrics
ACCEPT_PAUSE = 0.1  # seconds accepting pauses after EMFILE/ENFILE
ACCEPT_LOG_INTERVAL = 60.0
_refused_log = RateLimitedLog(log)  # one line per status per 10 s: a hostile client cannot flood the log
CLOSE_GRACE = 1.0  # a TLS close_notify gets this long
LINGER = 2.0  # after answering a request whose rest was not read: how long its bytes are still read and dropped
_CAPACITY_ERRNOS = {errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS}


class TLSContext:
    """The server's ``ssl.SSLContext``, rebuilt from the certificate and key files by :meth:`load` (at start
    and on SIGHUP): new connections get the new context, open ones keep theirs."""

    def __init__(self, cert: str, key: str):
        self.cert, self.key = cert, key
        self.context = self.build()

    def build(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.cert, self.key)  # OSError / ssl.SSLError on a missing or bad file
        ctx.set_alpn_protocols(["http/1.1"])
        return ctx

    def load(self) -> None:
        self.context = self.build()


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


async def _read_head(conn: h11.Connection, stream: trio.abc.Stream, deadline: float | None,
                     header_timeout: float) -> Any:
    """The next request head, or None (closed, idle too long, or the head's deadline passed)."""
    if deadline is None:  # keep-alive: idle until the next request's first byte, then its head has a deadline
        if not conn.trailing_data[0] and not conn.trailing_data[1]:
            with trio.move_on_after(IDLE_TIMEOUT):
                conn.receive_data(await stream.receive_some(1 << 20))
            if not conn.trailing_data[0] and not conn.trailing_data[1]:
                return None
        deadline = trio.current_time() + header_timeout
    with trio.move_on_at(deadline):
        event = await _next_event(conn, stream)
        return None if isinstance(event, h11.ConnectionClosed) else event
    return None  # slowloris: the head did not arrive in time


async def _read_request(
    conn: h11.Connection, stream: trio.abc.Stream, api: API, peer: str, counted: list[bool],
    deadline: float | None, over_capacity: bool,
) -> Request | None:
    event = await _read_head(conn, stream, deadline, api.limits.header_timeout)
    if event is None:
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
    req = Request(method, target, path, parse_qs(split.query), headers, b"", peer)
    if "content-length" in headers and "transfer-encoding" in headers:
        # RFC 9112 §6.1: a request smuggling vector. 400, and the connection closes (the body is not read).
        raise HTTPError(400, "bad_request", "Content-Length and Transfer-Encoding together")
    api.check_head(req, over_capacity=over_capacity)
    limit = api.limits.max_body_bytes
    if method in ("POST", "PUT") and "content-length" not in headers and "transfer-encoding" not in headers:
        raise HTTPError(411, "length_required", "send a Content-Length (or chunked) body")
    length = headers.get("content-length", "0")
    if length.isdigit() and int(length) > limit:
        raise HTTPError(413, "body_too_large", f"body of {length} bytes, the limit is {limit}")
    body = bytearray()
    with trio.fail_after(api.limits.body_timeout):
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
    req.body = bytes(body)
    return req


def _peer(stream: trio.SocketStream) -> str:
    try:
        host, port = stream.socket.getpeername()[:2]
        return f"{host}:{port}"
    except OSError:
        return "?"


async def _serve_connection(stream: trio.SocketStream, api: API, tls: TLSContext | None) -> None:
    api.connections += 1
    try:
        await _connection(stream, api, tls)
    finally:
        api.connections -= 1


async def _connection(sock_stream: trio.SocketStream, api: API, tls: TLSContext | None) -> None:
    limits = api.limits
    over_capacity = api.connections > limits.max_connections
    if api.connections > limits.max_connections + CONNECTION_RESERVE:
        await trio.aclose_forcefully(sock_stream)  # no descriptor kept for it, no work done
        return
    deadline = trio.current_time() + limits.header_timeout  # the first head, handshake included
    peer = _peer(sock_stream)
    stream: trio.abc.Stream = sock_stream
    conn: h11.Connection | None = None
    try:
        if tls is not None:
            stream = trio.SSLStream(sock_stream, tls.context, server_side=True, https_compatible=True)
            with trio.move_on_at(deadline):
                await stream.do_handshake()
            if trio.current_time() >= deadline:
                return
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
        first: float | None = deadline
        while not api.stopping.is_set():
            counted = [False]  # set once the request's head arrived: it is in ``api.active`` until answered
            try:
                if not await _exchange(conn, stream, api, peer, counted, first, over_capacity):
                    return
            finally:
                if counted[0]:
                    api.active -= 1
            if over_capacity:
                return
            first = None
            conn.start_next_cycle()
    except (trio.BrokenResourceError, trio.ClosedResourceError, h11.LocalProtocolError, OSError):
        return
    except Exception:
        log.exception("unexpected error serving %s", peer)
    finally:
        if conn is not None and tls is None and conn.their_state in (h11.SEND_BODY, h11.ERROR):
            await _linger(sock_stream)
        with trio.move_on_after(CLOSE_GRACE):
            await stream.aclose()
        if stream is not sock_stream:
            await trio.aclose_forcefully(sock_stream)


async def _linger(stream: trio.SocketStream) -> None:
    """Half-close, then read and discard what the client still sends, for at most ``LINGER`` seconds. Closing
    with unread data (a body past the limit, the rest of a malformed request) makes the kernel send a reset,
    which can destroy the answer just sent (a 413, a 400) before the client reads it."""
    try:
        await stream.send_eof()
        with trio.move_on_after(LINGER):
            while await stream.receive_some(1 << 16):
                pass
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
        pass


async def _exchange(conn: h11.Connection, stream: trio.abc.Stream, api: API, peer: str, counted: list[bool],
                    deadline: float | None, over_capacity: bool) -> bool:
    """Read one request and answer it; False when the connection must end."""
    head_only = False
    try:
        req = await _read_request(conn, stream, api, peer, counted, deadline, over_capacity)
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
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, ssl.SSLError):
        return False
    except Exception:  # a bug: answer it rather than drop the connection, and say where
        log.exception("unexpected error handling a request from %s", peer)
        resp = error_response(HTTPError(500, "internal_error", "unexpected error; see the daemon's log"))
    if resp.status >= 400:
        api.count_refusal(resp)
    if resp.status >= 400 and resp.status not in (401, 404, 429, 503):
        _refused_log.info(str(resp.status), "%s -> %d %s", peer, resp.status, resp.body[:200].decode(errors="replace"))
    if conn.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
        return False
    if conn.their_state is not h11.DONE or api.stopping.is_set() or over_capacity:
        # Answered before the body was read (the stream is unusable), the daemon is stopping, or over the cap.
        resp.headers = list(resp.headers or []) + [("Connection", "close")]
    with trio.move_on_after(api.limits.body_timeout) as sending:
        await _send(conn, stream, resp, head_only)
    if sending.cancelled_caught:
        return False  # the client does not read its answer
    return conn.our_state is not h11.MUST_CLOSE and conn.their_state is h11.DONE


async def _accept_loop(listener: trio.SocketListener, handler, nursery: trio.Nursery) -> None:
    """``trio.serve_listeners`` for one listener, but out of descriptors it pauses and logs once a minute
    (trio logs every retry: ten lines a second)."""
    logged = -ACCEPT_LOG_INTERVAL
    skipped = 0
    while True:
        try:
            stream = await listener.accept()
        except OSError as exc:
            if exc.errno not in _CAPACITY_ERRNOS:
                raise
            now = trio.current_time()
            if now - logged >= ACCEPT_LOG_INTERVAL:
                log.error("accept: %s (%d more since the last line); pausing new connections; see "
                          "limits.max_connections and LimitNOFILE", errno.errorcode.get(exc.errno, exc.errno),
                          skipped)
                logged, skipped = now, 0
            else:
                skipped += 1
            await trio.sleep(ACCEPT_PAUSE)
            continue
        nursery.start_soon(handler, stream)


async def serve_http(
    api: API, host: str, port: int, *, tls: TLSContext | None = None,
    task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the API (over TLS with ``tls``) until cancelled or ``api.stopping`` is set;
    ``task_status.started(listeners)`` once bound.

    On stop the listeners close at once, requests in progress get up to ``STOP_GRACE`` seconds to be answered
    (with ``Connection: close``), and idle keep-alive connections are closed: no request that reached us is
    cut off mid-way.
    """
    listeners = await trio.open_tcp_listeners(port, host=host)
    handler = partial(_serve_connection, api=api, tls=tls)
    async with trio.open_nursery() as handlers:
        async with trio.open_nursery() as acceptor:
            for listener in listeners:
                acceptor.start_soon(_accept_loop, listener, handler, handlers)
            task_status.started(listeners)
            await api.stopping.wait()
            acceptor.cancel_scope.cancel()
        for listener in listeners:
            await listener.aclose()
        with trio.move_on_after(STOP_GRACE):
            while api.active:
                await trio.sleep(0.01)
        handlers.cancel_scope.cancel()
