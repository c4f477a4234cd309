"""Core layer: the engine, a sans-IO state machine over the lanes (purge logs), nodes and their policies.

The I/O layer feeds it and performs what it answers (like h11 / aioquic): ``submit(targets, now)`` at ingest
(after :mod:`purged.core.admission` said yes); ``take_ids(node, n, now)`` for the next purges to send to a
node; ``ack_ids``/``fail``/``requeue`` with what happened (the answers' side is the base classes,
:mod:`purged.core.acks` and :mod:`purged.core.failures`); ``get_timer()``/``handle_timer(now)`` for retries, deferrals,
rate limits and tier delays. After feeding it, the I/O layer drains :meth:`Engine.events` (which nodes to wake,
whether the timer moved, which lanes progressed) in one place. Queries (``has_work``, ``backlog``, and the
read-only views in :mod:`purged.core.status`) change nothing. No clock, no sockets, no logging here.

A purge handed to a sender is named by an id ``seq << 1 | lane``: one integer, whichever lane it is in.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Iterator
from dataclasses import dataclass, field

from .acks import Acks
from .batches import Batches
from .events import Events, Outbox
from .histogram import LATENCY_BUCKETS, Histogram
from .lane import Lane
from .limits import TokenBucket
from .log import Entry
from .node import Node, NodeStats, Policy, classify
from .topology import Topology

__all__ = [
    "BULK", "HIGH", "LANES", "LATENCY_BUCKETS", "Engine", "Events", "Node", "NodeStats", "Policy", "Receipt",
    "classify",
]

LANES = ("high", "bulk")  # drained in this order
HIGH, BULK = 0, 1
MAINTENANCE_INTERVAL = 1.0  # seconds between max_lag checks


@dataclass(frozen=True, slots=True)
class Receipt:
    batch_id: str
    accepted: int
    coalesced: int


@dataclass
class SourceStats:
    received: int = 0
    accepted: int = 0
    coalesced: int = 0
    rejected: dict[str, int] = field(default_factory=dict)


class Engine(Acks):
    def __init__(
        self,
        topology: Topology,
        *,
        now: float,
        policy: Policy | None = None,
        rates: dict[str, tuple[float, float]] | None = None,
        batch_prefix: str = "",
        rng: random.Random | None = None,
    ):
        self.topology = topology
        self.policy = policy = policy or Policy()
        self._rng = rng or random.Random()
        self._out = Outbox()
        self.lanes = [Lane(topology, self._out, policy.linger) for _ in LANES]
        self._floors = tuple(lane.floor() for lane in self.lanes)
        rates = rates or {}
        self.nodes: dict[str, Node] = {}
        for di, dc in enumerate(topology.datacenters):
            for ti, tier in enumerate(dc.tiers):
                for name in tier.nodes:
                    rate, burst = rates.get(name, (0.0, 0.0))
                    self.nodes[name] = Node(name, di, ti, TokenBucket(rate, burst or rate, now), policy.dedup_window)
        self._throttled: dict[str, float] = {}  # node -> when its bucket has a token again
        self.batches = Batches(batch_prefix, policy.recent_batches)
        self.sources: dict[str, SourceStats] = {}
        self.latency: dict[tuple[str, str], Histogram] = {}  # (dc, tier) -> accept-to-ack seconds
        self._acks_since_trim = 0
        self._next_maintenance = now + MAINTENANCE_INTERVAL if policy.max_lag else None
        self._appended: list[list[tuple[int, str, float]]] | None = None  # new entries, for the journal

    # -- events -----------------------------------------------------------------------------------------------

    def events(self) -> Events:
        """What the I/O layer must do since the last call: drain after every call that fed the engine."""
        out = self._out
        floors = None
        if out.progress:
            out.progress = False
            now_floors = tuple(lane.floor() for lane in self.lanes)
            if now_floors != self._floors:
                self._floors = floors = now_floors
        if not (out.wake or out.timer or floors is not None or out.set_aside):
            return _NO_EVENTS
        events = Events(frozenset(out.wake), out.timer, floors, tuple(out.set_aside))
        out.wake.clear()
        out.timer = False
        out.set_aside.clear()
        return events

    def _wake_all(self) -> None:
        self._out.wake.update(self.nodes)
        self._out.timer = True
        self._out.progress = True

    # -- ingest -----------------------------------------------------------------------------------------------

    def _source(self, source: str) -> SourceStats:
        stats = self.sources.get(source)
        if stats is None:
            stats = self.sources[source] = SourceStats()
        return stats

    def reject(self, source: str, reason: str, count: int = 1) -> None:
        """Count purges refused before they reached the log (bad URL, bad datagram, overload...)."""
        stats = self._source(source)
        stats.received += count
        stats.rejected[reason] = stats.rejected.get(reason, 0) + count

    def unique_pending(self) -> int:
        return sum(len(lane.log.index) for lane in self.lanes)

    def submit(self, targets: list[str], now: float, source: str = "http", priority: str = "bulk") -> Receipt:
        """Accept validated purge targets (``host + path``) as one batch. Admission decided it may."""
        li = HIGH if priority == "high" else BULK
        lane = self.lanes[li]
        journal = self._appended[li] if self._appended is not None else None
        hi, coalesced = lane.extend(targets, now, self.topology.routing, journal)
        stats = self._source(source)
        stats.received += len(targets)
        stats.accepted += len(targets)
        stats.coalesced += coalesced
        batch_id = self.batches.add(li, hi + 1, len(targets), now)
        if self.policy.linger > 0:
            self._out.timer = True  # the new purges become readable when their linger ends
        else:
            self._out.wake.update(lane.first_tier_nodes())
        return Receipt(batch_id, len(targets), coalesced)

    # -- sending ----------------------------------------------------------------------------------------------

    def has_work(self, name: str, now: float) -> bool:
        """Whether ``name`` has purges to send now, rate limit aside (``take`` applies it)."""
        node = self.nodes[name]
        if node.down and node.inflight:
            return False  # one probe at a time
        if node.retries and node.retries[0][0] <= now:
            return True
        return any(lane.cursors[name].cursor < lane.read_limit(name, now) for lane in self.lanes)

    def _throttle(self, node: Node) -> None:
        if node.name not in self._throttled:
            node.stats.rate_limited += 1
            self._throttled[node.name] = node.bucket.when_available(1)
            self._out.timer = True

    def take(self, name: str, limit: int, now: float) -> list[tuple[int, str]]:
        """The next purges ``(id, target)`` for node ``name``: :meth:`take_ids` as pairs."""
        ids, targets = self.take_ids(name, limit, now)
        return list(zip(ids, targets, strict=True))

    def take_ids(self, name: str, limit: int, now: float) -> tuple[list[int], list[str]]:
        """The next purges for node ``name``, their ids and their targets (two lists, in the same order): due
        retries and deferrals first, then new entries, high lane before bulk. A node marked down gets one purge
        at a time (a probe) until it answers. When this returns nothing, the node is woken (see :meth:`events`)
        once it may have something."""
        node = self.nodes[name]
        ids: list[int] = []
        targets: list[str] = []
        if node.down:
            if node.inflight:
                return ids, targets
            limit = 1
        limit = min(limit, node.bucket.available(now))
        if limit <= 0:
            self._throttle(node)
            return ids, targets
        dedup = node.dedup
        if node.retries and node.retries[0][0] <= now:
            retried = 0
            while node.retries and node.retries[0][0] <= now and len(ids) < limit:
                ident = heapq.heappop(node.retries)[1]
                target = self.lanes[ident & 1].log.get(ident >> 1).target
                if node.deferred.get(target) == ident:
                    del node.deferred[target]
                if dedup is not None:
                    until = dedup.blocked_until(target, now)
                    if until is not None:  # sent again since this was deferred
                        heapq.heappush(node.retries, (until, ident))
                        node.deferred[target] = ident
                        self._out.timer = True
                        continue
                    dedup.sent(target, now)
                node.inflight.add(ident)
                ids.append(ident)
                targets.append(target)
                retried += 1
            node.stats.retries += retried
        max_age = self.policy.max_age
        for li, lane in enumerate(self.lanes):
            if len(ids) >= limit:
                break
            lane.read(node, li, limit, now, ids, targets, max_age)
        node.bucket.consume(len(ids), now)
        node.stats.sent += len(ids)
        return ids, targets

    # -- timers -----------------------------------------------------------------------------------------------

    def get_timer(self) -> float | None:
        """When :meth:`handle_timer` next has something to do."""
        times = [t for lane in self.lanes if (t := lane.get_timer()) is not None]
        times.extend(node.retries[0][0] for node in self.nodes.values() if node.retries)
        times.extend(self._throttled.values())
        if self._next_maintenance is not None:
            times.append(self._next_maintenance)
        return min(times) if times else None

    def handle_timer(self, now: float) -> None:
        for lane in self.lanes:
            lane.handle_timer(now)
        wake = self._out.wake
        for name, when in list(self._throttled.items()):
            if when <= now:
                del self._throttled[name]
                wake.add(name)
        for name, node in self.nodes.items():
            if node.retries and node.retries[0][0] <= now:
                wake.add(name)
        if self._next_maintenance is not None and now >= self._next_maintenance:
            self._next_maintenance = now + MAINTENANCE_INTERVAL
            self.enforce_max_lag(now)

    def enforce_max_lag(self, now: float) -> list[str]:
        """Declare out of sync every node owing more than ``max_lag`` purges: its backlog is dropped (counted)
        so that it stops pinning the log in memory. Returns the nodes affected."""
        limit = self.policy.max_lag
        affected = []
        for name, node in self.nodes.items():
            if limit and self.backlog(name) > limit:
                dropped = 0
                for lane in self.lanes:
                    dropped += lane.skip_node(name)
                    lane.moved(name, now)
                node.inflight.clear()  # answers still on the wire will be ignored as stale
                node.retries.clear()
                node.deferred.clear()
                node.suspects.clear()
                node.out_of_sync = True
                node.stats.resyncs += 1
                node.stats.dropped["max_lag"] = node.stats.dropped.get("max_lag", 0) + dropped
                self._out.progress = True
                affected.append(name)
            elif node.out_of_sync and self.backlog(name) == 0:
                node.out_of_sync = False
        return affected

    # -- reload (see core/reload.py) ----------------------------------------------------------------------------

    def remove_node(self, name: str) -> int:
        """Forget node ``name`` (its sender is stopped); return the purges of its backlog dropped with it."""
        backlog = self.backlog(name)
        del self.nodes[name]
        self._throttled.pop(name, None)
        for lane in self.lanes:
            lane.remove_node(name)
        self._out.progress = True
        return backlog

    def set_policy(self, policy: Policy, now: float) -> None:
        """Run with ``policy`` from now on; every sender is woken (gates, rates and nodes may have changed)."""
        self.policy = policy
        self.batches.keep = policy.recent_batches
        if not policy.max_lag:
            self._next_maintenance = None
        elif self._next_maintenance is None:
            self._next_maintenance = now + MAINTENANCE_INTERVAL
        for lane in self.lanes:
            lane.linger = policy.linger
        for node in self.nodes.values():
            node.latency = None  # its data centre or tier may have changed
        self.trim()  # a removed node may have been the one holding the log
        self._wake_all()

    # -- journal ----------------------------------------------------------------------------------------------

    def positions(self) -> list[dict[str, int]]:
        """Each lane's node positions, for a checkpoint: below them a node has everything."""
        return [lane.positions() for lane in self.lanes]

    def heads(self) -> list[int]:
        """Each lane's next seq: everything below was appended."""
        return [lane.log.head for lane in self.lanes]

    def held(self, lane: int) -> Iterator[tuple[int, Entry]]:
        """The entries a lane still holds, ``(seq, entry)`` in order (for a journal snapshot)."""
        return iter(self.lanes[lane].log.entries())

    def record_appends(self) -> None:
        """From now on keep every new log entry for :meth:`take_appended` (the journal writes them)."""
        self._appended = [[] for _ in self.lanes]

    def take_appended(self) -> list[tuple[int, int, str, float]]:
        """New log entries since the last call, as ``(lane, seq, target, accepted_at)``, in append order per lane."""
        out: list[tuple[int, int, str, float]] = []
        for li, items in enumerate(self._appended or ()):
            if items:
                out.extend((li, seq, target, at) for seq, target, at in items)
                items.clear()
        return out

    def restore(self, lane: int, base: int, items: list[tuple[str, float]], positions: dict[str, int]) -> None:
        """Load a lane from a journal replay (see :meth:`Lane.restore`). Call before any submit."""
        self.lanes[lane].restore(base, items, positions, self.topology)
        self._floors = tuple(ln.floor() for ln in self.lanes)
        self._wake_all()

    # -- bookkeeping ------------------------------------------------------------------------------------------

    def trim(self) -> int:
        self._acks_since_trim = 0
        return sum(lane.trim() for lane in self.lanes)

    def backlog(self, name: str) -> int:
        """Purges meant for this node that it has not acknowledged yet (all lanes)."""
        return sum(lane.backlog(name) for lane in self.lanes)

    def total_backlog(self) -> int:
        return sum(self.backlog(name) for name in self.nodes)


_NO_EVENTS = Events()
