"""A fleet member in-process, on a real 1-server JetStream, with a stub edge that stalls on request: a node slow
for longer than ``bus.nats.ack_wait`` (heartbeats, no redelivery), a consumer deleted under a running daemon,
more daemons than one page of the consumer list; and a daemon without a bus has no fleet routes."""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager

import pytest
import trio
from daemon_helpers import config_for, running_daemon
from nats_cluster import NatsCluster
from stub_edge import StubEdge, serve_stub_edge

pytestmark = pytest.mark.integration


def _metric(text: str, name: str) -> float:
    return next(float(line.split()[1]) for line in text.splitlines() if line.startswith(name + " "))


@asynccontextmanager
async def fleet_member(tmp_path, name: str, **nats):
    """A daemon named ``name`` on a 1-server JetStream (``bus.nats`` settings ``nats``) with one stub edge node:
    yields ``(cluster, edge, service, client)`` once its bus is ready; stops it all after."""
    cluster = await trio.to_thread.run_sync(lambda: NatsCluster(tmp_path / "nats", size=1).start())
    try:
        async with trio.open_nursery() as nursery:
            edge = StubEdge()
            port = await nursery.start(serve_stub_edge, edge)
            bus = {"nats": {"servers": cluster.urls, **nats}}
            cfg = config_for({"a": [[f"127.0.0.1:{port}"]]}, name=name, bus=bus)
            async with running_daemon(cfg) as (service, client):
                await service.bus.ready.wait()
                yield cluster, edge, service, client
            nursery.cancel_scope.cancel()
    finally:
        await trio.to_thread.run_sync(cluster.stop)


async def test_slow_node_is_heartbeaten_not_redelivered(tmp_path):
    async with fleet_member(tmp_path, "slow.one", ack_wait=1.0, publish_timeout=2.0) as (cluster, edge, service, client):
        edge.stall()
        r = await client.post("/v1/purge", json={"urls": [f"http://h.test/{i}" for i in range(100)]})
        assert r.status_code == 202, r.text
        fid = r.json()["id"]
        await edge.wait_for_requests(100)
        await trio.sleep(3.5)  # three and a half ack_waits
        status = (await client.get(f"/v1/purge/{fid}")).json()
        assert status["done"] is False and status["daemons"]["slow.one"]["lag"] == 1, status
        metrics = (await client.get("/metrics")).text
        assert _metric(metrics, "purged_bus_redelivered_total") == 0
        assert _metric(metrics, "purged_bus_held_messages") == 1
        edge.resume()
        status = (await client.get(f"/v1/purge/{fid}", params={"wait": 10})).json()
        assert status["done"] is True, status
        assert status["datacenters"] == {"a": {"t0": {"nodes": 1, "done": 1}}}
        metrics = (await client.get("/metrics")).text
        assert _metric(metrics, "purged_bus_redelivered_total") == 0
        assert _metric(metrics, "purged_bus_acked_total") == 1
        assert len(edge.requests) == 100
        assert (await client.get("/v1/purge/s99")).json()["error"] == "unknown_batch"


async def test_no_bus_no_fleet_routes(tmp_path):
    async with running_daemon(config_for({"a": [["127.0.0.1:9"]]})) as (service, client):
        assert service.bus is None
        r = await client.get("/v1/fleet")
        assert r.status_code == 404 and r.json()["error"] == "no_fleet"
        assert "bus" not in (await client.get("/healthz")).json()
        r = await client.get("/v1/purge/s1")  # not a fleet daemon: an unknown local id, as before
        assert r.status_code == 404 and r.json()["error"] == "unknown_batch"




async def test_consumer_deleted_under_a_running_daemon_comes_back(tmp_path):
    """An operator deleted the consumer of a daemon that is still running: its fetches fail, it sets the
    consumer up again, and it gets the batches published meanwhile."""
    async with fleet_member(tmp_path, "back.again", ack_wait=1.0, publish_timeout=2.0) as (cluster, edge, service, client):
        await service.bus.delete_consumer("back_again")
        # While no consumer at all exists the stream keeps nothing (interest retention, docs/fleet.md):
        # post until a batch reaches the node, then that batch is done with the consumer back.
        with trio.fail_after(20):
            n = 0
            while not edge.requests:
                n += 1
                r = await client.post("/v1/purge", json={"urls": [f"http://h.test/{n}"]})
                assert r.status_code == 202, r.text
                await trio.sleep(0.5)
        status = (await client.get(f"/v1/purge/{r.json()['id']}", params={"wait": 10})).json()
        assert status["done"] is True and "back.again" in status["daemons"], status


async def test_status_counts_every_consumer_past_one_page(tmp_path):
    """300 more durable consumers (the server lists 256 a page) that never ack: a batch is not done, and
    ``/v1/fleet`` lists every daemon."""
    import nats
    from nats.js.api import ConsumerConfig

    async with fleet_member(tmp_path, "many") as (cluster, edge, service, client):

        async def add_consumers() -> None:
            nc = await nats.connect(cluster.urls)
            js = nc.jetstream()
            for i in range(300):
                await js.add_consumer("PURGED", ConsumerConfig(durable_name=f"idle{i}"))
            await nc.close()

        await trio.to_thread.run_sync(lambda: asyncio.run(add_consumers()))
        r = await client.post("/v1/purge", json={"urls": ["http://h.test/x"]})
        status = (await client.get(f"/v1/purge/{r.json()['id']}", params={"wait": 1})).json()
        assert status["done"] is False and len(status["daemons"]) == 301, len(status["daemons"])
        assert status["daemons"]["many"]["done"] is True
        fleet = (await client.get("/v1/fleet")).json()
        assert len(fleet["daemons"]) == 301 and fleet["missing_daemons"] == 0
