"""End to end with real Varnish: two data centres, each a backend and a frontend tier, fed over the HTTP API.

Checked from Varnish's own records (varnishncsa, MAIN.n_purges): every purge arrives at every node serving its
host with the right Host and path, frontends get it at least ``delay`` after their backend, and a stopped node
catches up after a restart while the others never waited for it.
"""

from collections import Counter

import pytest
import trio
from daemon_helpers import running_daemon

pytestmark = pytest.mark.integration
DELAY = 0.5


def two_dc_config(nodes):
    be1, fe1, be2, fe2 = (n.address for n in nodes)
    return {
        "listen": {"http": "127.0.0.1:0"},
        "datacenters": {
            "eqiad": {
                "hosts": ["*.wikipedia.org"],
                "tiers": [{"name": "backend", "nodes": [be1]}, {"name": "frontend", "delay": DELAY, "nodes": [fe1]}],
            },
            "codfw": {
                "tiers": [{"name": "backend", "nodes": [be2]}, {"name": "frontend", "delay": DELAY, "nodes": [fe2]}],
            },
        },
        "sender": {"retry_initial": 0.05, "retry_max": 0.2, "connect_timeout": 1.0},
        "state_dir": None,  # no journal: the default /var/lib/purged is the host's
    }


async def purges_of(node):
    return await trio.to_thread.run_sync(node.purges)


async def test_changeprop_batch_and_curl_purge_reach_every_node_in_tier_order(varnish_factory):
    nodes = varnish_factory(4)
    be1, fe1, be2, fe2 = nodes
    async with running_daemon(two_dc_config(nodes)) as (service, client):
        events = [{"meta": {"uri": f"//en.wikipedia.org/wiki/P{i}?x={i}"}} for i in range(1000)]
        events.append({"meta": {"uri": "https://upload.wikimedia.org/a/b.png"}})  # codfw only
        r = await client.post("/sys/purge/", json=events)
        assert r.status_code == 201 and r.json()["accepted"] == 1001
        batch = r.json()["id"]
        r = await client.request("PURGE", "/wiki/Foo", headers={"Host": "en.wikipedia.org"})
        assert r.status_code == 202
        one = r.json()["id"]
        st = (await client.get(f"/v1/purge/{batch}?wait=20")).json()
        assert st["done"], st
        assert st["datacenters"] == {
            "eqiad": {"backend": {"nodes": 1, "done": 1}, "frontend": {"nodes": 1, "done": 1}},
            "codfw": {"backend": {"nodes": 1, "done": 1}, "frontend": {"nodes": 1, "done": 1}},
        }
        assert (await client.get(f"/v1/purge/{one}?wait=5")).json()["done"]
        metrics = (await client.get("/metrics")).text

    wiki = {("en.wikipedia.org", f"/wiki/P{i}?x={i}") for i in range(1000)} | {("en.wikipedia.org", "/wiki/Foo")}
    expected = {be1: wiki, fe1: wiki, be2: wiki | {("upload.wikimedia.org", "/a/b.png")}}
    expected[fe2] = expected[be2]
    times = {}
    for node in nodes:
        got = await purges_of(node)
        counts = Counter((p.host, p.url) for p in got)
        assert set(counts) == expected[node], node
        assert max(counts.values()) == 1  # nothing sent twice
        assert await trio.to_thread.run_sync(node.n_purges) == len(expected[node])
        times[node] = {(p.host, p.url): p.time for p in got}
    for backend, frontend in ((be1, fe1), (be2, fe2)):
        for key, at in times[frontend].items():
            assert at >= times[backend][key] + DELAY - 0.01, (key, at - times[backend][key])
    assert 'purged_http_requests_total{dc="eqiad",layer="frontend",status="200"} 1001.0' in metrics
    assert 'purged_purges_accepted_total{source="changeprop"} 1001.0' in metrics


async def test_stopped_node_catches_up_and_never_holds_the_others(varnish_factory):
    nodes = varnish_factory(4)
    be1, fe1, be2, fe2 = nodes
    async with running_daemon(two_dc_config(nodes)) as (service, client):
        await trio.to_thread.run_sync(be2.stop)
        urls = [f"https://en.wikipedia.org/wiki/Q{i}" for i in range(300)]
        start = trio.current_time()
        batch = (await client.post("/v1/purge", json={"urls": urls})).json()["id"]
        with trio.fail_after(60):  # generous: a loaded machine is slow, but a held eqiad would never finish
            while True:  # eqiad finishes on its own, while codfw's backend is still down
                st = (await client.get(f"/v1/purge/{batch}?wait=0.2")).json()
                if st["datacenters"]["eqiad"]["frontend"]["done"]:
                    break
        took = trio.current_time() - start
        assert DELAY <= took < DELAY + 30, took  # the frontend waited its delay; nothing waited for codfw
        assert not st["done"]
        assert st["datacenters"]["codfw"] == {"backend": {"nodes": 1, "done": 0}, "frontend": {"nodes": 1, "done": 0}}
        health = (await client.get("/healthz")).json()["nodes"]
        assert health[be2.address]["backlog"] == 300 and health[fe2.address]["backlog"] == 300
        assert await trio.to_thread.run_sync(fe2.n_purges) == 0  # held back behind its backend
        await trio.to_thread.run_sync(be2.restart)
        restarted_at = trio.current_time()  # after varnishd is up again: its start-up time is not ours
        with trio.fail_after(60):
            while not (st := (await client.get(f"/v1/purge/{batch}?wait=5")).json())["done"]:
                pass
        assert st["done"], st
        assert trio.current_time() - restarted_at < 30  # retry_max is 0.2 s: no long back-off after the outage
    assert {p.url for p in await purges_of(be2)} == {f"/wiki/Q{i}" for i in range(300)}
    assert {p.url for p in await purges_of(fe2)} == {f"/wiki/Q{i}" for i in range(300)}


async def test_configured_rate_is_what_varnish_sees(varnish_factory):
    limited, free = varnish_factory(2)
    rate, burst, count = 100, 10, 300
    cfg = {
        "listen": {"http": "127.0.0.1:0"},
        "datacenters": {
            "slow": {"rate": rate, "burst": burst, "tiers": [{"nodes": [limited.address]}]},
            "fast": {"tiers": [{"nodes": [free.address]}]},
        },
        "state_dir": None,
    }
    samples = []  # (seconds since before the POST, at the latest; the limited node's MAIN.n_purges)
    async with running_daemon(cfg) as (service, client):
        start = trio.current_time()
        batch = (await client.post("/v1/purge", json={"urls": [f"http://h.org/r{i}" for i in range(count)]})).json()
        with trio.fail_after(30):  # the other DC is not paced: it is done while the slow one is still sending
            while await trio.to_thread.run_sync(free.n_purges) < count:
                await trio.sleep(0.05)
        free_done = await trio.to_thread.run_sync(limited.n_purges)
        assert free_done < count, free_done
        assert await trio.to_thread.run_sync(free.n_purges) == count
        with trio.fail_after(60):
            while True:
                n = await trio.to_thread.run_sync(limited.n_purges)
                samples.append((trio.current_time() - start, n))
                if n == count:
                    break
                await trio.sleep(0.2)
        st = (await client.get(f"/v1/purge/{batch['id']}?wait=10")).json()
        took = trio.current_time() - start
        metrics = (await client.get("/metrics")).text
    assert st["done"]
    # Varnish's own counter: the burst plus ~rate per second, never more. Each sample's time is taken after
    # its read, so it bounds the time the bucket had to refill whatever a loaded machine did.
    for elapsed, n in samples:
        assert n <= burst + rate * elapsed + 15, (elapsed, n)
    # ... and not much less: the whole batch went at no less than half the rate (generous for a loaded machine).
    paced = samples[-1][0]
    assert (count - burst) / rate - 0.1 <= paced <= 2 * (count - burst) / rate + 5, paced
    assert took >= (count - burst) / rate - 0.1, took
    assert await trio.to_thread.run_sync(limited.n_purges) == count
    assert f'purged_node_rate_limited_total{{dc="slow",layer="tier0",node="{limited.address}"}}' in metrics
