"""Core layer: a lane, one purge log with every node's cursor in it and the tier gates between them.

The engine keeps one lane per priority class (``high`` is drained before ``bulk``). Within a lane a tier's
position is the lowest position of its nodes; when it advances the tier records ``(position, now)``, and the
next tier of that data centre may read below it once its ``delay`` has passed (DESIGN.md guarantee 3). Ingest
``linger`` is a gate too: nothing younger than ``linger`` seconds is readable, so bursts of duplicates merge.
"""

from __future__ import annotations

import heapq
from collections import deque
from dataclasses import dataclass, field
from itertools import accumulate, compress, repeat
from itertools import count as numbering
from operator import add, and_, lt, ne, rshift
from typing import TYPE_CHECKING

from .cursor import NodeCursor
from .events import Outbox
from .log import PurgeLog
from .topology import Topology

if TYPE_CHECKING:
    from .node import Node


@dataclass
class TierGate:
    name: str
    delay: float  # of this tier, after the previous one acknowledged
    nodes: list[str]
    position: int = 0  # lowest position of its nodes
    marks: deque = field(default_factory=deque)  # (position, time), waiting for the next tier's delay
    gate: int = 0  # the next tier may read below this


class Lane:
    def __init__(self, topology: Topology, out: Outbox, linger: float = 0.0):
        self.out = out  # the engine's: gates that open wake the next tier's nodes
        self.log = PurgeLog()
        self.linger = linger
        self.linger_gate = 0  # entries below it are old enough to read
        self.cursors: dict[str, NodeCursor] = {}
        self.place: dict[str, tuple[int, int]] = {}  # node -> (dc index, tier index)
        self.tiers: list[list[TierGate]] = []
        for di, dc in enumerate(topology.datacenters):
            gates = []
            for ti, spec in enumerate(dc.tiers):
                for node in spec.nodes:
                    self.cursors[node] = NodeCursor(0)
                    self.place[node] = (di, ti)
                gates.append(TierGate(spec.name, spec.delay, list(spec.nodes)))
            self.tiers.append(gates)
        self.dc_appended = [0] * len(topology.datacenters)

    def extend(self, targets: list[str], now: float, dc_mask, journal: list | None) -> tuple[int, int]:
        """Append each target to the log (routed by ``dc_mask(host)``, or ``dc_mask`` itself if an int); returns
        the highest seq it got and how many merged. New entries are also added to ``journal`` as
        ``(seq, target, now)`` if given."""
        hi, merged, new = self.log.extend(targets, now, dc_mask, journal)
        appended = self.dc_appended
        for mask, count in new.items():
            di = 0
            while mask >> di:
                if mask >> di & 1:
                    appended[di] += count
                di += 1
        return hi, merged

    def read(self, node: Node, li: int, limit: int, now: float, ids: list[int], targets: list[str],
             max_age: float) -> None:
        """Read this lane for ``node`` up to its read limit, appending the id and target of each purge to send
        to ``ids`` and ``targets`` (until they hold ``limit``): entries for other data centres are passed,
        superseded ones pinned on their successor, stale ones (``max_age``) dropped, ones inside the node's dedup
        window deferred to its end.

        Without a dedup window a read goes by runs (:meth:`_read_run`), else entry by entry (:meth:`_read_each`):
        the same result, the first with list operations."""
        name = node.name
        cur = self.cursors[name]
        cursor = start = cur.cursor
        stop = self.read_limit(name, now)
        if cursor >= stop:
            return
        if node.dedup is None:
            while cursor < stop and len(ids) < limit:
                cursor = self._read_run(node, cur, li, cursor, min(stop, cursor + limit - len(ids)), now, ids,
                                        targets, max_age)
        else:
            cursor = self._read_each(node, cur, li, cursor, stop, limit, now, ids, targets, max_age)
        cur.cursor = cursor
        if cursor > start:
            self.log.mark_read(cursor - 1)
            self.moved(name, now)

    def _read_run(
        self, node: Node, cur: NodeCursor, li: int, cursor: int, end: int, now: float, ids: list[int],
        out: list[str], max_age: float,
    ) -> int:
        """Read the entries from ``cursor`` to ``end`` (no more than may be sent) for a node without a dedup
        window; returns ``end``. The plain ones (meant for this node's data centre, each the latest for its
        target, not past ``max_age``: usually all) are taken with list operations, a run at a time; only the
        others are handled one by one, as :meth:`_read_each` would."""
        log = self.log
        bit = node.dc_bit
        column_targets, column_accepted, column_masks, off = log.columns()
        lo, hi = cursor + off, end + off
        targets, accepted, masks = column_targets[lo:hi], column_accepted[lo:hi], column_masks[lo:hi]
        n = end - cursor
        mask = masks[0]
        if masks.count(mask) == n and mask & bit:  # the usual case: all for this node's data centre
            seqs: range | list[int] = range(cursor, end)
        else:
            wanted = list(map(and_, masks, repeat(bit)))
            if not any(wanted):
                return end
            targets = list(compress(targets, wanted))
            accepted = list(compress(accepted, wanted))
            seqs = list(compress(range(cursor, end), wanted))
            n = len(seqs)
        cur.matched += n
        # Every entry held is the latest for its target when the index has as many targets as the log entries.
        if len(log.index) == log.head - log.base:
            odd = []
        else:
            latest = list(map(log.index.__getitem__, targets))
            odd = [] if latest == list(seqs) else list(compress(numbering(), map(ne, latest, seqs)))
        if max_age and min(accepted) + max_age < now:
            stale = compress(numbering(), map(lt, map(add, accepted, repeat(max_age)), repeat(now)))
            odd = sorted(set(odd).union(stale))
        if not odd:
            self._take(node, cur, li, seqs, targets, ids, out)
            return end
        index = log.index
        prev = 0
        for k in odd:
            if k > prev:
                self._take(node, cur, li, seqs[prev:k], targets[prev:k], ids, out)
            prev = k + 1
            seq = seqs[k]
            latest_seq = index[targets[k]]
            if latest_seq != seq:
                cur.pin(seq, latest_seq)  # a later entry for the same target will purge it
            else:  # past max_age
                self._drop_stale(node, cur, seq)
        if prev < n:
            self._take(node, cur, li, seqs[prev:], targets[prev:], ids, out)
        return end

    def _drop_stale(self, node: Node, cur: NodeCursor, seq: int) -> None:
        """``seq`` is past ``max_age`` for ``node``: done without a send, counted."""
        cur.take(seq)
        cur.finish(seq)
        dropped = node.stats.dropped
        dropped["max_age"] = dropped.get("max_age", 0) + 1
        self.out.progress = True

    @staticmethod
    def _take(node: Node, cur: NodeCursor, li: int, seqs: range | list[int], targets, ids: list[int],
              out: list[str]) -> None:
        """Send ``targets`` (their entries' ``seqs``, ascending): their ids to ``ids``, themselves to ``out``."""
        if type(seqs) is range:
            first, stop = seqs.start, seqs.stop
            cur.take_run(first, stop)
            idents: range | list[int] = range(first << 1 | li, stop << 1 | li, 2)
        else:
            for seq in seqs:
                cur.take(seq)
            idents = [seq << 1 | li for seq in seqs]
        node.inflight.update(idents)
        ids += idents
        out += targets

    def _read_each(
        self, node: Node, cur: NodeCursor, li: int, cursor: int, stop: int, limit: int, now: float,
        ids: list[int], out: list[str], max_age: float,
    ) -> int:
        """The per-entry read (see :meth:`read`) from ``cursor`` to ``stop``; returns the new cursor."""
        bit, dedup, stats = node.dc_bit, node.dedup, node.stats
        log = self.log
        index = log.index
        inflight = node.inflight
        column_targets, column_accepted, column_masks, off = log.columns()
        take = cur.take
        while cursor < stop and len(ids) < limit:
            seq = cursor
            cursor += 1
            if not column_masks[seq + off] & bit:
                continue
            cur.matched += 1
            target = column_targets[seq + off]
            latest = index[target]
            if latest != seq:
                cur.pin(seq, latest)  # a later entry for the same target will purge it
                continue
            if max_age and column_accepted[seq + off] + max_age < now:
                self._drop_stale(node, cur, seq)
                continue
            ident = seq << 1 | li
            if dedup is not None:
                until = dedup.blocked_until(target, now)
                if until is not None:
                    stats.deferred += 1
                    prior = node.deferred.get(target)
                    if prior is not None and prior & 1 == li:
                        # Already deferred to the window's end, which is after this purge arrived: that one
                        # send serves both (trailing edge: once per window however many repeats came).
                        cur.pin(seq, prior >> 1)
                        continue
                    cur.take(seq)
                    node.deferred[target] = ident
                    heapq.heappush(node.retries, (until, ident))
                    self.out.timer = True
                    continue
                dedup.sent(target, now)
            take(seq)
            inflight.add(ident)
            ids.append(ident)
            out.append(target)
        return cursor

    def read_limit(self, node: str, now: float) -> int:
        di, ti = self.place[node]
        if ti:
            return self.tiers[di][ti - 1].gate
        if self.linger <= 0:
            return self.log.head
        return self._advance_linger(now)

    def _advance_linger(self, now: float) -> int:
        log, gate = self.log, self.linger_gate
        horizon = now - self.linger
        gate = max(gate, log.base)
        _, accepted, _, off = log.columns()
        while gate < log.head and accepted[gate + off] <= horizon:
            gate += 1
        self.linger_gate = gate
        return gate

    def moved(self, node: str, now: float) -> None:
        """``node``'s position may have advanced: advance its tier's, and open the next tier's gate."""
        di, ti = self.place[node]
        tiers = self.tiers[di]
        if ti + 1 >= len(tiers):
            return
        tier = tiers[ti]
        cursors = self.cursors
        position = min(cursors[n].position for n in tier.nodes)
        if position <= tier.position:
            return
        tier.position = position
        if tiers[ti + 1].delay <= 0:
            tier.gate = position
            self.out.wake.update(tiers[ti + 1].nodes)
        else:
            tier.marks.append((position, now))
            self.out.timer = True  # the next tier's delay ends at a new time

    def get_timer(self) -> float | None:
        when: float | None = None
        for tiers in self.tiers:
            for ti, tier in enumerate(tiers[:-1]):
                if tier.marks:
                    t = tier.marks[0][1] + tiers[ti + 1].delay
                    when = t if when is None or t < when else when
        if self.linger > 0 and self.linger_gate < self.log.head:
            t = self.log.get(max(self.linger_gate, self.log.base)).accepted_at + self.linger
            when = t if when is None or t < when else when
        return when

    def handle_timer(self, now: float) -> None:
        for tiers in self.tiers:
            for ti, tier in enumerate(tiers[:-1]):
                delay = tiers[ti + 1].delay
                if tier.marks and tier.marks[0][1] + delay <= now:
                    while tier.marks and tier.marks[0][1] + delay <= now:
                        tier.gate = tier.marks.popleft()[0]
                    self.out.wake.update(tiers[ti + 1].nodes)
        if self.linger > 0:
            before = self.linger_gate
            if self._advance_linger(now) > before:
                self.out.wake.update(self.first_tier_nodes())

    def first_tier_nodes(self) -> list[str]:
        """The nodes that read straight from the log (the first tier of each data centre)."""
        return [name for tiers in self.tiers if tiers for name in tiers[0].nodes]

    def floor(self) -> int:
        """The seq below which every node is done (the head when there are no nodes)."""
        return min((c.position for c in self.cursors.values()), default=self.log.head)

    def backlog(self, node: str) -> int:
        """Entries meant for ``node`` that it has not finished."""
        cursor = self.cursors[node]
        return self.dc_appended[self.place[node][0]] - cursor.matched + cursor.unfinished

    def skip_node(self, node: str) -> int:
        """Declare ``node`` out of sync: drop its whole backlog; return how many purges that was."""
        dropped = self.backlog(node)
        cursor = self.cursors[node]
        cursor.skip_to(self.log.head)
        cursor.matched = self.dc_appended[self.place[node][0]]
        return dropped

    def remove_node(self, node: str) -> None:
        del self.cursors[node]
        del self.place[node]

    def trim(self) -> int:
        return self.log.trim(self.floor())

    def positions(self) -> dict[str, int]:
        return {node: cursor.position for node, cursor in self.cursors.items()}

    def restore(self, base: int, items: list[tuple[str, float]], positions: dict[str, int], topology: Topology) -> None:
        """Rebuild from a journal: entries ``(target, accepted_at)`` numbered from ``base`` and each node's
        checkpointed position. A node without a checkpoint (new in the config) starts at the head. Tier gates
        open at their tier's position: the purges below were acknowledged before the restart."""
        targets = [item[0] for item in items]
        accepted = [item[1] for item in items]
        masks = list(map(topology.target_mask, targets))
        head = base + len(targets)
        starts = {node: min(max(positions.get(node, head), base), head) for node in self.cursors}
        self.log.load(base, targets, accepted, masks, max(starts.values(), default=base))
        self.linger_gate = base
        # Per data centre, how many entries it must get below each seq: prefix counts give every node's
        # ``matched`` (entries read that were meant for it) in one pass.
        for di in range(len(self.dc_appended)):
            prefix = [0, *accumulate(map(and_, map(rshift, masks, repeat(di)), repeat(1)))]
            self.dc_appended[di] = prefix[-1]
            for node, (ndi, _) in self.place.items():
                if ndi == di:
                    self.cursors[node] = NodeCursor(starts[node], prefix[starts[node] - base])
        for tiers in self.tiers:
            for tier in tiers:
                tier.position = min(self.cursors[n].position for n in tier.nodes)
                tier.gate = tier.position
                tier.marks.clear()

