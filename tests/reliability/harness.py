"""Shared steps of the reliability scenarios: post batches into a ledger, wait, take purged's own view."""

from __future__ import annotations

import time

import httpx
import trio
from oracle import Ledger


async def post_batch(client: httpx.AsyncClient, ledger: Ledger, urls: list[str]) -> str:
    """POST /v1/purge; on 2xx record the accepted URLs with the time the request was sent. Returns the id."""
    sent_at = time.time()
    r = await client.post("/v1/purge", json={"urls": urls})
    assert r.status_code == 202, r.text
    ledger.add(urls, sent_at, r.json())
    return r.json()["id"]


async def wait_done(client: httpx.AsyncClient, batch_ids: list[str], timeout: float) -> bool:
    """True once every batch is done on every node (GET /v1/purge/{id}?wait=), False at the deadline."""
    with trio.move_on_after(timeout):
        for batch in batch_ids:
            while not (await client.get(f"/v1/purge/{batch}?wait=5")).json()["done"]:
                pass
        return True
    return False


async def purged_view(client: httpx.AsyncClient) -> tuple[dict, str]:
    """(/healthz JSON, /metrics text)."""
    health = (await client.get("/healthz")).json()
    metrics = (await client.get("/metrics")).text
    return health, metrics
