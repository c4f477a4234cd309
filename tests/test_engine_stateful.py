"""Hypothesis stateful test of the engine: random interleavings of arrivals, sends, answers, connection
failures and clock steps. Invariants: backlogs are never negative; after a final drain every node has an empty
backlog (conservation: nothing lost, nothing dropped without a counted policy), and every purge was followed by
an acknowledged send of its URL to every node serving its host, sent no earlier than the purge arrived (never
suppress, DESIGN.md guarantee 2). Tier order: a frontend's send follows its backend's acknowledgement."""

import random

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from purged.core.engine import Engine, Policy
from purged.core.topology import DatacenterSpec, TierSpec, Topology

TARGETS = ["a.org/1", "a.org/2", "x.org/1", "x.org/2"]
NODES = ["b1", "b2", "f1", "c1"]
SERVES = {"b1": None, "b2": None, "f1": None, "c1": "x.org"}  # c1's DC serves x.org only
DELAY = 0.5


class EngineMachine(RuleBasedStateMachine):
    @initialize(window=st.sampled_from([0.0, 1.0]), linger=st.sampled_from([0.0, 0.2]))
    def setup(self, window, linger):
        topo = Topology(
            [
                DatacenterSpec("a", (), (TierSpec("be", 0.0, ("b1", "b2")), TierSpec("fe", DELAY, ("f1",)))),
                DatacenterSpec("b", ("x.org",), (TierSpec("be", 0.0, ("c1",)),)),
            ]
        )
        self.engine = Engine(
            topo, now=0.0, policy=Policy(dedup_window=window, linger=linger, down_after=3), rng=random.Random(0)
        )
        self.now = 0.0
        self.arrivals: list[tuple[str, float]] = []
        self.outstanding: dict[str, list[tuple[int, str, float]]] = {n: [] for n in NODES}
        # node -> (target, sent, acked, ident, accepted_at of its entry) of each acknowledged PURGE
        self.delivered: dict[str, list[tuple[str, float, float, int, float]]] = {n: [] for n in NODES}

    @rule(urls=st.lists(st.sampled_from(TARGETS), min_size=1, max_size=4), high=st.booleans())
    def submit(self, urls, high):
        self.engine.submit(urls, self.now, priority="high" if high else "bulk")
        self.arrivals.extend((t, self.now) for t in urls)

    @rule(node=st.sampled_from(NODES), n=st.integers(1, 5))
    def take(self, node, n):
        for ident, target in self.engine.take(node, n, self.now):
            self.outstanding[node].append((ident, target, self.now, self._accepted_at(ident)))

    def _accepted_at(self, ident):
        return self.engine.lanes[ident & 1].log.get(ident >> 1).accepted_at

    @precondition(lambda self: any(self.outstanding.values()))
    @rule(data=st.data(), status=st.sampled_from([200, 200, 404, 503]))
    def answer(self, data, status):
        node = data.draw(st.sampled_from([n for n in NODES if self.outstanding[n]]))
        ident, target, sent, at = self.outstanding[node].pop(0)  # responses come back in order
        if self.engine.ack(node, ident, status, self.now) == "ok":
            self.delivered[node].append((target, sent, self.now, ident, at))

    @precondition(lambda self: any(self.outstanding.values()))
    @rule(data=st.data(), statuses=st.lists(st.sampled_from([200, 200, 204, 404, 503]), min_size=1, max_size=6))
    def answer_many(self, data, statuses):
        """One read's worth of responses, acknowledged in one call (what the sender does)."""
        node = data.draw(st.sampled_from([n for n in NODES if self.outstanding[n]]))
        answered = self.outstanding[node][: len(statuses)]
        del self.outstanding[node][: len(answered)]
        pairs = list(zip(answered, statuses, strict=False))
        inflight = self.engine.nodes[node].inflight
        ok = [a for a, code in pairs if (200 <= code < 300 or code == 404) and a[0] in inflight]
        oks_before = self.engine.nodes[node].oks
        self.engine.ack_many(node, [(a[0], code) for a, code in pairs], self.now)
        assert self.engine.nodes[node].oks - oks_before == len(ok)
        for ident, target, sent, at in ok:
            self.delivered[node].append((target, sent, self.now, ident, at))

    @precondition(lambda self: any(self.outstanding.values()))
    @rule(data=st.data(), graceful=st.booleans())
    def connection_lost(self, data, graceful):
        node = data.draw(st.sampled_from([n for n in NODES if self.outstanding[n]]))
        idents = [i for i, _, _, _ in self.outstanding[node]]
        self.outstanding[node] = []
        if graceful:
            self.engine.requeue(node, idents, self.now)
        else:
            self.engine.fail(node, idents, "reset", self.now)

    @rule(dt=st.sampled_from([0.0, 0.1, 0.3, 1.0, 5.0]))
    def tick(self, dt):
        self.now += dt
        self.engine.handle_timer(self.now)

    @invariant()
    def backlogs_are_sane(self):
        if hasattr(self, "engine"):
            for node in NODES:
                assert self.engine.backlog(node) >= 0

    def teardown(self):
        if not hasattr(self, "engine"):
            return
        e = self.engine
        for node in NODES:  # answer whatever is still on the wire
            for ident, target, sent, at in self.outstanding[node]:
                if e.ack(node, ident, 200, self.now) == "ok":
                    self.delivered[node].append((target, sent, self.now, ident, at))
        for _ in range(200):
            self.now += 40.0  # past any backoff (retry_max 30), window and delay
            e.handle_timer(self.now)
            for node in NODES:
                for ident, target in e.take(node, 100, self.now):
                    at = self._accepted_at(ident)
                    assert e.ack(node, ident, 200, self.now) == "ok"
                    self.delivered[node].append((target, self.now, self.now, ident, at))
            if all(e.backlog(n) == 0 for n in NODES):
                break
        for node in NODES:
            assert e.backlog(node) == 0, node
            for target, arrived in self.arrivals:
                host = target.split("/")[0]
                if SERVES[node] not in (None, host):
                    continue
                assert any(t == target and sent >= arrived for t, sent, _, _, _ in self.delivered[node]), (
                    f"{target} arrived at {arrived} was never sent to {node} afterwards"
                )
        # Tier order: every frontend send of a log entry follows, by DELAY, each backend's acknowledgement of
        # a PURGE of the same URL sent after that entry was accepted (the entry itself, a later one that
        # superseded it, or an earlier one deferred by the dedup window to after its arrival).
        for target, sent, _, ident, at in self.delivered["f1"]:
            for backend in ("b1", "b2"):
                assert any(
                    t == target and bsent >= at and acked + DELAY <= sent
                    for t, bsent, acked, _, _ in self.delivered[backend]
                ), f"f1 got {target} (id {ident}) at {sent} before {backend} acked it + {DELAY}s"


TestEngineStateful = EngineMachine.TestCase
TestEngineStateful.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
