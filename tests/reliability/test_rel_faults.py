"""Scenario B: every fault mode of the fault proxy between purged and a Varnish node, then recovery.

One node is reached through ``FaultProxy``, a second (another DC) directly. For each mode in turn the proxy
misbehaves for a while as a batch is posted (each batch repeats some URLs of the previous one, so a re-purge
after a send must be sent again), then passes again. At the end every batch is done and the oracle holds on
both nodes from Varnish's own logs: nothing accepted was lost, every acceptance has a PURGE after it.
"""

from __future__ import annotations

import oracle
import pytest
import trio
from ats import purges_of
from daemon_helpers import running_daemon
from faultproxy import FaultProxy
from harness import post_batch, purged_view, wait_done

pytestmark = pytest.mark.integration
CONFIG_SENDER = {
    "connections": 2,
    "window": 32,
    "timeout": 0.5,
    "connect_timeout": 0.5,
    "retry_initial": 0.05,
    "retry_max": 0.3,
    "down_after": 3,
}
FAULTS = ["storm503", "stall", "reset", "slow", "close_each", "half"]
FAULT_SECONDS = 1.5


async def test_each_fault_mode_then_pass_loses_nothing(varnish_factory, nursery):
    behind, direct = varnish_factory(2)
    proxy = await nursery.start(FaultProxy(("127.0.0.1", behind.port), reset_after=3000).serve)
    cfg = {
        "listen": {"http": "127.0.0.1:0"},
        "state_dir": None,
        "datacenters": {
            "faulty": {"tiers": [{"nodes": [proxy.address]}]},
            "clean": {"tiers": [{"nodes": [direct.address]}]},
        },
        "sender": CONFIG_SENDER,
    }
    ledger = oracle.Ledger()
    async with running_daemon(cfg) as (service, client):
        batches, previous = [], []
        for round_, mode in enumerate(FAULTS):
            proxy.set_mode(mode)
            urls = [f"http://w.example.org/{mode}/{i}" for i in range(60)] + previous[:20]
            batches.append(await post_batch(client, ledger, urls))
            await trio.sleep(FAULT_SECONDS / 2)
            batches.append(await post_batch(client, ledger, [f"http://w.example.org/{mode}/late{round_}"]))
            await trio.sleep(FAULT_SECONDS / 2)
            proxy.set_mode("pass")
            await trio.sleep(0.3)
            previous = urls
        assert await wait_done(client, batches, timeout=30), (await purged_view(client))[0]
        health, metrics = await purged_view(client)

    logs = await trio.to_thread.run_sync(purges_of, [behind, direct])
    logs[proxy.address] = logs.pop(behind.address)
    report = oracle.check(ledger, cfg, logs, health, metrics)
    print(report, dict(proxy.stats), sep="\n")
    report.assert_ok()  # every accepted purge delivered after its acceptance, pending, or in a named drop
    # And none set aside: every fault here is node-wide (a storm, a stall...), not a purge the node singles out.
    report.assert_complete()
    assert not report.nodes[direct.address].missing  # the clean DC never noticed
    assert report.nodes[proxy.address].repeats  # resends after resets repeat purges: reported, not failed
    # Each fault really happened.
    assert proxy.stats["answered_503"] > 0 and proxy.stats["resets"] > 0
    assert proxy.stats["half_written"] > 0 and proxy.stats["closed_after_response"] > 0
    assert oracle.metric_sum(metrics, "purged_retries_total", node=proxy.address) > 0


async def test_node_wide_503_storm_then_recovery_drops_nothing(varnish_factory, nursery):
    """A node answering 503 to everything for a while is an outage, not a bad purge: once it answers again,
    every purge accepted during the storm reaches it (guarantee 1); none may be set aside as a poison purge."""
    (node,) = varnish_factory(1)
    proxy = await nursery.start(FaultProxy(("127.0.0.1", node.port), mode="storm503").serve)
    cfg = {
        "listen": {"http": "127.0.0.1:0"},
        "state_dir": None,
        "datacenters": {"dc": {"tiers": [{"nodes": [proxy.address]}]}},
        "sender": CONFIG_SENDER,
    }
    ledger = oracle.Ledger()
    async with running_daemon(cfg) as (service, client):
        batch = await post_batch(client, ledger, [f"http://w.example.org/storm/{i}" for i in range(100)])
        await trio.sleep(2.0)  # ~6 retry rounds at retry_max 0.3 s
        proxy.set_mode("pass")
        assert await wait_done(client, [batch], timeout=15)
        health, metrics = await purged_view(client)
    logs = {proxy.address: await trio.to_thread.run_sync(node.purges)}
    report = oracle.check(ledger, cfg, logs, health, metrics)
    assert proxy.stats["answered_503"] >= 100
    report.assert_complete()
