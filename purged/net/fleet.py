"""Trio adapter: this daemon as a member of a fleet on a replicated stream (docs/fleet.md).

Three duties, over the :class:`~purged.net.bus.NatsBus` and the local :class:`~purged.net.driver.Driver`:

- **Publish** (the API's purges port in fleet mode): a batch goes through the one admission path
  (:meth:`Admission.screen`: URLs, limits, tokens), is published to the stream, and the API answers 2xx only
  once JetStream stored it; its id is the stream sequence (``s1234``, or ``s1234-1236`` when split). It is
  not submitted locally: this daemon gets it back through its own consumer like every other daemon.
- **Consume**: pull this daemon's durable consumer, submit each batch to the local engine (waiting, never
  dropping, while the local log is full), and ack a message only once its batch is done on every local node:
  the consumer's ack floor is then this daemon's delivered position. Held messages get ``in_progress``
  heartbeats so that ``ack_wait`` does not expire while nodes are slow.
- **Status** (:mod:`purged.net.fleet_status`, the base class): a fleet id is done once every durable consumer's
  ack floor passed its last sequence; ``GET /v1/fleet`` lists the daemons with their lag.
"""

from __future__ import annotations

import heapq
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

from ..core.admission import Admitted, Refused
from ..core.auth import Token
from ..core.engine import Receipt, SourceStats
from ..core.fleet import (
    BadMessage,
    decode_message,
    encode_batch,
    format_fleet_id,
)
from .bus import BusUnavailable, NatsBus
from .fleet_status import FleetStatus, Known, View

if TYPE_CHECKING:
    from .driver import Driver

log = logging.getLogger("purged.fleet")

BUS_RETRY_AFTER = 2.0  # seconds a client is told to wait when the bus cannot take its batch
MONITOR_INTERVAL = 5.0  # the consumer lag metrics are this old at most
RECENT = 100_000  # fleet sequences whose local batch id (and accepted/priority) this daemon remembers
BAD_LOG_INTERVAL = 10.0


@dataclass
class Held:
    """A message whose batch is in the local engine and not yet done on every local node."""

    msg: Any
    seq: int
    lane: int
    hi: int


class Fleet(FleetStatus):
    def __init__(self, driver: Driver, bus: NatsBus, *, name: str):
        self.driver = driver
        self.bus = bus
        self.name = name
        self.held: dict[int, Held] = {}  # stream seq -> held message
        self._heaps: list[list[tuple[int, int]]] = [[] for _ in driver.engine.lanes]  # per lane (hi, seq)
        self._fetched: list[Any] = []  # fetched, not yet submitted (waiting for local capacity): heartbeaten too
        self.known: OrderedDict[int, Known] = OrderedDict()
        self._acked: OrderedDict[int, None] = OrderedDict()  # recently settled seqs: a redelivery is acked again
        self._view: View | None = None
        self._view_lock = trio.Lock()
        self.waiters = 0
        self.local_rejected = 0
        self._bad_logged = 0.0
        bus.before_close.append(self._release_held)

    # -- publish ---------------------------------------------------------------------------------------------

    async def accept(self, urls: list[Any], source: str, *, client: str | None = None,
                     priority: str = "bulk", token: Token | None = None) -> Admitted:
        driver = self.driver
        checked = driver.admission.screen(urls, source=source, now=trio.current_time(), client=client,
                                          priority=priority, token=token)
        targets = checked.targets
        if not targets:
            return Admitted(None, checked.rejected)
        try:
            try:
                payloads = encode_batch(targets, priority=priority, origin=self.name, accepted_at=time.time(),
                                        max_payload=self.bus.max_payload)
            except ValueError as exc:  # a URL longer than the server's max_payload: the server's config
                raise self.bus.fail("too_large", str(exc)) from None
            seqs = await self.bus.publish(payloads, len(targets))
        except BusUnavailable as exc:
            driver.engine.reject(source, "bus_unavailable", len(targets))
            raise Refused(exc.detail, reason="bus_unavailable", status=503, retry_after=BUS_RETRY_AFTER) from None
        # Counted by source like a local submit (purged_purges_accepted_total{source="http"}); the local engine
        # counts the same purges again under source "bus" when this daemon consumes them.
        stats = driver.engine.sources.setdefault(source, SourceStats())
        stats.received += len(targets)
        stats.accepted += len(targets)
        if seqs[-1] not in self.known:  # our own consumer may have had it already (it knows the local batch)
            self._remember(seqs[-1], Known(None, len(targets), priority))
        return Admitted(Receipt(format_fleet_id(seqs[0], seqs[-1]), len(targets), 0), checked.rejected)

    def _remember(self, seq: int, known: Known) -> None:
        self.known[seq] = known
        self.known.move_to_end(seq)
        while len(self.known) > RECENT:
            self.known.popitem(last=False)

    # -- consume ---------------------------------------------------------------------------------------------

    async def serve_intake(self, *, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        """Pull this daemon's consumer and submit each batch locally; stops on SIGTERM (an intake)."""
        task_status.started()
        await self.bus.ready.wait()
        batch = self.bus.settings.fetch_batch
        while True:
            # Never more held than the consumer may have unacked: past it the server sends nothing anyway.
            if len(self.held) >= self.bus.settings.max_ack_pending:
                await self.driver.wait_progress(1.0)
                continue
            self._fetched = await self.bus.fetch(batch)
            while self._fetched:
                await self._deliver(self._fetched[0])
                self._fetched.pop(0)

    async def serve_acks(self, *, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        """Ack held messages as their batches finish on every local node; heartbeat the rest."""
        task_status.started()
        beat_every = self.bus.settings.ack_wait / 3
        next_beat = trio.current_time() + beat_every
        while True:
            await self.driver.wait_progress(min(1.0, beat_every))
            self._ack_done()
            now = trio.current_time()
            if now >= next_beat:
                next_beat = now + beat_every
                for held in self.held.values():
                    self.bus.in_progress(held.msg)
                for msg in self._fetched:
                    self.bus.in_progress(msg)

    async def serve_monitor(self, *, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        """Refresh the fleet view every few seconds (the lag metrics read it)."""
        task_status.started()
        await self.bus.ready.wait()
        while True:
            try:
                await self.view(MONITOR_INTERVAL / 2)
            except BusUnavailable:
                pass
            await trio.sleep(MONITOR_INTERVAL)

    def _ack_done(self) -> None:
        lanes = self.driver.engine.lanes
        for li, heap in enumerate(self._heaps):
            if not heap:
                continue
            floor = lanes[li].floor()
            while heap and heap[0][0] <= floor:
                _, seq = heapq.heappop(heap)
                held = self.held.pop(seq, None)
                if held is not None:
                    self._ack(held.msg, seq)

    def _ack(self, msg: Any, seq: int) -> None:
        self.bus.ack(msg)
        self._settled(seq)

    def _settled(self, seq: int) -> None:
        """``seq`` is finished here (acked, or terminated as unreadable): a redelivery of it, after an ack or a
        term lost in a failover, is only acked again, neither resent nor counted twice."""
        self._acked[seq] = None
        if len(self._acked) > 10_000:
            self._acked.popitem(last=False)

    async def _deliver(self, msg: Any) -> None:
        bus, stats = self.bus, self.bus.stats
        try:
            meta = msg.metadata
            seq, delivered = meta.sequence.stream, meta.num_delivered
        except Exception:  # not a JetStream message: nothing to ack
            self._bad("no_metadata", None)
            return
        stats.consumed_messages += 1
        if delivered > 1:
            stats.redelivered += 1
        held = self.held.get(seq)
        if held is not None:  # redelivered while still held (a heartbeat came late): ack this delivery later
            held.msg = msg
            return
        if seq in self._acked:  # our ack was lost: ack again, do not resend
            self._ack(msg, seq)
            return
        try:
            batch = decode_message(msg.data)
        except BadMessage as exc:
            self._bad(exc.reason, seq)
            bus.term(msg)
            self._settled(seq)
            return
        stats.consumed_urls += len(batch.urls)
        receipts = await self._submit(batch.urls, batch.priority)
        if not receipts:  # no URL valid here: nothing owed
            self.local_rejected += 1
            self._remember(seq, Known(None, batch.total, batch.priority))
            self._ack(msg, seq)
            return
        engine = self.driver.engine
        hi, lane = 0, 1
        for receipt in receipts:
            b = engine.batches.get(receipt.batch_id)
            if b is not None:
                lane, hi = b.lane, max(hi, b.hi)
        self._remember(seq, Known(receipts[-1].batch_id, batch.total, batch.priority))
        self.held[seq] = Held(msg, seq, lane, hi)
        heapq.heappush(self._heaps[lane], (hi, seq))
        self._ack_done()

    async def _submit(self, urls: list[str], priority: str) -> list[Receipt]:
        """Submit to the local engine, waiting while it is full (local ``max_pending``, a journal that cannot
        write). A batch larger than the whole local ceiling goes in halves once the log is empty."""
        driver = self.driver
        while True:
            try:
                admitted = driver.ingest(urls, "bus", priority=priority)
            except Refused as exc:
                if exc.reason == "overload" and driver.engine.unique_pending() == 0 and len(urls) > 1:
                    half = len(urls) // 2
                    return await self._submit(urls[:half], priority) + await self._submit(urls[half:], priority)
                await driver.wait_progress(min(1.0, exc.retry_after or 1.0))
                continue
            return [] if admitted.receipt is None else [admitted.receipt]

    def _bad(self, reason: str, seq: int | None) -> None:
        bad = self.bus.stats.bad_messages
        bad[reason] = bad.get(reason, 0) + 1
        now = time.monotonic()
        if now - self._bad_logged >= BAD_LOG_INTERVAL:
            self._bad_logged = now
            log.warning("bus: message %s is unreadable (%s); terminated, counted in "
                        "purged_bus_bad_messages_total", seq, reason)

    def _release_held(self) -> None:
        """Stopping: ack what is done (the drain may have just finished it), give back the rest so that the
        next run gets it at once (not after ack_wait)."""
        self._ack_done()
        for held in self.held.values():
            self.bus.nak(held.msg)
        for msg in self._fetched:
            self.bus.nak(msg)
        self.held.clear()
        self._fetched = []

    def health(self) -> dict:
        """``/healthz``'s ``bus`` entry."""
        return {"state": self.bus.state if self.bus.ready.is_set() or self.bus.state != "connected" else "setup",
                "stream": self.bus.settings.stream, "consumer": self.bus.consumer, "held": len(self.held)}
