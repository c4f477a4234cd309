"""Benchmark (issue 14): 1 of 20 nodes dead for the whole run; do the other 19 keep their rate?

19 real ``varnishd`` on 127.0.0.1 (bench/edges.py's ``Varnish``) and, as the 20th node, a black hole: a
listening socket whose connections are accepted and read but never answered (``--dead refused`` instead uses a
port nobody listens on). For each repeat, paired, on the same nodes:

* **19 alone**: a fresh purged whose one tier holds the 19 nodes; ``--urls`` unique URLs posted in batches of
  ``--batch``; the clock runs from the first post until every one of the 19 counted ``--urls`` more
  ``MAIN.n_purges`` (polled).
* **19 + dead**: the same with the dead node in the tier too (it is never done; purged keeps retrying it).

Printed: PURGE/s into the 19 for both, the ratio (with dead / alone; 1.0 = not dragged at all), the dead node's
backlog as /healthz reports it (it must be every URL: counted, not lost), the connections the black hole took.

    .venv/bin/python bench/dead_node_bench.py                     # 50k URLs, 3 repeats
    .venv/bin/python bench/dead_node_bench.py --urls 10000 --repeats 1 --dead refused

Only 127.0.0.1; bounded by --timeout per run; processes stopped by PID.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Purged, fmt_repeats, free_port, machine_note, make_urls, median  # noqa: E402
from common import post_batch as post  # noqa: E402
from edges import PurgeSampler, Varnish  # noqa: E402


class BlackHole:
    """Accepts connections and reads them until closed; never writes a byte."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.accepted = 0
        self._stop = threading.Event()
        self._conns: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            self._conns.append(conn)
            threading.Thread(target=self._swallow, args=(conn,), daemon=True).start()

    def _swallow(self, conn: socket.socket) -> None:
        try:
            conn.settimeout(1.0)
            while not self._stop.is_set():
                try:
                    if not conn.recv(65536):
                        return
                except TimeoutError:
                    continue
        except OSError:
            return

    def stop(self) -> None:
        self._stop.set()
        self.sock.close()
        for c in self._conns:
            c.close()


def one_run(varnishes: list[Varnish], dead: str | None, urls: int, batch: int, timeout: float, tag: str) -> dict:
    nodes = [v.address for v in varnishes] + ([dead] if dead else [])
    daemon = Purged(nodes, window=256, connections=4)
    daemon.start()
    try:
        sampler = PurgeSampler(varnishes, urls, timeout=timeout)
        items = make_urls(urls, tag)
        t0 = time.monotonic()
        sampler.start()
        for i in range(0, urls, batch):
            post(daemon.base_url, items[i : i + batch])
        if not sampler.join():
            raise RuntimeError(f"the 19 did not get {urls} each within {timeout}s: {sampler.deltas()}")
        elapsed = sampler.reached_at - t0
        with urllib.request.urlopen(f"{daemon.base_url}/healthz", timeout=30) as r:
            health = json.loads(r.read())
    finally:
        daemon.stop(timeout=5)
    out = {"rate": urls * len(varnishes) / elapsed, "elapsed": elapsed}
    if dead:
        out["dead_backlog"] = health["nodes"][dead]["backlog"]
        out["dead_state"] = health["nodes"][dead]["state"]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--live", type=int, default=19)
    p.add_argument("--urls", type=int, default=50_000, help="unique URLs per run (default 50000)")
    p.add_argument("--batch", type=int, default=10_000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dead", choices=["blackhole", "refused"], default="blackhole")
    p.add_argument("--timeout", type=float, default=300.0)
    args = p.parse_args(argv)
    print(f"dead_node_bench: {machine_note()}; {args.live} varnishd + 1 dead node ({args.dead}); {args.urls:,} URLs "
          f"per run; {args.repeats} repeats", flush=True)
    varnishes = [Varnish(extra_params=("thread_pool_min=5",)) for _ in range(args.live)]
    hole = BlackHole() if args.dead == "blackhole" else None
    dead = hole.address if hole else f"127.0.0.1:{free_port()}"
    alone, with_dead = [], []
    try:
        for v in varnishes:
            v.start()
        for rep in range(args.repeats):
            a = one_run(varnishes, None, args.urls, args.batch, args.timeout, f"alone{rep}")
            d = one_run(varnishes, dead, args.urls, args.batch, args.timeout, f"dead{rep}")
            alone.append(a)
            with_dead.append(d)
            print(f"  [{rep + 1}] 19 alone {a['rate']:,.0f} PURGE/s ({a['elapsed']:.2f} s); with the dead node "
                  f"{d['rate']:,.0f} PURGE/s ({d['elapsed']:.2f} s), ratio {d['rate'] / a['rate']:.2f}; dead node "
                  f"{d['dead_state']}, backlog {d['dead_backlog']:,} of {args.urls:,}", flush=True)
            if d["dead_backlog"] != args.urls:
                raise RuntimeError(f"the dead node's backlog is {d['dead_backlog']}, not {args.urls}")
        ratios = [d["rate"] / a["rate"] for a, d in zip(alone, with_dead, strict=True)]
        print(f"19 alone      PURGE/s: {fmt_repeats([a['rate'] for a in alone])}")
        print(f"19 + dead     PURGE/s: {fmt_repeats([d['rate'] for d in with_dead])}")
        print(f"ratio (with dead / alone): {fmt_repeats(ratios, '{:.2f}')}; median {median(ratios):.2f}")
        if hole:
            print(f"the black hole accepted {hole.accepted} connections")
    finally:
        for v in varnishes:
            v.stop()
        if hole:
            hole.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
