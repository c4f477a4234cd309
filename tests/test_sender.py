"""The pipelined sender against stub edges (our own trio servers on loopback) that misbehave on purpose:
resend of unanswered PURGEs, no resend of answered ones, retries of 5xx, fallback for edges that do not
pipeline, time-outs of stalled nodes, and isolation (a stalled node costs the others nothing)."""

from collections import Counter

import trio
from daemon_helpers import config_for, running_daemon
from stub_edge import StubEdge, serve_stub_edge

FAST_RETRY = {"retry_initial": 0.01, "retry_max": 0.05, "timeout": 0.5, "connect_timeout": 0.5}


async def start_edges(nursery, *edges):
    for edge in edges:
        await nursery.start(serve_stub_edge, edge)
    return [f"127.0.0.1:{e.port}" for e in edges]


async def post(client, urls, priority="bulk"):
    r = await client.post("/v1/purge", json={"urls": urls, "priority": priority})
    assert r.status_code == 202, r.text
    return r.json()["id"]


async def wait_done(client, batch_id, seconds=10):
    r = await client.get(f"/v1/purge/{batch_id}?wait={seconds}")
    return r.json()


def answered_paths(edge, status=200):
    return Counter(r.path for r in edge.requests if r.status == status)


async def test_edge_closing_every_few_responses_gets_everything_once(nursery):
    edge = StubEdge(close_after=7)
    (node,) = await start_edges(nursery, edge)
    urls = [f"http://h.org/p{i}" for i in range(300)]
    async with running_daemon(config_for({"dc": [[node]]}, sender=FAST_RETRY)) as (service, client):
        st = await wait_done(client, await post(client, urls))
        assert st["done"], st
        ok = answered_paths(edge)
        assert set(ok) == {f"/p{i}" for i in range(300)}
        assert max(ok.values()) == 1  # an answered PURGE is never resent
        assert edge.connections >= 300 // 7
        assert service.engine.nodes[node].stats.errors == {}  # graceful closes are not failures


async def test_aborted_connection_resends_unanswered(nursery):
    edge = StubEdge(abort_after=10)
    (node,) = await start_edges(nursery, edge)
    async with running_daemon(config_for({"dc": [[node]]}, sender=FAST_RETRY)) as (service, client):
        st = await wait_done(client, await post(client, [f"http://h.org/p{i}" for i in range(200)]))
        assert st["done"], st
        ok = answered_paths(edge)
        assert set(ok) == {f"/p{i}" for i in range(200)} and max(ok.values()) == 1


async def test_5xx_is_retried_with_backoff(nursery):
    edge = StubEdge()
    edge.respond(503, count=5)
    (node,) = await start_edges(nursery, edge)
    async with running_daemon(config_for({"dc": [[node]]}, sender=FAST_RETRY)) as (service, client):
        st = await wait_done(client, await post(client, ["http://h.org/a", "http://h.org/b"]))
        assert st["done"], st
        assert set(answered_paths(edge)) == {"/a", "/b"}
        stats = service.engine.nodes[node].stats
        assert stats.responses[503] == 5 and stats.retries >= 5
        metrics = (await client.get("/metrics")).text
        assert 'purged_http_requests_total{dc="dc",layer="t0",status="503"} 5.0' in metrics


async def test_4xx_is_counted_not_retried(nursery):
    edge = StubEdge(status=403)
    (node,) = await start_edges(nursery, edge)
    async with running_daemon(config_for({"dc": [[node]]}, sender=FAST_RETRY)) as (service, client):
        st = await wait_done(client, await post(client, ["http://h.org/a"]))
        assert st["done"]  # given up on, counted: nothing left to wait for
        assert len(edge.requests) == 1
        assert service.engine.nodes[node].stats.gave_up == 1


async def test_edge_without_pipelining_falls_back_to_one_in_flight(nursery):
    edge = StubEdge(pipelining=False)
    (node,) = await start_edges(nursery, edge)
    async with running_daemon(config_for({"dc": [[node]]}, sender=FAST_RETRY)) as (service, client):
        st = await wait_done(client, await post(client, [f"http://h.org/p{i}" for i in range(50)]))
        assert st["done"], st
        assert set(answered_paths(edge)) == {f"/p{i}" for i in range(50)}
        assert service.senders[node].pipelining_fallbacks >= 1
        metrics = (await client.get("/metrics")).text
        assert f'purged_pipelining_fallbacks_total{{dc="dc",layer="t0",node="{node}"}} 1.0' in metrics
        assert f'purged_sender_window{{dc="dc",layer="t0",node="{node}"}} 1.0' in metrics
        connections = service.config.sender.connections
        assert f'purged_node_window{{dc="dc",layer="t0",node="{node}"}} {float(connections)}' in metrics


async def test_stalled_node_times_out_and_never_slows_the_others(nursery):
    stalled, healthy = StubEdge(), StubEdge()
    stalled.stall()
    nodes = await start_edges(nursery, stalled, healthy)
    cfg = config_for({"a": [[nodes[0]]], "b": [[nodes[1]]]}, sender=FAST_RETRY)
    async with running_daemon(cfg) as (service, client):
        batch = await post(client, [f"http://h.org/p{i}" for i in range(500)])
        with trio.fail_after(30):
            while service.engine.backlog(nodes[1]):
                await trio.sleep(0.02)
        # The healthy node did not wait for the stalled one: it was done before the stalled one timed out.
        assert service.engine.nodes[nodes[0]].stats.errors.get("timeout", 0) == 0
        st = (await client.get(f"/v1/purge/{batch}")).json()
        assert st["datacenters"]["b"]["t0"]["done"] == 1 and not st["done"]
        with trio.fail_after(30):  # > sender.timeout: the stalled connection is given up on
            while not service.engine.nodes[nodes[0]].stats.errors.get("timeout", 0):
                await trio.sleep(0.05)
        health = (await client.get("/healthz")).json()
        assert health["nodes"][nodes[0]]["backlog"] == 500
        stalled.resume()
        st = await wait_done(client, batch)
        assert st["done"], st
        assert set(answered_paths(stalled)) == {f"/p{i}" for i in range(500)}


async def test_dead_node_is_marked_down_then_catches_up(nursery):
    # A port with nothing listening: connect errors until a stub starts there.
    sock = trio.socket.socket()
    await sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    node = f"127.0.0.1:{port}"
    cfg = config_for({"dc": [[node]]}, sender={**FAST_RETRY, "down_after": 2})
    async with running_daemon(cfg) as (service, client):
        batch = await post(client, ["http://h.org/a", "http://h.org/b"])
        for _ in range(100):
            if service.engine.nodes[node].down:
                break
            await trio.sleep(0.02)
        assert (await client.get("/healthz")).json()["nodes"][node]["state"] == "down"
        assert "purged_tcp_errors_total{type=\"connect\"}" in (await client.get("/metrics")).text
        edge = StubEdge()
        edge.port = port
        listeners = await trio.open_tcp_listeners(port, host="127.0.0.1")
        await nursery.start(trio.serve_listeners, _handler(edge), listeners)
        st = await wait_done(client, batch)
        assert st["done"], st
        assert not service.engine.nodes[node].down


def _handler(edge):
    from stub_edge import handle_connection

    async def handler(stream):
        await handle_connection(edge, stream)

    return handler
