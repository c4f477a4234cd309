"""Shaping rules in the core, with explicit time: dedup window, linger, rate limits, priorities, ceilings."""

import random

import pytest

from purged.core.admission import Admission, Refused
from purged.core.engine import BULK, HIGH, Engine, Policy
from purged.core.limits import DedupWindow, TokenBucket
from purged.core.status import batch_status, node_state
from purged.core.topology import DatacenterSpec, TierSpec, Topology


def engine(rates=None, nodes=("n1",), **policy):
    topo = Topology([DatacenterSpec("dc", (), (TierSpec("t", 0.0, tuple(nodes)),))])
    return Engine(topo, now=0.0, policy=Policy(**policy), rates=rates, rng=random.Random(7))


def send_all(e, node, now, status=200, limit=1000):
    out = e.take(node, limit, now)
    for ident, _ in out:
        e.ack(node, ident, status, now)
    return [t for _, t in out]


def test_token_bucket():
    b = TokenBucket(10, 5, now=0.0)
    assert b.available(0.0) == 5
    b.consume(5, 0.0)
    assert b.available(0.0) == 0
    assert b.when_available(1) == pytest.approx(0.1)
    assert b.available(0.25) == 2
    assert b.available(100.0) == 5  # capped at burst
    assert TokenBucket(0, 0, 0.0).available(0.0) > 10**9  # rate 0: unlimited


def test_dedup_window_forgets_after_window():
    d = DedupWindow(10.0)
    d.sent("a", 0.0)
    assert d.blocked_until("a", 5.0) == 10.0
    assert d.blocked_until("a", 10.0) is None
    d.sent("b", 20.0)
    assert len(d) == 1  # "a" expired and was forgotten


def test_dedup_window_defers_to_trailing_edge_and_never_drops():
    e = engine(dedup_window=10.0)
    e.submit(["h/a"], 0.0)
    assert send_all(e, "n1", 0.0) == ["h/a"]
    e.submit(["h/a"], 1.0)
    e.submit(["h/a"], 2.0)  # merges into the unsent purge of 1.0
    assert send_all(e, "n1", 2.0) == []  # deferred to 10.0
    assert e.nodes["n1"].stats.deferred == 1
    assert e.get_timer() == 10.0
    assert e.backlog("n1") == 1
    e.handle_timer(10.0)
    assert send_all(e, "n1", 10.0) == ["h/a"]  # sent once, at the window's end
    assert e.backlog("n1") == 0


def test_linger_merges_bursts_before_the_first_send():
    e = engine(linger=0.5)
    r1 = e.submit(["h/a", "h/b"], 0.0)
    r2 = e.submit(["h/a"], 0.3)
    assert r1.coalesced == 0 and r2.coalesced == 1
    assert send_all(e, "n1", 0.3) == []
    assert e.get_timer() == 0.5
    e.handle_timer(0.5)
    assert send_all(e, "n1", 0.5) == ["h/a", "h/b"]


def test_rate_limit_paces_a_node_and_counts_waits():
    e = engine(rates={"n1": (100.0, 10.0)})
    e.submit([f"h/{i}" for i in range(50)], 0.0)
    assert len(send_all(e, "n1", 0.0)) == 10  # the burst
    e.events()
    assert send_all(e, "n1", 0.0) == []
    assert e.has_work("n1", 0.0)  # work waiting for tokens: take() applies the rate
    assert e.nodes["n1"].stats.rate_limited == 1
    assert e.events().timer  # the node is woken when its bucket has a token again
    t = e.get_timer()
    assert t == pytest.approx(0.01)
    e.handle_timer(t)
    assert e.events().wake == {"n1"}
    assert len(send_all(e, "n1", 0.1)) == 10
    assert e.backlog("n1") == 30  # nothing dropped for rate alone


def test_rate_limit_is_per_node():
    e = engine(rates={"n1": (1.0, 1.0)}, nodes=("n1", "n2"))
    e.submit([f"h/{i}" for i in range(5)], 0.0)
    assert len(send_all(e, "n1", 0.0)) == 1
    assert len(send_all(e, "n2", 0.0)) == 5


def test_high_priority_overtakes_bulk_backlog():
    e = engine(rates={"n1": (10.0, 10.0)})
    e.submit([f"h/bulk{i}" for i in range(1000)], 0.0, priority="bulk")
    assert len(send_all(e, "n1", 0.0)) == 10
    r = e.submit(["h/urgent"], 0.5, priority="high")
    e.handle_timer(0.5)
    sent = send_all(e, "n1", 0.6)
    assert sent[0] == "h/urgent"
    assert batch_status(e, r.batch_id).done and batch_status(e, r.batch_id).priority == "high"


def test_max_pending_refuses_whole_batches_and_counts_them():
    e = engine()
    admission = Admission(e, max_pending=3)
    admission.admit(["http://h/a", "http://h/b"], source="http", now=0.0)
    with pytest.raises(Refused) as refused:
        admission.admit(["http://h/c", "http://h/d"], source="http", now=0.0)
    assert refused.value.reason == "overload" and refused.value.retry_after > 0
    assert e.sources["http"].rejected["overload"] == 2
    send_all(e, "n1", 0.0)
    admission.admit(["http://h/c", "http://h/d"], source="http", now=0.0)  # room again once delivered


def test_memory_is_per_unique_url_not_per_node():
    few, many = engine(nodes=("n1",)), engine(nodes=tuple(f"n{i}" for i in range(50)))
    for e in (few, many):
        e.submit([f"h/{i}" for i in range(1000)], 0.0)
        e.submit([f"h/{i}" for i in range(500)], 0.0)  # duplicates merge
    assert len(few.lanes[BULK].log) == len(many.lanes[BULK].log) == 1000


def test_max_lag_declares_a_node_out_of_sync():
    e = engine(max_lag=100, nodes=("slow", "fast"))
    e.submit([f"h/{i}" for i in range(150)], 0.0)
    send_all(e, "fast", 0.0)
    e.handle_timer(1.0)
    st = node_state(e, "slow", 1.0)
    assert st.state == "out_of_sync" and st.backlog == 0
    assert e.nodes["slow"].stats.dropped["max_lag"] == 150
    assert e.trim() == 150  # the slow node no longer pins the log
    e.submit(["h/new"], 2.0)
    assert send_all(e, "slow", 2.0) == ["h/new"]  # it continues from the head
    e.handle_timer(3.0)
    assert node_state(e, "slow", 3.0).state == "up"


def test_max_age_drops_stale_purges_for_a_node():
    e = engine(max_age=60.0)
    e.submit(["h/old"], 0.0)
    e.submit(["h/new"], 100.0)
    assert send_all(e, "n1", 100.0) == ["h/new"]
    assert e.nodes["n1"].stats.dropped["max_age"] == 1
    assert e.backlog("n1") == 0


def test_high_and_bulk_lanes_have_separate_tier_gates():
    topo = Topology([DatacenterSpec("dc", (), (TierSpec("be", 0.0, ("b",)), TierSpec("fe", 0.0, ("f",))))])
    e = Engine(topo, now=0.0)
    e.submit(["h/bulk"], 0.0)
    e.take("b", 10, 0.0)  # bulk in flight at the backend
    e.submit(["h/hi"], 0.0, priority="high")
    for ident, _ in e.take("b", 10, 0.0):
        assert ident & 1 == HIGH
        e.ack("b", ident, 200, 0.0)
    assert [t for _, t in e.take("f", 10, 0.0)] == ["h/hi"]  # not held behind the unacked bulk purge


def test_engine_tells_the_io_layer_when_the_timer_may_be_earlier():
    e = engine(linger=0.5)
    e.events()
    assert not e.events().timer
    e.submit(["h/a"], 0.0)
    events = e.events()
    assert events.timer and not events.wake  # the linger ends at 0.5: the timer task must re-read get_timer()
    assert not e.events()  # drained
    e.handle_timer(0.5)
    assert e.events().wake == {"n1"}  # the linger ended: the node may read
    (ident, _), = e.take("n1", 10, 0.5)
    assert not e.events().timer
    e.ack("n1", ident, 503, 0.5)
    assert e.events().timer and e.get_timer() > 0.5  # a retry is due later


def test_dedup_window_sends_once_per_window_however_many_repeats():
    """Issue 11 #5: sent at 0, then purged 20 times within 0.5 s: sent again once, at 2.0, never at 4.0."""
    e = engine(dedup_window=2.0)
    e.submit(["h/a"], 0.0)
    sends = [(t, 0.0) for t in send_all(e, "n1", 0.0)]
    now = 0.0
    for i in range(20):
        now = 0.025 * (i + 1)
        e.submit(["h/a"], now)
        sends += [(t, now) for t in send_all(e, "n1", now)]  # the node reads each repeat as it comes
    while (when := e.get_timer()) is not None and when < 10.0:
        e.handle_timer(when)
        sends += [(t, when) for t in send_all(e, "n1", when)]
    assert sends == [("h/a", 0.0), ("h/a", 2.0)]
    assert e.backlog("n1") == 0
