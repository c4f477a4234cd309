"""Benchmark: PURGE/s per node across data centres, through a faithful 80 ms round trip.

``netns_delay.DelayedLink`` makes two fresh network namespaces joined by a TUN delayer (40 ms each way by
default; addresses in 198.18.0.0/15): namespace B is the remote data centre, with ``--nodes`` real ``varnishd``
on 198.18.1.1; namespace A holds purged (a subprocess, ``ip netns exec``) and the poster (this process, via
``setns``). Before measuring it prints the TCP round trip (connect, and a PURGE's request -> answer time) to
every node.

Then, ``--repeats`` times, for each sender setting (``WINDOWxCONNECTIONS``): a fresh purged with one data centre
holding the nodes; unique URLs are posted to ``POST /v1/purge`` in batches of 10,000; the clock runs from the
first post until purged reports the last batch done on every node, and each node's ``MAIN.n_purges`` delta must
have reached the count. PURGE/s per node = URLs / time. The URL count per run is sized so a run takes about
``--seconds`` at the setting's theoretical rate (window x connections / RTT), between 100 and ``--urls``: the
one-request-in-flight comparison (1x1) posts a few hundred URLs, not 100,000.

    .venv/bin/python bench/crossdc_bench.py                               # 80 ms RTT, 1 node, 3 repeats
    .venv/bin/python bench/crossdc_bench.py --nodes 2 --settings 256x4,512x4
    .venv/bin/python bench/crossdc_bench.py --delay-ms 40 --settings 64x2,1x1 --repeats 1

Needs root (namespaces, TUN). Every run is bounded (``--timeout``); namespaces and processes are removed by
their exact names/PIDs on exit, also on failure.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Purged, Varnish, fmt_repeats, machine_note, make_urls, median, post_batch, wait_batch  # noqa: E402
from netns_delay import DelayedLink, in_netns, tcp_rtt  # noqa: E402


def run_setting(link: DelayedLink, varnishes: list[Varnish], n_urls: int, window: int, connections: int,
                timeout: float, tag: str) -> dict:
    daemon = Purged([v.address for v in varnishes], window=window, connections=connections, netns=link.netns_a)
    daemon.start()
    try:
        urls = make_urls(n_urls, f"{tag}_{time.monotonic_ns()}")
        batches = [urls[i : i + 10_000] for i in range(0, n_urls, 10_000)]
        before = [v.n_purges() for v in varnishes]
        cpu0, dcpu0 = daemon.cpu_seconds(), link.cpu_seconds()
        with in_netns(link.netns_a):
            t0 = time.monotonic()
            replies = [post_batch(daemon.base_url, b) for b in batches]
            done = wait_batch(daemon.base_url, replies[-1]["id"], timeout)
            t1 = time.monotonic()
        cpu1, dcpu1 = daemon.cpu_seconds(), link.cpu_seconds()
        deltas = [v.n_purges() - b for v, b in zip(varnishes, before, strict=True)]
        if not done:
            raise RuntimeError(f"not delivered within {timeout}s: Varnish counted {deltas} of {n_urls} each")
        deadline = time.monotonic() + 10
        while not all(d >= n_urls for d in deltas) and time.monotonic() < deadline:
            time.sleep(0.1)
            deltas = [v.n_purges() - b for v, b in zip(varnishes, before, strict=True)]
        if not all(d >= n_urls for d in deltas):
            raise RuntimeError(f"Varnish counted {deltas} purges, expected {n_urls} each")
    finally:
        daemon.stop()
    elapsed = t1 - t0
    return {
        "urls": n_urls,
        "per_node": n_urls / elapsed,
        "elapsed": elapsed,
        "cpu_us": (cpu1 - cpu0) / (n_urls * len(varnishes)) * 1e6,
        "purged_cores": (cpu1 - cpu0) / elapsed,
        "delayer_cores": (dcpu1 - dcpu0) / elapsed,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--delay-ms", type=float, default=40.0, help="one-way delay (default 40 = 80 ms RTT)")
    p.add_argument("--nodes", type=int, default=1, help="varnishd nodes in the remote data centre (default 1)")
    p.add_argument("--settings", default="256x4,64x2,1x1",
                   help="sender WINDOWxCONNECTIONS (default 256x4, the daemon's default 64x2, and 1x1)")
    p.add_argument("--urls", type=int, default=100_000, help="most URLs per run (default 100000)")
    p.add_argument("--seconds", type=float, default=15.0, help="aim for runs about this long (default 15)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--timeout", type=float, default=180.0, help="bound on one run, seconds")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("crossdc_bench needs root (network namespaces, /dev/net/tun)")
    settings = [tuple(int(x) for x in s.lower().split("x")) for s in args.settings.split(",")]

    print(f"crossdc_bench: {machine_note()}; {args.delay_ms:g} ms each way, {args.nodes} node(s), "
          f"{args.repeats} repeats")
    with DelayedLink(delay=args.delay_ms / 1000) as link:
        varnishes: list[Varnish] = []
        try:
            for i in range(args.nodes):
                varnishes.append(Varnish(link.addr_b, 6081 + i, netns=link.netns_b).start())
            print(f"  purged side: namespace {link.netns_a} ({link.addr_a}); data centre: namespace "
                  f"{link.netns_b}, Varnish on {', '.join(v.address for v in varnishes)}")
            rtt = None
            with in_netns(link.netns_a):
                for v in varnishes:
                    r = tcp_rtt(v.host, v.port, count=5,
                                request=b"PURGE /rtt-check HTTP/1.1\r\nHost: en.wikipedia.org\r\n\r\n")
                    rtt = r["connect"] if rtt is None else max(rtt, r["connect"])
                    print(f"  RTT to {v.address}: TCP connect median {r['connect'] * 1000:.1f} ms "
                          f"({', '.join(f'{x * 1000:.1f}' for x in r['connect_all'])}); PURGE request -> "
                          f"answer median {r['request'] * 1000:.1f} ms")
            results: dict[tuple[int, int], list[dict]] = {s: [] for s in settings}
            for rep in range(args.repeats):
                for window, conns in settings:
                    theory = window * conns / rtt
                    n = int(min(args.urls, max(100, theory * args.seconds)))
                    r = run_setting(link, varnishes, n, window, conns, args.timeout,
                                    f"x{args.nodes}_w{window}_c{conns}_r{rep + 1}")
                    results[(window, conns)].append(r)
                    print(f"  [{rep + 1}] window {window} x {conns} conn ({window * conns} in flight; at most "
                          f"{theory:,.0f}/s per node at this RTT): {r['per_node']:,.0f} PURGE/s per node "
                          f"({r['urls']:,} URLs per node in {r['elapsed']:.2f} s); purged {r['cpu_us']:.1f} us "
                          f"CPU/PURGE = {r['purged_cores']:.2f} cores; delayer {r['delayer_cores']:.2f} cores")
            print(f"  -- medians of {args.repeats}, PURGE/s per node at {2 * args.delay_ms:g} ms "
                  f"(measured RTT {rtt * 1000:.1f} ms):")
            for (window, conns), rs in results.items():
                print(f"     window {window:>4} x {conns} conn: {fmt_repeats([r['per_node'] for r in rs])}")
            best = max(results.items(), key=lambda kv: median([r["per_node"] for r in kv[1]]))
            print(f"     best: window {best[0][0]} x {best[0][1]} connections")
        finally:
            for v in varnishes:
                v.stop()
    print(f"  delayer counters: {link.stats}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
