"""Trio adapter: one pipelined HTTP/1.1 connection of a node's sender, from connect to close.

:class:`Pipeline` runs on a connected non-blocking socket of its own (not a trio stream): every read and write is
tried first and waits (``wait_readable``/``wait_writable``) only when the kernel has nothing, so a busy
connection costs one trio round per read rather than three or four (trio's socket calls add a scheduling round
to each call that did not block, the stream a conflict check, and a second task woken per read added two more).

The reading task does the steady state alone: read what the edge sent, parse it, acknowledge the answers to
the engine, and refill the window with one write of everything the engine has for the room that opened (once
the room is worth a write: a quarter of the window). The writing task only starts the pipeline, takes work the
engine announces while the window has room, and finishes a write the socket could not take whole. A watchdog
ends the connection when requests are owed and nothing came back for ``sender.timeout``.
"""

from __future__ import annotations

import logging
import socket
from collections import deque
from typing import TYPE_CHECKING, Protocol

import trio

from ..core.http1 import ProtocolError, ResponseParser, encode_purges
from ..core.http1_fast import FastResponseParser

if TYPE_CHECKING:
    from ..config import Sender
    from ..core.window import WindowControl

log = logging.getLogger("purged.sender")

RECEIVE_SIZE = 1 << 18  # one read takes everything the edge sent so far: fewer wake-ups, reads end between answers
# After a read that emptied the socket with many answers still owed, let more arrive before the next one: an edge
# answers a pipeline a few responses per write, and each read is a trio round whatever it carries. 1 ms of
# latency on purges takes the reads from ~4 answers each to dozens (docs/benchmarks.md, issue 15).
READ_PAUSE = 0.001
PAUSE_OWED = 32  # answers owed for a pause to pay
READS_PER_YIELD = 8  # reads that found data at once, at most, before the reader lets other tasks run
_COMPACT = 4096  # answered ids kept at the head of the FIFO list before it is compacted


class Pacer:
    """The read pause of a node's connections (or of all nodes' connections: whoever shares one), taken together.

    The first reader to pause sleeps ``READ_PAUSE``; readers that pause meanwhile park until it wakes and then
    wake with it. A trio sleep ends through its cancel scope (the deadline, the Cancelled exception thrown into
    the task and caught by the scope: ~100 Python calls), which costs more than parking; one sleep per pause
    for all the connections instead of one each saves that, and their reads come back in one scheduler round.
    """

    __slots__ = ("_lot", "_leading")

    def __init__(self) -> None:
        self._lot = trio.lowlevel.ParkingLot()
        self._leading = False

    async def pause(self) -> None:
        if self._leading:
            await self._lot.park()
            return
        self._leading = True
        try:
            await trio.sleep(READ_PAUSE)
        finally:  # cancelled too (its connection ended): the others read now rather than wait for a next leader
            self._leading = False
            self._lot.unpark_all()


class SenderPort(Protocol):
    """What a sender needs of the engine (``purged.net.driver.Driver`` provides it)."""

    async def wait(self, name: str) -> None: ...
    async def wait_for_work(self, name: str) -> None: ...
    def take(self, name: str, limit: int) -> tuple[list[int], list[str]]: ...
    def ack(self, name: str, idents: list[int], statuses: list[int]) -> None: ...
    def fail(self, name: str, idents: list[int], kind: str) -> None: ...
    def requeue(self, name: str, idents: list[int]) -> None: ...
    def reconnect_delay(self, name: str) -> float: ...


class Owner(Protocol):
    """What a connection needs of its node's sender (:class:`purged.net.sender.NodeSender` is one)."""

    port: SenderPort
    name: str
    cfg: Sender
    control: WindowControl  # the node's adaptive window, shared by its connections
    pacer: Pacer  # the read pause, shared by its connections (and maybe other nodes')
    hand_parser: bool  # set when llhttp refused a stream it could not hand over: the hand parser from now on
    no_pipelining: bool  # set when the edge closes after each answer
    pipelining_fallbacks: int

    @property
    def window(self) -> int: ...


class Pipeline:
    def __init__(self, sender: Owner, sock: socket.socket):
        self.sender = sender
        self.sock = sock
        self.port, self.name = sender.port, sender.name
        # Ids written and not answered are fifo[head:], oldest first (a list and an index: the ids of one read's
        # answers are one slice, zipped with their statuses).
        self.fifo: list[int] = []
        self.head = 0
        self.batches: deque[list] = deque()  # [written at, requests of that write not answered yet], oldest first
        self.out = b""  # the end of a write the socket did not take (it was full); nothing is taken meanwhile
        self.sent_at = 0.0  # when the FIFO last went from empty to not
        self.last_data = trio.current_time()
        self.answered = 0
        self.result: str | None = "reset"
        self._nursery: trio.Nursery | None = None
        self._ended = False
        self._idle: trio.CancelScope | None = None  # the writer's wait for work, cancelled when a write blocks

    def unanswered(self) -> list[int]:
        return self.fifo[self.head :]

    async def run(self) -> str | None:
        """Until the connection ends: ``None`` for a graceful end (the edge closed after some answers, or while
        idle), else the failure type (``reset``, ``timeout``, ``protocol``, ``closed``)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._writer)
            nursery.start_soon(self._watchdog)
            await self._reader()
        return self.result

    def _end(self, kind: str | None) -> None:
        self.result = kind
        self._ended = True
        self._nursery.cancel_scope.cancel()  # type: ignore[union-attr]

    # -- writing ---------------------------------------------------------------------------------------------

    def _fill(self, now: float) -> bool:
        """Take what the engine has for the room in the window and write it; True if anything was taken."""
        if self.out or self._ended:
            return False  # the socket is full (the writer finishes that write first), or the connection ends
        sender = self.sender
        window = sender.window
        owed = len(self.fifo) - self.head
        room = window - owed
        if owed and room < (window >> 2 or 1):
            sender.control.full(now)  # the window, not the engine, holds the next ones back
            return False
        ids, targets = self.port.take(self.name, room)
        if not ids:
            return False
        if len(ids) == room:
            sender.control.full(now)
        if not owed:
            self.sent_at = now
        self.batches.append([now, len(ids)])
        self.fifo += ids
        data = encode_purges(targets)
        try:
            n = self.sock.send(data)
        except BlockingIOError:
            n = 0
        except OSError:
            self._end("reset")
            return True
        if n < len(data):
            self.out = data[n:]
            if self._idle is not None:
                self._idle.cancel()  # the writer waits for the socket instead
        return True

    async def _writer(self) -> None:
        sock, port, name = self.sock, self.port, self.name
        while True:
            if self.out:
                await trio.lowlevel.wait_writable(sock)
                try:
                    n = sock.send(self.out)
                except BlockingIOError:
                    continue
                except OSError:
                    return self._end("reset")
                self.out = self.out[n:]
                continue
            if self._fill(trio.current_time()):
                continue
            with trio.CancelScope() as self._idle:
                await port.wait(name)  # the engine wakes this node when it may have something
            self._idle = None

    # -- reading ---------------------------------------------------------------------------------------------

    def _answered_rtt(self, n: int, now: float) -> float:
        """How long the oldest of ``n`` answers was in flight; forgets their writes."""
        batches = self.batches
        rtt = now - batches[0][0]
        while n:
            batch = batches[0]
            if batch[1] > n:
                batch[1] -= n
                break
            n -= batch[1]
            batches.popleft()
        return rtt

    async def _reader(self) -> None:
        sender, sock, name = self.sender, self.sock, self.name
        parser = ResponseParser() if sender.hand_parser else FastResponseParser()
        recv, feed = sock.recv, parser.feed_statuses
        current_time, wait_readable, pause = trio.current_time, trio.lowlevel.wait_readable, sender.pacer.pause
        streak = 0  # reads since the last yield
        while True:
            try:
                data = recv(RECEIVE_SIZE)
            except BlockingIOError:
                streak = 0
                await wait_readable(sock)
                continue
            except OSError:
                return self._end("reset")
            now = current_time()
            self.last_data = now
            try:
                statuses = feed(data) if data else [r.status for r in parser.feed_eof()]
            except ProtocolError as exc:
                log.warning("%s: bad response (%s): %s", name, exc.reason, exc.detail)
                if getattr(parser, "needs_hand_parser", False):
                    sender.hand_parser = True
                return self._end("protocol")
            n = len(statuses)
            head = self.head
            owed = len(self.fifo) - head
            if data and not parser.closed and n <= owed:
                if n:
                    # The usual read: every answer keeps the connection open and matches a request sent.
                    self._acked(statuses, now)
                    self._fill(now)
                if owed - n >= PAUSE_OWED and len(data) < RECEIVE_SIZE // 2:
                    streak = 0
                    await pause()
                elif (streak := streak + 1) >= READS_PER_YIELD:
                    streak = 0
                    await trio.lowlevel.checkpoint()
                continue
            # EOF completes only a read-until-close answer, which ends the connection like one that says so.
            return self._unusual(statuses, owed, last_closes=parser.closed if data else bool(statuses), now=now)

    def _acked(self, statuses: list[int], now: float) -> None:
        """The oldest ``len(statuses)`` requests owed got these answers: tell the engine and the window."""
        n = len(statuses)
        fifo, head = self.fifo, self.head
        self.port.ack(self.name, fifo[head : head + n], statuses)
        head += n
        if head >= _COMPACT and head * 2 >= len(fifo):
            del fifo[:head]
            head = 0
        self.head = head
        self.answered += n
        self.sender.control.acked(n, self._answered_rtt(n, now), now)

    def _unusual(self, statuses: list[int], owed: int, *, last_closes: bool, now: float) -> None:
        """A read that ends the connection (EOF, an answer that closes) or brings more answers than requests."""
        sender, name = self.sender, self.name
        n = len(statuses)
        if n > owed:
            statuses = statuses[:owed]
            log.warning("%s: a response without a request", name)
        if statuses:
            self._acked(statuses, now)
        if n > owed:
            return self._end("protocol")
        left = owed - n
        if last_closes and self.answered == 1 and left and sender.window > 1:
            # The edge closes after one answer with more queued: it does not pipeline.
            sender.no_pipelining = True
            sender.pipelining_fallbacks += 1
            log.warning("%s: closes after each response; sending one at a time", name)
        return self._end(None if self.answered or not left else "closed")

    async def _watchdog(self) -> None:
        timeout = self.sender.cfg.timeout
        while True:
            await trio.sleep(min(timeout, 1.0))
            if len(self.fifo) > self.head and trio.current_time() - max(self.last_data, self.sent_at) >= timeout:
                return self._end("timeout")
