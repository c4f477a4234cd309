"""Trio adapter layer: log lines that bad input can trigger, rate-limited so that it cannot flood the log."""

from __future__ import annotations

import logging

import trio

LOG_INTERVAL = 10.0


class RateLimitedLog:
    """At most one line per ``interval`` seconds per key; the next line says how many were suppressed."""

    def __init__(self, logger: logging.Logger, interval: float = LOG_INTERVAL):
        self._log = logger
        self._interval = interval
        self._next: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def log(self, level: int, key: str, msg: str, *args: object) -> None:
        now = trio.current_time()
        if now < self._next.get(key, -1.0):
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return
        if len(self._next) > 1000:  # keys come from a small fixed set; this only bounds a mistake
            self._next.clear()
        self._next[key] = now + self._interval
        skipped = self._suppressed.pop(key, 0)
        if skipped:
            msg += " (%d more like this suppressed)"
            args = (*args, skipped)
        self._log.log(level, msg, *args)

    def warning(self, key: str, msg: str, *args: object) -> None:
        self.log(logging.WARNING, key, msg, *args)

    def info(self, key: str, msg: str, *args: object) -> None:
        self.log(logging.INFO, key, msg, *args)
