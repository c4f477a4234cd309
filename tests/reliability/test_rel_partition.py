"""A data centre partitioned, then healed, while purges flow.

DC ``west`` is a real varnishd inside a network namespace of our own (tests/netns.py: a veth pair, addresses
in 198.18.0.0/15); DC ``east`` a varnishd on 127.0.0.1. Batches are posted every 0.2 s; after a second the
veth is taken down (``ip link set down``: the route to west goes, its connections hang, new ones fail), 2.5 s
later it comes back up. Judged from both nodes' own logs: west got nothing while cut off and everything after
the heal (the oracle complete on both), and east was not slowed meanwhile (each purge accepted during the
partition reached east within a fraction of the partition's length).
"""

from __future__ import annotations

import time

import oracle
import pytest
import trio
from daemon_helpers import running_daemon
from harness import post_batch, purged_view, wait_done
from netns import missing_prerequisites, veth_namespace
from varnish import DEMO_VCL, VarnishNode, start_all, stop_all

pytestmark = pytest.mark.integration
BEFORE, CUT, AFTER = 1.0, 2.5, 1.5  # seconds of traffic before, during and after the partition
EVERY = 0.2


async def test_partitioned_dc_gets_everything_after_healing_and_the_other_is_not_slowed(tmp_path):
    assert not missing_prerequisites(), missing_prerequisites()  # CI runs as root with iproute2
    # The demo VCL lets only loopback purge; purged reaches west from the veth's root-side address.
    vcl = tmp_path / "purge-netns.vcl"
    vcl.write_text(DEMO_VCL.read_text().replace('"::1";', '"::1";\n    "198.18.0.0"/15;'))
    with veth_namespace(multicast_route=False) as ns:
        west = VarnishNode(tmp_path / "west", vcl=vcl, host=ns.ns_addr, port=6081, netns=ns.name)
        east = VarnishNode(tmp_path / "east")
        await trio.to_thread.run_sync(start_all, [west, east])
        try:
            await _scenario(ns, west, east)
        finally:
            errors = await trio.to_thread.run_sync(stop_all, [west, east])
    assert not errors, errors


async def _scenario(ns, west: VarnishNode, east: VarnishNode) -> None:
    cfg = {
        "listen": {"http": "127.0.0.1:0"},
        "state_dir": None,
        "datacenters": {
            "west": {"tiers": [{"nodes": [west.address]}]},
            "east": {"tiers": [{"nodes": [east.address]}]},
        },
        "sender": {"connections": 2, "window": 64, "timeout": 1.0, "connect_timeout": 0.5,
                   "retry_initial": 0.05, "retry_max": 0.5, "down_after": 3},
    }
    ledger = oracle.Ledger()
    batches: list[str] = []
    cut_at = healed_at = 0.0
    async with running_daemon(cfg) as (service, client):
        t0 = time.time()
        k = 0
        while (now := time.time()) < t0 + BEFORE + CUT + AFTER:
            if not cut_at and now >= t0 + BEFORE:
                ns.set_link(False)
                cut_at = time.time()
            elif cut_at and not healed_at and now >= cut_at + CUT:
                ns.set_link(True)
                healed_at = time.time()
            batches.append(await post_batch(client, ledger, [f"http://w.example.org/p/{k}/{i}" for i in range(50)]))
            k += 1
            await trio.sleep(EVERY)
        assert await wait_done(client, batches, timeout=30), (await purged_view(client))[0]
        done_at = time.time()
        health, metrics = await purged_view(client)

    logs = await trio.to_thread.run_sync(lambda: {n.address: n.purges() for n in (west, east)})
    report = oracle.check(ledger, cfg, logs, health, metrics)
    print(report)
    report.assert_complete()  # west got every purge after the heal; nothing pending, nothing dropped

    # The partition was real: west logged nothing while cut off (bar what was in the air as the link went).
    assert not [p for p in logs[west.address] if cut_at + 0.1 < p.time < healed_at]
    during = [(key, sent) for key, sent, _ in ledger.accepted if cut_at <= sent < healed_at]
    assert len(during) >= 400
    west_first = {(p.host, p.url): p.time for p in reversed(logs[west.address])}
    assert all(west_first[key] >= healed_at for key, _ in during)
    # East was not held: every purge accepted during the partition reached it within a fraction of the cut.
    east_times: dict = {}
    for p in logs[east.address]:
        east_times.setdefault((p.host, p.url), []).append(p.time)
    lag = [min(t for t in east_times[key] if t >= sent - oracle.CLOCK_SLACK) - sent for key, sent in during]
    west_after_heal = max(west_first[key] for key, _ in during) - healed_at
    print(f"partition {CUT:.1f} s: {len(during)} purges accepted meanwhile; east reached them in at most "
          f"{max(lag) * 1000:.0f} ms (median {sorted(lag)[len(lag) // 2] * 1000:.0f} ms); west had all of them "
          f"{west_after_heal:.2f} s after the heal; every batch done {done_at - healed_at:.2f} s after it")
    assert max(lag) < CUT / 3, max(lag)
