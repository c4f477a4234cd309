"""Benchmark: the CPU of each step of purged's hot path, in one process, without sockets or trio.

Where ``sender_bench.py`` measures purged whole (and so whatever share of a busy 2-core machine it gets), this
times each step alone with ``time.process_time`` (CPU of this process only), best of ``--repeats``, so two
commits can be compared step by step on a noisy machine. Run it on each tree
(``PURGED_BENCH_SRC=DIR`` or ``PYTHONPATH=DIR``); it uses the newer APIs when the tree has them
(``FastResponseParser.feed_statuses``, ``Engine.ack_many``, ``encode_purges``) and the older ones otherwise:

* **parse**: Varnish's answer to a PURGE (the golden bytes of ``tests/data``, its XID varied) x 1,024, fed in
  reads of ``--per-read`` answers.
* **take + ack**: an engine with ``--nodes`` nodes in one tier holds 100,000 purges; each node takes ``--take``
  (256) at a time and acknowledges them (per read of ``--per-read``: one ``ack_many``, or one ``ack`` each as the
  driver did; with ``--split``, ``take_ids`` and one ``ack_ids``). ``--steps take`` runs this step alone.
* **encode**: the PURGE bytes of 1,024 targets.
* **ingest**: a 5,000-URL JSON body decoded, validated and submitted to a fresh engine's log.

    .venv/bin/python bench/hotpath_bench.py --nodes 1,4
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

src = os.environ.get("PURGED_BENCH_SRC")
if src:
    sys.path.insert(0, src)

from purged.core import http1  # noqa: E402
from purged.core.admission import validate_urls  # noqa: E402
from purged.core.engine import Engine  # noqa: E402
from purged.core.ingest import decode_purge_body  # noqa: E402
from purged.core.topology import DatacenterSpec, TierSpec, Topology  # noqa: E402

try:
    from purged.core.http1_fast import FastResponseParser as Parser
except ImportError:
    Parser = http1.ResponseParser

RESPONSE = (Path(__file__).resolve().parent.parent / "tests" / "data" / "varnish_purge_response.bin").read_bytes()


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.process_time()
        fn()
        times.append(time.process_time() - t)
    return min(times)


def bench_parse(per_read: int, repeats: int) -> float:
    n = 1024
    answers = [RESPONSE.replace(b"X-Varnish: 2", b"X-Varnish: %d" % (1000 + i)) for i in range(n)]
    reads = [b"".join(answers[i : i + per_read]) for i in range(0, n, per_read)]

    def run():
        parser = Parser()
        feed = getattr(parser, "feed_statuses", parser.feed)  # the sender's call where the tree has it
        for _ in range(20):
            for data in reads:
                feed(data)

    return best(run, repeats) / (20 * n) * 1e6


def topology(nodes: int) -> Topology:
    names = tuple(f"n{i}" for i in range(nodes))
    return Topology([DatacenterSpec("dc", (), (TierSpec("t", 0.0, names),))])


def bench_take_ack(nodes: int, per_read: int, repeats: int, take: int = 256, split: bool = False) -> float:
    """Per PURGE: take ``take`` at a time, ack by reads of ``per_read``. ``split``: the engine's split forms
    (``take_ids``/``ack_ids``: ids, targets and statuses as separate lists, as a sender holds them) when the
    tree has them."""
    topo = topology(nodes)
    names = [f"n{i}" for i in range(nodes)]
    targets = [f"en.wikipedia.org/wiki/P{i}?action=raw" for i in range(100_000)]
    times = []
    for _ in range(repeats):
        engine = Engine(topo, now=0.0)
        engine.submit(targets, 0.0)
        many = getattr(engine, "ack_many", None)
        take_ids = getattr(engine, "take_ids", None) if split else None
        t = time.process_time()
        done = 0
        while done < len(targets) * nodes:
            for name in names:
                if take_ids is not None:
                    ids, _ = take_ids(name, take, 1.0)
                    for i in range(0, len(ids), per_read):
                        read = ids[i : i + per_read]
                        engine.ack_ids(name, read, [200] * len(read), 1.0)
                    done += len(ids)
                    continue
                items = engine.take(name, take, 1.0)
                for i in range(0, len(items), per_read):
                    answers = [(ident, 200) for ident, _ in items[i : i + per_read]]
                    if many is not None:
                        many(name, answers, 1.0)
                    else:
                        for ident, status in answers:
                            engine.ack(name, ident, status, 1.0)
                done += len(items)
            engine.events()
        times.append(time.process_time() - t)
    return min(times) / (len(targets) * nodes) * 1e6


def bench_encode(repeats: int) -> float:
    targets = [f"en.wikipedia.org/wiki/P{i}?action=raw" for i in range(1024)]
    batch = getattr(http1, "encode_purges", None)
    from purged.core.urls import split_target

    def run():
        for _ in range(50):
            if batch is not None:
                batch(targets)
            else:
                b"".join(http1.encode_purge(*split_target(t)) for t in targets)

    return best(run, repeats) / (50 * 1024) * 1e6


def bench_ingest(repeats: int) -> float:
    topo = topology(1)
    times = []
    for r in range(repeats):
        bodies = [json.dumps({"urls": [f"https://en.wikipedia.org/wiki/B{r}_{k}_{i}?action=raw"
                                       for i in range(5000)]}).encode() for k in range(10)]
        engine = Engine(topo, now=0.0)
        t = time.process_time()
        for body in bodies:
            req = decode_purge_body("application/json", body, 100_000)
            engine.submit(validate_urls(req.urls).targets, 0.0)
        times.append(time.process_time() - t)
    return min(times) / 50_000 * 1e6


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", default="1,4")
    p.add_argument("--per-read", type=int, default=16, help="answers per read (default 16)")
    p.add_argument("--take", type=int, default=256, help="purges per take (default 256)")
    p.add_argument("--split", action="store_true", help="take + ack with take_ids/ack_ids (if the tree has them)")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--steps", default="parse,take,encode,ingest", help="which steps to run (default: all)")
    args = p.parse_args(argv)
    steps = set(args.steps.split(","))
    print(f"hotpath_bench: purged from {src or 'the working tree'}; parser {Parser.__name__}; best of "
          f"{args.repeats}; us of CPU")
    if "parse" in steps:
        print(f"  parse, per answer ({args.per_read} per read):   {bench_parse(args.per_read, args.repeats):6.2f}")
    if "take" in steps:
        for n in (int(x) for x in args.nodes.split(",")):
            took = bench_take_ack(n, args.per_read, args.repeats, args.take, args.split)
            form = " (split)" if args.split else ""
            print(f"  take {args.take} + ack{form}, per PURGE, {n} node(s):  {took:6.2f}")
    if "encode" in steps:
        print(f"  encode, per PURGE:                      {bench_encode(args.repeats):6.2f}")
    if "ingest" in steps:
        print(f"  ingest (decode+validate+submit), per URL: {bench_ingest(args.repeats):6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
