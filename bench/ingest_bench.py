"""Benchmark: the CPU the daemon spends per URL ingested over the HTTP API, nothing delivered.

A fresh ``purged --config`` subprocess whose one node is a loopback port nothing listens on (its sender only
backs off, so the daemon's CPU is ingest: HTTP, body decoding, URL validation, admission, the log append, and
with ``--journal`` the journal's encoding and writes). ``--urls`` unique URLs are posted to ``POST /v1/purge``
in JSON batches of ``--batch`` (bodies built before the clock starts; one keep-alive connection, or a new
connection per batch with ``--no-keepalive`` as ``sender_bench.py`` posts). Printed: purged's utime+stime per
URL (from /proc), each repeat and the median. Run against another tree with ``PURGED_BENCH_SRC=DIR``.

    .venv/bin/python bench/ingest_bench.py                        # 300k URLs in 5000-URL batches, 3 repeats
    .venv/bin/python bench/ingest_bench.py --journal --repeats 1

Every loop is bounded (a fixed number of posts, each with a timeout); the daemon is stopped by its PID and its
temp dir removed.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import Purged, cpu_times, fmt_repeats, free_port, machine_note, make_urls  # noqa: E402


def run(n_urls: int, batch: int, journal: bool, keepalive: bool, tag: str, spy_out: str | None = None) -> dict:
    dead = f"127.0.0.1:{free_port()}"  # nothing listens there: connects are refused, the sender backs off
    daemon = Purged([dead], journal=journal).start()
    try:
        urls = make_urls(n_urls, f"{tag}_{time.monotonic_ns()}")
        bodies = [(json.dumps({"urls": urls[i : i + batch]}).encode(), len(urls[i : i + batch]))
                  for i in range(0, n_urls, batch)]
        del urls
        headers = {"Content-Type": "application/json"}
        conn = None
        spy = None
        if spy_out:
            spy = subprocess.Popen([pyspy(), "record", "--pid", str(daemon.proc.pid), "--rate", "1000", "--format",
                                    "raw", "--output", spy_out, "--nonblocking"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)  # the daemon's start-up work is not ingest (and py-spy attaches)
        user0, sys0 = cpu_times(daemon.proc.pid)
        t0 = time.monotonic()
        for body, count in bodies:
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=60)
            conn.request("POST", "/v1/purge", body=body, headers=headers)
            resp = conn.getresponse()
            reply = json.loads(resp.read())
            if resp.status != 202 or reply.get("accepted") != count:
                raise RuntimeError(f"purged answered {resp.status}: {str(reply)[:300]}")
            if not keepalive:
                conn.close()
                conn = None
        elapsed = time.monotonic() - t0
        user1, sys1 = cpu_times(daemon.proc.pid)
        if conn is not None:
            conn.close()
        if spy is not None:
            spy.send_signal(signal.SIGINT)  # py-spy writes its output when interrupted
            spy.wait(timeout=20)
    finally:
        daemon.stop()
    cpu = (user1 - user0) + (sys1 - sys0)
    return {"us_per_url": cpu / n_urls * 1e6, "sys_share": (sys1 - sys0) / max(cpu, 1e-9),
            "urls_per_s": n_urls / elapsed}


def pyspy() -> str:
    """py-spy from the venv, $PYSPY or PATH."""
    here = Path(sys.executable).parent / "py-spy"
    found = os.environ.get("PYSPY") or (str(here) if here.exists() else shutil.which("py-spy"))
    if not found:
        raise SystemExit("--profile needs py-spy (pip install py-spy, or PYSPY=/path/to/py-spy)")
    return found


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--urls", type=int, default=300_000)
    p.add_argument("--batch", type=int, default=5000)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--journal", action="store_true", help="run purged with its journal (temp dir, default durability)")
    p.add_argument("--no-keepalive", action="store_true", help="a new connection per batch (as sender_bench posts)")
    p.add_argument("--profile", metavar="FILE", help="py-spy the daemon (raw collapsed stacks to FILE.N)")
    args = p.parse_args(argv)
    print(f"ingest_bench: {args.urls:,} URLs in batches of {args.batch:,}, journal "
          f"{'on' if args.journal else 'off'}, {'new connection per batch' if args.no_keepalive else 'keep-alive'}; "
          f"{machine_note()}")
    results = [run(args.urls, args.batch, args.journal, not args.no_keepalive, f"r{i}",
                   args.profile and f"{args.profile}.{i}") for i in range(args.repeats)]
    print(f"  purged CPU per URL (us): {fmt_repeats([r['us_per_url'] for r in results], '{:.2f}')}")
    print(f"  kernel share:            {fmt_repeats([r['sys_share'] * 100 for r in results], '{:.0f}%')}")
    print(f"  URLs/s (the poster included; noisy): {fmt_repeats([r['urls_per_s'] for r in results])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
