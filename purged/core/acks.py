"""Core layer: how the engine takes its nodes' answers: one answer (:meth:`Acks.ack`) or one read's worth
(:meth:`Acks.ack_ids`), its latency histograms, and the cursor and tier bookkeeping that follows.

A part of :class:`purged.core.engine.Engine` (its base class; failures, the retry and poison side, are
:mod:`purged.core.failures`, this one's base). The usual read (one 2xx/404 status for consecutive purges of one
lane, all in flight) is acknowledged with list and set operations and one cursor step; any other read by runs,
and any failure answer by answer, as the poison rule judges each failure after the successes before it.
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from itertools import compress, count, islice, repeat
from operator import ne, sub
from typing import TYPE_CHECKING

from .failures import Failures
from .histogram import Histogram
from .node import Node, classify, is_success

if TYPE_CHECKING:
    from .lane import Lane
    from .topology import Topology



class Acks(Failures):
    topology: Topology
    latency: dict[tuple[str, str], Histogram]
    _acks_since_trim: int

    def trim(self) -> int:
        raise NotImplementedError

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
        if verdict == "ok":
            self._succeeded(node, 1)
            self._histogram(node).observe(now - self.lanes[ident & 1].log.get(ident >> 1).accepted_at)
        else:
            stats.gave_up += 1
        self._finish(node, ident, now)
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
            and is_success(status)
            and idents == (tuple(expected) if idents.__class__ is tuple else list(expected))
            and inflight.issuperset(idents)
        ):
            self._ack_runs(node, tuple(idents), tuple(statuses), now)
            return
        inflight.difference_update(idents)
        responses = node.stats.responses
        responses[status] = responses.get(status, 0) + n
        self._ack_run(node, self.lanes[first & 1], first, n, now)
        self._succeeded(node, n)
        self._moved(name, 1 << (first & 1), n, now)

    def _ack_runs(self, node: Node, idents: tuple[int, ...], statuses: tuple[int, ...], now: float) -> None:
        """:meth:`ack_many` for a read that is not the usual one. Every answer a success: by runs of
        consecutive ids of one lane (``seq << 1 | lane``: a step of 2), answer by answer where some are stale.
        Any other status: :meth:`_ack_each`, in order, as the poison rule judges each failure after the
        successes before it."""
        if not all(map(is_success, set(statuses))):
            self._ack_each(node, list(zip(idents, statuses, strict=True)), now)
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
                _count_statuses(responses, statuses[lo:hi])
                self._ack_run(node, self.lanes[run[0] & 1], run[0], hi - lo, now)
                oks += hi - lo
                moved |= 1 << (run[0] & 1)
            else:  # some are stale (the node was resynced meanwhile, or an id repeats): not counted
                for ident, status in zip(run, statuses[lo:hi], strict=True):
                    if ident in inflight:
                        inflight.discard(ident)
                        responses[status] = responses.get(status, 0) + 1
                        self._ack_run(node, self.lanes[ident & 1], ident, 1, now)
                        oks += 1
                        moved |= 1 << (ident & 1)
        if oks:
            self._succeeded(node, oks)
        self._moved(name, moved, oks, now)

    def _ack_run(self, node: Node, lane: Lane, first: int, n: int, now: float) -> None:
        """Acknowledge the ``n`` purges from id ``first`` on (consecutive seqs of ``lane``), no longer in
        flight: cursor, latency histogram and suspects; the caller counts them and moves tier positions."""
        lo = first >> 1
        hi = lo + n
        if node.suspects:
            pop = node.suspects.pop
            for ident in range(first, first + 2 * n, 2):
                pop(ident, None)
        _, accepted_at, _, off = lane.log.columns()
        accepted = accepted_at[lo + off : hi + off]
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
        columns = [lane.log.columns() for lane in lanes]
        finish = [lane.cursors[name].finish for lane in lanes]
        for ident, status in answers:
            if ident not in inflight:
                continue  # stale: the node was resynced or removed meanwhile
            if not is_success(status):
                self.ack(name, ident, status, now)  # retry, error, poison: the general path
                columns = [lane.log.columns() for lane in lanes]  # it may have trimmed a log
                continue
            responses[status] = responses.get(status, 0) + 1
            inflight.discard(ident)
            if node.suspects:
                node.suspects.pop(ident, None)
            li = ident & 1
            seq = ident >> 1
            _, accepted_at, _, off = columns[li]
            seconds = now - accepted_at[seq + off]
            observe_counts[bisect_left(observe_bounds, seconds)] += 1
            latency += seconds
            finish[li](seq)
            moved |= 1 << li
            oks += 1
            self._succeeded(node, 1)  # per answer, not per read: the poison rule reads these between answers
        if oks:
            hist.total += latency
        self._moved(name, moved, oks, now)

    def _finish(self, node: Node, ident: int, now: float) -> None:
        """The purge ``ident`` is done for ``node`` (delivered, given up or set aside) and no longer in flight."""
        li = ident & 1
        self.lanes[li].cursors[node.name].finish(ident >> 1)
        self._moved(node.name, 1 << li, 1, now)

    def _succeeded(self, node: Node, n: int) -> None:
        """``n`` answers of ``node`` were successes: its failure streak ends, and a node marked down is up
        again (out of probing: woken for a full window)."""
        node.failures = 0
        node.oks += n
        if node.down:
            node.down = False
            self._out.wake.add(node.name)

    def _moved(self, name: str, moved: int, oks: int, now: float) -> None:
        """After a read's acks: the lanes in bit set ``moved`` advanced ``name``'s position (tier gates may
        open); ``oks`` purges were done (the log is trimmed every 1,024)."""
        if moved:
            for li, lane in enumerate(self.lanes):
                if moved >> li & 1:
                    lane.moved(name, now)
            self._out.progress = True
            self._acks_since_trim += oks
            if self._acks_since_trim >= 1024:
                self.trim()

    def _histogram(self, node: Node) -> Histogram:
        """The latency histogram of ``node``'s data centre and tier (kept on the node until a reload)."""
        dc = self.topology.datacenters[node.dc_index]
        key = (dc.name, dc.tiers[node.tier_index].name)
        hist = self.latency.get(key)
        if hist is None:
            hist = self.latency[key] = Histogram()
        node.latency = hist
        return hist


def _count_statuses(responses: dict[int, int], statuses: tuple[int, ...]) -> None:
    """Add ``statuses`` to the per-status counts (one status for the whole run, as a rule: one count)."""
    status = statuses[0]
    n = len(statuses)
    if statuses.count(status) == n:
        responses[status] = responses.get(status, 0) + n
    else:
        for status, k in Counter(statuses).items():
            responses[status] = responses.get(status, 0) + k
