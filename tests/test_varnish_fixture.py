"""The real-Varnish test fixture itself: nodes start, purge, restart, and record every PURGE."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import trio
from procgroup import _pgroup_members
from varnish import SYNC_PATH, Purge, VarnishNode

pytestmark = pytest.mark.integration

Factory = Callable[..., list[VarnishNode]]


def purge(client: httpx.Client, node: VarnishNode, host: str, url: str) -> int:
    return client.request("PURGE", node.url + url, headers={"Host": host}).status_code


def pipelined_purges(node: VarnishNode, urls: list[str], host: str = "bulk.example") -> int:
    """Send all PURGEs on one connection without waiting; return how many got 200."""
    with socket.create_connection((node.host, node.port), timeout=10) as s:
        payload = b"".join(f"PURGE {u} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode() for u in urls)
        sender = threading.Thread(target=s.sendall, args=(payload,))
        sender.start()
        ok = 0
        buf = b""
        while ok < len(urls):
            data = s.recv(1 << 16)
            assert data, "connection closed early"
            buf += data
            ok += buf.count(b"HTTP/1.1 200 Purged\r\n")
            buf = buf[buf.rfind(b"\r\n") :]  # keep a tail so a split status line still counts once
        sender.join()
    return ok


def test_two_nodes_record_purges_with_host_url_and_time(
    varnish_factory: Factory,
) -> None:
    a, b = varnish_factory(2)
    assert a.port != b.port
    assert a.address == f"127.0.0.1:{a.port}"
    assert a.n_purges() == 0
    assert a.purges() == []

    before = time.time()
    with httpx.Client() as client:
        assert purge(client, a, "en.wikipedia.org", "/wiki/Main_Page") == 200
        assert purge(client, a, "de.wikipedia.org", "/wiki/Hauptseite?action=raw") == 200
        assert purge(client, b, "upload.wikimedia.org", "/x/y.png") == 200
        assert purge(client, a, "en.wikipedia.org", "/wiki/Main_Page") == 200  # again: not deduplicated
    after = time.time()

    assert a.n_purges() == 3
    assert b.n_purges() == 1
    got = a.purges()
    assert [(p.host, p.url) for p in got] == [
        ("en.wikipedia.org", "/wiki/Main_Page"),
        ("de.wikipedia.org", "/wiki/Hauptseite?action=raw"),
        ("en.wikipedia.org", "/wiki/Main_Page"),
    ]
    times = [p.time for p in got]
    assert times == sorted(times) and len(set(times)) == 3
    # Varnish stamps arrival with the same wall clock as time.time(), to the microsecond.
    assert before - 0.001 <= times[0] and times[-1] <= after + 0.001
    assert b.purges() == [Purge(b.purges()[0].time, "upload.wikimedia.org", "/x/y.png")]


def test_other_methods_get_503_and_are_not_purges(varnish_node: VarnishNode) -> None:
    with httpx.Client() as client:
        assert (
            client.get(varnish_node.url + "/wiki/Foo", headers={"Host": "en.wikipedia.org"}).status_code
            == 503
        )
        assert client.head(varnish_node.url + "/").status_code == 503
        assert client.post(varnish_node.url + "/", content=b"x").status_code == 503
    assert varnish_node.n_purges() == 0
    assert varnish_node.purges() == []
    assert varnish_node.stats("MAIN.client_req")["MAIN.client_req"] >= 3


def test_restart_keeps_port_and_record(varnish_node: VarnishNode) -> None:
    node = varnish_node
    port = node.port
    with httpx.Client() as client:
        assert purge(client, node, "a.example", "/before") == 200
    node.restart()
    assert node.port == port and node.running
    assert node.n_purges() == 0  # a new varnishd: counters start over
    with httpx.Client() as client:
        assert purge(client, node, "a.example", "/after") == 200
    assert node.n_purges() == 1
    assert [p.url for p in node.purges()] == ["/before", "/after"]


def test_kill_refuses_connections_until_restart(varnish_node: VarnishNode) -> None:
    node = varnish_node
    pid = node.pid
    assert pid is not None
    assert pipelined_purges(node, [f"/k{i}" for i in range(100)]) == 100
    node.kill()
    assert not node.running and node.pid is None
    assert _pgroup_members(pid, zombies=False) == []
    with pytest.raises(httpx.ConnectError), httpx.Client() as client:
        purge(client, node, "a.example", "/while-down")
    assert len(node.purges()) == 100  # the record outlives the process

    node.restart()
    with httpx.Client() as client:
        assert purge(client, node, "a.example", "/back") == 200
    assert len(node.purges()) == 101


def test_ten_thousand_pipelined_purges_are_all_recorded(varnish_node: VarnishNode) -> None:
    urls = [f"/bulk/{i}" for i in range(10_000)]
    assert pipelined_purges(varnish_node, urls) == len(urls)
    assert varnish_node.n_purges() == len(urls)
    got = varnish_node.purges()
    assert sorted(p.url for p in got) == sorted(urls)
    assert {p.host for p in got} == {"bulk.example"}


def test_stop_under_load_records_every_acknowledged_purge(varnish_node: VarnishNode) -> None:
    """What a client saw answered 200 is in purges() after stop(), and nothing else."""
    node = varnish_node
    acked: list[str] = []
    sent: list[str] = []
    halt = threading.Event()

    def client(cid: int) -> None:
        n = 0
        with socket.create_connection((node.host, node.port), timeout=10) as s:
            while not halt.is_set():
                batch = [f"/c{cid}/{n + i}" for i in range(20)]
                n += len(batch)
                sent.extend(batch)
                try:
                    s.sendall(b"".join(f"PURGE {u} HTTP/1.1\r\nHost: h\r\n\r\n".encode() for u in batch))
                    buf = b""
                    for u in batch:
                        while (end := buf.find(b"Purged</title>")) < 0:  # end of one response body
                            data = s.recv(1 << 16)
                            if not data:
                                return
                            buf += data
                        buf = buf[end + 1 :]
                        acked.append(u)
                except OSError:
                    return

    threads = [threading.Thread(target=client, args=(c,)) for c in range(3)]
    for t in threads:
        t.start()
    while len(acked) < 500:
        time.sleep(0.01)
    node.stop()
    halt.set()
    for t in threads:
        t.join(10)
    got = {p.url for p in node.purges()}
    assert set(acked) <= got <= set(sent)


def test_purges_from_outside_the_acl_get_405(varnish_node: VarnishNode) -> None:
    # The demo ACL allows 127.0.0.1 and ::1 only: a client on another loopback address is outside it.
    transport = httpx.HTTPTransport(local_address="127.0.0.2")
    with httpx.Client(transport=transport) as client:
        assert purge(client, varnish_node, "a.example", "/x") == 405
    assert varnish_node.n_purges() == 0
    assert varnish_node.purges() == []


def test_stop_leaves_no_process_and_marker_requests_are_not_purges(tmp_path: Path) -> None:
    node = VarnishNode(tmp_path / "edge").start()
    pid = node.pid
    assert pid is not None
    assert node.start_seconds is not None and node.start_seconds < 10
    members = _pgroup_members(pid)
    assert len(members) == 2  # manager and worker child
    assert SYNC_PATH in (tmp_path / "edge" / "purges.0.log").read_text()
    node.stop()
    node.stop()  # idempotent
    assert _pgroup_members(pid, zombies=False) == []
    assert node.purges() == []


async def test_usable_from_trio(varnish_factory: Factory) -> None:
    (node,) = await trio.to_thread.run_sync(varnish_factory, 1)
    async with httpx.AsyncClient() as client:
        for i in range(5):
            r = await client.request("PURGE", f"{node.url}/t{i}", headers={"Host": "trio.example"})
            assert r.status_code == 200
    got = await trio.to_thread.run_sync(node.wait_for_purges, 5)
    assert [p.url for p in got] == [f"/t{i}" for i in range(5)]
    await trio.to_thread.run_sync(node.restart)
    async with httpx.AsyncClient() as client:
        r = await client.request("PURGE", f"{node.url}/t5", headers={"Host": "trio.example"})
        assert r.status_code == 200
