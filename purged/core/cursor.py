"""Core layer: one node's position in one purge log.

``cursor`` is the next seq to read. ``position`` is the lowest seq the node is not done with: an entry taken but
not yet acknowledged (in flight, deferred or waiting for a retry), or skipped because a later entry for the same
target supersedes it (then it is done when that later entry is). Everything below ``position`` has been delivered
to the node, dropped for it by a counted policy, or was never meant for it. Batch status, tier gates and log
trimming are comparisons against it.
"""

from __future__ import annotations

from collections import deque


class NodeCursor:
    __slots__ = ("cursor", "matched", "_order", "_done", "_waiters")

    def __init__(self, start: int, matched: int = 0):
        self.cursor = start
        self.matched = matched  # entries read that were meant for this node
        self._order: deque[int] = deque()  # seqs taken or pinned, in read order
        self._done: set[int] = set()  # finished seqs still inside _order
        self._waiters: dict[int, list[int]] = {}  # superseding seq -> seqs pinned on it

    @property
    def position(self) -> int:
        return self._order[0] if self._order else self.cursor

    @property
    def unfinished(self) -> int:
        return len(self._order) - len(self._done)

    def take(self, seq: int) -> None:
        self._order.append(seq)

    def pin(self, seq: int, superseded_by: int) -> None:
        self._order.append(seq)
        self._waiters.setdefault(superseded_by, []).append(seq)

    def finish(self, seq: int) -> None:
        """``seq`` is delivered (or dropped by policy): it and everything pinned on it are done."""
        order, done = self._order, self._done
        if not self._waiters:  # the usual case, nothing pinned: no stack
            if order and order[0] == seq:
                order.popleft()
                while order and order[0] in done:
                    done.discard(order.popleft())
            else:
                done.add(seq)
            return
        stack = [seq]
        while stack:
            s = stack.pop()
            self._done.add(s)
            stack.extend(self._waiters.pop(s, ()))
        while order and order[0] in done:
            done.discard(order.popleft())

    def skip_to(self, seq: int) -> int:
        """Give up on everything before ``seq`` (a node declared out of sync); return how many were unfinished."""
        dropped = self.unfinished
        self._order.clear()
        self._done.clear()
        self._waiters.clear()
        self.cursor = max(self.cursor, seq)
        return dropped
