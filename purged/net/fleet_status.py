"""Trio adapter: the status half of a fleet member (``GET /v1/purge/{fleet id}``, ``GET /v1/fleet``, retiring a
daemon, the lag metrics), :class:`~purged.net.fleet.Fleet`'s base class.

A fleet id is done once every durable consumer's ack floor passed its last sequence. Every status request looks at
the consumers' positions through one shared :class:`View`, at most ``VIEW_MAX_AGE`` old, so that a crowd of
``?wait=`` clients costs the stream one request per look, not one each.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import trio

from ..core.errors import PurgedError
from ..core.fleet import (
    BadMessage,
    ConsumerPosition,
    daemon_progress,
    decode_message,
    fleet_progress,
    fleet_table,
    parse_fleet_id,
)
from ..core.status import batch_status
from .bus import BusUnavailable, NatsBus

if TYPE_CHECKING:
    from .driver import Driver

log = logging.getLogger("purged.fleet")

VIEW_MAX_AGE = 0.2  # status requests share one look at the consumers' positions this fresh
WAIT_POLL = 0.25  # a ?wait= on a fleet id looks again this often


@dataclass(frozen=True, slots=True)
class Known:
    """What this daemon knows about a fleet sequence: its local batch (if consumed) and the batch's size."""

    local_id: str | None
    accepted: int
    priority: str


@dataclass
class View:
    at: float
    last_seq: int
    consumers: list[ConsumerPosition]
    missing: int = 0  # consumers the stream counts but did not describe (not done, conservatively)


class FleetStatus:
    """Queries over the stream's consumers; :class:`~purged.net.fleet.Fleet` sets the attributes below."""

    driver: Driver
    bus: NatsBus
    name: str
    known: OrderedDict[int, Known]
    waiters: int
    _view: View | None
    _view_lock: trio.Lock

    # -- status ----------------------------------------------------------------------------------------------

    async def view(self, max_age: float = VIEW_MAX_AGE) -> View:
        """The stream head and every consumer's position, at most ``max_age`` seconds old (one request shared
        by every status waiting at the same time)."""
        async with self._view_lock:
            now = trio.current_time()
            if self._view is None or now - self._view.at > max_age:
                last_seq, consumers, missing = await self.bus.positions()
                self._view = View(trio.current_time(), last_seq, consumers, missing)
            return self._view

    async def status(self, fleet_id: str, wait: float) -> dict:
        """``GET /v1/purge/{fleet id}``: done on every daemon? Waits up to ``wait`` seconds for it."""
        first, last = parse_fleet_id(fleet_id)
        view = await self._checked_view()
        if last > view.last_seq:  # published since that look (by us a moment ago, or by another daemon)
            view = await self._checked_view(0.0)
        if last > view.last_seq:
            raise PurgedError(f"no batch {fleet_id!r}: the stream ends at {view.last_seq}",
                              reason="unknown_batch", status=404)
        done, _ = fleet_progress(last, view.last_seq, view.consumers, view.missing)
        if not done and wait > 0 and self.waiters < self.driver.max_waiters:
            self.waiters += 1
            try:
                with trio.move_on_after(wait):
                    while not done:
                        await trio.sleep(WAIT_POLL)
                        try:
                            view = await self.view()
                        except BusUnavailable:  # a stream server failing over: ask again, keep the last view
                            continue
                        done, _ = fleet_progress(last, view.last_seq, view.consumers, view.missing)
            finally:
                self.waiters -= 1
        return await self._status_json(fleet_id, first, last, view)

    async def _checked_view(self, max_age: float = VIEW_MAX_AGE) -> View:
        try:
            return await self.view(max_age)
        except BusUnavailable as exc:
            raise PurgedError(exc.detail, reason="bus_unavailable", status=503) from None

    async def _status_json(self, fleet_id: str, first: int, last: int, view: View) -> dict:
        done, daemons = fleet_progress(last, view.last_seq, view.consumers, view.missing)
        out_daemons = {name: asdict(p) for name, p in daemons.items()}
        local = self._local_detail(first, last)
        if self.name in out_daemons and local is not None:
            out_daemons[self.name]["datacenters"] = local
        known = self.known.get(last)
        accepted, priority = (known.accepted, known.priority) if known is not None else await self._lookup(first)
        out = {"id": fleet_id, "done": done, "accepted": accepted, "priority": priority,
               "datacenters": local or {}, "daemons": out_daemons}
        if view.missing:
            out["missing_daemons"] = view.missing
        return out

    async def _lookup(self, seq: int) -> tuple[int | None, str | None]:
        data = await self.bus.get_message(seq)
        if data is None:
            return None, None
        try:
            msg = decode_message(data)
        except BadMessage:
            return None, None
        return msg.total, msg.priority

    def _local_detail(self, first: int, last: int) -> dict | None:
        """Per data centre and tier, how many local nodes are done with the parts this daemon consumed."""
        if last - first > 1000:
            return None
        merged: dict[str, dict[str, dict]] | None = None
        engine = self.driver.engine
        for seq in range(first, last + 1):
            known = self.known.get(seq)
            if known is None or known.local_id is None:
                continue
            st = batch_status(engine, known.local_id)
            if st is None:
                continue
            detail = {dc: {t: asdict(p) for t, p in tiers.items()} for dc, tiers in st.datacenters.items()}
            if merged is None:
                merged = detail
            else:
                for dc, tiers in detail.items():
                    for t, p in tiers.items():
                        old = merged.setdefault(dc, {}).setdefault(t, p)
                        old["done"] = min(old["done"], p["done"])
        return merged

    async def fleet_json(self) -> dict:
        """``GET /v1/fleet``: every daemon (durable consumer) with its lag and last activity."""
        view = await self._checked_view()
        return {"stream": self.bus.settings.stream, "last_seq": view.last_seq, "self": self.name,
                "bus": self.bus.state, "missing_daemons": view.missing,
                "daemons": fleet_table(view.last_seq, view.consumers)}

    async def retire(self, daemon: str) -> dict:
        """``DELETE /v1/fleet/{daemon}``: delete a daemon's consumer (gone for good); 404 if unknown, 409 for
        this very daemon (stop it first, then retire it from another)."""
        if daemon == self.name:
            raise PurgedError(f"{daemon!r} is this daemon: stop it, then retire it through another daemon",
                              reason="retire_self", status=409)
        self._view = None
        view = await self._checked_view()
        match = [p for p in view.consumers if p.daemon == daemon]
        if not match:
            raise PurgedError(f"no daemon {daemon!r} in stream {self.bus.settings.stream}", reason="unknown_daemon",
                              status=404)
        try:
            await self.bus.delete_consumer(match[0].consumer)
        except Exception as exc:
            raise PurgedError(f"could not delete consumer {match[0].consumer}: {exc!r}", reason="bus_unavailable",
                              status=503) from None
        self._view = None
        log.warning("fleet: retired daemon %r (consumer %s deleted)", daemon, match[0].consumer)
        return {"retired": daemon, "consumer": match[0].consumer}

    def lags(self) -> dict[str, int]:
        """Each daemon's lag from the last view (for the metrics; refreshed every few seconds)."""
        view = self._view
        if view is None:
            return {}
        return {pos.daemon: daemon_progress(view.last_seq, view.last_seq, pos).lag for pos in view.consumers}
