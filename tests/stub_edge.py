"""Test support (trio layer): a stub edge cache that answers PURGE like Varnish and misbehaves on request.

    edge = StubEdge()
    port = await nursery.start(serve_stub_edge, edge)
    edge.respond(503, count=2)      # the next two responses, on any connection
    edge.stall()                    # keep reading and recording, answer nothing ...
    edge.resume()                   # ... until now, in order

Every attribute of a ``StubEdge`` may be changed while it serves; a change applies from the next response on.
``handle_connection(edge, stream)`` serves any trio stream, so tests with memory streams and ``autojump_clock``
can use the same stub without sockets. The request parser is minimal on purpose: the clients under test send
small PURGE requests, and the stub should see exactly the bytes they wrote, pipelined or not.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from functools import partial
from http import HTTPStatus

import trio

__all__ = ["ReceivedRequest", "StubEdge", "handle_connection", "serve_stub_edge"]

MAX_HEAD = 64 * 1024
_BODY = (
    "<!DOCTYPE html>\n<html>\n  <head>\n    <title>{status} {phrase}</title>\n  </head>\n  <body>\n"
    "    <h1>Error {status} {phrase}</h1>\n    <p>{phrase}</p>\n    <h3>Guru Meditation:</h3>\n"
    "    <p>XID: {xid}</p>\n    <hr>\n    <p>Stub edge</p>\n  </body>\n</html>\n"
)


@dataclass(slots=True)
class ReceivedRequest:
    method: str
    path: str
    host: str | None
    at: float  # trio.current_time() when its head had arrived
    connection: int  # which connection (1, 2, ... in accept order) it came on
    headers: list[tuple[str, str]]
    status: int | None = None  # what the stub answered; None while unanswered, or if it never was


class _BadRequest(Exception):
    def __init__(self, status: int):
        self.status = status


class StubEdge:
    """The stub's behaviour (public attributes, changeable at any time) and its record of what it saw."""

    def __init__(
        self,
        *,
        status: int = 200,
        chunked: bool = False,
        pipelining: bool = True,
        close_after: int | None = None,
        abort_after: int | None = None,
        latency: float = 0.0,
    ) -> None:
        self.status = status  # answer for every request not covered by respond()
        self.chunked = chunked  # bodies with Transfer-Encoding: chunked instead of Content-Length
        # False: read one request per connection, answer it with Connection: close and close (HTTP/1.0 style).
        self.pipelining = pipelining
        self.close_after = close_after  # per connection: Connection: close on the n-th response, then close
        self.abort_after = abort_after  # per connection: close without a word after n responses
        self.latency = (
            latency  # answer each request this long after it arrived (without blocking the pipeline)
        )
        self.requests: list[ReceivedRequest] = []
        self.connections = 0  # accepted so far
        self.responses_sent = 0
        self.port: int | None = None  # set by serve_stub_edge
        self._statuses: deque[int] = deque()
        self._stalled = False
        self._resumed = trio.Event()
        self._arrived = trio.lowlevel.ParkingLot()
        self._scopes: set[trio.CancelScope] = set()

    def respond(self, status: int, count: int = 1) -> None:
        """Answer the next ``count`` requests (after any queued before) with ``status``."""
        self._statuses.extend([status] * count)

    def stall(self) -> None:
        """Keep reading and recording requests but answer none until :meth:`resume`."""
        if not self._stalled:
            self._stalled = True
            self._resumed = trio.Event()

    def resume(self) -> None:
        self._stalled = False
        self._resumed.set()

    @property
    def stalled(self) -> bool:
        return self._stalled

    def drop_connections(self) -> None:
        """Close every open connection now, answered or not (an edge restart, a reset by a middlebox)."""
        for scope in self._scopes:
            scope.cancel()

    async def wait_for_requests(self, n: int) -> list[ReceivedRequest]:
        """Wait until ``n`` requests in all have arrived; returns the record."""
        while len(self.requests) < n:
            await self._arrived.park()
        return self.requests

    @property
    def answered(self) -> list[ReceivedRequest]:
        return [r for r in self.requests if r.status is not None]

    def _next_status(self) -> int:
        return self._statuses.popleft() if self._statuses else self.status

    def _record(self, request: ReceivedRequest) -> None:
        self.requests.append(request)
        self._arrived.unpark_all()


def _parse_request(buf: bytearray, connection: int) -> tuple[ReceivedRequest, bool, int] | None:
    """One request from the front of ``buf``: (request, client wants close, bytes used), or None for "not yet"."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        if len(buf) > MAX_HEAD:
            raise _BadRequest(431)
        return None
    lines = bytes(buf[:end]).decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[0].isalpha() or not parts[2].startswith("HTTP/1."):
        raise _BadRequest(400)
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip() or "\n" in line or "\r" in line:
            raise _BadRequest(400)
        headers.append((name.lower(), value.strip(" \t")))
    fields = dict(headers)
    if "transfer-encoding" in fields:
        raise _BadRequest(501)  # PURGE has no body; chunked requests are not worth supporting here
    length = fields.get("content-length", "0")
    if not length.isdigit() or not length.isascii():
        raise _BadRequest(400)
    used = end + 4 + int(length)
    if len(buf) < used:
        return None
    tokens = {t.strip().lower() for t in fields.get("connection", "").split(",")}
    wants_close = "close" in tokens or (parts[2] == "HTTP/1.0" and "keep-alive" not in tokens)
    request = ReceivedRequest(
        parts[0], parts[1], fields.get("host"), trio.current_time(), connection, headers
    )
    return request, wants_close, used


def _encode_response(edge: StubEdge, status: int, method: str, close: bool, xid: int) -> bytes:
    phrase = "Purged" if status == 200 and method == "PURGE" else _phrase(status)
    head = f"HTTP/1.1 {status} {phrase}\r\nServer: stub-edge\r\nX-Varnish: {xid}\r\n"
    if close:
        head += "Connection: close\r\n"
    if status < 200 or status in (204, 304):
        return (head + "\r\n").encode()
    body = b"" if method == "HEAD" else _BODY.format(status=status, phrase=phrase, xid=xid).encode()
    head += "Content-Type: text/html; charset=utf-8\r\n"
    if edge.chunked:
        # Two chunks, one with an extension, and a trailer: the shapes a client parser must skip.
        half = len(body) // 2
        chunks = b"".join(b"%x;stub=1\r\n%s\r\n" % (len(c), c) for c in (body[:half], body[half:]) if c)
        return (head + "Transfer-Encoding: chunked\r\n\r\n").encode() + chunks + b"0\r\nX-Stub: end\r\n\r\n"
    return (head + f"Content-Length: {len(body)}\r\n\r\n").encode() + body


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


async def _read_requests(
    edge: StubEdge, stream: trio.abc.Stream, number: int, send: trio.MemorySendChannel
) -> None:
    # Requests go to the answering task a read's worth at a time: one channel hop per request halves the rate.
    buf = bytearray()
    async with send:
        while True:
            try:
                data = await stream.receive_some(65536)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            if not data:
                return
            buf += data
            batch: list[tuple[ReceivedRequest, bool] | _BadRequest] = []
            done = False
            while not done:
                try:
                    parsed = _parse_request(buf, number)
                except _BadRequest as exc:
                    batch.append(exc)
                    done = True
                    break
                if parsed is None:
                    break
                request, wants_close, used = parsed
                del buf[:used]
                edge._record(request)
                batch.append((request, wants_close))
                # A non-pipelining server never reads what was pipelined behind the request it answers.
                done = wants_close or not edge.pipelining
            if batch:
                try:
                    await send.send(batch)
                except trio.BrokenResourceError:
                    return  # the answering side finished (closed or aborted the connection)
            if done:
                return


async def _answer_requests(
    edge: StubEdge, stream: trio.abc.Stream, receive: trio.MemoryReceiveChannel
) -> None:
    sent = 0
    out = bytearray()  # answers written together, so a pipelined burst costs one send, as with a real edge
    async for batch in receive:
        for item in batch:
            if isinstance(item, _BadRequest):
                out += _encode_response(edge, item.status, "", True, 0)
                await stream.send_all(out)
                return
            request, wants_close = item
            if edge.latency and trio.current_time() < request.at + edge.latency:
                await _flush(stream, out)
                await trio.sleep_until(request.at + edge.latency)
            while edge._stalled:
                await _flush(stream, out)
                await edge._resumed.wait()
            sent += 1
            close = wants_close or not edge.pipelining or sent == edge.close_after
            request.status = edge._next_status()
            edge.responses_sent += 1
            out += _encode_response(edge, request.status, request.method, close, edge.responses_sent)
            if close or sent == edge.abort_after:
                await stream.send_all(out)
                return
        await _flush(stream, out)


async def _flush(stream: trio.abc.Stream, out: bytearray) -> None:
    if out:
        await stream.send_all(out)
        out.clear()


async def handle_connection(edge: StubEdge, stream: trio.abc.Stream) -> None:
    """Serve one connection: read (and record) requests as they come, answer them in order."""
    edge.connections += 1
    number = edge.connections
    send, receive = trio.open_memory_channel[object](math.inf)
    with trio.CancelScope() as scope:
        edge._scopes.add(scope)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_read_requests, edge, stream, number, send)
                async with receive:
                    await _answer_requests(edge, stream, receive)
                nursery.cancel_scope.cancel()
        except* (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the client went away mid-answer
        finally:
            edge._scopes.discard(scope)
    with trio.CancelScope(shield=True):
        await trio.aclose_forcefully(stream)


async def serve_stub_edge(
    edge: StubEdge, *, host: str = "127.0.0.1", task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
) -> None:
    """Listen on ``host`` with an ephemeral port, report the port via ``task_status``, serve until cancelled."""
    listeners = await trio.open_tcp_listeners(0, host=host)
    edge.port = listeners[0].socket.getsockname()[1]
    task_status.started(edge.port)
    await trio.serve_listeners(partial(handle_connection, edge), listeners)
