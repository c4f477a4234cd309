"""Multicast ingest through the whole daemon: HTCP CLR and msgpack batch datagrams on a loopback multicast group
reach real Varnish nodes of two data centres; malformed datagrams and bad URLs are counted drops, never fatal."""

import random
import socket

import pytest
import trio
from daemon_helpers import config_for, running_daemon

from purged.core.batchcodec import encode_batch
from purged.core.htcp import encode_clr

pytestmark = pytest.mark.integration


def sender_socket() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton("127.0.0.1"))
    s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
    s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 0)  # never leaves this host
    return s


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_htcp_and_msgpack_datagrams_reach_every_node(varnish_factory):
    nodes = varnish_factory(4)
    group = f"239.255.{random.randrange(1, 250)}.{random.randrange(1, 250)}"
    htcp_port, batch_port = free_udp_port(), free_udp_port()
    nodes_by_dc = {"eqiad": [[nodes[0].address], [nodes[1].address]],
                   "codfw": [[nodes[2].address], [nodes[3].address]]}
    cfg = config_for(nodes_by_dc, listen={"multicast": [
                {"group": group, "port": htcp_port, "interface": "127.0.0.1", "format": "htcp"},
                {"group": group, "port": batch_port, "interface": "127.0.0.1", "format": "msgpack"},
    ]})
    async with running_daemon(cfg) as (service, client):
        with sender_socket() as s:
            for i in range(200):  # as MediaWiki sends them: full URLs, sequential transaction ids
                s.sendto(encode_clr(f"http://en.wikipedia.org/wiki/M{i}", i + 1), (group, htcp_port))
            s.sendto(encode_clr("test.com", 201), (group, htcp_port))  # a bare host: http://test.com/
            s.sendto(b"\x00\x2c garbage", (group, htcp_port))
            s.sendto(encode_clr("http://bad host/x", 202), (group, htcp_port))
            urls = [f"https://upload.wikimedia.org/b{i}.png" for i in range(50)]
            s.sendto(encode_batch(urls, sender="test", seq=1), (group, batch_port))
        expected = {f"/wiki/M{i}" for i in range(200)} | {"/"} | {f"/b{i}.png" for i in range(50)}
        for _ in range(200):
            if all(n.n_purges() == len(expected) for n in nodes):
                break
            await trio.sleep(0.05)
        metrics = (await client.get("/metrics")).text
    for node in nodes:
        assert {p.url for p in await trio.to_thread.run_sync(node.purges)} == expected
    g = f"{group}:{htcp_port}"
    assert f'purged_htcp_packets_total{{group="{g}",state="good"}} 202.0' in metrics
    assert f'purged_htcp_packets_total{{group="{g}",state="bad"}} 1.0' in metrics
    assert f'purged_multicast_dropped_total{{group="{g}",reason="invalid_url"}} 1.0' in metrics
    assert f'purged_multicast_urls_total{{group="{group}:{batch_port}"}} 50.0' in metrics
    assert f'purged_purges_accepted_total{{source="multicast:{g}"}} 201.0' in metrics


async def test_sources_outside_the_allowlist_are_dropped_and_counted(varnish_factory):
    (node,) = varnish_factory(1)
    group = f"239.255.{random.randrange(1, 250)}.{random.randrange(1, 250)}"
    port = free_udp_port()
    cfg = {
        "listen": {
            "http": "127.0.0.1:0",
            "multicast": [{"group": group, "port": port, "interface": "127.0.0.1", "sources": ["10.0.0.0/8"]}],
        },
        "datacenters": {"dc": {"tiers": [{"nodes": [node.address]}]}},
        "state_dir": None,
    }
    async with running_daemon(cfg) as (service, client):
        with sender_socket() as s:
            s.sendto(encode_clr("http://h.org/x", 1), (group, port))
        stats = service.multicast[f"{group}:{port}"]
        for _ in range(100):
            if stats.drops["source"]:
                break
            await trio.sleep(0.02)
        metrics = (await client.get("/metrics")).text
    assert f'purged_multicast_dropped_total{{group="{group}:{port}",reason="source"}} 1.0' in metrics
    assert service.engine.unique_pending() == 0 and node.n_purges() == 0
