"""docs/grafana-dashboard.json queries only metrics that a running daemon exports (issue 12)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import trio
from daemon_helpers import config_for, running_daemon
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.integration
DASHBOARD = Path(__file__).resolve().parent.parent / "docs" / "grafana-dashboard.json"


def queried_metrics() -> set[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    exprs += [v["query"] for v in dash["templating"]["list"] if v["type"] == "query"]
    return {m for e in exprs for m in re.findall(r"\b(purged_[a-z_]+)\b", e)}


async def test_every_dashboard_metric_is_exported(varnish_node):
    wanted = queried_metrics()
    assert len(wanted) >= 10
    # One live node and one dead one: sends, acks, latency, connection errors and retries all happen.
    cfg = config_for({"dc": [[varnish_node.address, "127.0.0.1:9"]]},
                     sender={"retry_initial": 0.05, "retry_max": 0.2, "connect_timeout": 1.0})
    async with running_daemon(cfg) as (_, client):
        r = await client.post("/v1/purge", json={"urls": ["http://h.org/a", "ftp://bad/"]})
        assert r.status_code == 202
        with trio.move_on_after(20):
            while True:
                text = (await client.get("/metrics")).text
                exported = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
                if wanted <= exported:
                    break
                await trio.sleep(0.2)
    assert wanted <= exported, sorted(wanted - exported)
