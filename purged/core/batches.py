"""Core layer: the recently accepted batches, and what "done" means for one (DESIGN.md §2: status is positions).

A batch accepted into a lane as seqs below ``hi`` is done on a node when that node's position in the lane is at
least ``hi``, and done everywhere when the lane's floor (the lowest position of all its nodes) is. So a status
is a comparison, and a waiter only needs waking when its lane's floor passes its ``hi``.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Batch:
    lane: int
    hi: int  # one past the highest seq holding one of its purges
    accepted: int
    created: float


@dataclass(frozen=True, slots=True)
class TierProgress:
    nodes: int
    done: int


@dataclass(frozen=True, slots=True)
class BatchStatus:
    id: str
    done: bool
    accepted: int
    priority: str
    datacenters: dict[str, dict[str, TierProgress]]


class Batches:
    """The last ``keep`` batches by id (older ones are forgotten: their status answers 404)."""

    def __init__(self, prefix: str, keep: int):
        self._prefix = prefix
        self.keep = keep
        self.count = 0  # batches ever accepted by this process
        self._recent: OrderedDict[str, Batch] = OrderedDict()

    def add(self, lane: int, hi: int, accepted: int, now: float) -> str:
        self.count += 1
        batch_id = f"{self._prefix}{self.count}"
        self._recent[batch_id] = Batch(lane, hi, accepted, now)
        while len(self._recent) > self.keep:
            self._recent.popitem(last=False)
        return batch_id

    def get(self, batch_id: str) -> Batch | None:
        return self._recent.get(batch_id)
