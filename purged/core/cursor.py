"""Core layer: one node's position in one purge log.

``cursor`` is the next seq to read. ``position`` is the lowest seq the node is not done with: an entry taken but
not yet acknowledged (in flight, deferred or waiting for a retry), or skipped because a later entry for the same
target supersedes it (then it is done when that later entry is). Everything below ``position`` has been delivered
to the node, dropped for it by a counted policy, or was never meant for it. Batch status, tier gates and log
trimming are comparisons against it.

What is taken is kept as runs ``[lo, hi)`` of consecutive seqs, not one item per seq: a node takes its window as
one run and, answers coming back in order, one read's acknowledgements finish the front of the oldest run at
once (:meth:`NodeCursor.finish_run`), O(1) whatever their number. What is finished out of order waits in
``_done`` until the front reaches it, as runs too: a node's connections each hold a slice of its window, and the
answers of one connection that come back before an older one's are one run, not one item per seq.
"""

from __future__ import annotations

from collections import deque


class NodeCursor:
    __slots__ = ("cursor", "matched", "_runs", "_count", "_done", "_ndone", "_waiters")

    def __init__(self, start: int, matched: int = 0):
        self.cursor = start
        self.matched = matched  # entries read that were meant for this node
        # Seqs taken or pinned, ascending (they are read in order): disjoint runs [lo, hi), oldest first.
        self._runs: deque[list[int]] = deque()
        self._count = 0  # seqs inside _runs
        # Finished runs still inside _runs, lo -> hi, disjoint (each within one taken run), and how many seqs in all.
        self._done: dict[int, int] = {}
        self._ndone = 0
        self._waiters: dict[int, list[int]] = {}  # superseding seq -> seqs pinned on it

    @property
    def position(self) -> int:
        runs = self._runs
        return runs[0][0] if runs else self.cursor

    @property
    def unfinished(self) -> int:
        return self._count - self._ndone

    def take(self, seq: int) -> None:
        runs = self._runs
        if runs and runs[-1][1] == seq:
            runs[-1][1] = seq + 1
        else:
            runs.append([seq, seq + 1])
        self._count += 1

    def take_run(self, lo: int, hi: int) -> None:
        """:meth:`take` each seq of ``lo .. hi - 1`` (above everything taken so far)."""
        runs = self._runs
        if runs and runs[-1][1] == lo:
            runs[-1][1] = hi
        else:
            runs.append([lo, hi])
        self._count += hi - lo

    def pin(self, seq: int, superseded_by: int) -> None:
        self.take(seq)
        self._waiters.setdefault(superseded_by, []).append(seq)

    def finish(self, seq: int) -> None:
        """``seq`` is delivered (or dropped by policy): it and everything pinned on it are done."""
        if not self._waiters:  # the usual case, nothing pinned: no stack
            runs = self._runs
            if runs:
                run = runs[0]
                if run[0] == seq:
                    self._count -= 1
                    if seq + 1 < run[1]:
                        run[0] = seq + 1
                    else:
                        runs.popleft()
                    if self._done:
                        self._advance()
                    return
            self._done[seq] = seq + 1
            self._ndone += 1
            return
        done, waiters = self._done, self._waiters
        stack = [seq]
        while stack:
            s = stack.pop()
            done[s] = s + 1
            self._ndone += 1
            stack.extend(waiters.pop(s, ()))
        self._advance()

    def finish_run(self, lo: int, hi: int) -> None:
        """:meth:`finish` each seq of ``lo .. hi - 1``, all taken and unfinished (consecutive seqs taken are
        one run): O(1) when nothing is pinned on them, at the front of the oldest run or not."""
        runs = self._runs
        waiters = self._waiters
        if runs and (not waiters or waiters.keys().isdisjoint(range(lo, hi))):
            run = runs[0]
            if run[0] == lo and hi <= run[1]:
                self._count -= hi - lo
                if hi < run[1]:
                    run[0] = hi
                else:
                    runs.popleft()
                if self._done:
                    self._advance()
            else:  # answers of a younger connection before an older one's: they wait as one run
                self._done[lo] = hi
                self._ndone += hi - lo
            return
        for seq in range(lo, hi):
            self.finish(seq)

    def _advance(self) -> None:
        """Drop finished seqs from the front of the runs."""
        runs, done = self._runs, self._done
        while runs:
            run = runs[0]
            first, hi = run
            lo = first
            while lo < hi and (end := done.pop(lo, None)) is not None:
                if end > hi:  # a finished run reaching past this taken run: the rest waits for the next one
                    done[hi] = end
                    end = hi
                lo = end
            self._count -= lo - first
            self._ndone -= lo - first
            if lo < hi:
                run[0] = lo
                return
            runs.popleft()

    def skip_to(self, seq: int) -> int:
        """Give up on everything before ``seq`` (a node declared out of sync); return how many were unfinished."""
        dropped = self.unfinished
        self._runs.clear()
        self._count = 0
        self._done.clear()
        self._ndone = 0
        self._waiters.clear()
        self.cursor = max(self.cursor, seq)
        return dropped
