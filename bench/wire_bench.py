"""Benchmark: the CPU of purged's wire side per PURGE, in one process, into real loopback Varnish nodes.

``sender_bench.py`` measures purged whole (HTTP ingest included, in a subprocess); this runs only what a PURGE
costs once it is in the log: the trio senders (``purged.net.sender``), the driver, the engine's take and ack,
encoding, the response parser and the syscalls. ``--urls`` targets are submitted to the engine straight (no
HTTP, no JSON), then one :class:`NodeSender` per node runs until the last batch is done everywhere. Printed per
repeat: PURGE/s, the process CPU (``os.times``: user + sys of this process only, so Varnish's CPU is
not in it) per PURGE, and how many answers a read and PURGEs a write carried on average.

Run it against another tree with ``PURGED_BENCH_SRC=DIR`` (its ``purged`` package is imported instead):

    .venv/bin/python bench/wire_bench.py --nodes 1 --urls 200000 --repeats 3
    PURGED_BENCH_SRC=/tmp/before .venv/bin/python bench/wire_bench.py --nodes 4

The nodes run the PURGE VCL of ``bench/edges.py``; every run checks their ``MAIN.n_purges`` deltas. Every
loop is bounded (``--timeout``); every varnishd is stopped by PID.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

src = os.environ.get("PURGED_BENCH_SRC")
if src:
    sys.path.insert(0, src)
sys.path.insert(1, str(Path(__file__).resolve().parent))

import trio  # noqa: E402
from edges import Varnish  # noqa: E402

from purged.config import Address, Sender  # noqa: E402
from purged.core.admission import Admission  # noqa: E402
from purged.core.engine import Engine  # noqa: E402
from purged.core.topology import DatacenterSpec, TierSpec, Topology  # noqa: E402
from purged.net import sender as sender_mod  # noqa: E402
from purged.net.driver import Driver  # noqa: E402


class Counts:
    reads = 0
    writes = 0
    sent = 0


def instrument() -> None:
    """Count reads (parser feeds) and writes (encoded batches) without changing the code under test: the
    sender module's names for the parser and the encoder are wrapped for this process."""
    counts = Counts
    try:
        from purged.net import pipeline as mod  # where the connection's loop lives since the wire rework
    except ImportError:
        mod = sender_mod
    encode = mod.encode_purges

    def counting_encode(targets):
        counts.writes += 1
        return encode(targets)

    mod.encode_purges = counting_encode
    for name in ("FastResponseParser", "ResponseParser"):
        base = getattr(mod, name)
        if hasattr(base, "feed_statuses"):

            class Counting(base):
                __slots__ = ()

                def feed_statuses(self, data, _feed=base.feed_statuses):
                    counts.reads += 1
                    return _feed(self, data)
        else:

            class Counting(base):
                __slots__ = ()

                def feed(self, data, _feed=base.feed):
                    counts.reads += 1
                    return _feed(self, data)

        setattr(mod, name, Counting)


async def run_once(nodes: list[Varnish], urls: int, batch: int, cfg: Sender, timeout: float, tag: str) -> dict:
    names = [v.address for v in nodes]
    topo = Topology([DatacenterSpec("dc", (), (TierSpec("t", 0.0, tuple(names)),))])
    engine = Engine(topo, now=trio.current_time())
    driver = Driver(engine, Admission(engine))
    targets = [f"en.wikipedia.org/wiki/{tag}_{i}?action=raw" for i in range(urls)]
    last = None
    for i in range(0, urls, batch):
        last = engine.submit(targets[i : i + batch], trio.current_time()).batch_id
    before = [v.n_purges() for v in nodes]
    Counts.reads = Counts.writes = 0
    # One read pacer for all senders, as the daemon has (trees from before it have none).
    pacer = {"pacer": sender_mod.Pacer()} if hasattr(sender_mod, "Pacer") else {}
    senders = [sender_mod.NodeSender(driver, Address(v.host, v.port), cfg, **pacer) for v in nodes]
    t0, times0 = time.perf_counter(), os.times()
    with trio.move_on_after(timeout) as scope:
        async with trio.open_nursery() as nursery:
            for s in senders:
                await nursery.start(s.run)
            driver.poke()
            status = await driver.wait_batch(last, timeout)
            nursery.cancel_scope.cancel()
    wall, times1 = time.perf_counter() - t0, os.times()
    user, system = times1.user - times0.user, times1.system - times0.system
    cpu = user + system
    if scope.cancelled_caught or status is None or not status.done:
        raise SystemExit(f"run did not finish in {timeout}s")
    after = [v.n_purges() for v in nodes]
    delivered = [a - b for a, b in zip(after, before, strict=True)]
    if any(d < urls for d in delivered):
        raise SystemExit(f"varnish counted {delivered}, expected {urls} each")
    total = urls * len(nodes)
    return {
        "rate": total / wall, "us": cpu / total * 1e6, "cores": cpu / wall, "sys": system / cpu,
        "per_read": total / Counts.reads if Counts.reads else float("nan"),
        "per_write": total / Counts.writes if Counts.writes else float("nan"),
        "window": [s.node_window for s in senders],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--urls", type=int, default=200_000, help="PURGEs per node per run (default 200000)")
    p.add_argument("--batch", type=int, default=5000, help="targets per engine.submit (default 5000)")
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--max-window", type=int, default=None, help="default: the tree's sender.max_window")
    p.add_argument("--connections", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--no-count", action="store_true", help="do not wrap the parser and encoder to count them")
    p.add_argument("--gc-off", action="store_true", help="run with the cyclic GC disabled (to see its share)")
    args = p.parse_args(argv)
    if args.gc_off:
        import gc

        gc.disable()
    if not args.no_count:
        instrument()
    kw = {"window": args.window, "connections": args.connections}
    if args.max_window is not None:
        kw["max_window"] = args.max_window
    cfg = Sender(**kw)
    print(f"wire_bench: purged from {src or 'the working tree'}; {args.nodes} node(s), {args.urls:,} PURGEs each, "
          f"window {cfg.window} (max {getattr(cfg, 'max_window', cfg.window)}) x {cfg.connections}; load "
          f"{os.getloadavg()[0]:.1f}")
    nodes = [Varnish().start() for _ in range(args.nodes)]
    try:
        results = []
        for r in range(args.repeats):
            res = trio.run(run_once, nodes, args.urls, args.batch, cfg, args.timeout, f"r{r}_{time.time_ns()}")
            results.append(res)
            print(f"  run {r + 1}: {res['rate']:9,.0f} PURGE/s  {res['us']:5.2f} us CPU/PURGE  "
                  f"({res['cores']:.2f} cores, {res['sys']:.0%} sys)  {res['per_read']:6.1f} answers/read  "
                  f"{res['per_write']:6.1f} PURGEs/write  window {res['window']}")
        us = statistics.median(r["us"] for r in results)
        rate = statistics.median(r["rate"] for r in results)
        print(f"  median: {rate:9,.0f} PURGE/s  {us:5.2f} us CPU/PURGE")
    finally:
        for v in nodes:
            v.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
