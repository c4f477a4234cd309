"""Core layer: token buckets and the per-node dedup window, both driven by an explicit ``now``."""

from __future__ import annotations

from collections import deque


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved up. ``rate <= 0`` means unlimited."""

    __slots__ = ("rate", "burst", "tokens", "stamp")

    def __init__(self, rate: float, burst: float, now: float):
        self.rate = rate
        self.burst = max(burst, 1.0)
        self.tokens = self.burst
        self.stamp = now

    @property
    def unlimited(self) -> bool:
        return self.rate <= 0

    def _refill(self, now: float) -> None:
        if now > self.stamp:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now

    def available(self, now: float) -> int:
        if self.rate <= 0:
            return 1 << 62
        self._refill(now)
        return int(self.tokens)

    def consume(self, n: int, now: float) -> None:
        if self.rate > 0:
            self._refill(now)
            self.tokens -= n

    def when_available(self, n: int = 1) -> float:
        """The time at which ``n`` tokens will be there (``stamp`` if they are now)."""
        if self.rate <= 0 or self.tokens >= n:
            return self.stamp
        return self.stamp + (n - self.tokens) / self.rate

    def admit(self, n: int, now: float) -> float | None:
        """Take ``n`` tokens for a request, or say when to retry. A request larger than the burst passes when
        the bucket is full and leaves it in debt, so big batches are slowed, never refused forever."""
        if self.rate <= 0:
            return None
        self._refill(now)
        need = min(n, self.burst)
        if self.tokens >= need:
            self.tokens -= n
            return None
        return self.stamp + (need - self.tokens) / self.rate


class DedupWindow:
    """Remembers when each target was last sent to one node, for ``window`` seconds.

    Memory is bounded by what one node sends in one window; expired targets are forgotten in send order.
    """

    __slots__ = ("window", "_sent", "_order")

    def __init__(self, window: float):
        self.window = window
        self._sent: dict[str, float] = {}
        self._order: deque[tuple[float, str]] = deque()

    def __len__(self) -> int:
        return len(self._sent)

    def blocked_until(self, target: str, now: float) -> float | None:
        """When ``target`` may be sent again, or ``None`` if it may be sent now."""
        sent = self._sent.get(target)
        if sent is None or sent + self.window <= now:
            return None
        return sent + self.window

    def sent(self, target: str, now: float) -> None:
        self._sent[target] = now
        self._order.append((now, target))
        horizon = now - self.window
        order, sent = self._order, self._sent
        while order and order[0][0] <= horizon:
            t, old = order.popleft()
            if sent.get(old) == t:
                del sent[old]
