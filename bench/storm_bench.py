"""Storm benchmark (issue "Shaping"): a purge storm offered over HTTP as fast as purged accepts it.

2M URL purges (30 % of them repeats of recent URLs) are posted in batches of 1000 by several concurrent posters
to a purged subprocess fanning out to 4 real Varnish nodes, one of them rate-limited to 1k PURGE/s (its own
data centre with ``rate: 1000``), under a ``limits.max_pending`` ceiling. Mid-storm an operator's high-priority
``PURGE`` is sent and timed until every node (the slow one included) acknowledged it.

Printed: accept rate, 429 answers, duplicates merged, peak RSS, bytes per pending unique URL (RSS growth over
the unique URLs pending, and the core's own measure from bench/memory_bench.py), the high-priority delay.
Targets: >= 10k purges/s accepted, <= 300 bytes per pending unique URL beyond the URL, high-priority delay < 1 s.

Then the conservation verdict, by MAIN.n_purges counts (see ``conservation``): the three unlimited nodes are
drained first (bounded by --drain-timeout), the rate-limited one is judged with its backlog.

Usage: python bench/storm_bench.py [--urls 2000000] [--max-pending 1000000] [--posters 3]
       python bench/storm_bench.py --urls 5000000          # issue 14's 5M storm
Only 127.0.0.1 is used; every process started is stopped by its PID; the run is bounded by --timeout.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import re
import shutil
import subprocess
import tempfile
import threading
import time

from common import PYTHON, ROOT, free_port, metric, rss_kib, stop_process, wait_listening
from edges import Varnish

CONFIG = """\
state_dir: null
listen: {{http: "127.0.0.1:{port}"}}
datacenters:
  fast:
    tiers:
      - name: frontend
        nodes: [{fast}]
  slow:
    rate: 1000
    burst: 1000
    tiers:
      - name: frontend
        nodes: [{slow}]
limits:
  max_pending: {max_pending}
  max_pending_bytes: 0
  client_rate: 0  # the posters share one address: the storm is bounded by max_pending only
  max_urls_per_batch: 10000
sender: {{window: 128, connections: 2}}
"""


def get(port: int, path: str, timeout: float = 30.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


def make_batches(urls: int, batch: int, seed: int = 1) -> list[list[str]]:
    """Batches of ``batch`` URLs; 30 % of all offers repeat a URL from the last ~20k (so some merge while
    unsent and some arrive after the URL was sent: both must be handled)."""
    rng = random.Random(seed)
    batches, recent, fresh = [], [], 0
    for _ in range(0, urls, batch):
        items = []
        for _ in range(batch):
            if recent and rng.random() < 0.3:
                items.append(recent[rng.randrange(len(recent))])
            else:
                url = f"https://en.wikipedia.org/wiki/Storm_page_{fresh:08d}"
                fresh += 1
                items.append(url)
                recent.append(url)
                if len(recent) > 20_000:
                    recent = recent[-10_000:]
        batches.append(items)
    return batches


class Poster(threading.Thread):
    """Posts its share of the bodies on one keep-alive connection; a 429 is counted and the batch skipped
    (a real client would retry after Retry-After; here the storm goes on)."""

    def __init__(self, port: int, bodies: list[tuple[int, bytes]], deadline: float):
        super().__init__(daemon=True)
        self.port, self.bodies, self.deadline = port, bodies, deadline
        self.accepted = self.refused = self.sent = 0
        self.accepted_batches: list[int] = []  # indexes of the batches answered 202
        self.retry_after_missing = 0

    def run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        for index, body in self.bodies:
            if time.monotonic() > self.deadline:
                break
            conn.request("POST", "/v1/purge", body, {"Content-Type": "application/json"})
            r = conn.getresponse()
            reply = r.read()
            self.sent += 1
            if r.status == 202:
                answer = json.loads(reply)
                if answer.get("rejected"):
                    raise RuntimeError(f"URLs rejected: {answer['rejected'][:3]}")
                self.accepted += answer["accepted"]
                self.accepted_batches.append(index)
            elif r.status == 429:
                self.refused += 1
                self.retry_after_missing += r.getheader("Retry-After") is None
            else:
                raise RuntimeError(f"unexpected {r.status}: {reply[:200]!r}")
        conn.close()


def conservation(port: int, nodes: list[Varnish], batches: list[list[str]], posters: list[Poster],
                 drain_timeout: float) -> bool:
    """The oracle's verdict by counts (MAIN.n_purges; a 5M storm is too many log lines to keep and read on
    this machine while it runs): per node, PURGEs counted >= unique URLs accepted - backlog - named drops. A
    URL repeated after it was sent is sent again, so counts can only overstate delivery by those resends; the
    unlimited nodes are first drained (bounded), which makes their check exact: backlog 0, counts >= unique.
    The set-based oracle runs on the CI storm (tests/reliability/test_rel_load.py)."""
    unique = len({u for p in posters for i in p.accepted_batches for u in batches[i]})
    t0 = time.monotonic()
    while time.monotonic() - t0 < drain_timeout:
        health = json.loads(get(port, "/healthz")[1])
        if all(health["nodes"][n.address]["backlog"] == 0 for n in nodes[:3]):
            break
        time.sleep(1.0)
    drained = time.monotonic() - t0
    health = json.loads(get(port, "/healthz")[1])
    text = get(port, "/metrics")[1].decode()
    drops = [(m.group(1), m.group(2), float(m.group(3))) for m in re.finditer(
        r'^purged_node_dropped_total{[^}]*node="([^"]*)",reason="([^"]*)"} ([0-9.e+]+)$', text, re.M)]
    ok = True
    print(f"conservation by MAIN.n_purges counts: {unique:,} unique URLs accepted; the 3 unlimited nodes "
          f"drained {drained:.0f} s after the storm")
    for n in nodes:
        backlog = int(health["nodes"][n.address]["backlog"])
        node_drops = sum(v for node, _, v in drops if node == n.address)
        reasons = {r: v for node, r, v in drops if node == n.address and v}
        count = n.n_purges()
        good = count >= unique - backlog - node_drops
        ok &= good
        print(f"  {n.address}: counted {count:,} PURGEs ({count - unique:+,} vs unique accepted), backlog "
              f"{backlog:,}, named drops {node_drops:,.0f} {reasons or ''} -> {'OK' if good else 'LOST'}")
    return ok


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--urls", type=int, default=2_000_000)
    p.add_argument("--batch", type=int, default=1000)
    p.add_argument("--max-pending", type=int, default=1_000_000)
    p.add_argument("--posters", type=int, default=3)
    p.add_argument("--timeout", type=float, default=900.0, help="bound on the storm itself, seconds")
    p.add_argument("--drain-timeout", type=float, default=300.0,
                   help="after the storm, wait at most this long for the 3 unlimited nodes to owe nothing")
    args = p.parse_args()

    print(f"building {args.urls:,} offers in batches of {args.batch} ...", flush=True)
    batches = make_batches(args.urls, args.batch)
    bodies = [(i, json.dumps({"urls": b}).encode()) for i, b in enumerate(batches)]
    nodes = [Varnish().start() for _ in range(4)]
    tmp = tempfile.mkdtemp(prefix="purged-storm-")
    proc = None
    try:
        port = free_port()
        cfg = os.path.join(tmp, "purged.yaml")
        with open(cfg, "w") as f:
            f.write(CONFIG.format(port=port, max_pending=args.max_pending,
                                  fast=", ".join(f'"{n.address}"' for n in nodes[:3]), slow=f'"{nodes[3].address}"'))
        log = open(os.path.join(tmp, "purged.log"), "wb")
        proc = subprocess.Popen([PYTHON, "-m", "purged", "--config", cfg], stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, cwd=str(ROOT))
        wait_listening("127.0.0.1", port, proc=proc)
        base_rss = rss_kib(proc.pid)
        print(f"purged pid {proc.pid}, RSS at start {base_rss / 1024:.1f} MiB; 4 varnishd; "
              f"all on this 2-core machine with the posters", flush=True)

        deadline = time.monotonic() + args.timeout
        shares = [bodies[i :: args.posters] for i in range(args.posters)]
        posters = [Poster(port, share, deadline) for share in shares]
        start = time.monotonic()
        for t in posters:
            t.start()
        # Mid-storm: one operator purge at high priority, timed until every node acknowledged it.
        while sum(t.sent for t in posters) < len(bodies) // 2 and any(t.is_alive() for t in posters):
            time.sleep(0.05)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        t0 = time.monotonic()
        conn.request("PURGE", "/wiki/Urgent", headers={"Host": "en.wikipedia.org"})
        urgent = json.loads(conn.getresponse().read())["id"]
        status, body = get(port, f"/v1/purge/{urgent}?wait=30")
        high_delay = time.monotonic() - t0
        high_done = json.loads(body)["done"]
        peak = (0, 0)  # (rss KiB, unique pending at that time)
        while any(t.is_alive() for t in posters):
            time.sleep(0.5)
            text = get(port, "/metrics")[1].decode()
            peak = max(peak, (rss_kib(proc.pid), int(metric(text, "purged_unique_pending"))))
        elapsed = time.monotonic() - start
        text = get(port, "/metrics")[1].decode()
        peak = max(peak, (rss_kib(proc.pid), int(metric(text, "purged_unique_pending"))))
        accepted = sum(t.accepted for t in posters)
        refused = sum(t.refused for t in posters)
        print(f"offered {sum(t.sent for t in posters) * args.batch:,} purges in {elapsed:.1f}s: "
              f"accepted {accepted:,} ({accepted / elapsed:,.0f}/s), 429 answers {refused:,} batches "
              f"({sum(t.retry_after_missing for t in posters)} without Retry-After)")
        print(f"duplicates merged (coalesced): {metric(text, 'purged_purges_coalesced_total'):,.0f}")
        print(f"high-priority PURGE mid-storm: done on all 4 nodes in {high_delay * 1000:.0f} ms (done={high_done})")
        print(f"peak RSS {rss_kib(proc.pid, 'VmHWM') / 1024:.1f} MiB; at the sampled peak {peak[0] / 1024:.1f} MiB "
              f"with {peak[1]:,} unique URLs pending")
        if peak[1]:
            per = (peak[0] - base_rss) * 1024 / peak[1]
            print(f"RSS growth per pending unique URL: {per:.0f} bytes (the URL string itself ~100 bytes of it; "
                  f"bench/memory_bench.py measures the core alone)")
        backlog = {m.group(1): float(m.group(2)) for m in re.finditer(
            r'^purged_backlog{dc="[^"]*",layer="[^"]*",node="([^"]*)"} ([0-9.e+]+)$', text, re.M)}
        print("backlog per node at the end of the storm:", {k: int(v) for k, v in backlog.items()})
        print("purges delivered per node:", [n.n_purges() for n in nodes])
        verdict = conservation(port, nodes, batches, posters, args.drain_timeout)
        print("verdict:", "nothing lost" if verdict else "PURGES LOST")
    finally:
        stop_process(proc)
        for n in nodes:
            n.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
