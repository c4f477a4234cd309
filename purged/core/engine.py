"""Core layer: the engine, a sans-IO state machine over the lanes (purge logs), nodes and their policies.

The I/O layer feeds it and performs what it answers (like h11 / aioquic): ``submit(targets, now)`` at ingest
(after :mod:`purged.core.admission` said yes); ``take(node, n, now)`` for the next purges to send to a node;
``ack``/``fail``/``requeue`` with what happened; ``get_timer()``/``handle_timer(now)`` for retries, deferrals,
rate limits and tier delays. After feeding it, the I/O layer drains :meth:`Engine.events` (which nodes to wake,
whether the timer moved, which lanes progressed) in one place. Queries (``has_work``, ``backlog``, and the
read-only views in :mod:`purged.core.status`) change nothing. No clock, no sockets, no logging here.

A purge handed to a sender is named by an id ``seq << 1 | lane``: one integer, whichever lane it is in.
"""

from __future__ import annotations

import heapq
import random
from bisect import bisect_left
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import compress, count, islice, repeat
from operator import itemgetter, ne, sub

from .batches import Batches
from .events import Events, Outbox
from .failures import Failures
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
_first, _second = itemgetter(0), itemgetter(1)
_accepted_at = itemgetter(1)  # of a log Entry


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


class Engine(Failures):
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
        topology = self.topology
        # Without host patterns every data centre serves every host: one mask for all, no host cut per target.
        routing = (topology.dc_mask if any(dc.hosts for dc in topology.datacenters)
                   else (1 << len(topology.datacenters)) - 1)
        hi, coalesced = lane.extend(targets, now, routing, journal)
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
            if not self._suspect(node, ident, now):
                self._schedule_retry(node, ident, now)
            return verdict
        node.inflight.discard(ident)
        if node.suspects:
            node.suspects.pop(ident, None)
        lane = self.lanes[ident & 1]
        seq = ident >> 1
        if verdict == "ok":
            node.failures = 0
            node.oks += 1
            if node.down:
                node.down = False
                self._out.wake.add(name)  # out of probing: a full window again
            self._observe_latency(node, now - lane.log.get(seq).accepted_at)
        else:
            stats.gave_up += 1
        self._finish(node, lane, seq, now)
        return verdict

    def ack_many(self, name: str, answers: list[tuple[int, int]], now: float) -> None:
        """Node ``name`` answered ``(ident, status)`` for each of ``answers``, in order (one read's worth):
        :meth:`ack_ids` with the pairs split."""
        if answers:
            idents, statuses = zip(*answers)  # noqa: B905 (pairs; strict would cost a call per answer)
            self.ack_ids(name, idents, statuses, now)

    def ack_ids(self, name: str, idents: list[int] | tuple[int, ...], statuses: list[int] | tuple[int, ...],
                now: float) -> None:
        """Node ``name`` answered ``statuses[i]`` to the PURGE ``idents[i]``, in order (one read's worth; two
        lists or two tuples of the same length): the same as :meth:`ack` for each, with the per-answer
        bookkeeping (tier positions, trimming) done once.

        The usual read, one 2xx/404 status for purges of consecutive seqs of one lane all in flight, is done with
        list and set operations; a read that is not usual is split into runs (:meth:`_ack_runs`)."""
        node = self.nodes.get(name)
        n = len(idents)
        if node is None or not n:
            return
        first = idents[0]
        status = statuses[0]
        inflight = node.inflight
        expected = range(first, first + 2 * n, 2)
        if not (
            statuses.count(status) == n
            and (200 <= status < 300 or status == 404)
            and idents == (tuple(expected) if idents.__class__ is tuple else list(expected))
            and inflight.issuperset(idents)
        ):
            self._ack_runs(node, list(zip(idents, statuses, strict=True)), tuple(idents), tuple(statuses), now)
            return
        inflight.difference_update(idents)
        responses = node.stats.responses
        responses[status] = responses.get(status, 0) + n
        lane = self.lanes[first & 1]
        lo = first >> 1
        entries, off = lane.log.slots()
        accepted = list(map(_accepted_at, entries[lo + off : lo + off + n]))
        oldest = accepted[0]
        if node.suspects or accepted.count(oldest) != n:
            self._ack_run(node, lane, first, n, now)
        else:  # :meth:`_ack_run` inline: accepted together (one batch), one latency bucket
            hist = node.latency or self._histogram(node)
            hist.counts[bisect_left(hist.bounds, now - oldest)] += n
            hist.total += (now - oldest) * n
            lane.cursors[name].finish_run(lo, lo + n)
        node.failures = 0
        node.oks += n
        if node.down:
            node.down = False
            self._out.wake.add(name)  # out of probing: a full window again
        lane.moved(name, now)
        self._out.progress = True
        self._acks_since_trim += n
        if self._acks_since_trim >= 1024:
            self.trim()

    def _ack_runs(self, node: Node, answers: list[tuple[int, int]], idents: tuple[int, ...],
                  statuses: tuple[int, ...], now: float) -> None:
        """:meth:`ack_many` for a read that is not the usual one. Every answer a success: by runs of
        consecutive ids of one lane (``seq << 1 | lane``: a step of 2), answer by answer where some are stale.
        Any other status: :meth:`_ack_each`, in order, as the poison rule judges each failure after the
        successes before it."""
        if not all(200 <= status < 300 or status == 404 for status in set(statuses)):
            self._ack_each(node, answers, now)
            return
        name = node.name
        responses = node.stats.responses
        n = len(idents)
        bounds = [0, *compress(count(1), map(ne, map(sub, islice(idents, 1, None), idents), repeat(2))), n]
        oks = 0
        moved = 0
        inflight = node.inflight
        for i in range(len(bounds) - 1):
            lo, hi = bounds[i], bounds[i + 1]
            run = idents[lo:hi]
            if inflight.issuperset(run):
                inflight.difference_update(run)
                for status in statuses[lo:hi]:
                    responses[status] = responses.get(status, 0) + 1
                self._ack_run(node, self.lanes[run[0] & 1], run[0], hi - lo, now)
                oks += hi - lo
                moved |= 1 << (run[0] & 1)
            else:  # some are stale (the node was resynced meanwhile, or an id repeats): not counted
                for ident, status in answers[lo:hi]:
                    if ident in inflight:
                        inflight.discard(ident)
                        responses[status] = responses.get(status, 0) + 1
                        self._ack_run(node, self.lanes[ident & 1], ident, 1, now)
                        oks += 1
                        moved |= 1 << (ident & 1)
        if oks:
            node.failures = 0
            node.oks += oks
            if node.down:
                node.down = False
                self._out.wake.add(name)  # out of probing: a full window again
        if moved:
            for li, lane in enumerate(self.lanes):
                if moved >> li & 1:
                    lane.moved(name, now)
            self._out.progress = True
            self._acks_since_trim += oks
            if self._acks_since_trim >= 1024:
                self.trim()

    def _ack_run(self, node: Node, lane: Lane, first: int, n: int, now: float) -> None:
        """Acknowledge the ``n`` purges from id ``first`` on (consecutive seqs of ``lane``), no longer in
        flight: cursor, latency histogram and suspects; the caller counts them and moves tier positions."""
        lo = first >> 1
        hi = lo + n
        if node.suspects:
            pop = node.suspects.pop
            for ident in range(first, first + 2 * n, 2):
                pop(ident, None)
        entries, off = lane.log.slots()
        accepted = list(map(_accepted_at, entries[lo + off : hi + off]))
        hist = node.latency or self._histogram(node)
        oldest = accepted[0]
        if accepted.count(oldest) == n:  # accepted together (one batch): one bucket
            hist.counts[bisect_left(hist.bounds, now - oldest)] += n
            hist.total += (now - oldest) * n
        else:
            bounds, counts = hist.bounds, hist.counts
            bucket = bisect_left(bounds, now - max(accepted))
            if bucket == bisect_left(bounds, now - min(accepted)):
                counts[bucket] += n
            else:
                for bucket, k in Counter(map(bisect_left, repeat(bounds), map(sub, repeat(now), accepted))).items():
                    counts[bucket] += k
            hist.total += now * n - sum(accepted)
        lane.cursors[node.name].finish_run(lo, hi)

    def _ack_each(self, node: Node, answers: list[tuple[int, int]], now: float) -> None:
        """:meth:`ack_many` answer by answer (a read with a failure in it)."""
        name = node.name
        inflight, lanes = node.inflight, self.lanes
        responses = node.stats.responses
        hist = self._histogram(node)
        observe_bounds, observe_counts = hist.bounds, hist.counts
        moved = 0  # bit per lane whose cursor advanced
        oks = 0
        latency = 0.0
        slots = [lane.log.slots() for lane in lanes]
        finish = [lane.cursors[name].finish for lane in lanes]
        for ident, status in answers:
            if ident not in inflight:
                continue  # stale: the node was resynced or removed meanwhile
            if not (200 <= status < 300 or status == 404):
                self.ack(name, ident, status, now)  # retry, error, poison: the general path
                slots = [lane.log.slots() for lane in lanes]  # it may have trimmed a log
                continue
            responses[status] = responses.get(status, 0) + 1
            inflight.discard(ident)
            if node.suspects:
                node.suspects.pop(ident, None)
            li = ident & 1
            seq = ident >> 1
            entries, off = slots[li]
            seconds = now - entries[seq + off][1]  # type: ignore[index]  # (target, accepted_at, dc_mask)
            observe_counts[bisect_left(observe_bounds, seconds)] += 1
            latency += seconds
            finish[li](seq)
            moved |= 1 << li
            oks += 1
            # Per answer, not once per read: the poison rule (_suspect) reads these between answers.
            node.failures = 0
            node.oks += 1
            if node.down:
                node.down = False
                self._out.wake.add(name)  # out of probing: a full window again
        if oks:
            hist.total += latency
        if moved:
            for li, lane in enumerate(lanes):
                if moved >> li & 1:
                    lane.moved(name, now)
            self._out.progress = True
            self._acks_since_trim += oks
            if self._acks_since_trim >= 1024:
                self.trim()

    def _finish(self, node: Node, lane: Lane, seq: int, now: float) -> None:
        lane.cursors[node.name].finish(seq)
        lane.moved(node.name, now)
        self._out.progress = True
        self._acks_since_trim += 1
        if self._acks_since_trim >= 1024:
            self.trim()

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

    def _observe_latency(self, node: Node, seconds: float) -> None:
        self._histogram(node).observe(seconds)

    def _histogram(self, node: Node) -> Histogram:
        """The latency histogram of ``node``'s data centre and tier (kept on the node until a reload)."""
        dc = self.topology.datacenters[node.dc_index]
        key = (dc.name, dc.tiers[node.tier_index].name)
        hist = self.latency.get(key)
        if hist is None:
            hist = self.latency[key] = Histogram()
        node.latency = hist
        return hist

    def backlog(self, name: str) -> int:
        """Purges meant for this node that it has not acknowledged yet (all lanes)."""
        return sum(lane.backlog(name) for lane in self.lanes)

    def total_backlog(self) -> int:
        return sum(self.backlog(name) for name in self.nodes)


_NO_EVENTS = Events()
