"""Trio adapter: the per-node PURGE sender, HTTP/1.1 pipelined over a few persistent connections.

One :class:`NodeSender` per edge node, so a slow or dead node only ever blocks its own tasks (guarantee 4).
Each connection keeps up to ``window`` PURGEs in flight, written in batches; responses come back in order and
are matched to a FIFO of log seqs. When a connection dies mid-pipeline the unanswered seqs go back to the
engine (resent on a new connection: a repeated PURGE is harmless); answered ones are never resent.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import TYPE_CHECKING, Protocol

import trio

from ..core.http1 import ProtocolError, ResponseParser, encode_purges
from ..core.http1_fast import FastResponseParser
from ..core.window import WindowControl

if TYPE_CHECKING:
    from ..config import Address, Sender

log = logging.getLogger("purged.sender")

RECEIVE_SIZE = 1 << 18  # one read takes everything the edge sent so far: fewer wake-ups, reads end between answers
# After a read that emptied the socket with many answers still owed, let more arrive before the next one: an edge
# answers a pipeline a few responses per write, and each read is a trio round (~10 us) whatever it carries. 1 ms
# of latency on purges takes the reads from ~4 answers each to dozens (docs/benchmarks.md, issue 15).
READ_PAUSE = 0.001
PAUSE_OWED = 32  # answers owed for a pause to pay


class SenderPort(Protocol):
    """What a sender needs of the engine (``purged.net.driver.Driver`` provides it)."""

    async def wait(self, name: str) -> None: ...
    async def wait_for_work(self, name: str) -> None: ...
    def take(self, name: str, limit: int) -> list[tuple[int, str]]: ...
    def ack(self, name: str, answers: list[tuple[int, int]]) -> None: ...
    def fail(self, name: str, idents: list[int], kind: str) -> None: ...
    def requeue(self, name: str, idents: list[int]) -> None: ...
    def reconnect_delay(self, name: str) -> float: ...


class NodeSender:
    def __init__(self, port: SenderPort, address: Address, cfg: Sender):
        self.port = port
        self.name = str(address)
        self.address = address
        self.cfg = cfg
        self.control = self._control(cfg)
        self.no_pipelining = False  # the edge closes after each answer: one PURGE at a time, for good
        self.pipelining_fallbacks = 0
        self.connects = 0
        self.hand_parser = False  # llhttp refused a stream it could not hand over: the hand parser from now on

    @staticmethod
    def _control(cfg: Sender) -> WindowControl:
        # sender.window per connection is the start (and floor), sender.max_window per connection the cap.
        n = cfg.connections
        return WindowControl(cfg.window * n, cfg.max_window * n, now=trio.current_time())

    @property
    def window(self) -> int:
        """PURGEs in flight allowed per connection now (the node's adaptive window split over them)."""
        return 1 if self.no_pipelining else max(1, self.control.limit // self.cfg.connections)

    @property
    def node_window(self) -> int:
        return self.window * self.cfg.connections

    def reconfigure(self, cfg: Sender) -> None:
        """A reload: the window adapts again from the new start (a pipelining fallback stays)."""
        if (cfg.window, cfg.max_window, cfg.connections) != (self.cfg.window, self.cfg.max_window,
                                                            self.cfg.connections):
            self.control = self._control(cfg)
        self.cfg = cfg

    async def run(self, *, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            for _ in range(self.cfg.connections):
                nursery.start_soon(self._connection_loop)
            task_status.started()

    async def _connection_loop(self) -> None:
        port, name = self.port, self.name
        while True:
            await port.wait_for_work(name)
            try:
                with trio.fail_after(self.cfg.connect_timeout):
                    stream = await trio.open_tcp_stream(self.address.host, self.address.port)
            except (OSError, trio.TooSlowError) as exc:
                port.fail(name, [], "connect")
                log.debug("%s: connect failed: %s", name, exc)
                await trio.sleep(port.reconnect_delay(name))
                continue
            self.connects += 1
            fifo: deque[int] = deque()
            try:
                async with stream:
                    kind = await self._pipeline(stream, fifo)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                kind = "reset"
            if kind is None:
                port.requeue(name, list(fifo))
            else:
                self.control.failed(trio.current_time())
                port.fail(name, list(fifo), kind)
                log.info("%s: connection %s with %d unanswered; they will be resent", name, kind, len(fifo))
                await trio.sleep(port.reconnect_delay(name))

    async def _pipeline(self, stream: trio.SocketStream, fifo: deque[int]) -> str | None:
        """Run one connection until it ends. Returns ``None`` for a graceful end (the edge closed after some
        answers, or while idle) or the failure type (``reset``, ``timeout``, ``protocol``, ``closed``)."""
        port, name = self.port, self.name
        space = trio.Event()
        sent_at = 0.0
        control = self.control
        batches: deque[list] = deque()  # [sent at, requests of that write not answered yet], oldest first
        result: list[str | None] = ["reset"]

        def end(kind: str | None) -> None:
            result[0] = kind
            nursery.cancel_scope.cancel()

        async def writer() -> None:
            nonlocal space, sent_at
            while True:
                room = self.window - len(fifo)
                if room <= 0:
                    control.full(trio.current_time())  # the window, not the engine, holds the next ones back
                    await space.wait()
                    space = trio.Event()
                    continue
                items = port.take(name, room)
                if not items:
                    await port.wait(name)  # the engine wakes this node when it may have something
                    continue
                now = trio.current_time()
                if not fifo:
                    sent_at = now
                batches.append([now, len(items)])
                fifo.extend([seq for seq, _ in items])
                data = encode_purges([target for _, target in items])
                try:
                    await stream.send_all(data)
                except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                    return end("reset")

        def answered_rtt(n: int, now: float) -> float:
            """How long the oldest of ``n`` answers was in flight; forgets their writes."""
            rtt = now - batches[0][0]
            while n:
                batch = batches[0]
                if batch[1] > n:
                    batch[1] -= n
                    break
                n -= batch[1]
                batches.popleft()
            return rtt

        async def reader() -> None:
            parser = ResponseParser() if self.hand_parser else FastResponseParser()
            answered = 0
            timeout = self.cfg.timeout
            last_data = trio.current_time()
            while True:
                data = None
                with trio.move_on_after(min(timeout, 1.0)):
                    try:
                        data = await stream.receive_some(RECEIVE_SIZE)
                    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                        return end("reset")
                now = trio.current_time()
                if data is None:
                    if fifo and now - max(last_data, sent_at) >= timeout:
                        return end("timeout")
                    continue
                last_data = now
                try:
                    responses = parser.feed(data) if data else parser.feed_eof()
                except ProtocolError as exc:
                    log.warning("%s: bad response (%s): %s", name, exc.reason, exc.detail)
                    if getattr(parser, "needs_hand_parser", False):
                        self.hand_parser = True
                    return end("protocol")
                closing = not data
                n = len(responses)
                if n and n <= len(fifo) and responses[-1].keep_alive and not closing:
                    # The usual read: every answer keeps the connection open and matches a request sent.
                    popleft = fifo.popleft
                    port.ack(name, [(popleft(), resp.status) for resp in responses])
                    answered += n
                    control.acked(n, answered_rtt(n, now), now)
                    space.set()
                    if len(fifo) >= PAUSE_OWED and len(data) < RECEIVE_SIZE // 2:
                        await trio.sleep(READ_PAUSE)
                    continue
                answers = []
                for resp in responses:
                    if not fifo:
                        port.ack(name, answers)
                        log.warning("%s: a response without a request", name)
                        return end("protocol")
                    answers.append((fifo.popleft(), resp.status))
                    answered += 1
                    if not resp.keep_alive:
                        if answered == 1 and fifo and self.window > 1:
                            # The edge closes after one answer with more queued: it does not pipeline.
                            self.no_pipelining = True
                            self.pipelining_fallbacks += 1
                            log.warning("%s: closes after each response; sending one at a time", name)
                        closing = True
                        break
                if answers:
                    port.ack(name, answers)
                    control.acked(len(answers), answered_rtt(len(answers), now), now)
                    space.set()
                if closing:
                    return end(None if answered or not fifo else "closed")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer)
            nursery.start_soon(reader)
        return result[0]
