"""Core layer: one node's position in the purge log.

``cursor`` is the next seq to read. ``position`` (the acked watermark) is the lowest seq the node is not done
with: an entry sent but not yet acknowledged, waiting for a retry, or skipped because a later entry for the same
target supersedes it (then it is done when that later entry is). Everything below ``position`` has been
delivered to this node or was never meant for it. Batch status, tier gates and log trimming are comparisons
against it.
"""

from __future__ import annotations

import heapq
from collections import deque


class NodeCursor:
    def __init__(self, name: str, dc_bit: int, start: int):
        self.name = name
        self.dc_bit = dc_bit
        self.cursor = start
        self._order: deque[int] = deque()  # seqs taken or pinned, in read order
        self._done: set[int] = set()  # finished seqs still inside _order
        self._waiters: dict[int, list[int]] = {}  # superseding seq -> seqs pinned on it
        self.inflight: set[int] = set()
        self.retries: list[tuple[float, int]] = []  # heap of (due, seq)
        self.failures = 0  # consecutive
        self.down = False
        self.matched = 0  # entries read that were meant for this node (sent or superseded)

    @property
    def position(self) -> int:
        return self._order[0] if self._order else self.cursor

    @property
    def unfinished(self) -> int:
        return len(self._order) - len(self._done)

    def take(self, seq: int) -> None:
        self._order.append(seq)
        self.inflight.add(seq)

    def pin(self, seq: int, superseded_by: int) -> None:
        self._order.append(seq)
        self._waiters.setdefault(superseded_by, []).append(seq)

    def finish(self, seq: int) -> None:
        """``seq`` is delivered (or given up on): it and everything pinned on it are done."""
        stack = [seq]
        while stack:
            s = stack.pop()
            self._done.add(s)
            stack.extend(self._waiters.pop(s, ()))
        order, done = self._order, self._done
        while order and order[0] in done:
            done.discard(order.popleft())

    def schedule_retry(self, seq: int, due: float) -> None:
        self.inflight.discard(seq)
        heapq.heappush(self.retries, (due, seq))

    def due_retries(self, now: float, limit: int) -> list[int]:
        out: list[int] = []
        while self.retries and self.retries[0][0] <= now and len(out) < limit:
            out.append(heapq.heappop(self.retries)[1])
        return out

    def next_retry(self) -> float | None:
        return self.retries[0][0] if self.retries else None
