"""A fleet on a real 3-server NATS JetStream cluster: three purged processes, each with its own real Varnish.

Checked from Varnish's own record (varnishncsa, tests/varnish.py): a batch posted to one daemon reaches every
daemon's node; ``?wait=`` on another daemon says done; with one daemon and one NATS server killed -9 while
more is posted (the server leading the stream), status says not done until the daemon is back, then it catches up and nothing is lost.
Also: the bus unreachable gives 503 ``bus_unavailable``; an unreadable stream message is counted, not fatal.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import time

import httpx
import pytest
import yaml
from nats_cluster import NatsCluster, free_port
from test_signals import PurgedProcess
from varnish import VarnishNode, start_all, stop_all

from purged.ctl import main as ctl_main

pytestmark = pytest.mark.integration

NAMES = ["cp1.eqiad", "cp2.esams", "cp3.ulsfo"]


def _config(path, name, node, port, servers, **bus):
    cfg = {
        "name": name,
        "listen": {"http": f"127.0.0.1:{port}"},
        "state_dir": None,
        "datacenters": {"a": {"tiers": [{"name": "t0", "nodes": [node]}]}},
        "sender": {"connect_timeout": 0.5, "retry_initial": 0.05, "retry_max": 0.5},
        "limits": {"client_rate": 0},
        "bus": {"nats": {"servers": servers, "replicas": 3, "ack_wait": 2.0, "publish_timeout": 2.0,
                         "connect_timeout": 1.0, **bus}},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def _post(url: str, urls: list[str], deadline: float = 30.0) -> str:
    """Post like a producer does: retry on 503 (the bus failing over) until accepted; the fleet id."""
    end = time.monotonic() + deadline
    while True:
        try:
            r = httpx.post(url + "/v1/purge", json={"urls": urls}, timeout=10)
        except httpx.TransportError:
            r = None
        if r is not None and r.status_code == 202:
            return r.json()["id"]
        assert r is None or r.status_code == 503, r.text
        assert time.monotonic() < end, r.text if r is not None else "no answer"
        time.sleep(0.2)


def _status(url: str, fleet_id: str, wait: float = 0) -> dict:
    """A fleet status; a 503 (the stream's leaders failing over after a server died) is retried a while."""
    end = time.monotonic() + 20
    while True:
        r = httpx.get(f"{url}/v1/purge/{fleet_id}", params={"wait": wait}, timeout=wait + 10)
        if r.status_code != 503 or time.monotonic() > end:
            assert r.status_code == 200, r.text
            return r.json()
        time.sleep(0.2)


def _wait_fleet(url: str, names: list[str], timeout: float = 30) -> dict:
    end = time.monotonic() + timeout
    while True:
        try:
            r = httpx.get(url + "/v1/fleet", timeout=5)
            if r.status_code == 200 and set(names) <= set(r.json()["daemons"]):
                return r.json()
        except httpx.TransportError:
            pass
        assert time.monotonic() < end, "the fleet did not come up"
        time.sleep(0.1)


def _metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics", timeout=5).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"no metric {name}")


async def _publish_garbage(servers: list[str]) -> None:
    import nats

    nc = await nats.connect(servers)
    try:
        await nc.jetstream().publish("PURGED.batches", b"\x93\x01\x02\x03", stream="PURGED")
    finally:
        await nc.close()


def test_fleet_delivers_to_every_daemon_and_survives_kills(tmp_path, capsys):
    cluster = NatsCluster(tmp_path / "nats").start()
    nodes = [VarnishNode(tmp_path / f"edge{i}") for i in range(3)]
    daemons: list[PurgedProcess | None] = [None] * 3
    try:
        start_all(nodes)
        ports = [free_port() for _ in NAMES]
        configs = [_config(tmp_path / f"{n}.yaml", n, nodes[i].address, ports[i], cluster.urls)
                   for i, n in enumerate(NAMES)]
        # The daemon that gets killed keeps a journal: its replay and the stream's redelivery meet at restart.
        cfg = yaml.safe_load(configs[2].read_text())
        cfg.update(state_dir=str(tmp_path / "state-c"), durability="batch")
        configs[2].write_text(yaml.safe_dump(cfg))
        for i in range(3):
            daemons[i] = PurgedProcess(configs[i], ports[i], tmp_path)
        for d in daemons:
            d.wait_listening()
        urls = [d.url for d in daemons]
        _wait_fleet(urls[0], NAMES)

        # 1. A batch posted to one daemon reaches every daemon's node; another daemon says done.
        first = [f"http://h.test/a/{i}" for i in range(2000)]
        fid = _post(urls[0], first)
        status = _status(urls[1], fid, wait=30)
        assert status["done"] is True and status["accepted"] == 2000, status
        assert set(status["daemons"]) == set(NAMES) and all(d["done"] for d in status["daemons"].values())
        assert status["daemons"]["cp2.esams"]["datacenters"] == {"a": {"t0": {"nodes": 1, "done": 1}}}
        for node in nodes:
            got = {p.url for p in node.purges() if p.host == "h.test"}
            assert {u[len("http://h.test"):] for u in first} <= got, node.name

        # An unreadable message in the stream is counted and terminated; nothing stops.
        asyncio.run(_publish_garbage(cluster.urls))

        # 2. kill -9 one daemon and the NATS server leading the stream while more is posted (to the two others,
        # alternately).
        leader = cluster.stream_leader("PURGED")
        assert leader is not None
        daemons[2].proc.send_signal(signal.SIGKILL)
        daemons[2].wait(10)
        cluster.kill(leader)  # the stream fails over; publishes are retried inside publish_timeout
        more: list[str] = []
        ids = []
        for b in range(6):
            batch = [f"http://h.test/b{b}/{i}" for i in range(500)]
            ids.append(_post(urls[b % 2], batch))
            more += batch
        status = _status(urls[0], ids[-1], wait=1)
        assert status["done"] is False, status
        assert status["daemons"]["cp3.ulsfo"]["done"] is False
        assert status["daemons"]["cp1.eqiad"]["lag"] >= 0
        fleet = _wait_fleet(urls[1], NAMES)
        assert fleet["daemons"]["cp3.ulsfo"]["lag"] > 0

        # 3. The daemon comes back: it catches up from its consumer's position; status turns done.
        daemons[2] = PurgedProcess(configs[2], ports[2], tmp_path)
        daemons[2].wait_listening()
        status = _status(urls[2], ids[-1], wait=40)
        assert status["done"] is True, status
        everything = {u[len("http://h.test"):] for u in first + more}
        for node in nodes:
            got = {p.url for p in node.purges() if p.host == "h.test"}
            missing = everything - got
            assert not missing, f"{node.name}: {len(missing)} purges never arrived, e.g. {sorted(missing)[:3]}"
        bad = [line for line in httpx.get(urls[0] + "/metrics", timeout=5).text.splitlines()
               if line.startswith("purged_bus_bad_messages_total{")]
        assert bad == ['purged_bus_bad_messages_total{reason="bad_shape"} 1.0'], bad
        assert _metric(urls[0], "purged_bus_connected") == 1
        health = httpx.get(urls[2] + "/healthz", timeout=5).json()
        assert health["bus"]["state"] == "connected" and health["bus"]["consumer"] == "cp3_ulsfo"

        # 4. purgectl lists the fleet; a daemon gone for good is retired (its consumer deleted), after which
        # batches are done without it.
        assert ctl_main(["--api", urls[0], "fleet"]) == 0
        table = capsys.readouterr().out
        assert all(name in table for name in NAMES), table
        daemons[2].proc.send_signal(signal.SIGKILL)
        daemons[2].wait(10)
        assert httpx.delete(urls[0] + "/v1/fleet/cp1.eqiad", timeout=5).status_code == 409
        assert httpx.delete(urls[0] + "/v1/fleet/nobody", timeout=5).json()["error"] == "unknown_daemon"
        assert ctl_main(["--api", urls[0], "fleet", "retire", "cp3.ulsfo"]) == 0
        assert "retired cp3.ulsfo" in capsys.readouterr().out
        assert set(_wait_fleet(urls[1], NAMES[:2])["daemons"]) == set(NAMES[:2])
        fid = _post(urls[1], ["http://h.test/after-retire"])
        assert _status(urls[0], fid, wait=20)["done"] is True
    finally:
        for d in daemons:
            if d is not None:
                d.kill()
        stop_all(nodes)
        for node in nodes:  # the shared-memory log (vsl_space) is the bulk, as in conftest's fixture
            shutil.rmtree(node.instance_dir, ignore_errors=True)
        cluster.stop()


def test_bus_unreachable_is_503_bus_unavailable(tmp_path, varnish_node):
    port = free_port()
    config = _config(tmp_path / "d.yaml", "lonely", varnish_node.address, port, [f"nats://127.0.0.1:{free_port()}"])
    daemon = PurgedProcess(config, port, tmp_path)
    try:
        daemon.wait_listening()
        r = httpx.post(daemon.url + "/v1/purge", json={"urls": ["http://h.test/x"]}, timeout=10)
        assert r.status_code == 503 and r.json()["error"] == "bus_unavailable", r.text
        assert r.headers["Retry-After"] == "2"
        r = httpx.request("PURGE", daemon.url + "/x", headers={"Host": "h.test"}, timeout=10)
        assert r.status_code == 503 and r.json()["error"] == "bus_unavailable"
        r = httpx.get(daemon.url + "/v1/purge/s1", timeout=10)
        assert r.status_code == 503 and r.json()["error"] == "bus_unavailable"
        r = httpx.get(daemon.url + "/v1/purge/s1-x", timeout=10)
        assert r.status_code == 404 and r.json()["error"] == "bad_batch_id"
        assert httpx.get(daemon.url + "/healthz", timeout=10).json()["bus"]["state"] == "connecting"
        assert _metric(daemon.url, "purged_bus_connected") == 0
        text = httpx.get(daemon.url + "/metrics", timeout=10).text
        assert 'purged_bus_publish_failures_total{reason="not_ready"} 2.0' in text
        assert varnish_node.purges() == []
    finally:
        daemon.stop()


def test_split_batches_priority_and_a_small_local_ceiling(tmp_path):
    """A batch above the server's max payload travels as several messages (id ``s<first>-<last>``); a daemon
    whose local ``max_pending`` is below the batch size takes it in parts, waiting, and loses nothing; a
    ``PURGE`` stays high priority on every daemon; a second daemon under a name that maps to the same
    consumer is refused at start."""
    cluster = NatsCluster(tmp_path / "nats", size=1, max_payload=64 * 1024).start()
    nodes = [VarnishNode(tmp_path / f"edge{i}") for i in range(2)]
    daemons: list[PurgedProcess] = []
    try:
        start_all(nodes)
        ports = [free_port() for _ in range(3)]
        a = _config(tmp_path / "a.yaml", "cp.a", nodes[0].address, ports[0], cluster.urls, replicas=1)
        b = _config(tmp_path / "b.yaml", "cp.b", nodes[1].address, ports[1], cluster.urls, replicas=1)
        cfg = yaml.safe_load(b.read_text())
        cfg["limits"]["max_pending"] = 1000
        b.write_text(yaml.safe_dump(cfg))
        daemons += [PurgedProcess(a, ports[0], tmp_path), PurgedProcess(b, ports[1], tmp_path)]
        for d in daemons:
            d.wait_listening()
        _wait_fleet(daemons[0].url, ["cp.a", "cp.b"])

        batch = [f"http://h.test/split/{i:05d}/{'p' * 20}" for i in range(5000)]
        fid = _post(daemons[0].url, batch)
        first, _, last = fid[1:].partition("-")
        assert last and int(last) > int(first), fid  # several messages
        status = _status(daemons[1].url, fid, wait=30)
        assert status["done"] is True and status["accepted"] == 5000, status
        want = {u[len("http://h.test"):] for u in batch}
        for node in nodes:
            assert want <= {p.url for p in node.purges() if p.host == "h.test"}, node.name

        r = httpx.request("PURGE", daemons[1].url + "/high/one", headers={"Host": "h.test"}, timeout=10)
        assert r.status_code == 202, r.text
        status = _status(daemons[0].url, r.json()["id"], wait=20)
        assert status["done"] is True and status["priority"] == "high", status
        text = httpx.get(daemons[0].url + "/metrics", timeout=5).text
        assert 'purged_purges_accepted_total{source="bus"} 5001.0' in text
        assert 'purged_purges_accepted_total{source="http"} 5000.0' in text  # what it published

        c = _config(tmp_path / "c.yaml", "cp_a", nodes[0].address, ports[2], cluster.urls, replicas=1)
        imposter = PurgedProcess(c, ports[2], tmp_path)
        assert imposter.proc.wait(30) == 1
        imposter.wait(1)
        assert "belongs to daemon 'cp.a'" in imposter.output()

        daemons[1].signal(signal.SIGTERM)  # stops its intake, naks what it holds, exits cleanly
        assert daemons[1].wait(20) == 0, daemons[1].output()[-2000:]
    finally:
        for d in daemons:
            d.kill()
        stop_all(nodes)
        for node in nodes:  # the shared-memory log (vsl_space) is the bulk, as in conftest's fixture
            shutil.rmtree(node.instance_dir, ignore_errors=True)
        cluster.stop()


def test_bridge_bench_smoke():
    """bench/fleet_bridge.py end to end with tiny counts, so the script does not rot (figures: docs/fleet.md)."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    r = subprocess.run([sys.executable, str(root / "bench" / "fleet_bridge.py"), "--seconds", "0.5", "--rounds",
                        "1", "--busy", "0", "--publishers", "2"], capture_output=True, text=True, timeout=120,
                       cwd=root)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "thread: median publish" in r.stdout and "consume" in r.stdout, r.stdout
