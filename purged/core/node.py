"""Core layer: an edge node's state across lanes (in flight, retries, health, rate, dedup window, counters),
the engine-wide policy knobs, and what a node's answer means."""

from __future__ import annotations

from dataclasses import dataclass, field

from .histogram import Histogram
from .limits import DedupWindow, TokenBucket


def is_success(status: int) -> bool:
    """A node's answer that means delivered: 2xx, or 404 as ATS answers for an object it lacks."""
    return 200 <= status < 300 or status == 404


def classify(status: int) -> str:
    """What a node's answer means: ``ok`` (2xx, or 404 as ATS answers for an object it lacks), ``retry``
    (5xx, 408, 429: the node may do better later) or ``error`` (other codes: a misconfigured edge; retrying
    would not help)."""
    if is_success(status):
        return "ok"
    if status >= 500 or status in (408, 429):
        return "retry"
    return "error"


@dataclass(frozen=True)
class Policy:
    """Engine-wide knobs (from the config); 0 disables a limit."""

    retry_initial: float = 0.1
    retry_max: float = 30.0
    down_after: int = 5
    dedup_window: float = 0.0
    linger: float = 0.0
    max_lag: int = 0  # a node owing more purges than this is declared out of sync
    max_age: float = 0.0  # purges older than this when a node reaches them are dropped for it
    recent_batches: int = 100_000
    poison_after: int = 5  # strikes against the same purge on a node before it is set aside (0: never)


@dataclass
class NodeStats:
    sent: int = 0
    responses: dict[int, int] = field(default_factory=dict)
    retries: int = 0
    errors: dict[str, int] = field(default_factory=dict)  # connection failures by type
    gave_up: int = 0  # answered with an error status: counted, not retried
    deferred: int = 0  # held back by the dedup window
    rate_limited: int = 0  # times the node had work but no tokens
    dropped: dict[str, int] = field(default_factory=dict)  # by policy: max_age, max_lag, poison
    resyncs: int = 0


class Node:
    """Node-wide state that spans lanes: what is in flight, retries, health, rate, dedup window, counters."""

    def __init__(self, name: str, dc_index: int, tier_index: int, bucket: TokenBucket, window: float):
        self.name = name
        self.dc_index, self.tier_index = dc_index, tier_index
        self.dc_bit = 1 << dc_index
        self.inflight: set[int] = set()
        self.retries: list[tuple[float, int]] = []  # heap of (due, id): retries and dedup deferrals
        self.deferred: dict[str, int] = {}  # target -> id waiting in ``retries`` for its dedup window to end
        # Engine._suspect: id -> (strikes, ``oks`` at its first failure, ``oks`` at its last failure), and the
        # node's last failure: (the only purge that failed since its last success, None if several; ``oks``)
        self.suspects: dict[int, tuple[int, int, int]] = {}
        self.last_failure: tuple[int | None, int] | None = None
        self.oks = 0  # purges this node acknowledged
        self.failures = 0  # consecutive
        self.down = False
        self.out_of_sync = False
        self.bucket = bucket
        self.dedup = DedupWindow(window) if window > 0 else None
        self.stats = NodeStats()
        self.latency: Histogram | None = None  # the engine's histogram of its data centre and tier, once known
