"""Core engine with explicit ``now`` floats: coalescing, tier order, cursors, backlog, batch status, retries."""

import random

from purged.core.engine import BULK, Engine, Policy, classify
from purged.core.status import batch_status
from purged.core.topology import DatacenterSpec, TierSpec, Topology


def make_engine(now=0.0, delay=1.0, hosts_b=("*.example.org",), rates=None, **kw):
    topo = Topology(
        [
            DatacenterSpec("a", (), (TierSpec("backend", 0.0, ("b1", "b2")), TierSpec("frontend", delay, ("f1",)))),
            DatacenterSpec("b", hosts_b, (TierSpec("backend", 0.0, ("b3",)),)),
        ]
    )
    return Engine(topo, now=now, policy=Policy(**kw), rates=rates, rng=random.Random(1))


def bulk(seq):
    return seq << 1 | BULK


def drain(engine, node, now, status=200):
    """Take everything for ``node`` and answer each with ``status``; return the targets sent."""
    sent = engine.take(node, 1000, now)
    for seq, _ in sent:
        engine.ack(node, seq, status, now)
    return [t for _, t in sent]


def test_classify():
    assert [classify(s) for s in (200, 204, 404, 500, 503, 408, 429, 400, 403, 301)] == [
        "ok", "ok", "ok", "retry", "retry", "retry", "retry", "error", "error", "error"
    ]


def test_routes_by_host_and_sends_each_target_once_per_node():
    e = make_engine()
    r = e.submit(["en.wikipedia.org/wiki/A", "www.example.org/x"], now=1.0)
    assert r.accepted == 2 and r.coalesced == 0
    assert drain(e, "b1", 1.0) == ["en.wikipedia.org/wiki/A", "www.example.org/x"]
    assert drain(e, "b3", 1.0) == ["www.example.org/x"]  # dc b serves *.example.org only
    assert drain(e, "b1", 1.0) == []


def test_coalesces_only_while_unsent():
    e = make_engine()
    e.submit(["h.org/a"], now=0.0)
    r = e.submit(["h.org/a"], now=0.1)
    assert r.coalesced == 1
    assert drain(e, "b1", 0.2) == ["h.org/a"]
    # Sent to b1 already: a new purge must be sent again (the object may have been re-cached).
    r = e.submit(["h.org/a"], now=0.3)
    assert r.coalesced == 0
    assert drain(e, "b1", 0.4) == ["h.org/a"]
    # b2 lagged: it reads the superseded entry, skips it, and sends the latest once.
    assert drain(e, "b2", 0.5) == ["h.org/a"]


def test_superseded_entry_is_done_only_when_its_successor_is_acked():
    e = make_engine()
    first = e.submit(["h.org/a"], now=0.0)
    drain(e, "b1", 0.1)
    e.submit(["h.org/a"], now=0.2)
    sent = e.take("b2", 1, 0.3)  # reads entry 0 (superseded, pinned) then takes entry 1
    assert [t for _, t in sent] == ["h.org/a"] and sent[0][0] == bulk(1)
    st = batch_status(e, first.batch_id)
    assert st.datacenters["a"]["backend"].done == 1  # b1 only: b2 has not acked the successor
    e.ack("b2", bulk(1), 200, 0.4)
    assert batch_status(e, first.batch_id).datacenters["a"]["backend"].done == 2


def test_frontend_waits_for_every_backend_plus_delay():
    e = make_engine(delay=1.0)
    e.submit(["h.org/a"], now=0.0)
    assert e.take("f1", 10, 0.0) == []
    drain(e, "b1", 0.5)
    assert not e.has_work("f1", 0.6)  # b2 has not acked
    drain(e, "b2", 2.0)
    assert e.get_timer() == 3.0
    e.handle_timer(2.9)
    assert e.take("f1", 10, 2.9) == []
    e.handle_timer(3.0)
    assert [t for _, t in e.take("f1", 10, 3.0)] == ["h.org/a"]


def test_down_backend_holds_its_frontends_but_not_other_dcs():
    e = make_engine(delay=0.0, hosts_b=())
    e.submit(["h.org/a"], now=0.0)
    seqs = [s for s, _ in e.take("b1", 10, 0.0)]
    e.fail("b1", seqs, "connect", 0.0)
    drain(e, "b2", 0.0)
    assert e.take("f1", 10, 0.1) == []
    assert drain(e, "b3", 0.1) == ["h.org/a"]
    assert e.backlog("b1") == 1 and e.backlog("f1") == 1 and e.backlog("b3") == 0
    t = e.get_timer()
    assert 0.0 < t <= 0.1  # retry_initial 0.1 with jitter in [0.5, 1]
    assert drain(e, "b1", t) == ["h.org/a"]
    assert drain(e, "f1", t) == ["h.org/a"]


def test_retry_on_5xx_and_give_up_on_4xx():
    e = make_engine(retry_initial=1.0, retry_max=4.0)
    e.submit(["h.org/a", "h.org/b"], now=0.0)
    (s1, _), (s2, _) = e.take("b1", 10, 0.0)
    assert e.ack("b1", s1, 503, 0.0) == "retry"
    assert e.ack("b1", s2, 403, 0.0) == "error"
    assert e.nodes["b1"].stats.gave_up == 1
    assert e.take("b1", 10, 0.1) == []
    t = e.get_timer()
    assert [x for _, x in e.take("b1", 10, t)] == ["h.org/a"]
    assert e.ack("b1", s1, 200, t) == "ok"
    assert e.backlog("b1") == 0


def test_node_marked_down_is_probed_one_at_a_time():
    e = make_engine(down_after=2, retry_initial=1.0)
    e.submit([f"h.org/{i}" for i in range(5)], now=0.0)
    seqs = [s for s, _ in e.take("b1", 10, 0.0)]
    e.fail("b1", seqs, "reset", 0.0)
    e.fail("b1", [], "connect", 0.0)
    assert e.nodes["b1"].down
    later = 100.0
    probe = e.take("b1", 10, later)
    assert len(probe) == 1
    e.ack("b1", probe[0][0], 200, later)
    assert not e.nodes["b1"].down
    assert len(e.take("b1", 10, later)) == 4


def test_batch_status_and_trim():
    e = make_engine(delay=0.0)
    r = e.submit(["h.org/a", "h.org/b"], now=0.0)
    st = batch_status(e, r.batch_id)
    assert st.done is False and st.accepted == 2
    for node in ("b1", "b2", "b3", "f1"):
        drain(e, node, 0.0)
    assert batch_status(e, r.batch_id).done is True
    assert batch_status(e, "nope") is None
    assert e.trim() == 2 and len(e.lanes[BULK].log) == 0 and e.lanes[BULK].log.index == {}


def test_stale_ack_is_ignored():
    e = make_engine()
    e.submit(["h.org/a"], now=0.0)
    assert e.ack("b1", bulk(0), 200, 0.0) == "stale"
    assert e.ack("nope", 0, 200, 0.0) == "stale"


def test_backlog_counts_per_node_and_latency():
    e = make_engine()
    e.submit([f"x.example.org/{i}" for i in range(10)], now=0.0)
    assert e.backlog("b1") == 10 and e.backlog("b3") == 10
    drain(e, "b3", 2.0)
    assert e.backlog("b3") == 0
    hist = e.latency[("b", "backend")]
    assert hist.cumulative()[-1] == (float("inf"), 10) and hist.total == 20.0
    assert dict(hist.cumulative())[2.5] == 10 and dict(hist.cumulative())[1.0] == 0


def test_core_imports_no_io_modules():
    import subprocess
    import sys

    code = (
        "import sys, purged.core.engine, purged.core.urls, purged.core.log, purged.core.topology;"
        "import pkgutil, importlib, purged.core as c;"
        "[importlib.import_module('purged.core.' + m.name) for m in pkgutil.iter_modules(c.__path__)];"
        "bad = [m for m in ('trio', 'httpx', 'h11', 'yaml', 'prometheus_client') if m in sys.modules];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_restore_from_a_journal_resumes_each_node_at_its_position():
    e = make_engine(delay=0.0)
    items = [("h.org/a", 0.0), ("x.example.org/b", 0.0), ("h.org/c", 0.0)]
    # b1 had everything below 12, b2 below 11; b3 is new (no checkpoint): it starts at the head.
    e.restore(BULK, 10, items, {"b1": 12, "b2": 11, "f1": 10})
    assert e.backlog("b1") == 1 and e.backlog("b2") == 2 and e.backlog("b3") == 0
    assert drain(e, "b1", 1.0) == ["h.org/c"]
    assert drain(e, "b2", 1.0) == ["x.example.org/b", "h.org/c"]
    assert drain(e, "f1", 1.0) == ["h.org/a", "x.example.org/b", "h.org/c"]
    r = e.submit(["x.example.org/b"], now=2.0)  # seqs continue after the replayed ones
    assert r.coalesced == 0 and e.lanes[BULK].log.head == 14
    assert drain(e, "b3", 2.0) == ["x.example.org/b"]


def test_appended_entries_are_recorded_for_the_journal():
    e = make_engine()
    e.record_appends()
    e.submit(["h.org/a", "h.org/a", "h.org/b"], now=1.0)
    e.submit(["h.org/c"], now=2.0, priority="high")
    assert e.take_appended() == [(0, 0, "h.org/c", 2.0), (BULK, 0, "h.org/a", 1.0), (BULK, 1, "h.org/b", 1.0)]
    assert e.take_appended() == []
