"""Core layer: what the engine tells the I/O layer after it was fed, like h11's and aioquic's events.

Every engine call that changes state records here what the adapters must do about it; the adapters drain it
with :meth:`Engine.events` in one place and act: wake the senders of the nodes named, re-read the timer, wake
the status waiters whose batches may be done, log a purge set aside. Nothing here is a flag for anyone outside
the core to clear.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SetAside:
    """A purge a node kept failing on (``sender.poison_after`` times in a row), dropped for that node."""

    node: str
    target: str
    failures: int


@dataclass(frozen=True, slots=True)
class Events:
    wake: frozenset[str] = frozenset()  # nodes whose take() may return purges now
    timer: bool = False  # get_timer() may be earlier than the I/O layer last read
    floors: tuple[int, ...] | None = None  # per lane, the seq below which every node is done (when it moved)
    set_aside: tuple[SetAside, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.wake or self.timer or self.floors is not None or self.set_aside)


class Outbox:
    """The engine's queue of pending events, shared with its lanes (same layer)."""

    __slots__ = ("wake", "timer", "progress", "set_aside")

    def __init__(self) -> None:
        self.wake: set[str] = set()
        self.timer = False
        self.progress = False  # a node finished something: floors may have moved
        self.set_aside: list[SetAside] = []
