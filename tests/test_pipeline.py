"""One pipelined connection (purged.net.pipeline) against small loopback servers, with a fake engine port: a write
the socket cannot take whole, answers a few at a time (the FIFO list compacted underway), the hand parser, and
the refill of the window in writes of at least a quarter of it."""

from __future__ import annotations

import re
from collections import deque

import pytest
import trio

from purged.config import Address, Sender
from purged.net import pipeline
from purged.net.sender import NodeSender

ANSWER = b"HTTP/1.1 200 Purged\r\nContent-Length: 5\r\nConnection: keep-alive\r\n\r\nhello"
PATH = re.compile(rb"PURGE (\S+) HTTP/1\.1\r\n")


class Port:
    """The engine side of a sender: a queue of (id, target), and what came back."""

    def __init__(self, targets: list[str]):
        self.queue = deque(enumerate(targets))
        self.total = len(targets)
        self.acked: dict[int, int] = {}
        self.failures: list[str] = []
        self.takes: list[int] = []
        self.lot = trio.lowlevel.ParkingLot()
        self.done = trio.Event()

    async def wait(self, name: str) -> None:
        await self.lot.park()

    async def wait_for_work(self, name: str) -> None:
        while not self.queue:
            await self.wait(name)

    def take(self, name: str, limit: int) -> tuple[list[int], list[str]]:
        items = [self.queue.popleft() for _ in range(min(limit, len(self.queue)))]
        if items:
            self.takes.append(len(items))
        return [i for i, _ in items], [t for _, t in items]

    def ack(self, name: str, idents: list[int], statuses: list[int]) -> None:
        for ident, status in zip(idents, statuses, strict=True):
            assert ident not in self.acked, "an answered PURGE was sent again"
            self.acked[ident] = status
        if len(self.acked) == self.total:
            self.done.set()

    def _back(self, idents: list[int]) -> None:
        self.queue.extendleft(reversed([(i, f"h.org/p{i}") for i in idents]))
        self.lot.unpark_all()

    def fail(self, name: str, idents: list[int], kind: str) -> None:
        self.failures.append(kind)
        self._back(idents)

    def requeue(self, name: str, idents: list[int]) -> None:
        self._back(idents)

    def reconnect_delay(self, name: str) -> float:
        return 0.01


async def serve(task_status, *, read_delay: float = 0.0, per_write: int = 10**9, seen: list | None = None):
    """Answer every PURGE with 200, ``per_write`` answers per write, after not reading for ``read_delay``."""

    async def handle(stream: trio.SocketStream) -> None:
        await trio.sleep(read_delay)
        buf = b""
        async with stream:
            while data := await stream.receive_some(1 << 16):
                buf += data
                end = buf.rfind(b"\r\n\r\n") + 4  # the complete requests end there
                paths = PATH.findall(buf, 0, end)
                buf = buf[end:]
                if seen is not None:
                    seen.extend(paths)
                for i in range(0, len(paths), per_write):
                    await stream.send_all(ANSWER * len(paths[i : i + per_write]))

    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    task_status.started(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(handle, listeners)


async def deliver(nursery, port: Port, server_port: int, cfg: Sender, **sender_attrs) -> NodeSender:
    sender = NodeSender(port, Address("127.0.0.1", server_port), cfg)
    for key, value in sender_attrs.items():
        setattr(sender, key, value)
    nursery.start_soon(sender.run)
    with trio.fail_after(20):
        await port.done.wait()
    return sender


@pytest.mark.parametrize("hand_parser", [False, True], ids=["llhttp", "hand"])
async def test_a_write_the_socket_cannot_take_whole_is_finished_later(nursery, monkeypatch, hand_parser):
    # 2,000 PURGEs of ~2 KB each in one write: far more than the socket buffers take while the edge does not read.
    left: list[int] = []
    fill = pipeline.Pipeline._fill

    def spy(self, now):
        took = fill(self, now)
        left.append(len(self.out))
        return took

    monkeypatch.setattr(pipeline.Pipeline, "_fill", spy)
    long = "x" * 2000
    port = Port([f"h.org/p{i}?{long}" for i in range(2000)])
    seen: list[bytes] = []
    server = await nursery.start(lambda task_status: serve(task_status, read_delay=0.3, seen=seen))
    await deliver(nursery, port, server, Sender(connections=1, window=2000, max_window=2000),
                  hand_parser=hand_parser)
    assert port.acked == dict.fromkeys(range(2000), 200) and port.failures == []
    assert [p.split(b"?")[0] for p in seen] == [b"/p%d" % i for i in range(2000)]  # in order, each once
    assert max(left) > 0  # the case under test did happen


async def test_answers_a_few_per_write_match_their_requests_past_the_fifo_compaction(nursery, monkeypatch):
    monkeypatch.setattr(pipeline, "_COMPACT", 64)
    port = Port([f"h.org/p{i}" for i in range(3000)])
    seen: list[bytes] = []
    server = await nursery.start(lambda task_status: serve(task_status, per_write=3, seen=seen))
    await deliver(nursery, port, server, Sender(connections=2, window=100, max_window=100))
    assert port.acked == dict.fromkeys(range(3000), 200) and port.failures == []
    assert sorted(seen) == sorted(b"/p%d" % i for i in range(3000))


async def test_the_window_is_refilled_a_quarter_at_least(nursery):
    # Answers come one per write; the sender still writes (takes) at least a quarter of its window at a time.
    port = Port([f"h.org/p{i}" for i in range(2000)])
    server = await nursery.start(lambda task_status: serve(task_status, per_write=1))
    await deliver(nursery, port, server, Sender(connections=1, window=64, max_window=64))
    assert port.acked == dict.fromkeys(range(2000), 200)
    assert min(port.takes[:-1]) >= 16  # the last take is whatever was left



async def test_read_pauses_taken_meanwhile_end_with_the_first(autojump_clock):
    """The first reader to pause sleeps READ_PAUSE; the ones that pause meanwhile wake with it, and a leader
    cancelled (its connection ended) lets them read at once rather than wait for another leader."""
    pause = pipeline.READ_PAUSE
    pacer = pipeline.Pacer()
    woke: dict[str, float] = {}

    async def reader(name: str, delay: float, scope: trio.CancelScope | None = None) -> None:
        await trio.sleep(delay)
        with scope or trio.CancelScope():
            await pacer.pause()
            woke[name] = trio.current_time()

    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader, "first", 0.0)
        nursery.start_soon(reader, "second", pause / 4)
        nursery.start_soon(reader, "third", pause / 2)
    assert woke == dict.fromkeys(["first", "second", "third"], start + pause)

    woke.clear()
    start = trio.current_time()
    leader = trio.CancelScope()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(reader, "leader", 0.0, leader)
        nursery.start_soon(reader, "follower", pause / 4)
        await trio.sleep(pause / 2)
        leader.cancel()
    assert woke == {"follower": start + pause / 2}
    start = trio.current_time()
    await pacer.pause()  # nobody leads any more: the next pause is a whole one
    assert trio.current_time() == start + pause
