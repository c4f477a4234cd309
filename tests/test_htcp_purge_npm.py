"""The real npm ``htcp-purge`` client (tests/npm) -> purged -> real Varnish nodes of two data centres.

``htcp-purge`` turns multicast loopback off, so a receiver on its own host (network namespace) never hears it.
The sender therefore runs in a network namespace of its own (tests/netns.py): a veth pair, and in the namespace
a route for 224.0.0.0/4 out of the veth, since the client never picks a multicast interface. purged runs in this
process, in the root namespace, joined to the group on the veth's root-side address.

Needs root, iproute2, node, ``npm ci`` in tests/npm and varnishd; ``.ci/test`` installs all of them. A missing
piece fails the test with the command that fixes it: it is never skipped.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
from pathlib import Path

import pytest
import trio
from daemon_helpers import config_for, running_daemon
from netns import missing_prerequisites, veth_namespace
from prometheus_client.parser import text_string_to_metric_families
from varnish import VARNISHD

pytestmark = pytest.mark.integration

NPM_DIR = Path(__file__).parent / "npm"
SEND_PURGES = NPM_DIR / "send_purges.js"

# MediaWiki-style URLs as change-propagation hands them to htcp-purge, and what each node must then receive
# (Host header, path + query). htcp-purge sends the URL's UTF-8 bytes as they are; purged percent-encodes
# non-ASCII path characters and leaves escapes and queries alone.
SPECIAL = {
    "http://en.wikipedia.org/wiki/Z\u00fcrich": ("en.wikipedia.org", "/wiki/Z%C3%BCrich"),
    "http://de.wikipedia.org/wiki/Stra\u00dfe_des_17._Juni": ("de.wikipedia.org", "/wiki/Stra%C3%9Fe_des_17._Juni"),
    "http://en.wikipedia.org/wiki/%E6%9D%B1%E4%BA%AC": ("en.wikipedia.org", "/wiki/%E6%9D%B1%E4%BA%AC"),
    "http://en.wikipedia.org/w/index.php?title=Main_Page&action=history": (
        "en.wikipedia.org",
        "/w/index.php?title=Main_Page&action=history",
    ),
    "http://en.m.wikipedia.org/wiki/Talk:Foo_(bar)": ("en.m.wikipedia.org", "/wiki/Talk:Foo_(bar)"),
    "https://en.wikipedia.org/wiki/Special:Random": ("en.wikipedia.org", "/wiki/Special:Random"),
}
URLS = {f"http://en.wikipedia.org/wiki/Npm_page_{i}": ("en.wikipedia.org", f"/wiki/Npm_page_{i}") for i in range(94)}
URLS |= SPECIAL
N = len(URLS)  # 100, one datagram each, transaction ids 1..100


def require_prerequisites() -> None:
    """Fail (not skip) with what is missing: CI installs everything through .ci/test."""
    problems = missing_prerequisites()
    if shutil.which("node") is None:
        problems.append("node is not installed (Debian package nodejs)")
    if not (NPM_DIR / "node_modules" / "htcp-purge" / "package.json").exists():
        problems.append("htcp-purge is not installed: run `(cd tests/npm && npm ci)` (.ci/test does)")
    if not os.access(VARNISHD, os.X_OK):
        problems.append("varnishd is not installed (Debian package varnish)")
    if problems:
        pytest.fail("cannot run the npm htcp-purge test: " + "; ".join(problems) + " (bash .ci/test sets all up)")


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def samples(metrics_text: str) -> dict[tuple[str, frozenset], float]:
    out = {}
    for family in text_string_to_metric_families(metrics_text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


async def test_npm_htcp_purge_datagrams_reach_every_node(request):
    require_prerequisites()
    nodes = request.getfixturevalue("varnish_factory")(4)
    group = f"239.255.{random.randrange(1, 255)}.{random.randrange(1, 255)}"
    port = free_udp_port()
    with veth_namespace() as ns:
        nodes_by_dc = {"eqiad": [[nodes[0].address], [nodes[1].address]],
                       "codfw": [[nodes[2].address], [nodes[3].address]]}
        cfg = config_for(nodes_by_dc, listen={"multicast": [
                    {"group": group, "port": port, "interface": ns.host_addr, "format": "htcp",
                     "sources": ["198.18.0.0/15"]},
        ]})
        async with running_daemon(cfg) as (service, client):
            # As change-propagation does: one purger, several purge() calls; TTL 1 = the veth link only
            # (the root namespace does not forward multicast anyway).
            job = {"host": group, "port": port, "urls": list(URLS), "chunk": 25, "multicast_ttl": 1}
            with trio.fail_after(20):
                proc = await trio.run_process(
                    ns.exec_argv(["node", str(SEND_PURGES)]),
                    stdin=json.dumps(job).encode(), capture_stdout=True, capture_stderr=True, check=False,
                )
            assert proc.returncode == 0, f"send_purges.js failed: {proc.stderr.decode(errors='replace')}"
            report = json.loads(proc.stdout)
            assert report == report | {"sent": N, "first_id": 1, "last_id": N, "multicast_ttl": 1}, report

            stats = service.multicast[f"{group}:{port}"]
            with trio.move_on_after(5):
                while stats.packets["good"] < N:
                    await trio.sleep(0.02)
            assert stats.packets["good"] == N, (
                f"purged heard {stats.packets} of {N} datagrams sent from {ns.ns_addr} in namespace {ns.name} "
                f"to {group}:{port} (joined on {ns.host_addr}, {ns.host_if}): check "
                f"{ns.sysctl_path('rp_filter')} and the namespace's 224.0.0.0/4 route"
            )
            for node in nodes:
                await trio.to_thread.run_sync(node.wait_for_purges, N, 10.0)
            metrics = (await client.get("/metrics")).text
            per_source = stats.loss.statistics()["per_source"]

    expected = set(URLS.values())
    for node in nodes:
        got = [(p.host, p.url) for p in await trio.to_thread.run_sync(node.purges)]
        assert len(got) == N and set(got) == expected, (node, sorted(set(got) ^ expected))

    g = f"{group}:{port}"
    m = samples(metrics)

    def value(name: str, **labels: str) -> float:
        return m.get((name, frozenset({"group": g, **labels}.items())), -1.0)

    assert value("purged_htcp_packets_total", state="good") == N
    assert value("purged_htcp_packets_total", state="bad") == 0
    assert value("purged_htcp_packets_total", state="filtered") == 0
    assert value("purged_multicast_urls_total") == N
    # Loss estimate from the client's transaction ids: nothing lost, duplicated, reordered, restarted ...
    for kind, want in {"received": N, "lost": 0, "duplicates": 0, "reordered": 0, "resets": 0}.items():
        assert value("purged_multicast_seq_total", kind=kind) == want, kind
    # ... and since the window (256) never slid past id 1, "lost 0" alone proves little: the one source (the
    # namespace's address) ended at id N having seen N ids, in order, so it saw exactly 1..N.
    assert per_source == {ns.ns_addr: {"received": N, "lost": 0, "duplicates": 0, "reordered": 0, "resets": 0,
                                       "last_seq": N}}
    dropped = {k: v for k, v in m.items() if k[0] == "purged_multicast_dropped_total" and v}
    assert not dropped, dropped
    assert m[("purged_purges_accepted_total", frozenset({"source": f"multicast:{g}"}.items()))] == N
