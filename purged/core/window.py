"""Core layer (sans-IO): a node's in-flight window, sized to the bandwidth-delay product as TCP sizes its own.

A pipelined sender delivers at most ``window / RTT`` PURGEs per second: 1,024 in flight carry 12.7k/s across
an 80 ms round trip and far more than any edge takes on loopback. :class:`WindowControl` grows a node's
window while that buys throughput and gives the growth back when it only buys latency:

* The sender reports what it sees, with ``now``: ``full(now)`` when a connection had to wait for room (the
  window, not the edge or the engine, was the limit), ``acked(count, rtt, now)`` per read of answers (``rtt``:
  how long the oldest of them was in flight), ``failed(now)`` when a connection failed.
* Time is cut into rounds of at least two round trips (and at least ``min_round``). A round in which the window
  was never full says nothing (the node gets all it is given: a rate-limited or idle node stays put).
* A full round after a growth that delivered ``growth`` times the rate of the round before it (more than the
  noise) grows again: doubling, like slow start. One that did not undoes the growth: more in flight raised the
  latency, not the throughput. Every ``probe_every`` full rounds without a change it probes once more (the
  path or the edge may have changed).
* A failed connection halves the window; a full round whose shortest RTT is over ``inflation`` times the
  node's base RTT (the least seen) shrinks it by a quarter: the edge is queueing.

The window never leaves ``[start, cap]``: ``start`` is what the operator configured (``sender.window`` per
connection), so adapting never sends a node less than a fixed window would, and errors are the engine's to
back off (retries, down-probing). ``cap`` bounds memory and the burst a node may get.
"""

from __future__ import annotations

__all__ = ["WindowControl"]


class WindowControl:
    __slots__ = (
        "start", "cap", "limit", "min_round", "growth", "inflation", "probe_every", "base_rtt", "_round_start",
        "_acks", "_full", "_round_rtt", "_settling", "_before", "_before_rate", "_steady", "_wait", "grown", "shrunk",
    )

    def __init__(self, start: int, cap: int, *, now: float, min_round: float = 0.05, growth: float = 1.2,
                 inflation: float = 4.0, probe_every: int = 40):
        self.start = max(1, start)
        self.cap = max(self.start, cap)
        self.limit = self.start  # PURGEs the node may have in flight
        self.min_round = min_round
        self.growth = growth
        self.inflation = inflation
        self.probe_every = probe_every
        self.base_rtt = float("inf")  # the least RTT seen: propagation and service, no queue
        self._round_start = now
        self._acks = 0
        self._full = False
        self._round_rtt = float("inf")
        self._settling = True  # the first round after a change shows the old window's rate: not judged
        self._before = 0  # the limit before the last growth, while that growth is on trial (0: none)
        self._before_rate = 0.0  # the rate measured at _before
        self._steady = 0  # full rounds judged since the last change
        self._wait = 1  # full rounds at a window before trying a larger one
        self.grown = self.shrunk = 0  # counters, for metrics and tests

    @property
    def adaptive(self) -> bool:
        return self.cap > self.start

    def full(self, now: float) -> None:
        self._full = True
        self._maybe_end_round(now)

    def acked(self, count: int, rtt: float, now: float) -> None:
        self._acks += count
        if rtt < self._round_rtt:
            self._round_rtt = rtt
        if rtt < self.base_rtt:
            self.base_rtt = rtt
        self._maybe_end_round(now)

    def failed(self, now: float) -> None:
        if self.limit > self.start:
            self._set(max(self.start, self.limit // 2), now)
            self.shrunk += 1
        self._before = 0
        self._wait = self.probe_every

    def _maybe_end_round(self, now: float) -> None:
        elapsed = now - self._round_start
        base = self.base_rtt
        if elapsed < self.min_round or (base != float("inf") and elapsed < 2 * base):
            return
        rate = self._acks / elapsed
        full, rtt = self._full, self._round_rtt
        self._round_start, self._acks, self._full, self._round_rtt = now, 0, False, float("inf")
        if self._settling:
            self._settling = False
            return
        if not full or not self.adaptive:
            return  # the window was not the limit: nothing to learn about it
        if self._before:  # a growth on trial
            if rate >= self._before_rate * self.growth:
                self._grow(rate, now)  # it paid: keep growing
            else:
                self._set(self._before, now)  # it bought latency, not throughput: give it back
                self._before = 0
                self._wait = self.probe_every
                self.shrunk += 1
            return
        if rtt > base * self.inflation and self.limit > self.start:
            self._set(max(self.start, self.limit * 3 // 4), now)  # the edge is queueing: less in flight
            self._wait = self.probe_every
            self.shrunk += 1
            return
        self._steady += 1
        if self._steady >= self._wait:
            self._grow(rate, now)  # at first at once, after a setback now and then: try more

    def _grow(self, rate: float, now: float) -> None:
        if self.limit >= self.cap:
            self._before = 0
            return
        self._before, self._before_rate = self.limit, rate
        self._set(min(self.cap, self.limit * 2), now)
        self.grown += 1

    def _set(self, limit: int, now: float) -> None:
        self.limit = limit
        self._steady = 0
        self._settling = True
        self._round_start, self._acks, self._full, self._round_rtt = now, 0, False, float("inf")
