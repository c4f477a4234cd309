"""Issue 13's "done when", end to end on this machine: three purged daemons on one 3-server NATS JetStream
cluster, each with its own two real Varnish nodes (one data centre, backend then frontend).

1. A batch of 20,000 URLs is posted to daemon A; ``GET /v1/purge/{id}?wait=`` on daemon B says done; every
   node of every daemon got every URL (Varnish's own log, varnishncsa).
2. While more is posted (to A and B), daemon C and the NATS server leading the stream are killed -9; the status of the last batch
   says ``done: false`` (C is down); C restarts, catches up from its consumer's position, the status turns
   ``done: true``, and every node again got every URL posted (set comparison).

Prints what it does and the figures; exits 1 if anything was lost. Everything runs on 127.0.0.1 with ephemeral
ports in a temporary directory; every process is stopped by its PID.

    .venv/bin/python bench/fleet_demo.py [--urls 20000] [--more 10000]
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from nats_cluster import NatsCluster, free_port  # noqa: E402
from test_signals import PurgedProcess  # noqa: E402
from varnish import VarnishNode, start_all, stop_all  # noqa: E402

NAMES = ["cp1.eqiad", "cp2.esams", "cp3.ulsfo"]


def config(path: Path, name: str, nodes: list[VarnishNode], port: int, servers: list[str]) -> Path:
    cfg = {
        "name": name,
        "listen": {"http": f"127.0.0.1:{port}"},
        "state_dir": None,
        "datacenters": {"dc": {"tiers": [{"name": "backend", "nodes": [nodes[0].address]},
                                         {"name": "frontend", "nodes": [nodes[1].address]}]}},
        "limits": {"client_rate": 0},
        "bus": {"nats": {"servers": servers, "replicas": 3, "ack_wait": 5.0}},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def post(url: str, urls: list[str]) -> tuple[str, int]:
    """Post like a producer: retry on 503 until accepted. Returns (id, 503s seen)."""
    refused = 0
    for _ in range(300):
        try:
            r = httpx.post(url + "/v1/purge", json={"urls": urls}, timeout=30)
        except httpx.TransportError:
            r = None
        if r is not None and r.status_code == 202:
            return r.json()["id"], refused
        if r is not None and r.status_code != 503:
            raise SystemExit(f"unexpected answer {r.status_code}: {r.text}")
        refused += 1
        time.sleep(0.2)
    raise SystemExit("never accepted")


def status(url: str, fid: str, wait: float) -> dict:
    for _ in range(100):
        r = httpx.get(f"{url}/v1/purge/{fid}", params={"wait": wait}, timeout=wait + 30)
        if r.status_code == 200:
            return r.json()
        time.sleep(0.2)
    raise SystemExit(f"status {fid}: {r.status_code} {r.text}")


def delivered(nodes: list[VarnishNode], want: set[str]) -> bool:
    ok = True
    for node in nodes:
        got = {p.url for p in node.purges(timeout=60) if p.host == "demo.test"}
        missing = want - got
        print(f"    {node.name:<10} {len(got & want):>6} of {len(want)} URLs"
              + (f"  MISSING {len(missing)}, e.g. {sorted(missing)[:3]}" if missing else ""))
        ok &= not missing
    return ok


def short(st: dict) -> str:
    return ", ".join(f"{n}: {'done' if d['done'] else 'lag ' + str(d['lag'])}" for n, d in st["daemons"].items())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--urls", type=int, default=20_000, help="URLs in the first batch (default 20000)")
    ap.add_argument("--more", type=int, default=10_000, help="URLs posted while C is down (default 10000)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="purged-fleet-demo-"))
    cluster = NatsCluster(work / "nats")
    nodes = [VarnishNode(work / f"{n.split('.')[0]}-{t}", params={"vsl_space": "128M"})
             for n in NAMES for t in ("be", "fe")]
    daemons: list[PurgedProcess | None] = [None] * 3
    try:
        t0 = time.monotonic()
        cluster.start()
        start_all(nodes)
        ports = [free_port() for _ in NAMES]
        configs = [config(work / f"{n}.yaml", n, nodes[2 * i: 2 * i + 2], ports[i], cluster.urls)
                   for i, n in enumerate(NAMES)]
        for i in range(3):
            daemons[i] = PurgedProcess(configs[i], ports[i], work)
        for d in daemons:
            d.wait_listening()
        urls = [d.url for d in daemons]
        while len(httpx.get(urls[0] + "/v1/fleet", timeout=5).json().get("daemons", {})) < 3:
            time.sleep(0.1)
        print(f"NATS cluster (3 servers, R3) + 6 Varnish + 3 daemons up in {time.monotonic() - t0:.1f}s; "
              f"servers {', '.join(cluster.urls)}")

        print(f"\n1. POST {args.urls} URLs to {NAMES[0]}")
        first = [f"http://demo.test/one/{i}" for i in range(args.urls)]
        t = time.monotonic()
        fid, _ = post(urls[0], first)
        t_accept = time.monotonic() - t
        st = status(urls[1], fid, wait=60)
        t_done = time.monotonic() - t
        print(f"   202 id {fid} in {t_accept * 1000:.0f} ms; GET /v1/purge/{fid}?wait=60 on {NAMES[1]}: "
              f"done={st['done']} after {t_done:.2f}s ({short(st)})")
        ok = delivered(nodes, {u[len("http://demo.test"):] for u in first})

        print(f"\n2. POST {args.more} URLs in batches of 1000 to {NAMES[0]} and {NAMES[1]}; meanwhile kill -9 "
              f"{NAMES[2]} and the NATS server leading the stream")
        more: list[str] = []
        ids: list[str] = []
        refused = [0]

        def producer() -> None:
            for b in range(args.more // 1000):
                batch = [f"http://demo.test/two/{b}/{i}" for i in range(1000)]
                fid, r = post(urls[b % 2], batch)
                ids.append(fid)
                refused[0] += r
                more.extend(batch)
                time.sleep(0.05)

        thread = threading.Thread(target=producer)
        thread.start()
        time.sleep(0.3)
        leader = cluster.stream_leader("PURGED")
        victim = 1 if leader is None else leader
        daemons[2].proc.send_signal(signal.SIGKILL)
        daemons[2].wait(10)
        cluster.kill(victim)
        t_kill = time.monotonic()
        thread.join()
        print(f"   killed NATS server n{victim} (the stream's leader: n{leader}); {len(ids)} batches accepted "
              f"({refused[0]} answers 503 bus_unavailable retried), last id {ids[-1]}")
        st = status(urls[0], ids[-1], wait=1)
        print(f"   status {ids[-1]} on {NAMES[0]} with {NAMES[2]} down: done={st['done']} ({short(st)})")
        down_ok = st["done"] is False

        print(f"\n3. restart {NAMES[2]}")
        t = time.monotonic()
        daemons[2] = PurgedProcess(configs[2], ports[2], work)
        daemons[2].wait_listening()
        st = status(urls[2], ids[-1], wait=60)
        print(f"   status {ids[-1]} on {NAMES[2]}: done={st['done']} {time.monotonic() - t:.2f}s after the "
              f"restart ({time.monotonic() - t_kill:.1f}s after the kill; {short(st)})")
        metrics = httpx.get(urls[2] + "/metrics", timeout=5).text
        redelivered = next(line for line in metrics.splitlines() if line.startswith("purged_bus_redelivered_total"))
        print(f"   {NAMES[2]} after the restart: {redelivered}")
        ok &= delivered(nodes, {u[len("http://demo.test"):] for u in first + more})
        ok &= down_ok and st["done"] is True
        print(f"\n{'OK: nothing lost' if ok else 'FAILED'}")
        return 0 if ok else 1
    finally:
        for d in daemons:
            if d is not None:
                d.kill()
        stop_all(nodes)
        cluster.stop()
        shutil.rmtree(work, ignore_errors=True)  # NATS stores and Varnish logs: hundreds of MB


if __name__ == "__main__":
    sys.exit(main())
