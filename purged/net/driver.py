"""Trio adapter: drives the sans-IO engine and admission with the clock, and turns engine events into wake-ups.

Every call that feeds the engine goes through a :class:`Driver` method, which then drains
:meth:`Engine.events` in one place (:meth:`Driver._dispatch`): the senders of the nodes named are woken, the
timer task re-reads the engine's next deadline, status waiters whose lane floor passed their batch are
released, and purges set aside are logged. Senders, the HTTP API and the multicast listeners hold a driver
(through the narrow protocols they declare), never the daemon.
"""

from __future__ import annotations

import heapq
import itertools
import logging
from typing import Any

import trio

from ..core.admission import Admission, Admitted, Refused
from ..core.auth import Token
from ..core.batches import BatchStatus
from ..core.engine import Engine
from ..core.status import batch_status

log = logging.getLogger("purged")

HEARTBEAT_INTERVAL = 1.0  # the timer task runs at least this often: the systemd watchdog checks it


class Driver:
    def __init__(self, engine: Engine, admission: Admission, *, max_waiters: int = 1000):
        self.engine = engine
        self.admission = admission
        self.journal: Any = None  # a net.journal.Journal once opened (error, kick(), commit())
        self.max_waiters = max_waiters
        self.heartbeat = trio.current_time()
        self._lots: dict[str, trio.lowlevel.ParkingLot] = {}  # node -> its parked sender tasks
        self._timer = trio.lowlevel.ParkingLot()
        self._progress = trio.lowlevel.ParkingLot()  # a lane floor moved (for the drain on SIGTERM)
        # Per lane: a heap of (hi, n) and the live waiters by n; a waiter is released when the floor reaches hi.
        self._heaps: list[list[tuple[int, int]]] = [[] for _ in engine.lanes]
        self._waiters: list[dict[int, trio.Event]] = [{} for _ in engine.lanes]
        self._counter = itertools.count()

    @property
    def waiting(self) -> int:
        return sum(len(w) for w in self._waiters)

    # -- the one place events are drained ----------------------------------------------------------------------

    def _dispatch(self) -> None:
        events = self.engine.events()
        if not events:
            return
        lots = self._lots
        for name in events.wake:
            lot = lots.get(name)
            if lot:
                lot.unpark_all()
        if events.timer:
            self._timer.unpark_all()
        if events.floors is not None:
            self._release(events.floors)
            self._progress.unpark_all()
        if events.set_aside and self.journal is not None:
            self.journal.checkpoint_soon()  # a restart must not bring the block back
        for item in events.set_aside:
            log.warning("%s: set aside %.200s after %d failures that followed it (counted as dropped, "
                        "reason poison)", item.node, item.target, item.failures)

    def _release(self, floors: tuple[int, ...]) -> None:
        for lane, floor in enumerate(floors):
            heap, waiters = self._heaps[lane], self._waiters[lane]
            while heap and heap[0][0] <= floor:
                event = waiters.pop(heapq.heappop(heap)[1], None)
                if event is not None:
                    event.set()

    # -- senders -----------------------------------------------------------------------------------------------

    async def wait(self, name: str) -> None:
        """Park until the engine names ``name`` in a wake-up (after ``take`` returned nothing)."""
        lot = self._lots.get(name)
        if lot is None:
            lot = self._lots[name] = trio.lowlevel.ParkingLot()
        await lot.park()

    async def wait_for_work(self, name: str) -> None:
        while not self.engine.has_work(name, trio.current_time()):
            await self.wait(name)

    def forget(self, name: str) -> None:
        """A node's sender stopped for good."""
        self._lots.pop(name, None)

    def take(self, name: str, limit: int) -> tuple[list[int], list[str]]:
        """The next purges for ``name``: their ids and their targets, two lists in the same order."""
        items = self.engine.take_ids(name, limit, trio.current_time())
        self._dispatch()
        return items

    def ack(self, name: str, idents: list[int], statuses: list[int]) -> None:
        """``statuses[i]`` answered ``idents[i]``: every response one read brought, in order."""
        self.engine.ack_ids(name, idents, statuses, trio.current_time())
        self._dispatch()

    def fail(self, name: str, idents: list[int], kind: str) -> None:
        self.engine.fail(name, idents, kind, trio.current_time())
        self._dispatch()

    def requeue(self, name: str, idents: list[int]) -> None:
        self.engine.requeue(name, idents, trio.current_time())
        self._dispatch()

    def reconnect_delay(self, name: str) -> float:
        return self.engine.reconnect_delay(name)

    # -- admission ---------------------------------------------------------------------------------------------

    def ingest(self, urls: list[Any], source: str, *, client: str | None = None, priority: str = "bulk",
               bare_host: bool = False, token: Token | None = None) -> Admitted:
        """Admit a batch now (multicast: never waits). Raises :class:`Refused` when nothing was accepted."""
        journal = self.journal
        error = journal.error.reason if journal is not None and journal.error is not None else None
        admitted = self.admission.admit(urls, source=source, now=trio.current_time(), client=client,
                                        priority=priority, journal_error=error, bare_host=bare_host,
                                        token=token)
        if admitted.receipt is not None:
            self._dispatch()
            if journal is not None:
                journal.kick()
        return admitted

    async def accept(self, urls: list[Any], source: str, *, client: str | None = None,
                     priority: str = "bulk", token: Token | None = None) -> Admitted:
        """:meth:`ingest`, then wait until the journal holds the batch as ``durability`` promises: the 2xx
        an HTTP client then gets is that promise. Raises :class:`~purged.net.journal.JournalError` (a 503)
        if this very write fails; the purges are in memory and will still be delivered, and a client retry
        is harmless."""
        admitted = self.ingest(urls, source, client=client, priority=priority, token=token)
        if admitted.receipt is not None and self.journal is not None:
            await self.journal.commit()
        return admitted

    # -- status ------------------------------------------------------------------------------------------------

    def batch_status(self, batch_id: str) -> BatchStatus | None:
        return batch_status(self.engine, batch_id)

    async def wait_batch(self, batch_id: str, timeout: float) -> BatchStatus | None:
        """The batch's status once it is done everywhere or ``timeout`` passed. Past ``max_waiters`` open
        waits the current status is answered at once: a long-poll costs memory, never CPU per response."""
        status = batch_status(self.engine, batch_id)
        batch = self.engine.batches.get(batch_id)
        if batch is None or status is None or status.done or timeout <= 0 or self.waiting >= self.max_waiters:
            return status
        lane, hi = batch.lane, batch.hi  # done everywhere once the lane's floor reaches hi
        n = next(self._counter)
        event = trio.Event()
        heap, waiters = self._heaps[lane], self._waiters[lane]
        waiters[n] = event
        heapq.heappush(heap, (hi, n))
        try:
            with trio.move_on_after(timeout):
                await event.wait()
        finally:
            if waiters.pop(n, None) is not None and len(heap) > 2 * len(waiters) + 64:
                heap[:] = [item for item in heap if item[1] in waiters]  # drop the timed-out entries
                heapq.heapify(heap)
        return batch_status(self.engine, batch_id)

    async def wait_progress(self, timeout: float) -> None:
        """Until some lane's floor moves (or ``timeout``): the drain on SIGTERM re-checks the backlog then."""
        with trio.move_on_after(timeout):
            await self._progress.park()

    # -- timers ------------------------------------------------------------------------------------------------

    async def run_timers(self, *, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        """Drive the engine's timers (retries and deferrals falling due, tier delays ending, rate limits
        refilling, maintenance). Wakes at least once a second: the heartbeat tells the watchdog it is alive."""
        task_status.started()
        engine = self.engine
        while True:
            now = trio.current_time()
            self.heartbeat = now
            when = engine.get_timer()
            deadline = now + HEARTBEAT_INTERVAL if when is None else min(when, now + HEARTBEAT_INTERVAL)
            with trio.move_on_at(deadline):
                await self._timer.park()
            engine.handle_timer(trio.current_time())
            self._dispatch()

    def alive(self) -> bool:
        """For the systemd watchdog: the timer task ran recently (a stuck event loop gets us restarted)."""
        return trio.current_time() - self.heartbeat < 5.0

    def poke(self) -> None:
        """Drain events after a change made outside these methods (a reload, a journal replay)."""
        self._dispatch()


__all__ = ["Driver", "Refused"]
