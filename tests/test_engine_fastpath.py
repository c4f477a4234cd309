"""The engine's fast paths pinned to its general ones.

``Lane.read`` takes runs of plain entries with list operations (``Lane._read_run``), ``Engine.ack_many`` acks a
read of consecutive successes at once, ``NodeCursor`` keeps runs of seqs, ``PurgeLog.trim`` drops a slice at a
time. Here a hypothesis state machine drives two engines in lockstep through random arrivals (several data
centres, repeated and superseded targets, accepted times out of order), takes, reads of answers (mixed statuses,
out of order, stale and repeated ids), connection losses, clock steps and trims: one engine as it is, the other
with each fast path replaced by the per-item code it must equal (the per-entry read, the per-answer ack, and the
per-seq cursor and per-entry trim they replaced, kept below as references). After every step both must have
answered the same and hold the same state.
"""

import random
import types
from collections import deque

from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from purged.core.cursor import NodeCursor
from purged.core.engine import Engine, Policy
from purged.core.lane import Lane
from purged.core.log import PurgeLog
from purged.core.topology import DatacenterSpec, TierSpec, Topology

# -- references: the per-item code the fast paths replaced -------------------------------------------------------


class RefCursor:
    """NodeCursor as a deque of every seq taken plus a set of those finished out of order."""

    def __init__(self, start: int, matched: int = 0):
        self.cursor = start
        self.matched = matched
        self._order: deque[int] = deque()
        self._done: set[int] = set()
        self._waiters: dict[int, list[int]] = {}

    @property
    def position(self) -> int:
        return self._order[0] if self._order else self.cursor

    @property
    def unfinished(self) -> int:
        return len(self._order) - len(self._done)

    def take(self, seq: int) -> None:
        self._order.append(seq)

    def take_run(self, lo: int, hi: int) -> None:
        for seq in range(lo, hi):
            self.take(seq)

    def pin(self, seq: int, superseded_by: int) -> None:
        self._order.append(seq)
        self._waiters.setdefault(superseded_by, []).append(seq)

    def finish(self, seq: int) -> None:
        stack = [seq]
        while stack:
            s = stack.pop()
            self._done.add(s)
            stack.extend(self._waiters.pop(s, ()))
        while self._order and self._order[0] in self._done:
            self._done.discard(self._order.popleft())

    def finish_run(self, lo: int, hi: int) -> None:
        for seq in range(lo, hi):
            self.finish(seq)

    def skip_to(self, seq: int) -> int:
        dropped = self.unfinished
        self._order.clear()
        self._done.clear()
        self._waiters.clear()
        self.cursor = max(self.cursor, seq)
        return dropped


def ref_trim(log: PurgeLog, below: int) -> int:
    """PurgeLog.trim entry by entry."""
    below = min(below, log.head)
    dropped = 0
    targets, index = log._targets, log.index
    while log.base < below:
        i = log._offset
        target = targets[i]
        targets[i] = None
        if target is not None:
            log.bytes -= len(target)
            if index.get(target) == log.base:
                del index[target]
        log._offset += 1
        log.base += 1
        dropped += 1
    if log._offset > 4096 and log._offset * 2 > len(targets):
        for column in (log._targets, log._accepted, log._masks):
            del column[: log._offset]
        log._offset = 0
    return dropped


def ref_read(lane: Lane, node, li, limit, now, ids, targets, max_age) -> None:
    """Lane.read entry by entry, whatever the node's dedup window."""
    cur = lane.cursors[node.name]
    start = cur.cursor
    stop = lane.read_limit(node.name, now)
    cursor = lane._read_each(node, cur, li, start, stop, limit, now, ids, targets, max_age)
    cur.cursor = cursor
    if cursor > start:
        lane.log.mark_read(cursor - 1)
        lane.moved(node.name, now)


def reference(engine: Engine) -> Engine:
    """Make ``engine`` (fresh, no journal, no reload) run the per-item code everywhere."""
    for lane in engine.lanes:
        lane.read = types.MethodType(ref_read, lane)
        lane.log.trim = types.MethodType(ref_trim, lane.log)
        for name, cur in lane.cursors.items():
            lane.cursors[name] = RefCursor(cur.cursor, cur.matched)

    def ack_many(name, answers, now):
        node = engine.nodes.get(name)
        if node is not None:
            engine._ack_each(node, answers, now)

    engine.ack_many = ack_many
    engine.ack_ids = lambda name, idents, statuses, now: ack_many(name, list(zip(idents, statuses, strict=True)), now)
    return engine


# -- the cursor alone -----------------------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["take", "run", "pin", "finish", "finish_run", "skip"]),
                          st.integers(0, 5), st.integers(0, 1000)), max_size=60))
def test_cursor_runs_equal_the_per_seq_cursor(ops):
    """NodeCursor as runs against the per-seq reference, fed the calls the engine makes: takes and pins above
    everything read, finishes of taken unfinished seqs (in any order, a run only when all of it is)."""
    fast, ref = NodeCursor(0), RefCursor(0)
    rng = random.Random(len(ops))
    taken: list[int] = []  # unfinished, not pinned
    pins: dict[int, int] = {}  # pinned seq -> the seq it waits on
    nxt = 0
    for op, k, r in ops:
        if op in ("take", "run", "pin"):
            gap = r % 3  # entries for other data centres in between
            lo = nxt + gap
            if op == "pin" and taken:
                on = taken[r % len(taken)]
                fast.pin(lo, on)
                ref.pin(lo, on)
                pins[lo] = on
                nxt = lo + 1
            else:
                hi = lo + (k + 1 if op == "run" else 1)
                fast.take_run(lo, hi) if op == "run" else fast.take(lo)
                ref.take_run(lo, hi)
                taken.extend(range(lo, hi))
                nxt = hi
        elif op == "finish" and taken:
            seq = taken.pop(r % len(taken))
            fast.finish(seq)
            ref.finish(seq)
        elif op == "finish_run" and taken:
            taken.sort()
            i = r % len(taken)
            j = i
            while j + 1 < len(taken) and taken[j + 1] == taken[j] + 1 and j - i < k:
                j += 1
            lo, hi = taken[i], taken[j] + 1
            del taken[i : j + 1]
            fast.finish_run(lo, hi)
            ref.finish_run(lo, hi)
        elif op == "skip":
            assert fast.skip_to(nxt) == ref.skip_to(nxt)
            taken.clear()
            pins.clear()
        rng.shuffle(taken)
        assert (fast.position, fast.unfinished) == (ref.position, ref.unfinished)


# -- the engine -----------------------------------------------------------------------------------------------

TARGETS = ["a.org/1", "a.org/2", "a.org/3", "x.org/1", "x.org/2", "y.org/1"]
NODES = ["b1", "b2", "f1", "c1", "d1"]


def topology() -> Topology:
    return Topology(
        [
            DatacenterSpec("a", (), (TierSpec("be", 0.0, ("b1", "b2")), TierSpec("fe", 0.5, ("f1",)))),
            DatacenterSpec("b", ("x.org",), (TierSpec("be", 0.0, ("c1",)),)),
            DatacenterSpec("c", ("x.org", "y.org"), (TierSpec("be", 0.0, ("d1",)),)),
        ]
    )


def state(e: Engine) -> dict:
    lanes = []
    for lane in e.lanes:
        log = lane.log
        lanes.append((
            log.base, log.head, log.read_mark, dict(log.index), log.bytes, log.entries(), list(lane.dc_appended),
            {n: (c.cursor, c.matched, c.position, c.unfinished) for n, c in lane.cursors.items()},
            [[(t.position, t.gate, list(t.marks)) for t in tiers] for tiers in lane.tiers],
        ))
    nodes = {
        name: (
            set(n.inflight), sorted(n.retries), dict(n.deferred), dict(n.suspects), n.last_failure, n.oks,
            n.failures, n.down, n.out_of_sync, n.stats,
        )
        for name, n in e.nodes.items()
    }
    # (The per-answer ack makes a tier's histogram at a read even when every answer was stale: an empty one.)
    latency = {key: h.counts for key, h in e.latency.items() if any(h.counts)}
    return {"lanes": lanes, "nodes": nodes, "latency": latency, "floors": e._floors, "backlog": e.total_backlog()}


class Lockstep(RuleBasedStateMachine):
    @initialize(
        window=st.sampled_from([0.0, 0.0, 1.0]),
        linger=st.sampled_from([0.0, 0.0, 0.2]),
        max_age=st.sampled_from([0.0, 0.0, 0.5, 3.0]),
        max_lag=st.sampled_from([0, 0, 6]),
        poison=st.sampled_from([0, 2, 5]),
    )
    def setup(self, window, linger, max_age, max_lag, poison):
        policy = Policy(dedup_window=window, linger=linger, max_age=max_age, max_lag=max_lag, poison_after=poison,
                        down_after=3)
        self.fast = Engine(topology(), now=0.0, policy=policy, rng=random.Random(0))
        self.ref = reference(Engine(topology(), now=0.0, policy=policy, rng=random.Random(0)))
        self.now = 0.0
        self.outstanding: dict[str, list[int]] = {n: [] for n in NODES}
        self.answered: list[tuple[str, int]] = []

    def both(self, call, *args):
        a = getattr(self.fast, call)(*args)
        b = getattr(self.ref, call)(*args)
        assert a == b, call
        assert self.fast.events() == self.ref.events(), call
        return a

    @rule(urls=st.lists(st.sampled_from(TARGETS), min_size=1, max_size=12), high=st.booleans(),
          back=st.sampled_from([0.0, 0.0, 0.0, 0.7]))
    def submit(self, urls, high, back):
        # ``back``: accepted before the last arrival (times in a lane are not assumed to be in order)
        self.both("submit", urls, self.now - back, "http", "high" if high else "bulk")

    @rule(node=st.sampled_from(NODES), n=st.sampled_from([1, 2, 3, 8, 40]), split=st.booleans())
    def take(self, node, n, split):
        if split:
            ids, targets = self.both("take_ids", node, n, self.now)
            assert len(ids) == len(targets)
        else:
            ids = [ident for ident, _ in self.both("take", node, n, self.now)]
        self.outstanding[node].extend(ids)

    @precondition(lambda self: any(self.outstanding.values()))
    @rule(data=st.data(), k=st.integers(1, 12), same=st.booleans(), swap=st.booleans(), stale=st.booleans(),
          statuses=st.lists(st.sampled_from([200, 200, 200, 204, 404, 503, 400]), min_size=13, max_size=13),
          split=st.booleans())
    def answer(self, data, k, same, swap, stale, statuses, split):
        node = data.draw(st.sampled_from([n for n in NODES if self.outstanding[n]]))
        idents = self.outstanding[node][:k]
        del self.outstanding[node][: len(idents)]
        if swap and len(idents) > 2:  # another connection's answers interleaved
            idents[0], idents[-1] = idents[-1], idents[0]
        if stale and self.answered:  # an answer to something answered before, or twice in one read
            old = data.draw(st.sampled_from(self.answered))
            idents.insert(len(idents) // 2, old[1] if old[0] == node else idents[0])
        codes = [statuses[0]] * len(idents) if same else statuses[: len(idents)]
        if split:  # as two lists (what a sender has)
            self.both("ack_ids", node, idents, codes, self.now)
        else:
            self.both("ack_many", node, list(zip(idents, codes, strict=False)), self.now)
        self.answered.extend((node, ident) for ident in idents)

    @precondition(lambda self: any(self.outstanding.values()))
    @rule(data=st.data(), graceful=st.booleans())
    def connection_lost(self, data, graceful):
        node = data.draw(st.sampled_from([n for n in NODES if self.outstanding[n]]))
        idents, self.outstanding[node] = self.outstanding[node], []
        if graceful:
            self.both("requeue", node, idents, self.now)
        else:
            self.both("fail", node, idents, "reset", self.now)

    @rule(dt=st.sampled_from([0.0, 0.1, 0.3, 1.0, 5.0]))
    def tick(self, dt):
        self.now += dt
        self.both("handle_timer", self.now)

    @rule()
    def trim(self):
        self.both("trim")

    @invariant()
    def same_state(self):
        if hasattr(self, "fast"):
            a, b = state(self.fast), state(self.ref)
            assert a == b
            for key, hist in self.fast.latency.items():
                assert abs(hist.total - self.ref.latency[key].total) <= 1e-6 * max(1.0, abs(hist.total))


TestLockstep = Lockstep.TestCase
TestLockstep.settings = settings(max_examples=200, stateful_step_count=50, deadline=None)


def test_long_runs_take_and_ack_like_the_reference():
    """Windows of hundreds, one data centre and all of them, trims past the compaction threshold."""
    topo = Topology([DatacenterSpec("a", (), (TierSpec("be", 0.0, ("n1", "n2")),)),
                     DatacenterSpec("b", ("x.org",), (TierSpec("be", 0.0, ("n3",)),))])
    fast = Engine(topo, now=0.0, rng=random.Random(0))
    ref = reference(Engine(topo, now=0.0, rng=random.Random(0)))
    rng = random.Random(7)
    now = 0.0
    for round_ in range(30):
        now += 0.01
        urls = [f"{rng.choice(['a.org', 'x.org'])}/{rng.randrange(3000)}" for _ in range(rng.randrange(500))]
        for e in (fast, ref):
            e.submit(urls, now)
        for name in ("n1", "n2", "n3"):
            limit = rng.choice([16, 256, 1000])
            items = fast.take(name, limit, now)
            assert ref.take(name, limit, now) == items
            for i in range(0, len(items), 16):
                answers = [(ident, 200) for ident, _ in items[i : i + 16]]
                fast.ack_many(name, answers, now + 0.02)
                ref.ack_many(name, answers, now + 0.02)
        assert state(fast) == state(ref), round_
        assert fast.events() == ref.events()
