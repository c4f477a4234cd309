"""Core layer: how the engine handles failures: retries with jittered backoff, marking a node down, and the
poison rule that sets aside a purge a node singles out (DESIGN.md guarantee 4).

A part of :class:`purged.core.engine.Engine` (its base class), kept apart because it is the one place where
answers turn into retries and drops; it uses the engine's nodes, lanes, policy, random source and outbox.
"""

from __future__ import annotations

import heapq
import random
from typing import TYPE_CHECKING

from .events import Outbox, SetAside
from .node import Node, Policy

if TYPE_CHECKING:
    from .lane import Lane


class Failures:
    nodes: dict[str, Node]
    lanes: list[Lane]
    policy: Policy
    _rng: random.Random
    _out: Outbox

    def _finish(self, node: Node, ident: int, now: float) -> None:
        raise NotImplementedError

    def fail(self, name: str, idents: list[int], kind: str, now: float) -> None:
        """A connection failed (``kind``: connect, reset, timeout, protocol, closed) with ``idents`` unanswered,
        in the order they were sent. The first of them is the suspect: the request the node failed on."""
        node = self.nodes.get(name)
        if node is None:
            return
        node.stats.errors[kind] = node.stats.errors.get(kind, 0) + 1
        self._failed(node, now)
        suspect = next((i for i in idents if i in node.inflight), None)
        if suspect is None:
            node.last_failure = (None, node.oks)  # no request to blame (connect, idle timeout): node-wide
        else:
            self._suspect(node, suspect, now)  # set aside, or left in flight to be retried below
        for ident in idents:
            if ident in node.inflight:
                self._schedule_retry(node, ident, now)

    def _suspect(self, node: Node, ident: int, now: float) -> bool:
        """Count a failure that followed ``ident`` on ``node``; at ``poison_after`` strikes set it aside for that
        node (DESIGN.md guarantee 4: one purge a node singles out never holds a lane or a tier gate forever).

        A failure is a strike only while the node is not failing everything: no other purge failed on it since
        its last success, or it answered some other purge since this one last failed. A node failing every
        purge it gets (a 503 storm, a restart, a stall) thus gives at most the first of them a strike, and
        strikes gathered before an outage do not turn its tail into drops. The purge is set aside only once
        the node answered some other purge since this one first failed: a lone purge through an outage waits.

        Callers report answers in the order the node gave them, each success counted in ``node.oks`` before the
        next failure is judged (a batched ack must not hold its successes back until after its failures)."""
        last = node.last_failure  # (the only purge that failed since the last success, or None: several; oks)
        fresh = last is None or last[1] != node.oks  # a success since the node's last failure
        alone = fresh or last[0] == ident
        node.last_failure = (ident if alone else None, node.oks)
        limit = self.policy.poison_after
        if not limit:
            return False
        strikes, first_oks, last_oks = node.suspects.get(ident, (0, node.oks, node.oks))
        if alone or node.oks != last_oks:
            strikes += 1
        if strikes < limit or node.oks == first_oks:
            node.suspects[ident] = (strikes, first_oks, node.oks)
            return False
        del node.suspects[ident]
        node.inflight.discard(ident)
        node.stats.dropped["poison"] = node.stats.dropped.get("poison", 0) + 1
        target = self.lanes[ident & 1].log.get(ident >> 1).target
        self._out.set_aside.append(SetAside(node.name, target, strikes))
        self._out.wake.add(node.name)
        self._finish(node, ident, now)
        return True

    def requeue(self, name: str, idents: list[int], now: float) -> None:
        """The connection closed gracefully with ``idents`` unanswered: resend them, no failure counted."""
        node = self.nodes.get(name)
        if node is not None:
            for ident in idents:
                if ident in node.inflight:
                    node.inflight.discard(ident)
                    heapq.heappush(node.retries, (now, ident))
                    self._out.wake.add(name)

    def _failed(self, node: Node, now: float) -> None:
        node.failures += 1
        if node.failures >= self.policy.down_after:
            node.down = True

    def _backoff(self, failures: int) -> float:
        """Capped exponential backoff, jittered to [1/2, 1] of the step so that many nodes' retries spread."""
        p = self.policy
        step = min(p.retry_max, p.retry_initial * 2 ** min(max(failures - 1, 0), 30))
        return step * (0.5 + self._rng.random() / 2)

    def reconnect_delay(self, name: str) -> float:
        node = self.nodes.get(name)
        return self._backoff(node.failures) if node is not None and node.failures else 0.0

    def _schedule_retry(self, node: Node, ident: int, now: float) -> None:
        node.inflight.discard(ident)
        # A purge that keeps failing backs off on its own count too, though the node answers others.
        failures = max(node.failures, node.suspects[ident][0]) if ident in node.suspects else node.failures
        heapq.heappush(node.retries, (now + self._backoff(failures), ident))
        self._out.timer = True
