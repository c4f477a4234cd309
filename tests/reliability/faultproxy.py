"""A small HTTP/1.1 fault proxy in trio: sits between purged and one edge node on 127.0.0.1.

    proxy = FaultProxy(("127.0.0.1", varnish.port))
    await nursery.start(proxy.serve)           # listens on 127.0.0.1:proxy.port
    proxy.set_mode("stall")                    # switch at run time; existing connections follow
    proxy.set_mode("pass")

It frames requests and responses (header block, Content-Length or chunked body) so that faults land on
message boundaries, or deliberately inside them. Each client connection gets its own upstream connection;
responses go back in request order (pipelining kept). Modes:

``pass``        forward everything.
``storm503``    answer every request itself with ``503`` (nothing reaches the node), keep-alive.
``stall``       stop forwarding both ways (bytes wait in the proxy) until the mode changes.
``reset``       forward until ``reset_after`` response bytes went out on the connection, then RST it
                (SO_LINGER 0) in the middle of the pipeline, usually mid-response.
``slow``        read the client's requests ``slow_bytes`` at a time with ``slow_delay`` s pauses.
``close_each``  close the client connection after each response (no ``Connection: close`` header).
``half``        write only the first half of each response's bytes, then close.

The mode is read at each step, so a switch affects open connections at their next request or response.
``stats`` counts connections, requests forwarded, requests answered 503, resets and closes, per mode.
"""

from __future__ import annotations

import socket
import struct
from collections import Counter

import trio

MODES = ("pass", "storm503", "stall", "reset", "slow", "close_each", "half")
_503 = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nRetry-After: 0\r\n\r\n"
_MAX_HEADER = 64 * 1024


class _Closed(Exception):
    pass


class _Reader:
    """Buffered reads from a trio stream with message framing."""

    def __init__(self, stream: trio.abc.ReceiveStream, proxy: FaultProxy, slowable: bool = False) -> None:
        self.stream = stream
        self.proxy = proxy
        self.slowable = slowable
        self.buf = bytearray()

    async def _fill(self) -> None:
        await self.proxy._unstalled()
        if self.slowable and self.proxy.mode == "slow":
            await trio.sleep(self.proxy.slow_delay)
            data = await self.stream.receive_some(self.proxy.slow_bytes)
        else:
            data = await self.stream.receive_some(65536)
        if not data:
            raise _Closed
        self.buf += data

    async def until(self, sep: bytes) -> bytes:
        while (i := self.buf.find(sep)) < 0:
            if len(self.buf) > _MAX_HEADER:
                raise _Closed
            await self._fill()
        out = bytes(self.buf[: i + len(sep)])
        del self.buf[: i + len(sep)]
        return out

    async def exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            await self._fill()
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    async def rest(self) -> bytes:
        try:
            while True:
                await self._fill()
        except _Closed:
            pass
        out = bytes(self.buf)
        self.buf.clear()
        return out

    async def message(self, *, response: bool, request_method: bytes = b"") -> tuple[bytes, bytes]:
        """One HTTP/1.1 message: (head, whole bytes)."""
        head = await self.until(b"\r\n\r\n")
        while head.startswith(b"\r\n"):  # stray CRLF between pipelined messages
            head = head[2:]
        lines = head.split(b"\r\n")
        headers = {}
        for line in lines[1:]:
            if b":" in line:
                k, v = line.split(b":", 1)
                headers[k.strip().lower()] = v.strip()
        body = b""
        status = int(lines[0].split()[1]) if response and len(lines[0].split()) > 1 else 0
        if response and (request_method == b"HEAD" or status in (204, 304) or 100 <= status < 200):
            pass
        elif b"chunked" in headers.get(b"transfer-encoding", b"").lower():
            parts = []
            while True:
                size_line = await self.until(b"\r\n")
                parts.append(size_line)
                size = int(size_line.split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while (line := await self.until(b"\r\n")) != b"\r\n":  # trailers, then a blank line
                        parts.append(line)
                    parts.append(line)
                    break
                parts.append(await self.exactly(size + 2))
            body = b"".join(parts)
        elif b"content-length" in headers:
            body = await self.exactly(int(headers[b"content-length"]))
        elif response:
            body = await self.rest()  # close-delimited
        return head, head + body


class FaultProxy:
    def __init__(
        self,
        upstream: tuple[str, int],
        *,
        mode: str = "pass",
        reset_after: int = 2000,
        slow_bytes: int = 32,
        slow_delay: float = 0.005,
        host: str = "127.0.0.1",
    ) -> None:
        self.upstream = upstream
        self.host = host
        self.port = 0
        self.reset_after = reset_after
        self.slow_bytes = slow_bytes
        self.slow_delay = slow_delay
        self.stats: Counter[str] = Counter()
        self._changed = trio.Event()
        self.mode = "pass"
        self.set_mode(mode)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def set_mode(self, mode: str, **params: object) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; one of {MODES}")
        for key, value in params.items():
            if not hasattr(self, key):
                raise TypeError(f"unknown parameter {key}")
            setattr(self, key, value)
        self.mode = mode
        self.stats[f"mode:{mode}"] += 1
        self._changed.set()
        self._changed = trio.Event()

    async def _unstalled(self) -> None:
        while self.mode == "stall":
            await self._changed.wait()

    async def serve(self, *, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(self.port, host=self.host)
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started(self)
        await trio.serve_listeners(self._handle, listeners)

    async def _handle(self, client: trio.SocketStream) -> None:
        self.stats["connections"] += 1
        try:
            upstream = await trio.open_tcp_stream(*self.upstream)
        except OSError:
            self.stats["upstream_refused"] += 1
            _rst(client)
            await client.aclose()
            return
        queue_send, queue_recv = trio.open_memory_channel[tuple[str, bytes]](1 << 16)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._requests, client, upstream, queue_send, nursery.cancel_scope)
                nursery.start_soon(self._responses, client, upstream, queue_recv, nursery.cancel_scope)
        finally:
            for stream in (client, upstream):
                with trio.CancelScope(shield=True):
                    await stream.aclose()

    async def _requests(self, client, upstream, queue, scope: trio.CancelScope) -> None:
        reader = _Reader(client, self, slowable=True)
        try:
            async with queue:
                while True:
                    head, whole = await reader.message(response=False)
                    method = head.split(b" ", 1)[0]
                    await self._unstalled()
                    if self.mode == "storm503":
                        self.stats["answered_503"] += 1
                        await queue.send(("503", method))
                        continue
                    await queue.send(("up", method))
                    await upstream.send_all(whole)
                    self.stats["forwarded"] += 1
        except (_Closed, trio.BrokenResourceError, trio.ClosedResourceError, ValueError, IndexError):
            # The client closed (or sent garbage): let answers already owed drain, then the writer ends.
            pass

    async def _responses(self, client, upstream, queue, scope: trio.CancelScope) -> None:
        reader = _Reader(upstream, self)
        sent = 0
        try:
            async for kind, method in queue:
                if kind == "503":
                    data = _503
                else:
                    _, data = await reader.message(response=True, request_method=method)
                await self._unstalled()
                mode = self.mode
                if mode == "half" and kind == "up":
                    await client.send_all(data[: max(1, len(data) // 2)])
                    self.stats["half_written"] += 1
                    break
                if mode == "reset" and sent + len(data) > self.reset_after:
                    cut = max(0, self.reset_after - sent)
                    if cut:
                        await client.send_all(data[:cut])
                    self.stats["resets"] += 1
                    _rst(client)
                    break
                await client.send_all(data)
                sent += len(data)
                if mode == "close_each":
                    self.stats["closed_after_response"] += 1
                    break
        except (_Closed, trio.BrokenResourceError, trio.ClosedResourceError, ValueError, IndexError):
            pass
        scope.cancel()


def _rst(stream: trio.SocketStream) -> None:
    try:
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
