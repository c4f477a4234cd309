"""Core layer: the purge log, an append-only sequence of unique pending purges shared by every node.

Each entry is ``(target, accepted_at, dc_mask)``, held in three parallel lists, one per field, and handed out
as an :class:`Entry`; its sequence number is its position. Columns rather than a tuple per entry: ~64 bytes less
per pending purge (a batch's entries share one ``accepted_at`` float and small-int masks), no object per entry
for the cyclic GC to look at, and a read of consecutive entries is a slice of each column.

A per-target index (target -> latest seq) makes coalescing O(1): a purge whose latest entry no node has read yet
merges into it (DESIGN.md guarantee 2: merge only while unsent). Memory is the span between the lowest node
position and the head; :meth:`trim` drops what every node is done with.
"""

from __future__ import annotations

import re
from collections import Counter, deque
from itertools import compress, repeat
from operator import eq
from typing import NamedTuple


class Entry(NamedTuple):
    target: str  # host + path
    accepted_at: float
    dc_mask: int  # data centres whose nodes must get it


_HOST_RE = re.compile(r"\n([^/\n]*)/")  # each target's host, in targets joined after newlines


def _constant(mask: int):
    return lambda host: mask


class PurgeLog:
    def __init__(self) -> None:
        # The columns: entry ``seq`` is at index ``seq - base + _offset`` of each; a trimmed target is None.
        self._targets: list[str | None] = []
        self._accepted: list[float] = []
        self._masks: list[int] = []
        self._offset = 0  # index in the columns of seq ``base``
        self.base = 0  # lowest seq still held
        self.head = 0  # next seq to assign
        self.read_mark = 0  # no node has read any entry at or above this seq
        self.index: dict[str, int] = {}  # target -> latest seq
        self.bytes = 0  # sum of the held entries' target lengths (admission's ``max_pending_bytes``)

    def __len__(self) -> int:
        return self.head - self.base

    def get(self, seq: int) -> Entry:
        i = self._offset + seq - self.base
        target = self._targets[i]
        assert target is not None
        return Entry(target, self._accepted[i], self._masks[i])

    def columns(self) -> tuple[list[str | None], list[float], list[int], int]:
        """``(targets, accepted, masks, off)``: entry ``seq`` is ``targets[seq + off]``, ``accepted[seq + off]``,
        ``masks[seq + off]``, for hot loops; valid until the next :meth:`trim` or :meth:`load` (appends keep it
        valid)."""
        return self._targets, self._accepted, self._masks, self._offset - self.base

    def append(self, target: str, now: float, dc_mask: int) -> tuple[int, bool]:
        """Add a purge; return ``(seq, merged)``. A merge reuses the unread latest entry for the same target."""
        latest = self.index.get(target)
        if latest is not None and latest >= self.read_mark:
            return latest, True
        seq = self.head
        self._targets.append(target)
        self._accepted.append(now)
        self._masks.append(dc_mask)
        self.bytes += len(target)
        self.index[target] = seq
        self.head += 1
        return seq, False

    def extend(self, targets: list[str], now: float, dc_mask, journal: list | None) -> tuple[int, int, dict]:
        """:meth:`append` for a batch, ``dc_mask(host)`` giving each new entry's mask (or ``dc_mask`` an int:
        every entry's mask, the routing not depending on the host). Returns the highest seq the batch got (-1
        if empty), how many merged, and how many new entries each mask got. New entries are added to
        ``journal`` as ``(seq, target, now)`` when given."""
        if len(targets) > 1:
            done = self._extend_unmerged(targets, now, dc_mask, journal)
            if done is not None:
                return done
        if dc_mask.__class__ is int:
            dc_mask = _constant(dc_mask)
        index, read_mark = self.index, self.read_mark
        get = index.get
        targets_append, accepted_append, masks_append = (self._targets.append, self._accepted.append,
                                                        self._masks.append)
        head = self.head
        hi = -1
        merged = 0
        nbytes = 0
        new: dict[int, int] = {}
        host = None
        mask = 0
        for target in targets:
            latest = get(target)
            if latest is not None and latest >= read_mark:
                merged += 1
                if latest > hi:
                    hi = latest
                continue
            h = target[: target.find("/")]
            if h != host:
                host, mask = h, dc_mask(h)
            targets_append(target)
            accepted_append(now)
            masks_append(mask)
            index[target] = head
            nbytes += len(target)
            new[mask] = new.get(mask, 0) + 1
            if journal is not None:
                journal.append((head, target, now))
            hi = head
            head += 1
        self.head = head
        self.bytes += nbytes
        return hi, merged, new

    def _extend_unmerged(self, targets: list[str], now: float, dc_mask, journal: list | None
                         ) -> tuple[int, int, dict] | None:
        """:meth:`extend`'s common case in bulk (C-level list and dict operations, nothing per target in
        Python): no target twice in the batch and none with an unread entry, so every target is a new entry.
        None (nothing changed) otherwise, or if a target's host cannot be cut as the loop cuts it."""
        index = self.index
        n = len(targets)
        head = self.head
        if dc_mask.__class__ is int:
            masks = None
            new = {dc_mask: n}
        else:
            joined = "\n" + "\n".join(targets)
            hosts = _HOST_RE.findall(joined)  # the loop's target[:target.find("/")], if every target has a "/"
            if len(hosts) != n or joined.count("\n") != n:
                return None
            mask_of = {host: dc_mask(host) for host in dict.fromkeys(hosts)}
            if len(set(mask_of.values())) == 1:
                dc_mask = next(iter(mask_of.values()))
                masks = None
                new = {dc_mask: n}
            else:
                masks = list(map(mask_of.__getitem__, hosts))
                new = dict(Counter(masks))
        before = len(index)
        seqs = range(head, head + n)
        held = list(map(index.setdefault, targets, seqs))  # one probe each: a target not held gets its seq
        if len(index) != before + n:  # some target is held already, or twice in the batch
            read_mark = self.read_mark
            if len(set(targets)) != n or (read_mark < head and any(map(range(read_mark, head).__contains__, held))):
                for target in targets:  # one merges: undo, and let the loop do it
                    if index.get(target, -1) >= head:
                        del index[target]
                return None
            index.update(zip(targets, seqs, strict=True))  # every one held was read: a new entry each
        self._targets += targets
        self._accepted += repeat(now, n)
        self._masks += repeat(dc_mask, n) if masks is None else masks
        if journal is not None:
            journal.extend(zip(range(head, head + n), targets, repeat(now)))
        self.head = head + n
        self.bytes += sum(map(len, targets))
        return head + n - 1, 0, new

    def mark_read(self, seq: int) -> None:
        """A node read ``seq``: from now on a new purge of that target needs a new entry."""
        if seq >= self.read_mark:
            self.read_mark = seq + 1

    def trim(self, below: int) -> int:
        """Forget entries below ``below`` (every node is done with them); return how many were dropped."""
        dropped = min(below, self.head) - self.base
        if dropped <= 0:
            return 0
        column, index = self._targets, self.index
        i = self._offset
        targets = column[i : i + dropped]
        column[i : i + dropped] = repeat(None, dropped)
        self.bytes -= sum(map(len, targets))
        # A target leaves the index with its latest entry (a superseded one left the index's value alone).
        # When the index has as many targets as the log entries, each entry is the latest for its target.
        if len(index) == self.head - self.base:
            deque(map(index.pop, targets), maxlen=0)
        else:
            latest = map(index.get, targets)  # lazily: a pop never changes a later target's latest seq
            deque(map(index.pop, compress(targets, map(eq, latest, range(self.base, self.base + dropped)))), maxlen=0)
        self._offset += dropped
        self.base += dropped
        # Compact once the dead prefix dominates: amortised O(1) per entry, and list indexing stays O(1).
        if self._offset > 4096 and self._offset * 2 > len(column):
            for col in (self._targets, self._accepted, self._masks):
                del col[: self._offset]
            self._offset = 0
        return dropped

    def entries(self, start: int | None = None) -> list[tuple[int, Entry]]:
        """``(seq, entry)`` from ``start`` (default: the base) to the head, for a snapshot."""
        first = self.base if start is None else max(start, self.base)
        return [(seq, self.get(seq)) for seq in range(first, self.head)]

    def remask(self, mask_of) -> None:
        """Route every held entry again: its ``dc_mask`` becomes ``mask_of(target)`` (a reload changed routes)."""
        targets, masks = self._targets, self._masks
        for i in range(self._offset, len(targets)):
            target = targets[i]
            if target is not None:
                masks[i] = mask_of(target)

    def load(self, base: int, targets: list[str], accepted: list[float], masks: list[int], read_mark: int) -> None:
        """Replace the content with the entries of these columns (a journal replay), numbered from ``base``; the
        log keeps the lists."""
        self._targets = targets  # type: ignore[assignment]  # a trim writes None into it
        self._accepted = accepted
        self._masks = masks
        self._offset = 0
        self.base = base
        self.head = base + len(targets)
        self.read_mark = max(base, min(read_mark, self.head))
        self.index = {target: base + i for i, target in enumerate(self._targets)}
        self.bytes = sum(map(len, self._targets))

