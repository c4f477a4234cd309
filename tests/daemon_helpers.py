"""Test helpers: run the real daemon in-process on an ephemeral port and talk to it with httpx."""

from __future__ import annotations

from contextlib import asynccontextmanager

import httpx
import trio

from purged.config import parse_config
from purged.daemon import serve


def config_for(nodes_by_dc: dict, **extra) -> dict:
    """``{"dc": [["127.0.0.1:1"], ["127.0.0.1:2"]]}`` (a list of tiers, each a list of nodes) -> config mapping."""
    dcs = {}
    for dc, tiers in nodes_by_dc.items():
        dcs[dc] = {
            "tiers": [
                {"name": ["backend", "frontend"][i] if len(tiers) == 2 else f"t{i}", "nodes": list(t)}
                for i, t in enumerate(tiers)
            ]
        }
    # No journal unless a test asks for one (state_dir=...): the default /var/lib/purged is shared.
    cfg = {"listen": {"http": "127.0.0.1:0"}, "state_dir": None, "datacenters": dcs}
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key].update(value)
        else:
            cfg[key] = value
    return cfg


@asynccontextmanager
async def running_daemon(cfg: dict):
    config = parse_config(cfg)
    async with trio.open_nursery() as nursery:
        service = await nursery.start(serve, config)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{service.http_port}", timeout=30) as client:
            yield service, client
        nursery.cancel_scope.cancel()
