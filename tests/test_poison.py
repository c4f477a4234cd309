"""A purge a node keeps failing on is set aside for that node after ``sender.poison_after`` tries (issue 11 #1):
it never holds a lane or a tier gate forever, and a restart does not bring the block back."""

import random

import pytest
import trio
from daemon_helpers import running_daemon

from purged.core.engine import Engine, Policy
from purged.core.topology import DatacenterSpec, TierSpec, Topology


def tiers():
    return Topology([DatacenterSpec("dc", (), (TierSpec("be", 0.0, ("b",)), TierSpec("fe", 0.0, ("f",))))])


def test_a_purge_that_keeps_resetting_the_connection_is_set_aside_and_the_gate_moves():
    e = Engine(tiers(), now=0.0, policy=Policy(poison_after=3, retry_initial=0.1, retry_max=0.1),
               rng=random.Random(1))
    e.submit(["h/poison"], 0.0)
    now = 0.0
    for attempt in range(3):
        e.submit([f"h/good{attempt}"], now)
        sent = dict((t, i) for i, t in e.take("b", 10, now))
        assert set(sent) == {"h/poison", f"h/good{attempt}"}
        e.ack("b", sent[f"h/good{attempt}"], 200, now)  # the node answers the others...
        e.fail("b", [sent["h/poison"]], "reset", now)  # ...and resets on the poison: the first unanswered
        now += 1.0
        e.handle_timer(now)
    events = e.events()
    assert [(s.node, s.target, s.failures) for s in events.set_aside] == [("b", "h/poison", 3)]
    assert e.nodes["b"].stats.dropped == {"poison": 1}
    assert e.backlog("b") == 0
    assert sorted(t for _, t in e.take("f", 10, now)) == ["h/good0", "h/good1", "h/good2", "h/poison"]


def test_a_node_failing_everything_is_an_outage_not_a_poison_purge():
    """A 503 storm or a node restarting: nothing is set aside however often it fails; all delivered after."""
    e = Engine(tiers(), now=0.0, policy=Policy(poison_after=2, retry_initial=0.1, retry_max=0.1, down_after=99),
               rng=random.Random(1))
    e.submit([f"h/{i}" for i in range(10)], 0.0)
    for now in range(10):
        e.handle_timer(float(now))
        sent = e.take("b", 100, float(now))
        for ident, _ in sent[: len(sent) // 2]:
            e.ack("b", ident, 503, float(now))
        e.fail("b", [i for i, _ in sent[len(sent) // 2:]], "reset", float(now))
    assert not e.nodes["b"].stats.dropped and e.backlog("b") == 10
    e.handle_timer(20.0)
    for ident, _ in e.take("b", 100, 20.0):
        e.ack("b", ident, 200, 20.0)
    assert e.backlog("b") == 0


def test_a_status_the_node_keeps_refusing_counts_too_and_an_answer_clears_the_count():
    e = Engine(tiers(), now=0.0, policy=Policy(poison_after=2, retry_initial=0.1, retry_max=0.1, down_after=99),
               rng=random.Random(1))
    e.submit(["h/a"], 0.0)
    (ident, _), = e.take("b", 1, 0.0)
    e.ack("b", ident, 503, 0.0)
    e.handle_timer(1.0)
    (ident, _), = e.take("b", 1, 1.0)
    e.ack("b", ident, 200, 1.0)  # answered: not poison
    assert e.nodes["b"].stats.dropped == {} and not e.nodes["b"].suspects
    e.submit(["h/b"], 2.0)
    for i, now in enumerate((2.0, 3.0)):
        e.submit([f"h/other{i}"], now)
        e.handle_timer(now)
        for ident, target in e.take("b", 10, now):
            e.ack("b", ident, 503 if target == "h/b" else 200, now)
    assert e.nodes["b"].stats.dropped == {"poison": 1} and e.backlog("b") == 0


def rounds(e, node, answer, now, last=None):
    """One retry round at ``now``: take what is due, answer each ``(ident, target)`` with ``answer(target)``
    (a status, or "reset": the connection fails with it first unanswered), ``last`` after the others (as on
    another connection). Returns the targets sent."""
    e.handle_timer(now)
    sent = e.take(node, 100, now)
    for ident, target in sorted(sent, key=lambda s: s[1] == last):
        verdict = answer(target)
        if verdict == "reset":
            e.fail(node, [ident], "reset", now)
        else:
            e.ack(node, ident, verdict, now)
    return [t for _, t in sent]


def test_strikes_gathered_during_an_outage_do_not_count_once_the_node_is_back():
    """The finding of docs/reliability.md (scenario B'): a 503 storm longer than poison_after rounds, then the
    node is back but the storm's tail still fails some purges right after its first successes."""
    e = Engine(tiers(), now=0.0, policy=Policy(poison_after=3, retry_initial=0.1, retry_max=0.1, down_after=99),
               rng=random.Random(1))
    e.submit([f"h/{i}" for i in range(6)], 0.0)
    for now in range(8):  # eight rounds of nothing but 503s
        assert len(rounds(e, "b", lambda t: 503, float(now))) == 6
    node = e.nodes["b"]
    assert max(s[0] for s in node.suspects.values()) <= 1  # only the first failure after a success
    # Back: the first answers are 200s, the storm's tail still 503s the others (a pipeline on its way).
    rounds(e, "b", lambda t: 200 if t in ("h/0", "h/1") else 503, 10.0)
    assert not node.stats.dropped and e.backlog("b") == 4
    rounds(e, "b", lambda t: 200, 11.0)
    assert e.backlog("b") == 0 and not node.stats.dropped and not node.suspects


def test_a_purge_failing_while_the_node_answers_others_is_set_aside_after_exactly_poison_after_strikes():
    """Outages in between (other purges fail too) add no strikes; each round in which the node answers others
    and fails it adds one."""
    e = Engine(tiers(), now=0.0, policy=Policy(poison_after=3, retry_initial=0.1, retry_max=0.1, down_after=99),
               rng=random.Random(1))
    e.submit(["h/poison"], 0.0)
    poison = e.lanes[1].log.index["h/poison"] << 1 | 1
    now, strikes = 0.0, []
    for i in range(3):
        for j in range(3):  # a node-wide outage first: the poison and fresh purges all fail
            e.submit([f"h/outage{i}.{j}"], now)
            rounds(e, "b", lambda t: 503, now, last="h/poison")
            now += 1.0
        strikes.append(e.nodes["b"].suspects.get(poison, (0,))[0])
        e.submit([f"h/good{i}"], now)
        # The node is back and answers everything else: one strike.
        rounds(e, "b", lambda t: 503 if t == "h/poison" else 200, now, last="h/poison")
        now += 1.0
    events = e.events()
    assert strikes == [0, 1, 2]  # the outages added none (their first failure, after a success, was another's)
    assert [(s.target, s.failures) for s in events.set_aside] == [("h/poison", 3)]
    assert e.nodes["b"].stats.dropped == {"poison": 1} and e.backlog("b") == 0


def test_a_lone_purge_through_an_outage_waits_and_a_lone_poison_is_set_aside_once_others_pass():
    """With nothing else to send, a purge the node keeps failing is indistinguishable from an outage: it gathers
    strikes but is not set aside before the node answered something else; one that did pass then sets it aside."""
    e = Engine(tiers(), now=0.0, policy=Policy(poison_after=3, retry_initial=0.1, retry_max=0.1, down_after=99),
               rng=random.Random(1))
    e.submit(["h/lone"], 0.0)
    for now in range(6):
        rounds(e, "b", lambda t: "reset", float(now))
    assert e.backlog("b") == 1 and not e.nodes["b"].stats.dropped
    e.submit(["h/other"], 6.0)
    rounds(e, "b", lambda t: "reset" if t == "h/lone" else 200, 6.0)
    rounds(e, "b", lambda t: "reset" if t == "h/lone" else 200, 7.0)
    assert e.nodes["b"].stats.dropped == {"poison": 1} and e.backlog("b") == 0


def test_two_poisons_side_by_side_are_both_set_aside():
    """The second of two failures in a row gets no strike from the first rule (the node's previous outcome was
    a failure), but from the second: the node answered others since it last failed."""
    e = Engine(tiers(), now=0.0, policy=Policy(poison_after=3, retry_initial=0.1, retry_max=0.1, down_after=99),
               rng=random.Random(1))
    e.submit(["h/p1", "h/p2"], 0.0)
    for now in range(6):
        e.submit([f"h/good{now}"], float(now))
        rounds(e, "b", lambda t: 503 if t in ("h/p1", "h/p2") else 200, float(now))
    assert e.nodes["b"].stats.dropped == {"poison": 2} and e.backlog("b") == 0
    assert sorted(s.target for s in e.events().set_aside) == ["h/p1", "h/p2"]


def test_a_node_that_restarts_resetting_every_connection_sets_nothing_aside():
    e = Engine(tiers(), now=0.0, policy=Policy(poison_after=2, retry_initial=0.1, retry_max=0.1, down_after=99),
               rng=random.Random(1))
    e.submit([f"h/{i}" for i in range(4)], 0.0)
    rounds(e, "b", lambda t: 200 if t == "h/0" else "reset", 0.0)  # answered one, then went away
    for now in range(1, 6):
        rounds(e, "b", lambda t: "reset", float(now))
    rounds(e, "b", lambda t: 200, 10.0)
    assert e.backlog("b") == 0 and not e.nodes["b"].stats.dropped


def test_poison_after_zero_retries_forever():
    e = Engine(tiers(), now=0.0, policy=Policy(poison_after=0, retry_initial=0.1, retry_max=0.1, down_after=99),
               rng=random.Random(1))
    e.submit(["h/a"], 0.0)
    for now in range(20):
        e.handle_timer(float(now))
        for ident, _ in e.take("b", 1, float(now)):
            e.fail("b", [ident], "reset", float(now))
    assert e.backlog("b") == 1 and not e.nodes["b"].stats.dropped


@pytest.mark.integration
async def test_a_poison_url_past_varnish_limits_blocks_no_frontend_and_stays_set_aside_after_restart(
    varnish_factory, tmp_path
):
    be, fe = varnish_factory(2)
    cfg = {
        "listen": {"http": "127.0.0.1:0"},
        "state_dir": str(tmp_path / "state"),
        "datacenters": {"dc": {"tiers": [{"name": "backend", "nodes": [be.address]},
                                         {"name": "frontend", "nodes": [fe.address]}]}},
        # Let the poison through ingest (the default max_request_bytes rejects it there) to test the sender side.
        "limits": {"max_request_bytes": 65536, "max_url_length": 8192},
        "sender": {"retry_initial": 0.05, "retry_max": 0.2, "poison_after": 3, "down_after": 100},
    }
    poison = "http://x.example/" + "€" * 4000  # ~36 KB encoded: Varnish's http_req_size is 32 KB
    async with running_daemon(cfg) as (service, client):
        r = await client.post("/v1/purge", json={"urls": [poison]})
        assert r.status_code == 202
        r = await client.post("/v1/purge", json={"urls": ["http://x.example/after"]})
        st = (await client.get(f"/v1/purge/{r.json()['id']}?wait=30")).json()
        assert st["done"], st
        urls = {p.url for p in await trio.to_thread.run_sync(fe.purges)}
        assert "/after" in urls
        metrics = (await client.get("/metrics")).text
        assert 'reason="poison"} 1.0' in metrics, [m for m in metrics.splitlines() if "dropped" in m]
    before = await trio.to_thread.run_sync(be.n_purges)
    async with running_daemon(cfg) as (service, client):
        await trio.sleep(1.0)  # a replayed poison would be retried (and reset) within this
        assert service.engine.total_backlog() == 0
        assert not any(n.stats.errors for n in service.engine.nodes.values())
    assert await trio.to_thread.run_sync(be.n_purges) == before
