"""Benchmark: PURGE/s per node across data centres, through a faithful 80 ms round trip.

``netns_delay.DelayedLink`` makes two fresh network namespaces joined by a TUN delayer (40 ms each way by
default; addresses in 198.18.0.0/15): namespace B is the remote data centre, with ``--nodes`` real ``varnishd``
on 198.18.1.1; namespace A holds purged (a subprocess, ``ip netns exec``) and the poster (this process, via
``setns``). Before measuring it prints the TCP round trip (connect, and a PURGE's request -> answer time) to
every node.

Then, ``--repeats`` times, for each sender setting (``WINDOWxCONNECTIONS``): a fresh purged with one data centre
holding the nodes; unique URLs are posted to ``POST /v1/purge`` in batches of 10,000; the clock runs from the
first post until every node's ``MAIN.n_purges`` delta reached the count (polled every 0.1 s; purged must also
report the last batch done). PURGE/s per node = URLs / time; "steady" is the rate between 10 % and 90 % of the
count, without the ramp (ingest of the first batch, TCP slow start). The URL count per run is sized so a run takes about
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

from common import (  # noqa: E402
    Purged,
    fmt_repeats,
    machine_note,
    make_urls,
    median,
    parse_setting,
    post_batch,
    wait_batch,
    wait_listening,
)
from edges import PurgeSampler, Varnish  # noqa: E402
from netns_delay import DelayedLink, in_netns, tcp_rtt  # noqa: E402


def run_setting(link: DelayedLink, varnishes: list[Varnish], n_urls: int, window: int, connections: int,
                timeout: float, tag: str, max_window: int | None = None) -> dict:
    daemon = Purged([v.address for v in varnishes], window=window, connections=connections, netns=link.netns_a,
                    max_window=max_window)
    daemon.start()
    sampler = None
    try:
        urls = make_urls(n_urls, f"{tag}_{time.monotonic_ns()}")
        batches = [urls[i : i + 5_000] for i in range(0, n_urls, 5_000)]
        sampler = PurgeSampler(varnishes, n_urls, interval=0.1, timeout=timeout)
        cpu0, dcpu0 = daemon.cpu_seconds(), link.cpu_seconds()
        with in_netns(link.netns_a):
            t0 = time.monotonic()
            sampler.start()  # its thread stays in the root namespace; varnishstat reads files anyway
            replies = [post_batch(daemon.base_url, b) for b in batches]
            done = wait_batch(daemon.base_url, replies[-1]["id"], timeout)
            t_done = time.monotonic()
        cpu1, dcpu1 = daemon.cpu_seconds(), link.cpu_seconds()
        window = node_window(daemon.base_url, link.netns_a)
        reached = sampler.join()
        t1 = sampler.reached_at or time.monotonic()
        if not (done and reached):
            raise RuntimeError(f"not delivered within {timeout}s: Varnish counted {sampler.deltas()} of "
                               f"{n_urls} each")
    finally:
        if sampler is not None:
            sampler.stop()
        daemon.stop()
    elapsed = t1 - t0
    return {
        "urls": n_urls,
        "per_node": n_urls / elapsed,
        "per_node_purged_clock": n_urls / (t_done - t0),
        "steady_per_node": sampler.steady_rate() / len(varnishes),
        "elapsed": elapsed,
        "cpu_us": (cpu1 - cpu0) / (n_urls * len(varnishes)) * 1e6,
        "purged_cores": (cpu1 - cpu0) / elapsed,
        "delayer_cores": (dcpu1 - dcpu0) / elapsed,
        "window": window,
    }


def node_window(base_url: str, netns: str) -> str:
    """``purged_node_window`` of each node at the end of a run (a purged older than issue 15 has none)."""
    import urllib.request

    try:
        with in_netns(netns), urllib.request.urlopen(base_url + "/metrics", timeout=10) as r:
            text = r.read().decode()
    except OSError:
        return "?"
    values = [line.rsplit(" ", 1)[1] for line in text.splitlines() if line.startswith("purged_node_window{")]
    return ", ".join(str(int(float(v))) for v in values) or "n/a"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--delay-ms", type=float, default=40.0, help="one-way delay (default 40 = 80 ms RTT)")
    p.add_argument("--nodes", type=int, default=1, help="varnishd nodes in the remote data centre (default 1)")
    p.add_argument("--settings", default="256x4,512x4,64x2,1x1",
                   help="sender WINDOWxCONNECTIONS (default 256x4 = the daemon's default, 512x4, 64x2, 1x1)")
    p.add_argument("--urls", type=int, default=100_000, help="most URLs per run (default 100000)")
    p.add_argument("--seconds", type=float, default=15.0, help="aim for runs about this long (default 15)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--timeout", type=float, default=180.0, help="bound on one run, seconds")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("crossdc_bench needs root (network namespaces, /dev/net/tun)")
    settings = [parse_setting(s) for s in args.settings.split(",")]

    print(f"crossdc_bench: {machine_note()}; {args.delay_ms:g} ms each way, {args.nodes} node(s), "
          f"{args.repeats} repeats")
    with DelayedLink(delay=args.delay_ms / 1000) as link:
        varnishes: list[Varnish] = []
        try:
            for i in range(args.nodes):
                v = Varnish(link.addr_b, 6081 + i, netns=link.netns_b)
                varnishes.append(v.start())
                with in_netns(link.netns_b):
                    wait_listening(v.host, v.port, proc=v.proc)
            print(f"  purged side: namespace {link.netns_a} ({link.addr_a}); data centre: namespace "
                  f"{link.netns_b}, Varnish on {', '.join(v.address for v in varnishes)}")
            rtt = None
            with in_netns(link.netns_a):
                for v in varnishes:
                    r = tcp_rtt(v.host, v.port, count=5,
                                request=b"PURGE /rtt-check HTTP/1.1\r\nHost: en.wikipedia.org\r\n\r\n")
                    best = min(r["connect_all"])  # the link's own RTT; the rest is scheduling noise
                    rtt = best if rtt is None else max(rtt, best)
                    print(f"  RTT to {v.address}: TCP connect min {best * 1000:.1f}, median {r['connect'] * 1000:.1f} ms "
                          f"({', '.join(f'{x * 1000:.1f}' for x in r['connect_all'])}); PURGE request -> "
                          f"answer median {r['request'] * 1000:.1f} ms")
            results: dict[tuple[int, int, int | None], list[dict]] = {s: [] for s in settings}
            for rep in range(args.repeats):
                for window, conns, cap in settings:
                    most = max(window, cap or 0)  # an adaptive window may grow to its cap
                    theory = most * conns / rtt
                    n = int(min(args.urls, max(100, theory * args.seconds)))
                    r = run_setting(link, varnishes, n, window, conns, args.timeout,
                                    f"x{args.nodes}_w{window}_c{conns}_r{rep + 1}", max_window=cap)
                    results[(window, conns, cap)].append(r)
                    capped = f", adaptive up to {cap} x {conns}" if cap else ""
                    print(f"  [{rep + 1}] window {window} x {conns} conn{capped} ({most * conns} in flight; at most "
                          f"{theory:,.0f}/s per node at this RTT): {r['per_node']:,.0f} PURGE/s per node "
                          f"({r['urls']:,} URLs per node in {r['elapsed']:.2f} s; steady {r['steady_per_node']:,.0f}/s); purged {r['cpu_us']:.1f} us "
                          f"CPU/PURGE = {r['purged_cores']:.2f} cores; delayer {r['delayer_cores']:.2f} cores; node window "
                          f"at the end {r['window']}")
            print(f"  -- medians of {args.repeats}, PURGE/s per node at {2 * args.delay_ms:g} ms "
                  f"(measured RTT {rtt * 1000:.1f} ms, min of the TCP connects):")
            for (window, conns, cap), rs in results.items():
                name = f"{window:>4} x {conns}" + (f" (cap {cap})" if cap else "")
                print(f"     window {name} conn: {fmt_repeats([r['per_node'] for r in rs])}")
                print(f"                  steady: {fmt_repeats([r['steady_per_node'] for r in rs])}")
            best = max(results.items(), key=lambda kv: median([r["per_node"] for r in kv[1]]))
            print(f"     best: window {best[0][0]} x {best[0][1]} connections (cap {best[0][2]})")
        finally:
            for v in varnishes:
                v.stop()
    print(f"  delayer counters: {link.stats}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
