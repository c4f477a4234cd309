"""Core layer: the engine, a sans-IO state machine tying the purge log, node cursors and tier gates together.

The I/O layer feeds it and performs what it answers (like h11 / aioquic): ``submit(targets, now)`` at ingest;
``take(node, n, now)`` for the next purges to send to a node; ``ack``/``fail`` with what the node answered;
``get_timer()``/``handle_timer(now)`` for retries and tier delays; ``statistics()`` for metrics. No clock, no
sockets, no logging here.
"""

from __future__ import annotations

import random
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from .cursor import NodeCursor
from .log import PurgeLog
from .topology import Topology

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, float("inf"))


def classify(status: int) -> str:
    """What a node's answer means: ``ok`` (2xx, or 404 as ATS answers for an object it lacks), ``retry``
    (5xx, 408, 429: the node may do better later) or ``error`` (other codes: a misconfigured edge; retrying
    would not help)."""
    if 200 <= status < 300 or status == 404:
        return "ok"
    if status >= 500 or status in (408, 429):
        return "retry"
    return "error"


@dataclass
class Receipt:
    batch_id: str
    accepted: int
    coalesced: int


@dataclass
class _Batch:
    hi: int  # one past the highest seq holding one of its purges
    accepted: int
    created: float


@dataclass
class _Tier:
    name: str
    delay: float  # of this tier, after the previous one acked
    nodes: list[NodeCursor]
    position: int = 0  # min position of its nodes
    marks: deque = field(default_factory=deque)  # (position, time) for the next tier's delay
    gate: int = 0  # the next tier may read below this


@dataclass
class _NodeStats:
    sent: int = 0
    responses: dict[int, int] = field(default_factory=dict)
    retries: int = 0
    errors: dict[str, int] = field(default_factory=dict)  # connection errors by type
    gave_up: int = 0  # answered with an error status: counted, not retried


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
        retry_initial: float = 0.1,
        retry_max: float = 30.0,
        down_after: int = 5,
        recent_batches: int = 100_000,
        batch_prefix: str = "",
        rng: random.Random | None = None,
    ):
        self.topology = topology
        self.log = PurgeLog()
        self.retry_initial, self.retry_max, self.down_after = retry_initial, retry_max, down_after
        self._rng = rng or random.Random()
        self.nodes: dict[str, NodeCursor] = {}
        self._node_tier: dict[str, tuple[int, int]] = {}
        self.tiers: list[list[_Tier]] = []
        for di, dc in enumerate(topology.datacenters):
            tiers = []
            for ti, spec in enumerate(dc.tiers):
                cursors = [NodeCursor(n, 1 << di, 0) for n in spec.nodes]
                for c in cursors:
                    self.nodes[c.name] = c
                    self._node_tier[c.name] = (di, ti)
                tiers.append(_Tier(spec.name, spec.delay, cursors))
            self.tiers.append(tiers)
        self._dc_appended = [0] * len(topology.datacenters)
        self._batches: OrderedDict[str, _Batch] = OrderedDict()
        self._recent_batches = recent_batches
        self._batch_prefix = batch_prefix
        self._batch_counter = 0
        self.sources: dict[str, _SourceStats] = {}
        self.node_stats = {name: _NodeStats() for name in self.nodes}
        self.latency: dict[tuple[str, str], list] = {}  # (dc, tier) -> [bucket counts, sum]
        self._acks_since_trim = 0
        self.gates_changed = False  # set when a tier gate opened; the I/O layer clears it after waking senders
        self.started = now

    # -- ingest -----------------------------------------------------------------------------------------------

    def _source(self, source: str) -> _SourceStats:
        stats = self.sources.get(source)
        if stats is None:
            stats = self.sources[source] = _SourceStats()
        return stats

    def reject(self, source: str, reason: str, count: int = 1) -> None:
        """Count purges refused before they reached the engine (bad URL, bad datagram...)."""
        stats = self._source(source)
        stats.received += count
        stats.rejected[reason] = stats.rejected.get(reason, 0) + count

    def submit(self, targets: list[str], now: float, source: str = "http") -> Receipt:
        """Accept validated purge targets (``host + path``) as one batch."""
        log, dc_mask, appended = self.log, self.topology.dc_mask, self._dc_appended
        hi = -1
        coalesced = 0
        for target in targets:
            host = target[: target.find("/")]
            mask = dc_mask(host)
            seq, merged = log.append(target, now, mask)
            if merged:
                coalesced += 1
            else:
                di = 0
                while mask >> di:
                    if mask >> di & 1:
                        appended[di] += 1
                    di += 1
            if seq > hi:
                hi = seq
        stats = self._source(source)
        stats.received += len(targets)
        stats.accepted += len(targets)
        stats.coalesced += coalesced
        self._batch_counter += 1
        batch_id = f"{self._batch_prefix}{self._batch_counter}"
        self._batches[batch_id] = _Batch(hi + 1, len(targets), now)
        while len(self._batches) > self._recent_batches:
            self._batches.popitem(last=False)
        return Receipt(batch_id, len(targets), coalesced)

    # -- sending ----------------------------------------------------------------------------------------------

    def _read_limit(self, name: str) -> int:
        di, ti = self._node_tier[name]
        return self.log.head if ti == 0 else self.tiers[di][ti - 1].gate

    def has_work(self, name: str, now: float) -> bool:
        node = self.nodes[name]
        if node.retries and node.retries[0][0] <= now:
            return True
        return not node.down and node.cursor < self._read_limit(name)

    def take(self, name: str, limit: int, now: float) -> list[tuple[int, str]]:
        """The next purges (seq, target) for node ``name``: due retries first, then new log entries.

        A node marked down gets one due retry at a time (a probe) and nothing new until it answers.
        """
        node = self.nodes[name]
        out: list[tuple[int, str]] = []
        if node.retries:
            log = self.log
            for seq in node.due_retries(now, 1 if node.down else limit):
                node.inflight.add(seq)
                out.append((seq, log.get(seq).target))
            self.node_stats[name].retries += len(out)
        if node.down:
            return out
        log = self.log
        limit_seq = self._read_limit(name)
        cursor, bit, index = node.cursor, node.dc_bit, log.index
        start = cursor
        while cursor < limit_seq and len(out) < limit:
            seq = cursor
            cursor += 1
            entry = log.get(seq)
            if not entry.dc_mask & bit:
                continue
            node.matched += 1
            latest = index[entry.target]
            if latest != seq:
                node.pin(seq, latest)  # a later entry for the same target will purge it
                continue
            node.take(seq)
            out.append((seq, entry.target))
        node.cursor = cursor
        if cursor > start:
            log.mark_read(cursor - 1)
            self._moved(name, now)
        self.node_stats[name].sent += len(out)
        return out

    def ack(self, name: str, seq: int, status: int, now: float) -> str:
        """Node ``name`` answered ``status`` to the PURGE for ``seq``; returns its :func:`classify` verdict."""
        node = self.nodes.get(name)
        if node is None or seq not in node.inflight:
            return "stale"
        stats = self.node_stats[name]
        stats.responses[status] = stats.responses.get(status, 0) + 1
        verdict = classify(status)
        if verdict == "retry":
            self._failed(node, seq, now)
            return verdict
        node.inflight.discard(seq)
        if verdict == "ok":
            node.failures = 0
            node.down = False
            self._observe_latency(name, now - self.log.get(seq).accepted_at)
        else:
            stats.gave_up += 1
        node.finish(seq)
        self._moved(name, now)
        self._acks_since_trim += 1
        if self._acks_since_trim >= 1024:
            self.trim()
        return verdict

    def fail(self, name: str, seqs: list[int], kind: str, now: float) -> None:
        """The connection failed (``kind``: connect, reset, timeout, protocol, closed) with ``seqs`` unanswered."""
        node = self.nodes.get(name)
        if node is None:
            return
        errors = self.node_stats[name].errors
        errors[kind] = errors.get(kind, 0) + 1
        node.failures += 1
        for seq in seqs:
            if seq in node.inflight:
                self._schedule_retry(node, seq, now)
        if node.failures >= self.down_after:
            node.down = True

    def _failed(self, node: NodeCursor, seq: int, now: float) -> None:
        node.failures += 1
        if node.failures >= self.down_after:
            node.down = True
        self._schedule_retry(node, seq, now)

    def requeue(self, name: str, seqs: list[int], now: float) -> None:
        """The connection closed gracefully with ``seqs`` unanswered: resend them, with no failure counted."""
        node = self.nodes.get(name)
        if node is not None:
            for seq in seqs:
                if seq in node.inflight:
                    node.schedule_retry(seq, now)

    def _backoff(self, failures: int) -> float:
        """Capped exponential backoff with jitter in [1/2, 1] of the step, so retries of many nodes spread out."""
        step = min(self.retry_max, self.retry_initial * 2 ** min(max(failures - 1, 0), 30))
        return step * (0.5 + self._rng.random() / 2)

    def reconnect_delay(self, name: str) -> float:
        node = self.nodes.get(name)
        return self._backoff(node.failures) if node is not None and node.failures else 0.0

    def _schedule_retry(self, node: NodeCursor, seq: int, now: float) -> None:
        node.schedule_retry(seq, now + self._backoff(node.failures))

    # -- tier order -------------------------------------------------------------------------------------------

    def _moved(self, name: str, now: float) -> None:
        """A node's position may have advanced: advance its tier's, and open the next tier's gate."""
        di, ti = self._node_tier[name]
        tiers = self.tiers[di]
        if ti + 1 >= len(tiers):
            return
        tier = tiers[ti]
        position = min(n.position for n in tier.nodes)
        if position <= tier.position:
            return
        tier.position = position
        if tiers[ti + 1].delay <= 0:
            tier.gate = position
            self.gates_changed = True
        else:
            tier.marks.append((position, now))

    def get_timer(self) -> float | None:
        """When :meth:`handle_timer` next has something to do (a retry falls due, a tier delay ends)."""
        when: float | None = None
        for tiers in self.tiers:
            for ti, tier in enumerate(tiers[:-1]):
                if tier.marks:
                    t = tier.marks[0][1] + tiers[ti + 1].delay
                    when = t if when is None or t < when else when
        for node in self.nodes.values():
            t = node.next_retry()
            if t is not None and (when is None or t < when):
                when = t
        return when

    def handle_timer(self, now: float) -> None:
        for tiers in self.tiers:
            for ti, tier in enumerate(tiers[:-1]):
                delay = tiers[ti + 1].delay
                while tier.marks and tier.marks[0][1] + delay <= now:
                    tier.gate = tier.marks.popleft()[0]
                    self.gates_changed = True

    # -- bookkeeping ------------------------------------------------------------------------------------------

    def trim(self) -> int:
        self._acks_since_trim = 0
        if not self.nodes:
            return self.log.trim(self.log.head)
        return self.log.trim(min(n.position for n in self.nodes.values()))

    def _observe_latency(self, name: str, seconds: float) -> None:
        di, ti = self._node_tier[name]
        key = (self.topology.datacenters[di].name, self.tiers[di][ti].name)
        hist = self.latency.get(key)
        if hist is None:
            hist = self.latency[key] = [[0] * len(LATENCY_BUCKETS), 0.0]
        for i, bound in enumerate(LATENCY_BUCKETS):
            if seconds <= bound:
                hist[0][i] += 1
                break
        hist[1] += seconds

    def backlog(self, name: str) -> int:
        """Purges meant for this node that it has not acknowledged yet."""
        node = self.nodes[name]
        di, _ = self._node_tier[name]
        return self._dc_appended[di] - node.matched + node.unfinished

    def oldest_pending_age(self, name: str, now: float) -> float:
        """Age of the oldest purge this node still owes (approximate: the entry at its position)."""
        position = self.nodes[name].position
        if self.backlog(name) == 0 or position >= self.log.head:
            return 0.0
        return now - self.log.get(position).accepted_at

    def batch_status(self, batch_id: str) -> dict | None:
        batch = self._batches.get(batch_id)
        if batch is None:
            return None
        dcs = {}
        done_all = True
        for di, dc in enumerate(self.topology.datacenters):
            tiers = {}
            for tier in self.tiers[di]:
                done = sum(1 for n in tier.nodes if n.position >= batch.hi)
                done_all &= done == len(tier.nodes)
                tiers[tier.name] = {"nodes": len(tier.nodes), "done": done}
            dcs[dc.name] = tiers
        return {"id": batch_id, "done": done_all, "accepted": batch.accepted, "datacenters": dcs}

    def node_state(self, name: str, now: float) -> dict:
        node = self.nodes[name]
        di, ti = self._node_tier[name]
        return {
            "dc": self.topology.datacenters[di].name,
            "tier": self.tiers[di][ti].name,
            "state": "down" if node.down else "up",
            "backlog": self.backlog(name),
            "inflight": len(node.inflight),
            "retrying": len(node.retries),
            "oldest_pending_seconds": round(self.oldest_pending_age(name, now), 3),
        }

    def statistics(self, now: float) -> dict:
        """Plain numbers for the metrics collector and /healthz."""
        self.trim()
        return {
            "log_entries": len(self.log),
            "log_head": self.log.head,
            "unique_pending": len(self.log.index),
            "batches": self._batch_counter,
            "sources": self.sources,
            "nodes": {name: self.node_state(name, now) for name in self.nodes},
            "node_stats": self.node_stats,
            "latency": self.latency,
        }
