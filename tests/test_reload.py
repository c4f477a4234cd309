"""Engine-side config reload (core/reload.py) with explicit time: nodes added, removed and moved, data centres
re-routed, tier gates kept, rates and policy applied; nothing accepted lost, nothing delivered sent again."""

import random

from purged.core.engine import BULK, Engine, Policy
from purged.core.reload import reconfigure
from purged.core.topology import DatacenterSpec, TierSpec, Topology


def topo(*dcs):
    """dcs: (name, hosts, [(tier, delay, nodes), ...])"""
    return Topology([DatacenterSpec(n, h, tuple(TierSpec(t, d, tuple(ns)) for t, d, ns in tiers)) for n, h, tiers in dcs])


BASE = topo(
    ("a", (), [("backend", 0.0, ["b1", "b2"]), ("frontend", 1.0, ["f1"])]),
    ("b", ("*.example.org",), [("backend", 0.0, ["b3"])]),
)


def make(t=BASE, **kw):
    return Engine(t, now=0.0, policy=Policy(**kw), rng=random.Random(1))


def drain(engine, node, now, limit=1000):
    sent = engine.take(node, limit, now)
    for ident, _ in sent:
        engine.ack(node, ident, 200, now)
    return [t for _, t in sent]


def check_backlogs(engine):
    """backlog(node) equals a brute-force count: entries at or past its cursor routed to its DC, plus unfinished."""
    for name, node in engine.nodes.items():
        expected = 0
        for lane in engine.lanes:
            cur = lane.cursors[name]
            for seq in range(max(cur.cursor, lane.log.base), lane.log.head):
                expected += bool(lane.log.get(seq).dc_mask >> node.dc_index & 1)
            expected += cur.unfinished
        assert engine.backlog(name) == expected, name


def test_add_node_starts_at_head_and_gets_only_new_purges():
    e = make()
    e.submit(["x.org/1", "x.org/2"], 0.0)
    new = topo(
        ("a", (), [("backend", 0.0, ["b1", "b2", "b4"]), ("frontend", 1.0, ["f1"])]),
        ("b", ("*.example.org",), [("backend", 0.0, ["b3"])]),
    )
    report = reconfigure(e, new, Policy(), {}, 1.0)
    assert report.added == ["b4"] and not report.removed
    assert e.backlog("b4") == 0 and drain(e, "b4", 1.0) == []
    e.submit(["x.org/3"], 1.0)
    assert drain(e, "b4", 1.0) == ["x.org/3"]
    assert drain(e, "b1", 1.0) == ["x.org/1", "x.org/2", "x.org/3"]
    check_backlogs(e)


def test_remove_node_drops_and_counts_its_backlog_others_untouched():
    e = make()
    e.submit([f"x.org/{i}" for i in range(10)], 0.0)
    inflight = e.take("b1", 4, 0.0)  # in flight on b1 across the reload
    drain(e, "b2", 0.0)
    new = topo(("a", (), [("backend", 0.0, ["b1"]), ("frontend", 1.0, ["f1"])]), ("b", ("*.example.org",), [("backend", 0.0, ["b3"])]))
    report = reconfigure(e, new, Policy(), {}, 0.5)
    assert report.removed == {"b2": 0} and report.removed_place == {"b2": ("a", "backend")}
    # b1's in-flight purges are answered after the reload: counted once, nothing resent.
    for ident, _ in inflight:
        assert e.ack("b1", ident, 200, 0.6) == "ok"
    assert drain(e, "b1", 0.6) == [f"x.org/{i}" for i in range(4, 10)]
    assert e.nodes["b1"].stats.sent == 10
    check_backlogs(e)


def test_removing_a_lagging_node_counts_and_releases_the_log():
    e = make()
    e.submit([f"x.org/{i}" for i in range(10)], 0.0)
    for n in ("b1", "f1"):
        drain(e, n, 0.0)
    e.handle_timer(5.0)
    drain(e, "f1", 5.0)
    new = topo(("a", (), [("backend", 0.0, ["b1"]), ("frontend", 1.0, ["f1"])]), ("b", ("*.example.org",), [("backend", 0.0, ["b3"])]))
    report = reconfigure(e, new, Policy(), {}, 6.0)
    assert report.removed == {"b2": 10}
    # The frontend was held by b2 (tier position 0); with b2 gone its gate opens after the delay.
    assert drain(e, "f1", 6.0) == []
    e.handle_timer(7.0)
    assert drain(e, "f1", 7.0) == [f"x.org/{i}" for i in range(10)]
    drain(e, "b3", 7.0)  # reads past entries not meant for it
    e.trim()
    assert len(e.lanes[BULK].log) == 0
    check_backlogs(e)


def test_tier_gate_in_progress_survives_a_reload():
    e = make()
    e.submit(["x.org/1"], 0.0)
    drain(e, "b1", 0.0)
    drain(e, "b2", 0.2)  # backend done at 0.2: frontend may read from 1.2
    reconfigure(e, BASE, Policy(), {}, 0.5)
    e.handle_timer(1.0)
    assert drain(e, "f1", 1.0) == []
    e.handle_timer(1.2)
    assert drain(e, "f1", 1.2) == ["x.org/1"]
    check_backlogs(e)


def test_changed_hosts_reroute_pending_entries():
    e = make()
    e.submit(["www.example.org/1", "en.wikipedia.org/2"], 0.0)
    drain(e, "b3", 0.0)  # got www.example.org/1 only
    new = topo(
        ("a", (), [("backend", 0.0, ["b1", "b2"]), ("frontend", 1.0, ["f1"])]),
        ("b", ("*.wikipedia.org",), [("backend", 0.0, ["b3"])]),
    )
    e.submit(["en.wikipedia.org/3"], 0.0)  # not for b3 yet
    reconfigure(e, new, Policy(), {}, 0.5)
    check_backlogs(e)
    # Entries b3 had not read yet are routed with the new patterns; those it read stay delivered.
    assert drain(e, "b3", 0.5) == ["en.wikipedia.org/3"]
    assert e.backlog("b3") == 0


def test_new_datacenter_and_moved_node():
    e = make()
    e.submit([f"x.org/{i}" for i in range(3)], 0.0)
    drain(e, "b3", 0.0)
    new = topo(
        ("c", (), [("edge", 0.0, ["c1"])]),
        ("a", (), [("backend", 0.0, ["b1", "b2"]), ("frontend", 1.0, ["f1"])]),
        ("b", (), [("backend", 0.0, ["b3"]), ("frontend", 0.0, ["f1b"])]),
    )
    report = reconfigure(e, new, Policy(), {}, 1.0)
    assert sorted(report.added) == ["c1", "f1b"] and report.rerouted
    check_backlogs(e)
    assert e.nodes["b1"].dc_index == 1 and e.backlog("b1") == 3
    assert drain(e, "b3", 1.0) == []  # b3 already read x.org/0..2 (they were not for it then)
    e.submit(["x.org/9"], 2.0)
    for n in ("c1", "b3", "f1b"):
        assert drain(e, n, 2.0) == ["x.org/9"], n
    check_backlogs(e)


def test_rates_and_policy_apply():
    e = make()
    reconfigure(e, BASE, Policy(max_lag=5, linger=0.5, dedup_window=2.0), {"b1": (10.0, 20.0)}, 1.0)
    assert e.nodes["b1"].bucket.rate == 10.0 and e.nodes["b1"].bucket.burst == 20.0
    assert e.nodes["b2"].bucket.unlimited
    assert e.nodes["b1"].dedup is not None and e.lanes[0].linger == 0.5
    assert e.get_timer() is not None  # max_lag maintenance scheduled
    reconfigure(e, BASE, Policy(), {}, 2.0)
    assert e.nodes["b1"].bucket.unlimited and e.nodes["b1"].dedup is None


def test_random_reloads_keep_backlogs_consistent_and_lose_nothing():
    rng = random.Random(7)
    pool = [f"n{i}" for i in range(8)]
    hosts_options = [(), ("*.example.org",), ("*.wikipedia.org", "x.org")]

    def random_topology():
        nodes = rng.sample(pool, rng.randint(2, 6))
        dcs, k = [], 0
        for d in range(rng.randint(1, 3)):
            tiers = []
            for t in range(rng.randint(1, 2)):
                take = nodes[k : k + rng.randint(1, 2)]
                k += len(take)
                if take:
                    tiers.append((f"t{t}", rng.choice([0.0, 0.5]), take))
            if tiers:
                dcs.append((f"dc{d}", rng.choice(hosts_options), tiers))
        return topo(*dcs) if dcs else topo(("dc0", (), [("t0", 0.0, nodes[:1])]))

    e = make(random_topology())
    now = 0.0
    held = []  # (node, ident) in flight across later steps and reloads
    urls = ["x.org/", "www.example.org/", "en.wikipedia.org/"]
    for _ in range(200):
        now += 0.1
        op = rng.random()
        if op < 0.4:
            e.submit([rng.choice(urls) + str(rng.randint(0, 30)) for _ in range(rng.randint(1, 5))], now,
                     priority=rng.choice(["bulk", "high"]))
        elif op < 0.8:
            node = rng.choice(list(e.nodes))
            for ident, _ in e.take(node, rng.randint(1, 5), now):
                if rng.random() < 0.8:
                    e.ack(node, ident, 200, now)
                else:
                    held.append((node, ident))
        elif op < 0.9:
            e.handle_timer(now)
        else:
            reconfigure(e, random_topology(), Policy(), {}, now)
        check_backlogs(e)
    # Everything drains: every node's backlog reaches zero.
    for node, ident in held:
        e.ack(node, ident, 200, now)  # "stale" for a node removed since
    for _ in range(100):
        now += 1.0
        e.handle_timer(now)
        for node in list(e.nodes):
            for ident, _ in e.take(node, 1000, now):
                e.ack(node, ident, 200, now)
    assert all(e.backlog(n) == 0 for n in e.nodes)
