"""Bytes per pending purge in the core, for several node counts (DESIGN.md guarantee 5).

Fills the engine with N unique pending URLs (30 % of the offers duplicates) while one node lags, and measures
with tracemalloc what the engine holds per unique pending URL, minus the URL strings themselves. Memory must not
grow with the number of nodes. Usage: python bench/memory_bench.py [--urls 500000]
"""

from __future__ import annotations

import argparse
import random
import sys
import tracemalloc

from purged.core.engine import Engine
from purged.core.topology import DatacenterSpec, TierSpec, Topology


def measure(urls: int, nodes: int, seed: int = 1) -> tuple[float, int]:
    topo = Topology(
        [DatacenterSpec("dc", (), (TierSpec("backend", 0.0, tuple(f"10.0.0.{i}:80" for i in range(nodes))),))]
    )
    rng = random.Random(seed)
    targets = [f"en.wikipedia.org/wiki/Page_{i:09d}" for i in range(urls)]
    offers = targets + [targets[rng.randrange(urls)] for _ in range(urls * 3 // 7)]  # 30 % duplicates
    rng.shuffle(offers)
    url_bytes = sum(sys.getsizeof(t) for t in targets)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    engine = Engine(topo, now=0.0)
    for i in range(0, len(offers), 1000):
        engine.submit(offers[i : i + 1000], now=i / 1e5)
    # The first node lags (nothing sent); the others have been sent and acknowledged half of the log, and hold
    # a full pipelining window in flight (64 x 2 connections), as a live sender would.
    for name in list(engine.nodes)[1:]:
        for _ in range(0, urls // 2, 128):
            for ident, _ in engine.take(name, 128, now=10.0):
                engine.ack(name, ident, 200, now=10.0)
        engine.take(name, 128, now=10.0)
    held = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    unique = engine.unique_pending()
    # The URL strings are shared with ``targets`` here (the daemon's come from request parsing), so count
    # their size separately: "beyond the URL itself" is what the engine adds.
    del offers
    return (held / unique), url_bytes // urls


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--urls", type=int, default=500_000)
    args = p.parse_args()
    print(f"unique pending URLs: {args.urls:,} (+30% duplicate offers), one node lagging, the others half done")
    print(f"{'nodes':>6} {'engine bytes / pending URL (beyond the URL string)':>52} {'URL str bytes':>14}")
    for nodes in (1, 4, 16, 64):
        per_url, url = measure(args.urls, nodes)
        print(f"{nodes:>6} {per_url:>52.1f} {url:>14}")


if __name__ == "__main__":
    main()
