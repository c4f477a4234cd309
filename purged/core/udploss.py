"""Core layer (sans-IO): estimate datagram loss from per-sender sequence numbers.

HTCP transaction ids are sequential per sending host in MediaWiki (``newSequentialPerNodeIDs``); npm
``htcp-purge`` numbers from 0 or 1 in each process and misbehaves past 2**31; purged's own batches carry an
explicit ``seq``. So a sequence may restart, wrap or leap at any moment, and a restart must read as one
``reset``, not as 2**31 losses.

Each source keeps a window of its last :attr:`LossTracker.window` sequence numbers as a bitmap. A number
missing when it slides out of the window is counted ``lost``; one that arrives late but inside the window is
``reordered`` (never counted lost, so ``lost`` only grows, as a Prometheus counter must); one already seen is
a ``duplicate``. A jump forward of more than ``max_gap``, a step back beyond the window, or a step back to a
number <= ``restart_max`` that was already seen is a ``reset``: the window restarts at the new number.
Sources are kept in LRU order up to ``max_sources``; an evicted source settles its window first.
"""

from __future__ import annotations

COUNTERS = ("received", "lost", "duplicates", "reordered", "resets")


class _Source:
    __slots__ = ("last", "seen", "received", "lost", "duplicates", "reordered", "resets")

    def __init__(self, seq: int, seen: int):
        self.last = seq
        self.seen = seen  # bit i set: last - i arrived (bits before the first number are set: not expected)
        self.received = 1
        self.lost = self.duplicates = self.reordered = self.resets = 0

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in COUNTERS} | {"last_seq": self.last}


class LossTracker:
    """Per-source loss, duplicate, reorder and reset counts from sequence numbers. Memory: ``max_sources``."""

    def __init__(
        self, *, window: int = 256, max_gap: int = 100_000, restart_max: int = 1, max_sources: int = 1024
    ):
        if window < 1 or max_gap < window or max_sources < 1:
            raise ValueError("need window >= 1, max_gap >= window, max_sources >= 1")
        self.window = window
        self.max_gap = max_gap
        self.restart_max = restart_max
        self.max_sources = max_sources
        self._mask = (1 << window) - 1
        self._top = window - 1
        self._sources: dict[str, _Source] = {}
        # Totals include evicted sources, so they only grow.
        self._totals = dict.fromkeys(COUNTERS, 0)
        self.evicted = 0

    def observe(self, source: str, seq: int) -> None:
        sources = self._sources
        st = sources.pop(source, None)  # re-inserting below moves it to the LRU tail
        if st is None:
            if len(sources) >= self.max_sources:
                self._evict()
            sources[source] = _Source(seq, self._mask)
            self._totals["received"] += 1
            return
        sources[source] = st
        st.received += 1
        self._totals["received"] += 1
        delta = seq - st.last
        if delta == 1:  # the common case: slide by one; the oldest number leaves the window
            if not st.seen >> self._top:
                self._count_lost(st, 1)
            st.last = seq
            st.seen = ((st.seen << 1) | 1) & self._mask
        elif 1 < delta <= self.max_gap:
            self._count_lost(st, self._slide(st, delta))
            st.last = seq
        elif delta > 0:
            self._reset(st, seq)
        elif -delta < self.window:
            bit = 1 << -delta
            if not st.seen & bit:
                st.seen |= bit
                st.reordered += 1
                self._totals["reordered"] += 1
            elif seq <= self.restart_max:
                self._reset(st, seq)
            else:
                st.duplicates += 1
                self._totals["duplicates"] += 1
        else:
            self._reset(st, seq)

    def _slide(self, st: _Source, delta: int) -> int:
        """Advance the window by ``delta``; return how many numbers fell out unseen."""
        window = self.window
        out = min(delta, window)
        gone = st.seen >> (window - out)  # the ``out`` oldest bits
        missing = out - gone.bit_count() + max(0, delta - window)
        st.seen = ((st.seen << delta) | 1) & self._mask
        return missing

    def _count_lost(self, st: _Source, n: int) -> None:
        if n:
            st.lost += n
            self._totals["lost"] += n

    def _settle(self, st: _Source) -> None:
        # Numbers still missing from the window will not come now.
        self._count_lost(st, self.window - st.seen.bit_count())

    def _reset(self, st: _Source, seq: int) -> None:
        self._settle(st)
        st.last = seq
        st.seen = self._mask
        st.resets += 1
        self._totals["resets"] += 1

    def _evict(self) -> None:
        oldest = next(iter(self._sources))
        self._settle(self._sources.pop(oldest))
        self.evicted += 1

    def forget(self, source: str) -> None:
        """Drop a source (settling its window), e.g. when it is known to have stopped."""
        st = self._sources.pop(source, None)
        if st is not None:
            self._settle(st)

    def __len__(self) -> int:
        return len(self._sources)

    def statistics(self) -> dict:
        """``{"received", "lost", "duplicates", "reordered", "resets", "sources", "evicted", "per_source"}``.

        The five totals are monotonic (they include evicted sources); ``per_source`` maps each tracked source
        to its own counters plus ``last_seq``. ``lost`` excludes numbers still inside a source's window.
        """
        return self._totals | {
            "sources": len(self._sources),
            "evicted": self.evicted,
            "per_source": {name: st.as_dict() for name, st in self._sources.items()},
        }
