"""The fault proxy itself, against an in-process trio HTTP/1.1 upstream (no real edge needed)."""

from __future__ import annotations

import socket

import pytest
import trio
from faultproxy import FaultProxy


async def upstream_server(seen: list[bytes], *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Answer each pipelined request with 200 and a body naming its target (keep-alive)."""

    async def handle(stream: trio.SocketStream) -> None:
        buf = b""
        try:
            while data := await stream.receive_some(65536):
                buf += data
                while b"\r\n\r\n" in buf:
                    head, buf = buf.split(b"\r\n\r\n", 1)
                    target = head.split(b" ")[1]
                    seen.append(target)
                    body = b"purged " + target
                    await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        except trio.BrokenResourceError:
            pass

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(handle, listeners)


def requests(*targets: str) -> bytes:
    return b"".join(f"PURGE {t} HTTP/1.1\r\nHost: h.org\r\n\r\n".encode() for t in targets)


async def read_all(stream: trio.SocketStream, timeout: float = 2.0) -> tuple[bytes, str]:
    """Everything until EOF / reset / timeout; and which of those ended it."""
    out = b""
    with trio.move_on_after(timeout):
        try:
            while data := await stream.receive_some(65536):
                out += data
            return out, "eof"
        except trio.BrokenResourceError:
            return out, "reset"
    return out, "timeout"


@pytest.fixture
async def setup(nursery):
    seen: list[bytes] = []
    port = await nursery.start(upstream_server, seen)
    proxy = await nursery.start(FaultProxy(("127.0.0.1", port)).serve)
    return proxy, seen


async def connect(proxy: FaultProxy) -> trio.SocketStream:
    return await trio.open_tcp_stream("127.0.0.1", proxy.port)


async def test_pass_keeps_pipelining(setup):
    proxy, seen = setup
    s = await connect(proxy)
    await s.send_all(requests("/a", "/b", "/c"))
    out, how = await read_all(s, 0.5)
    assert how == "timeout" and out.count(b"200 OK") == 3 and out.index(b"/a") < out.index(b"/b") < out.index(b"/c")
    assert seen == [b"/a", b"/b", b"/c"]


async def test_storm503_answers_itself(setup):
    proxy, seen = setup
    proxy.set_mode("storm503")
    s = await connect(proxy)
    await s.send_all(requests("/a", "/b"))
    out, _ = await read_all(s, 0.3)
    assert out.count(b"HTTP/1.1 503") == 2 and seen == []
    proxy.set_mode("pass")  # the same connection now reaches the node
    await s.send_all(requests("/c"))
    out, _ = await read_all(s, 0.3)
    assert b"200 OK" in out and seen == [b"/c"]


async def test_stall_holds_until_switched_back(setup):
    proxy, seen = setup
    s = await connect(proxy)
    await s.send_all(requests("/a"))
    out, _ = await read_all(s, 0.3)
    assert b"200 OK" in out
    proxy.set_mode("stall")
    await s.send_all(requests("/b"))
    out, how = await read_all(s, 0.3)
    assert out == b"" and how == "timeout" and seen == [b"/a"]
    proxy.set_mode("pass")
    out, _ = await read_all(s, 0.3)
    assert b"/b" in out and seen == [b"/a", b"/b"]


async def test_reset_mid_pipeline(setup):
    proxy, seen = setup
    proxy.set_mode("reset", reset_after=100)
    s = await connect(proxy)
    await s.send_all(requests(*(f"/r{i}" for i in range(10))))
    out, how = await read_all(s)
    assert how in ("reset", "eof") and len(out) == 100  # cut inside the third answer (~41 bytes each)
    assert proxy.stats["resets"] == 1


async def test_slow_reads_still_deliver(setup):
    proxy, seen = setup
    proxy.set_mode("slow", slow_bytes=8, slow_delay=0.002)
    s = await connect(proxy)
    start = trio.current_time()
    await s.send_all(requests("/a", "/b"))
    out, _ = await read_all(s, 1.0)
    assert out.count(b"200 OK") == 2 and seen == [b"/a", b"/b"]
    assert trio.current_time() - start > 0.02


async def test_close_each_and_half(setup):
    proxy, seen = setup
    proxy.set_mode("close_each")
    s = await connect(proxy)
    await s.send_all(requests("/a", "/b", "/c"))
    out, how = await read_all(s)
    assert how == "eof" and out.count(b"200 OK") == 1 and out.endswith(b"purged /a")
    proxy.set_mode("half")
    s = await connect(proxy)
    await s.send_all(requests("/d"))
    out, how = await read_all(s)
    full = b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\npurged /d"
    assert how == "eof" and out == full[: len(full) // 2]


async def test_upstream_down_resets_clients(nursery):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead = probe.getsockname()[1]
    proxy = await nursery.start(FaultProxy(("127.0.0.1", dead)).serve)
    s = await connect(proxy)
    out, how = await read_all(s)
    assert out == b"" and how in ("eof", "reset") and proxy.stats["upstream_refused"] == 1
