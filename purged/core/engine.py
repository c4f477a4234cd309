"""Core layer: the engine, a sans-IO state machine over the lanes (purge logs), nodes and their policies.

The I/O layer feeds it and performs what it answers (like h11 / aioquic): ``submit(targets, now)`` at ingest;
``take(node, n, now)`` for the next purges to send to a node; ``ack``/``fail``/``requeue`` with what happened;
``get_timer()``/``handle_timer(now)`` for retries, deferrals, rate limits and tier delays; ``statistics()`` for
metrics. No clock, no sockets, no logging here.

A purge handed to a sender is named by an id ``seq << 1 | lane``: one integer, whichever lane it is in.
"""

from __future__ import annotations

import heapq
import random
from collections import OrderedDict
from dataclasses import dataclass, field

from .errors import Overloaded
from .histogram import LATENCY_BUCKETS, Histogram
from .lane import Lane
from .limits import TokenBucket
from .node import Node, NodeStats, Policy, classify
from .topology import Topology

__all__ = ["BULK", "HIGH", "LANES", "LATENCY_BUCKETS", "Engine", "Node", "NodeStats", "Policy", "Receipt", "classify"]

LANES = ("high", "bulk")  # drained in this order
HIGH, BULK = 0, 1


@dataclass
class Receipt:
    batch_id: str
    accepted: int
    coalesced: int


@dataclass
class _Batch:
    lane: int
    hi: int  # one past the highest seq holding one of its purges
    accepted: int
    created: float


@dataclass
class _SourceStats:
    received: int = 0
    accepted: int = 0
    coalesced: int = 0
    rejected: dict[str, int] = field(default_factory=dict)


class Engine:
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
        self.lanes = [Lane(name, topology, policy.linger) for name in LANES]
        rates = rates or {}
        self.nodes: dict[str, Node] = {}
        for di, dc in enumerate(topology.datacenters):
            for ti, tier in enumerate(dc.tiers):
                for name in tier.nodes:
                    rate, burst = rates.get(name, (0.0, 0.0))
                    self.nodes[name] = Node(name, di, ti, TokenBucket(rate, burst or rate, now), policy.dedup_window)
        self._throttled: dict[str, float] = {}  # node -> when its bucket has a token again
        self._batches: OrderedDict[str, _Batch] = OrderedDict()
        self._batch_prefix = batch_prefix
        self._batch_counter = 0
        self.sources: dict[str, _SourceStats] = {}
        self.latency: dict[tuple[str, str], Histogram] = {}  # (dc, tier) -> accept-to-ack seconds
        self._acks_since_trim = 0
        self._next_maintenance = now + 1.0 if policy.max_lag else None
        self.gates_changed = False  # a gate opened or a deferral fell due: the I/O layer wakes senders
        # get_timer() may have become earlier (a retry, deferral, throttle, tier mark or lingering purge):
        # the I/O layer re-reads it. A flag keeps get_timer's scan of every node off the per-read hot path.
        self.timers_changed = False
        self.started = now

    # -- ingest -----------------------------------------------------------------------------------------------

    def _source(self, source: str) -> _SourceStats:
        stats = self.sources.get(source)
        if stats is None:
            stats = self.sources[source] = _SourceStats()
        return stats

    def reject(self, source: str, reason: str, count: int = 1) -> None:
        """Count purges refused before they reached the log (bad URL, bad datagram, overload...)."""
        stats = self._source(source)
        stats.received += count
        stats.rejected[reason] = stats.rejected.get(reason, 0) + count

    def unique_pending(self) -> int:
        return sum(len(lane.log.index) for lane in self.lanes)

    def check_capacity(self, count: int) -> None:
        """Raise :class:`Overloaded` if ``count`` more purges would pass ``max_pending``."""
        limit = self.policy.max_pending
        if limit and self.unique_pending() + count > limit:
            self.trim()
            if self.unique_pending() + count > limit:
                raise Overloaded(f"{self.unique_pending()} unique URLs pending, the ceiling is {limit}")

    def submit(self, targets: list[str], now: float, source: str = "http", priority: str = "bulk") -> Receipt:
        """Accept validated purge targets (``host + path``) as one batch; raises :class:`Overloaded` (nothing
        accepted) when the batch would pass ``max_pending``."""
        try:
            self.check_capacity(len(targets))
        except Overloaded:
            self.reject(source, "overload", len(targets))
            raise
        li = HIGH if priority == "high" else BULK
        lane = self.lanes[li]
        dc_mask = self.topology.dc_mask
        hi = -1
        coalesced = 0
        for target in targets:
            seq, merged = lane.append(target, now, dc_mask(target[: target.find("/")]))
            coalesced += merged
            if seq > hi:
                hi = seq
        stats = self._source(source)
        stats.received += len(targets)
        stats.accepted += len(targets)
        stats.coalesced += coalesced
        self._batch_counter += 1
        batch_id = f"{self._batch_prefix}{self._batch_counter}"
        self._batches[batch_id] = _Batch(li, hi + 1, len(targets), now)
        while len(self._batches) > self.policy.recent_batches:
            self._batches.popitem(last=False)
        if self.policy.linger > 0:
            self.timers_changed = True  # the new purges become readable when their linger ends
        return Receipt(batch_id, len(targets), coalesced)

    # -- sending ----------------------------------------------------------------------------------------------

    def has_work(self, name: str, now: float) -> bool:
        node = self.nodes[name]
        if node.down and node.inflight:
            return False  # one probe at a time
        work = bool(node.retries and node.retries[0][0] <= now)
        if not work:
            work = any(lane.cursors[name].cursor < lane.read_limit(name, now) for lane in self.lanes)
        if work and node.bucket.available(now) < 1:
            self._throttle(node)
            return False
        return work

    def _throttle(self, node: Node) -> None:
        if node.name not in self._throttled:
            node.stats.rate_limited += 1
            self._throttled[node.name] = node.bucket.when_available(1)
            self.timers_changed = True

    def take(self, name: str, limit: int, now: float) -> list[tuple[int, str]]:
        """The next purges ``(id, target)`` for node ``name``: due retries and deferrals first, then new
        entries, high lane before bulk. A node marked down gets one purge at a time (a probe) until it answers."""
        node = self.nodes[name]
        if node.down:
            if node.inflight:
                return []
            limit = 1
        limit = min(limit, node.bucket.available(now))
        if limit <= 0:
            self._throttle(node)
            return []
        out: list[tuple[int, str]] = []
        dedup = node.dedup
        if node.retries and node.retries[0][0] <= now:
            retried = 0
            while node.retries and node.retries[0][0] <= now and len(out) < limit:
                ident = heapq.heappop(node.retries)[1]
                target = self.lanes[ident & 1].log.get(ident >> 1).target
                if dedup is not None:
                    until = dedup.blocked_until(target, now)
                    if until is not None:  # sent again since this was deferred
                        heapq.heappush(node.retries, (until, ident))
                        self.timers_changed = True
                        continue
                    dedup.sent(target, now)
                node.inflight.add(ident)
                out.append((ident, target))
                retried += 1
            node.stats.retries += retried
        for li, lane in enumerate(self.lanes):
            if len(out) >= limit:
                break
            self._read(node, li, lane, limit, now, out)
        node.bucket.consume(len(out), now)
        node.stats.sent += len(out)
        return out

    def _read(self, node: Node, li: int, lane: Lane, limit: int, now: float, out: list) -> None:
        name, bit, dedup, stats = node.name, node.dc_bit, node.dedup, node.stats
        cur = lane.cursors[name]
        log = lane.log
        index = log.index
        max_age = self.policy.max_age
        stop = lane.read_limit(name, now)
        cursor = start = cur.cursor
        inflight = node.inflight
        while cursor < stop and len(out) < limit:
            seq = cursor
            cursor += 1
            entry = log.get(seq)
            if not entry.dc_mask & bit:
                continue
            cur.matched += 1
            latest = index[entry.target]
            if latest != seq:
                cur.pin(seq, latest)  # a later entry for the same target will purge it
                continue
            cur.take(seq)
            if max_age and entry.accepted_at + max_age < now:
                cur.finish(seq)
                stats.dropped["max_age"] = stats.dropped.get("max_age", 0) + 1
                continue
            ident = seq << 1 | li
            if dedup is not None:
                until = dedup.blocked_until(entry.target, now)
                if until is not None:
                    heapq.heappush(node.retries, (until, ident))  # trailing edge: sent once, at window end
                    self.timers_changed = True
                    stats.deferred += 1
                    continue
                dedup.sent(entry.target, now)
            inflight.add(ident)
            out.append((ident, entry.target))
        cur.cursor = cursor
        if cursor > start:
            log.mark_read(cursor - 1)
            lane.moved(name, now)
            self._sync_gates()

    def ack(self, name: str, ident: int, status: int, now: float) -> str:
        """Node ``name`` answered ``status`` to the PURGE ``ident``; returns its :func:`classify` verdict."""
        node = self.nodes.get(name)
        if node is None or ident not in node.inflight:
            return "stale"
        stats = node.stats
        stats.responses[status] = stats.responses.get(status, 0) + 1
        verdict = classify(status)
        if verdict == "retry":
            self._failed(node, now)
            self._schedule_retry(node, ident, now)
            return verdict
        node.inflight.discard(ident)
        lane = self.lanes[ident & 1]
        seq = ident >> 1
        if verdict == "ok":
            node.failures = 0
            node.down = False
            self._observe_latency(node, now - lane.log.get(seq).accepted_at)
        else:
            stats.gave_up += 1
        lane.cursors[name].finish(seq)
        lane.moved(name, now)
        self._sync_gates()
        self._acks_since_trim += 1
        if self._acks_since_trim >= 1024:
            self.trim()
        return verdict

    def fail(self, name: str, idents: list[int], kind: str, now: float) -> None:
        """A connection failed (``kind``: connect, reset, timeout, protocol, closed) with ``idents`` unanswered."""
        node = self.nodes.get(name)
        if node is None:
            return
        node.stats.errors[kind] = node.stats.errors.get(kind, 0) + 1
        self._failed(node, now)
        for ident in idents:
            if ident in node.inflight:
                self._schedule_retry(node, ident, now)

    def requeue(self, name: str, idents: list[int], now: float) -> None:
        """The connection closed gracefully with ``idents`` unanswered: resend them, no failure counted."""
        node = self.nodes.get(name)
        if node is not None:
            for ident in idents:
                if ident in node.inflight:
                    node.inflight.discard(ident)
                    heapq.heappush(node.retries, (now, ident))
                    self.timers_changed = True

    def _failed(self, node: Node, now: float) -> None:
        node.failures += 1
        if node.failures >= self.policy.down_after:
            node.down = True

    def _backoff(self, failures: int) -> float:
        """Capped exponential backoff, jittered to [1/2, 1] of the step so that many nodes' retries spread."""
        p = self.policy
        step = min(p.retry_max, p.retry_initial * 2 ** min(max(failures - 1, 0), 30))
        return step * (0.5 + self._rng.random() / 2)

    def reconnect_delay(self, name: str) -> float:
        node = self.nodes.get(name)
        return self._backoff(node.failures) if node is not None and node.failures else 0.0

    def _schedule_retry(self, node: Node, ident: int, now: float) -> None:
        node.inflight.discard(ident)
        heapq.heappush(node.retries, (now + self._backoff(node.failures), ident))
        self.timers_changed = True

    # -- timers -----------------------------------------------------------------------------------------------

    def _sync_gates(self) -> None:
        for lane in self.lanes:
            if lane.gates_changed:
                lane.gates_changed = False
                self.gates_changed = True
            if lane.timers_changed:
                lane.timers_changed = False
                self.timers_changed = True

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
        self._sync_gates()
        for name, when in list(self._throttled.items()):
            if when <= now:
                del self._throttled[name]
                self.gates_changed = True
        if any(node.retries and node.retries[0][0] <= now for node in self.nodes.values()):
            self.gates_changed = True
        if self._next_maintenance is not None and now >= self._next_maintenance:
            self._next_maintenance = now + 1.0
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
                node.out_of_sync = True
                node.stats.resyncs += 1
                node.stats.dropped["max_lag"] = node.stats.dropped.get("max_lag", 0) + dropped
                affected.append(name)
            elif node.out_of_sync and self.backlog(name) == 0:
                node.out_of_sync = False
        self._sync_gates()
        return affected

    # -- journal ----------------------------------------------------------------------------------------------

    def positions(self) -> list[dict[str, int]]:
        """Each lane's node positions, for a checkpoint: below them a node has everything."""
        return [lane.positions() for lane in self.lanes]

    def record_appends(self) -> None:
        """From now on keep every new log entry for :meth:`take_appended` (the journal writes them)."""
        for lane in self.lanes:
            lane.outbox = []

    def take_appended(self) -> list[tuple[int, int, str, float]]:
        """New log entries since the last call, as ``(lane, seq, target, accepted_at)``, in append order per lane."""
        out = []
        for li, lane in enumerate(self.lanes):
            if lane.outbox:
                out.extend((li, seq, target, at) for seq, target, at in lane.outbox)
                lane.outbox.clear()
        return out

    def restore(self, lane: int, base: int, items: list[tuple[str, float]], positions: dict[str, int]) -> None:
        """Load a lane from a journal replay (see :meth:`Lane.restore`). Call before any submit."""
        self.lanes[lane].restore(base, items, positions, self.topology)

    # -- bookkeeping ------------------------------------------------------------------------------------------

    def trim(self) -> int:
        self._acks_since_trim = 0
        return sum(lane.trim() for lane in self.lanes)

    def _observe_latency(self, node: Node, seconds: float) -> None:
        dc = self.topology.datacenters[node.dc_index]
        key = (dc.name, dc.tiers[node.tier_index].name)
        hist = self.latency.get(key)
        if hist is None:
            hist = self.latency[key] = Histogram()
        hist.observe(seconds)

    def backlog(self, name: str) -> int:
        """Purges meant for this node that it has not acknowledged yet (all lanes)."""
        return sum(lane.backlog(name) for lane in self.lanes)

    def oldest_pending_age(self, name: str, now: float) -> float:
        """Age of the oldest purge this node still owes (approximate: the entry at its position per lane)."""
        age = 0.0
        for lane in self.lanes:
            position = lane.cursors[name].position
            if lane.backlog(name) and position < lane.log.head:
                age = max(age, now - lane.log.get(max(position, lane.log.base)).accepted_at)
        return age

    def batch_status(self, batch_id: str) -> dict | None:
        batch = self._batches.get(batch_id)
        if batch is None:
            return None
        lane = self.lanes[batch.lane]
        dcs = {}
        done_all = True
        for di, dc in enumerate(self.topology.datacenters):
            tiers = {}
            for tier in lane.tiers[di]:
                done = sum(1 for n in tier.nodes if lane.cursors[n].position >= batch.hi)
                done_all &= done == len(tier.nodes)
                tiers[tier.name] = {"nodes": len(tier.nodes), "done": done}
            dcs[dc.name] = tiers
        return {
            "id": batch_id,
            "done": done_all,
            "accepted": batch.accepted,
            "priority": LANES[batch.lane],
            "datacenters": dcs,
        }

    def node_state(self, name: str, now: float) -> dict:
        node = self.nodes[name]
        dc = self.topology.datacenters[node.dc_index]
        state = "down" if node.down else "out_of_sync" if node.out_of_sync else "up"
        return {
            "dc": dc.name,
            "tier": dc.tiers[node.tier_index].name,
            "state": state,
            "backlog": self.backlog(name),
            "inflight": len(node.inflight),
            "retrying": len(node.retries),
            "oldest_pending_seconds": round(self.oldest_pending_age(name, now), 3),
        }

    def statistics(self, now: float) -> dict:
        """Plain numbers for the metrics collector and /healthz."""
        self.trim()
        return {
            "log_entries": sum(len(lane.log) for lane in self.lanes),
            "unique_pending": self.unique_pending(),
            "batches": self._batch_counter,
            "sources": self.sources,
            "nodes": {name: self.node_state(name, now) for name in self.nodes},
            "node_stats": {name: node.stats for name, node in self.nodes.items()},
            "latency": self.latency,
        }
