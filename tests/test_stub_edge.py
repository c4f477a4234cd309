"""Tests for the stub edge cache (tests/stub_edge.py), driven by a raw TCP client that writes bytes itself."""

from __future__ import annotations

import trio
import trio.testing
from stub_edge import StubEdge, handle_connection, serve_stub_edge

from purged.core.http1 import Response, ResponseParser, encode_purge

TIMEOUT = 10  # real sockets and a real clock: generous, only hit when something hangs


def purges(*paths: str, host: str = "example.org") -> bytes:
    return b"".join(encode_purge(host, path) for path in paths)


class Client:
    """A raw client: writes bytes, reads responses with the core parser, remembers the raw bytes."""

    def __init__(self, stream: trio.abc.Stream):
        self.stream = stream
        self.parser = ResponseParser()
        self.raw = bytearray()
        self.eof = False

    async def read(self, n: int) -> list[Response]:
        """Read until ``n`` responses or EOF."""
        out: list[Response] = []
        with trio.fail_after(TIMEOUT):
            while len(out) < n and not self.eof:
                data = await self.stream.receive_some(65536)
                if not data:
                    self.eof = True
                    out += self.parser.feed_eof()
                    break
                self.raw += data
                out += self.parser.feed(data)
        return out

    async def read_to_eof(self) -> list[Response]:
        return await self.read(10**9)


async def start(nursery: trio.Nursery, edge: StubEdge) -> int:
    port = await nursery.start(serve_stub_edge, edge)
    assert port == edge.port and port > 0
    return port


async def connect(port: int) -> Client:
    return Client(await trio.open_tcp_stream("127.0.0.1", port))


async def test_pipelined_purges_get_200_in_order(nursery):
    edge = StubEdge()
    client = await connect(await start(nursery, edge))
    before = trio.current_time()
    await client.stream.send_all(purges("/a", "/b") + purges("/c", host="other.org"))
    assert await client.read(3) == [Response(200, True)] * 3
    assert client.raw.startswith(b"HTTP/1.1 200 Purged\r\n")
    assert [(r.method, r.path, r.host, r.connection, r.status) for r in edge.requests] == [
        ("PURGE", "/a", "example.org", 1, 200),
        ("PURGE", "/b", "example.org", 1, 200),
        ("PURGE", "/c", "other.org", 1, 200),
    ]
    times = [r.at for r in edge.requests]
    assert before <= times[0] <= times[1] <= times[2] <= trio.current_time()
    assert ("user-agent", "purged") in edge.requests[0].headers
    assert edge.connections == 1 and edge.responses_sent == 3


async def test_requests_split_into_single_bytes(nursery):
    edge = StubEdge()
    client = await connect(await start(nursery, edge))
    data = purges("/a", "/b")
    for i in range(len(data)):
        await client.stream.send_all(data[i : i + 1])
    assert await client.read(2) == [Response(200, True)] * 2


async def test_status_for_next_n_then_default(nursery):
    edge = StubEdge()
    edge.respond(503, count=2)
    edge.respond(404)
    client = await connect(await start(nursery, edge))
    await client.stream.send_all(purges("/1", "/2", "/3", "/4"))
    assert [r.status for r in await client.read(4)] == [503, 503, 404, 200]
    assert b"HTTP/1.1 503 Service Unavailable\r\n" in client.raw
    edge.status = 500  # until told otherwise
    await client.stream.send_all(purges("/5", "/6"))
    assert [r.status for r in await client.read(2)] == [500, 500]
    assert [r.status for r in edge.requests] == [503, 503, 404, 200, 500, 500]


async def test_close_after_n_responses(nursery):
    edge = StubEdge(close_after=2)
    port = await start(nursery, edge)
    client = await connect(port)
    await client.stream.send_all(purges("/1", "/2", "/3"))
    assert await client.read_to_eof() == [Response(200, True), Response(200, False)]
    assert client.raw.count(b"Connection: close\r\n") == 1
    assert [r.status for r in edge.requests] == [200, 200, None]  # the third was read, never answered
    again = await connect(port)  # the count is per connection
    await again.stream.send_all(purges("/3"))
    assert await again.read(1) == [Response(200, True)]
    assert edge.requests[-1].connection == 2


async def test_abort_after_n_responses(nursery):
    edge = StubEdge(abort_after=1)
    client = await connect(await start(nursery, edge))
    await client.stream.send_all(purges("/1", "/2"))
    assert await client.read(2) == [Response(200, True)]
    assert client.eof and b"Connection: close" not in client.raw


async def test_stall_reads_but_does_not_answer(nursery):
    edge = StubEdge()
    client = await connect(await start(nursery, edge))
    edge.stall()
    assert edge.stalled
    await client.stream.send_all(purges("/1", "/2"))
    with trio.fail_after(TIMEOUT):
        await edge.wait_for_requests(2)
    with trio.move_on_after(0.3):
        await client.stream.receive_some(65536)
        raise AssertionError("a stalled edge answered")
    assert edge.answered == []
    edge.resume()
    assert await client.read(2) == [Response(200, True)] * 2
    assert [r.status for r in edge.requests] == [200, 200]


async def test_refuse_pipelining(nursery):
    edge = StubEdge(pipelining=False)
    port = await start(nursery, edge)
    client = await connect(port)
    await client.stream.send_all(purges("/1", "/2", "/3"))
    assert await client.read_to_eof() == [Response(200, False)]
    assert [r.path for r in edge.requests] == ["/1"]  # the rest was never read
    client = await connect(port)
    await client.stream.send_all(purges("/2"))
    assert await client.read_to_eof() == [Response(200, False)]
    assert edge.connections == 2


async def test_chunked_bodies(nursery):
    edge = StubEdge(chunked=True)
    edge.respond(503)
    client = await connect(await start(nursery, edge))
    await client.stream.send_all(purges("/1", "/2"))
    assert await client.read(2) == [Response(503, True), Response(200, True)]
    assert client.raw.count(b"Transfer-Encoding: chunked\r\n") == 2
    assert b";stub=1\r\n" in client.raw and b"\r\n0\r\nX-Stub: end\r\n\r\n" in client.raw
    assert b"Content-Length" not in client.raw


async def test_client_connection_close_is_honoured(nursery):
    edge = StubEdge()
    client = await connect(await start(nursery, edge))
    request = b"PURGE /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    await client.stream.send_all(purges("/1") + request + purges("/never"))
    assert await client.read_to_eof() == [Response(200, True), Response(200, False)]
    assert [r.path for r in edge.requests] == ["/1", "/x"]


async def test_request_bodies_are_skipped(nursery):
    edge = StubEdge()
    client = await connect(await start(nursery, edge))
    post = b"POST /sys HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello"
    await client.stream.send_all(post + purges("/after"))
    assert await client.read(2) == [Response(200, True)] * 2
    assert [(r.method, r.path) for r in edge.requests] == [("POST", "/sys"), ("PURGE", "/after")]


async def test_bad_request_gets_400_and_close(nursery):
    edge = StubEdge()
    client = await connect(await start(nursery, edge))
    await client.stream.send_all(purges("/ok") + b"NOT A REQUEST\r\n\r\n")
    assert await client.read_to_eof() == [Response(200, True), Response(400, False)]


async def test_drop_connections(nursery):
    edge = StubEdge()
    edge.stall()
    client = await connect(await start(nursery, edge))
    await client.stream.send_all(purges("/1"))
    with trio.fail_after(TIMEOUT):
        await edge.wait_for_requests(1)
    edge.drop_connections()
    assert await client.read_to_eof() == []


async def test_latency_delays_each_answer_without_blocking_the_pipeline(nursery):
    edge = StubEdge(latency=0.2)
    client = await connect(await start(nursery, edge))
    start_time = trio.current_time()
    await client.stream.send_all(purges(*(f"/{i}" for i in range(20))))
    assert await client.read(20) == [Response(200, True)] * 20
    elapsed = trio.current_time() - start_time
    assert 0.2 <= elapsed < 0.2 * 20  # one delay for the whole pipeline, not one per request


async def test_many_pipelined_requests(nursery):
    edge = StubEdge()
    client = await connect(await start(nursery, edge))
    n = 2000
    async with trio.open_nursery() as inner:
        inner.start_soon(client.stream.send_all, purges(*(f"/{i}" for i in range(n))))
        assert await client.read(n) == [Response(200, True)] * n
    assert [r.path for r in edge.requests] == [f"/{i}" for i in range(n)]


async def test_memory_streams_with_autojump_clock(autojump_clock):
    # The same stub without sockets, so tests of the sender can run in virtual time.
    edge = StubEdge(latency=5.0)
    client_stream, server_stream = trio.testing.memory_stream_pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(handle_connection, edge, server_stream)
        client = Client(client_stream)
        await client.stream.send_all(purges("/slow", "/slower"))
        assert await client.read(2) == [Response(200, True)] * 2
        assert trio.current_time() - edge.requests[0].at >= 5.0
        await client_stream.aclose()
    assert [r.status for r in edge.requests] == [200, 200]
