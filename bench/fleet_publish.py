"""How many URLs/s one fleet daemon's API accepts into a 3-replica JetStream stream (issue 13's goal: 100k/s
in 5000-URL batches), against the same daemon without a bus in the same run (the baseline), and how long the
fleet then takes to deliver them to one real Varnish per daemon.

Each mode: a fresh daemon, CLIENTS concurrent clients posting BATCH-URL batches (unique URLs) for SECONDS; the
figure is URLs accepted (2xx) per second. In fleet mode a 202 means "stored in the stream with its replicas".

    .venv/bin/python bench/fleet_publish.py [--seconds 5] [--clients 4] [--batch 5000] [--daemons 2]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import httpx
import trio
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from nats_cluster import NatsCluster, free_port  # noqa: E402
from test_signals import PurgedProcess  # noqa: E402
from varnish import VarnishNode, start_all, stop_all  # noqa: E402


def config(path: Path, name: str, node: VarnishNode, port: int, servers: list[str] | None) -> Path:
    cfg = {
        "name": name,
        "listen": {"http": f"127.0.0.1:{port}"},
        "state_dir": None,
        "datacenters": {"dc": {"tiers": [{"name": "t0", "nodes": [node.address]}]}},
        # The bench measures intake: no client rate limit, and room for everything it posts.
        "limits": {"client_rate": 0, "max_pending": 0, "max_pending_bytes": 0},
    }
    if servers:
        cfg["bus"] = {"nats": {"servers": servers, "replicas": 3}}
    path.write_text(yaml.safe_dump(cfg))
    return path


async def hammer(url: str, seconds: float, clients: int, batch: int, tag: str) -> tuple[int, list[str], float]:
    accepted = 0
    ids: list[str] = []
    deadline = trio.current_time() + seconds

    async def client(cid: int, http: httpx.AsyncClient) -> None:
        nonlocal accepted
        n = 0
        while trio.current_time() < deadline:
            n += 1
            urls = [f"http://bench.test/{tag}/{cid}/{n}/{i}" for i in range(batch)]
            r = await http.post("/v1/purge", json={"urls": urls})
            if r.status_code in (201, 202):
                accepted += batch
                ids.append(r.json()["id"])

    start = trio.current_time()
    async with httpx.AsyncClient(base_url=url, timeout=60) as http, trio.open_nursery() as nursery:
        for cid in range(clients):
            nursery.start_soon(client, cid, http)
    return accepted, ids, trio.current_time() - start


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--batch", type=int, default=5000)
    ap.add_argument("--daemons", type=int, default=2, help="fleet members (each consumes everything)")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="purged-fleet-publish-"))
    cluster = NatsCluster(work / "nats")
    nodes = [VarnishNode(work / f"edge{i}", params={"vsl_space": "16M"}) for i in range(args.daemons)]
    procs: list[PurgedProcess] = []
    try:
        cluster.start()
        start_all(nodes)
        results = {}
        for mode in ("alone", "fleet"):
            procs = []
            for i in range(args.daemons if mode == "fleet" else 1):
                port = free_port()
                cfg = config(work / f"{mode}{i}.yaml", f"bench{i}", nodes[i], port,
                             cluster.urls if mode == "fleet" else None)
                procs.append(PurgedProcess(cfg, port, work))
            for p in procs:
                p.wait_listening()
            if mode == "fleet":
                while len(httpx.get(procs[0].url + "/v1/fleet", timeout=5).json().get("daemons", {})) < len(procs):
                    time.sleep(0.1)
            accepted, ids, took = trio.run(hammer, procs[0].url, args.seconds, args.clients, args.batch, mode)
            rate = accepted / took
            results[mode] = rate
            line = f"{mode:>5}: {accepted} URLs accepted in {took:.2f}s = {rate:,.0f} URLs/s"
            if mode == "fleet" and ids:
                t = time.monotonic()
                r = httpx.get(f"{procs[-1].url}/v1/purge/{ids[-1]}", params={"wait": 120}, timeout=130).json()
                line += (f"; the last batch done on all {len(procs)} daemons {time.monotonic() - t:.1f}s after "
                         f"the posting stopped (done={r['done']})")
            if mode == "fleet":
                m = {ln.split()[0]: float(ln.split()[1]) for ln in httpx.get(procs[0].url + "/metrics", timeout=10)
                     .text.splitlines() if ln.startswith("purged_bus_publish_seconds_")}
                if m.get("purged_bus_publish_seconds_count"):
                    line += (f"\n       publish to the stream's ack: mean "
                             f"{1000 * m['purged_bus_publish_seconds_sum'] / m['purged_bus_publish_seconds_count']:.1f}"
                             f" ms over {m['purged_bus_publish_seconds_count']:.0f} batches")
            print(line, flush=True)
            for p in procs:
                p.stop()
            procs = []
        print(f"fleet / alone: {results['fleet'] / results['alone']:.2f}  ({args.clients} clients, "
              f"{args.batch}-URL batches, 3-server JetStream cluster, R3)")
        return 0
    finally:
        for p in procs:
            p.kill()
        stop_all(nodes)
        cluster.stop()
        shutil.rmtree(work, ignore_errors=True)  # NATS stores and Varnish logs: hundreds of MB


if __name__ == "__main__":
    sys.exit(main())
