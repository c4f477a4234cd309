"""Scenario A: Apache Traffic Server as the backend tier, Varnish as the frontend tier of one data centre.

A real purged daemon gets a few hundred URLs over the HTTP API. Half of them are cached in the ATS nodes
beforehand (so ATS answers 200 for those, 404 for the rest: both are success). Checked from the edges' own
logs: conservation per node (the oracle) and tier order (every frontend PURGE of a URL comes at least
``delay`` after that URL's PURGE on every backend node).
"""

from __future__ import annotations

import httpx
import oracle
import pytest
import trio
from ats import purges_of
from daemon_helpers import running_daemon
from harness import post_batch, purged_view, wait_done

pytestmark = pytest.mark.integration
DELAY = 0.3
N = 300


async def test_ats_backends_then_varnish_frontend(ats_factory, varnish_factory, origin):
    be = await trio.to_thread.run_sync(lambda: ats_factory(2, origin=origin.address))
    (fe,) = varnish_factory(1)
    urls = [f"https://en.wikipedia.org/wiki/Page_{i}?oldid={i}" for i in range(N)]

    def warm() -> None:  # cache the even pages in both ATS nodes
        for node in be:
            with httpx.Client(base_url=node.url) as c:
                for i in range(0, N, 2):
                    assert c.get(f"/wiki/Page_{i}?oldid={i}", headers={"Host": "en.wikipedia.org"}).status_code == 200

    await trio.to_thread.run_sync(warm)
    cfg = {
        "listen": {"http": "127.0.0.1:0"},
        "state_dir": None,
        "datacenters": {
            "eqiad": {
                "hosts": ["*.wikipedia.org"],
                "tiers": [
                    {"name": "backend", "nodes": [n.address for n in be]},
                    {"name": "frontend", "delay": DELAY, "nodes": [fe.address]},
                ],
            }
        },
        "sender": {"retry_initial": 0.05, "retry_max": 0.5, "connect_timeout": 1.0},
    }
    ledger = oracle.Ledger()
    async with running_daemon(cfg) as (service, client):
        batches = []
        for start in range(0, N, 100):  # three batches, a little apart
            batches.append(await post_batch(client, ledger, urls[start : start + 100]))
            await trio.sleep(0.1)
        assert await wait_done(client, batches, timeout=20)
        health, metrics = await purged_view(client)

    logs = await trio.to_thread.run_sync(purges_of, [*be, fe])
    report = oracle.check(ledger, cfg, logs, health, metrics)
    report.assert_complete()
    assert all(not r.repeats for r in report.nodes.values()), report  # a clean run sends each URL once
    assert oracle.tier_order(ledger, cfg, logs) == []
    for node in be:  # ATS answered both ways, and both counted as delivered
        statuses = {r.status for r in logs[node.address]}
        assert statuses == {200, 404}, statuses
        assert sum(r.status == 200 for r in logs[node.address]) == N // 2
    assert oracle.metric_sum(metrics, "purged_http_requests_total", layer="backend", status="404") == N
    assert oracle.metric_sum(metrics, "purged_http_requests_total", layer="backend", status="200") == N
    assert oracle.metric_sum(metrics, "purged_retries_total") == 0  # a 404 is success, not retried
