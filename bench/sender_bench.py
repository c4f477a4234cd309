"""Benchmark: PURGE/s that purged delivers into real loopback Varnish nodes, against wrk's pipelined ceiling.

For each node count (default 1 and 4) it starts that many ``varnishd`` on 127.0.0.1 (own ``-n`` dirs, the
PURGE VCL of ``bench/edges.py``) and then, ``--repeats`` times, for each sender setting, a ceiling run right
before a purged run, so that the pair sees about the same background load:

* **ceiling**: ``wrk`` with ``bench/wrk_pipeline.lua`` (pipelined PURGEs, varying paths) straight at the same
  Varnish nodes (one wrk per node, run together), for ``--wrk-seconds``; wrk's own response count is checked
  against the nodes' ``MAIN.n_purges`` delta (they may differ by at most the requests in flight at the end).
* **purged**, for each sender setting (``WINDOWxCONNECTIONS``): a fresh ``purged --config`` subprocess whose
  one data centre holds the nodes in one tier; ``--urls`` unique URLs are posted to ``POST /v1/purge`` in
  batches of ``--batch`` (JSON, urllib); the clock runs from the first post until purged reports the last batch
  done on every node (``GET /v1/purge/{id}?wait=``), and every node's ``MAIN.n_purges`` delta must then have
  reached ``--urls`` (checked; the run fails otherwise). PURGE/s = URLs x nodes / time. CPU us per PURGE =
  purged's utime+stime delta (/proc/PID/stat) / PURGEs delivered; it includes parsing the posted JSON.

Printed per figure: every repeat and the median; purged's rate as a ratio to the ceiling of the same repeat;
purged's CPU per PURGE as a share of Varnish's under wrk in the same repeat (the machine's own speed moves by
up to ~1.5x between runs on these VMs, and both move with it); the CPU used by everything else on the machine
during the run ("others", in cores), because these machines have 2 cores shared by the Varnish nodes, purged,
the poster, wrk and whatever else runs.

    .venv/bin/python bench/sender_bench.py                            # 1 and 4 nodes, 3 repeats
    .venv/bin/python bench/sender_bench.py --nodes 1 --settings 64x2,256x2,128x4 --urls 200000
    .venv/bin/python bench/sender_bench.py --httpx                    # + httpx AsyncClient into 1 node
    .venv/bin/python bench/sender_bench.py --profile py-spy --nodes 4 --repeats 1   # where purged spends CPU

Every loop is bounded: wrk runs for a fixed time, purged's runs have ``--timeout``, the httpx run a count and a
deadline. All processes are stopped by PID and their temp dirs removed.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    PYTHON,
    Purged,
    cpu_times,
    fmt_repeats,
    machine_note,
    make_urls,
    median,
    parse_setting,
    post_batch,
    wait_batch,
)
from edges import PurgeSampler, Varnish  # noqa: E402
from profile_summary import summarize  # noqa: E402

HERE = Path(__file__).resolve().parent
WRK_LUA = HERE / "wrk_pipeline.lua"


def busy_cpu_seconds() -> float:
    """CPU seconds the whole machine spent not idle (all CPUs), from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def children_cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


# -- the ceiling: wrk ------------------------------------------------------------------------------------------


def run_wrk(varnishes: list[Varnish], seconds: float, connections: int, depth: int) -> dict:
    """One wrk (1 thread) per node, all at once. Returns rate, wrk's counts and Varnish's deltas."""
    wrk = shutil.which("wrk")
    if wrk is None:
        raise SystemExit("wrk is not installed (apt-get install wrk, or run bench/run_all.sh)")
    before = [v.n_purges() for v in varnishes]
    vcpu0 = sum(v.cpu_seconds() for v in varnishes)
    busy0 = busy_cpu_seconds()
    wall0 = time.monotonic()
    children0 = children_cpu_seconds()
    procs = [
        subprocess.Popen(
            [wrk, "-t1", f"-c{connections}", f"-d{max(1, round(seconds))}s", "--timeout", "10s", "-s", str(WRK_LUA),
             f"http://{v.address}/", "--", str(depth)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for v in varnishes
    ]
    outs = []
    for p in procs:
        try:
            out, err = p.communicate(timeout=seconds + 30)
        except subprocess.TimeoutExpired:
            p.kill()
            out, err = p.communicate()
        line = next((ln for ln in out.splitlines() if ln.startswith("WRK_JSON ")), None)
        if line is None:
            raise RuntimeError(f"wrk printed no summary: {out}\n{err}")
        outs.append(json.loads(line[len("WRK_JSON "):]))
    busy = busy_cpu_seconds() - busy0
    wrk_cpu = children_cpu_seconds() - children0
    vcpu = sum(v.cpu_seconds() for v in varnishes) - vcpu0
    wall = time.monotonic() - wall0
    time.sleep(0.2)  # let Varnish finish what was in flight when wrk stopped
    deltas = [v.n_purges() - b for v, b in zip(varnishes, before, strict=True)]
    reqs = sum(o["requests"] for o in outs)
    duration = max(o["duration_us"] for o in outs) / 1e6
    errors = sum(o[k] for o in outs for k in ("connect", "read", "write", "status", "timeout"))
    slack = connections * depth * len(varnishes)
    return {
        "rate": reqs / duration,
        "wrk_requests": reqs,
        "varnish_purges": sum(deltas),
        "errors": errors,
        "counts_match": 0 <= sum(deltas) - reqs <= slack and errors == 0,
        "varnish_cores": vcpu / wall,
        "varnish_us": vcpu / max(sum(deltas), 1) * 1e6,
        "busy_cores": busy / wall,
        "wrk_cores": wrk_cpu / wall,
        "others_cores": max(0.0, busy - vcpu - wrk_cpu) / wall,  # wrk's own CPU excluded
    }


# -- purged ----------------------------------------------------------------------------------------------------


def run_purged(varnishes: list[Varnish], n_urls: int, batch: int, window: int, connections: int, timeout: float,
               tag: str, profile: str | None = None, profile_dir: str | None = None, journal: bool = False,
               max_window: int | None = None) -> dict:
    nodes = [v.address for v in varnishes]
    python_args: tuple[str, ...] = ()
    if profile == "cprofile":  # written when purged exits (SIGTERM: it drains, then returns normally)
        python_args = ("-m", "cProfile", "-o", os.path.join(profile_dir, f"{tag}.pstats"))
    daemon = Purged(nodes, window=window, connections=connections, python_args=python_args, journal=journal,
                    max_window=max_window)
    daemon.start()
    spy = sampler = None
    try:
        urls = make_urls(n_urls, f"{tag}_{time.monotonic_ns()}")
        batches = [urls[i : i + batch] for i in range(0, n_urls, batch)]
        if profile == "py-spy":
            spy_out = os.path.join(profile_dir, f"{tag}.txt")
            spy = subprocess.Popen(
                [str(Path(PYTHON).parent / "py-spy"), "record", "--pid", str(daemon.proc.pid), "--rate", "200",
                 "--format", "raw", "--output", spy_out, "--nonblocking"],
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            )
            time.sleep(1.0)
        sampler = PurgeSampler(varnishes, n_urls, timeout=timeout)
        vcpu0 = sum(v.cpu_seconds() for v in varnishes)
        cpu0 = daemon.cpu_seconds()
        sys0 = cpu_times(daemon.proc.pid)[1]
        busy0 = busy_cpu_seconds()
        t0 = time.monotonic()
        sampler.start()
        replies = [post_batch(daemon.base_url, b) for b in batches]
        t_posted = time.monotonic()
        done = wait_batch(daemon.base_url, replies[-1]["id"], timeout)
        t_done = time.monotonic()  # purged's own clock: every node acknowledged the last batch
        cpu1 = daemon.cpu_seconds()
        sys1 = cpu_times(daemon.proc.pid)[1]
        reached = sampler.join()  # Varnish's clock: every node's n_purges delta reached the target
        t1 = sampler.reached_at or time.monotonic()
        busy = busy_cpu_seconds() - busy0
        vcpu = sum(v.cpu_seconds() for v in varnishes) - vcpu0
        deltas = [v.n_purges() - b for v, b in zip(varnishes, sampler.before, strict=True)]
        if not (done and reached):
            raise RuntimeError(f"not delivered within {timeout}s: Varnish counted {deltas}, {n_urls} each expected")
    finally:
        if sampler is not None:
            sampler.stop()
        if spy is not None:
            spy.send_signal(signal.SIGINT)  # py-spy writes its output when interrupted
            try:
                spy.wait(timeout=10)
            except subprocess.TimeoutExpired:
                spy.kill()
                spy.wait()
        daemon.stop()
    elapsed = t1 - t0
    delivered = n_urls * len(nodes)
    own = (cpu1 - cpu0) + vcpu
    return {
        "rate": delivered / elapsed,
        "rate_purged_clock": delivered / (t_done - t0),
        "steady": sampler.steady_rate(),
        "per_node": n_urls / elapsed,
        "elapsed": elapsed,
        "post_seconds": t_posted - t0,
        "cpu_us": (cpu1 - cpu0) / delivered * 1e6,
        "sys_share": (sys1 - sys0) / max(cpu1 - cpu0, 1e-9),  # kernel share of purged's CPU
        "purged_cores": (cpu1 - cpu0) / elapsed,
        "varnish_cores": vcpu / elapsed,
        "others_cores": max(0.0, busy - own) / elapsed,  # the poster, other people's jobs...
        "duplicates": sum(deltas) - delivered,
    }


# -- httpx, for the record ---------------------------------------------------------------------------------------


def run_httpx(varnish: Varnish, concurrency: int, seconds: float, max_requests: int) -> dict:
    """PURGE/s with httpx.AsyncClient on trio, ``concurrency`` tasks, bounded by time and count (subprocess so
    its CPU time is its own)."""
    code = r"""
import sys, time, trio, httpx
url, conc, seconds, limit = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
async def main():
    done = [0]
    deadline = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=conc, max_keepalive_connections=conc)
    async with httpx.AsyncClient(base_url=url, limits=limits, headers={"Host": "en.wikipedia.org"}) as c:
        async def worker(w):
            i = 0
            while time.monotonic() < deadline and done[0] < limit:
                r = await c.request("PURGE", f"/wiki/httpx_{w}_{i}?action=raw")
                assert r.status_code == 200, r.status_code
                done[0] += 1
                i += 1
        t0 = time.monotonic()
        async with trio.open_nursery() as n:
            for w in range(conc):
                n.start_soon(worker, w)
        print(done[0], time.monotonic() - t0)
trio.run(main)
"""
    before = varnish.n_purges()
    r = subprocess.run([PYTHON, "-c", code, f"http://{varnish.address}", str(concurrency), str(seconds),
                        str(max_requests)], capture_output=True, text=True, timeout=seconds + 60)
    if r.returncode != 0:
        raise RuntimeError(r.stderr)
    count, elapsed = r.stdout.split()
    count, elapsed = int(count), float(elapsed)
    delta = varnish.n_purges() - before
    return {"rate": count / elapsed, "count": count, "varnish_purges": delta}


# -- driver ------------------------------------------------------------------------------------------------------


def parse_settings(text: str) -> list[tuple[int, int, int | None]]:
    return [parse_setting(item) for item in text.split(",")]


def label(setting: tuple[int, int, int | None]) -> str:
    window, conns, cap = setting
    return f"{window} x {conns}" + (f" (cap {cap})" if cap is not None else "")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", default="1,4", help="node counts to measure, comma-separated (default 1,4)")
    p.add_argument("--urls", type=int, default=200_000, help="unique URLs posted per run (default 200000)")
    p.add_argument("--batch", type=int, default=10_000, help="URLs per POST (default 10000)")
    p.add_argument("--settings", default="64x2,256x2,256x4",
                   help="sender WINDOWxCONNECTIONS[:MAX_WINDOW] to try (default 64x2, 256x2, and 256x4 = the "
                        "daemon's default; without :MAX_WINDOW the daemon's default cap of the adaptive window)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--timeout", type=float, default=120.0, help="bound on one purged run, seconds")
    p.add_argument("--wrk-seconds", type=int, default=4)
    p.add_argument("--wrk-connections", type=int, default=2, help="wrk connections per node (default 2)")
    p.add_argument("--wrk-depth", type=int, default=256, help="wrk pipeline depth (default 256)")
    p.add_argument("--no-wrk", action="store_true", help="skip the wrk ceiling")
    p.add_argument("--httpx", action="store_true", help="also measure httpx AsyncClient PURGE/s into 1 node")
    p.add_argument("--httpx-seconds", type=float, default=4.0)
    p.add_argument("--profile", choices=["py-spy", "cprofile"], help="profile purged during its runs")
    p.add_argument("--profile-out", metavar="DIR", help="keep the raw profiles in DIR")
    p.add_argument("--journal", action="store_true",
                   help="run purged with its journal (in a temp dir, default durability); default: no journal")
    p.add_argument("--json", metavar="FILE", help="also write every figure as JSON")
    args = p.parse_args(argv)

    node_counts = [int(x) for x in args.nodes.split(",")]
    settings = parse_settings(args.settings)
    profile_dir = None
    if args.profile:
        profile_dir = args.profile_out or tempfile.mkdtemp(prefix="purged-bench-profile-")
        os.makedirs(profile_dir, exist_ok=True)
    results: dict = {"machine": machine_note(), "args": vars(args), "runs": {}}
    print(f"sender_bench: {machine_note()}; {args.urls:,} URLs per run in batches of {args.batch:,}; "
          f"{args.repeats} repeats; purged journal {'on (temp dir)' if args.journal else 'off'}")
    print("  note: the Varnish nodes, purged, the poster and wrk all share this machine's "
          f"{os.cpu_count()} cores (as does anything else running); 'others' = CPU used by everything but "
          "purged and Varnish during a run, in cores")
    try:
        for n in node_counts:
            varnishes = [Varnish() for _ in range(n)]
            try:
                for v in varnishes:
                    v.start()
                print(f"\n== {n} Varnish node(s): {', '.join(v.address for v in varnishes)}")
                ceil: list[dict] = []
                runs: dict[tuple[int, int, int | None], list[dict]] = {s: [] for s in settings}
                hx: dict[int, list[dict]] = {1: [], 16: []}
                for rep in range(args.repeats):
                    for window, conns, cap in settings:
                        # The ceiling right before each purged run, so that both see the same background load.
                        if not args.no_wrk:
                            w = run_wrk(varnishes, args.wrk_seconds, args.wrk_connections, args.wrk_depth)
                            ceil.append(w)
                            print(f"  [{rep + 1}] wrk ceiling ({args.wrk_connections} conn x depth "
                                  f"{args.wrk_depth} per node): {w['rate']:,.0f} PURGE/s; wrk counted "
                                  f"{w['wrk_requests']:,}, Varnish {w['varnish_purges']:,} "
                                  f"({'match' if w['counts_match'] else 'MISMATCH'}), errors {w['errors']}; "
                                  f"Varnish {w['varnish_cores']:.2f} cores ({w['varnish_us']:.1f} us CPU/PURGE), wrk "
                                  f"{w['wrk_cores']:.2f}, others {w['others_cores']:.2f} cores")
                        tag = f"n{n}_w{window}_c{conns}_r{rep + 1}"
                        r = run_purged(varnishes, args.urls, args.batch, window, conns, args.timeout, tag,
                                       args.profile, profile_dir, args.journal, max_window=cap)
                        if ceil:
                            r["ratio"] = r["rate"] / ceil[-1]["rate"]
                            # The machine's own speed moves (by ~1.5x on these VMs): purged's CPU per PURGE as a
                            # share of what Varnish spent per PURGE under wrk right before compares across runs.
                            r["varnish_share"] = r["cpu_us"] / ceil[-1]["varnish_us"]
                        runs[(window, conns, cap)].append(r)
                        ratio = f", {r['ratio']:.2f}x that ceiling" if "ratio" in r else ""
                        share = f", {r['varnish_share']:.2f} of Varnish's under wrk" if "ratio" in r else ""
                        print(f"  [{rep + 1}] purged window {label((window, conns, cap))} conn: {r['rate']:,.0f} PURGE/s "
                              f"({r['per_node']:,.0f}/node){ratio}; {r['elapsed']:.2f} s (posting "
                              f"{r['post_seconds']:.2f} s; steady {r['steady']:,.0f}/s; by purged's clock "
                              f"{r['rate_purged_clock']:,.0f}/s); purged {r['cpu_us']:.1f} us CPU/PURGE{share} ("
                              f"{100 * r['sys_share']:.0f}% kernel) = {r['purged_cores']:.2f} cores; Varnish "
                              f"{r['varnish_cores']:.2f} cores; others {r['others_cores']:.2f} cores")
                    if args.httpx and n == 1:
                        for conc in hx:
                            h = run_httpx(varnishes[0], conc, args.httpx_seconds, 200_000)
                            hx[conc].append(h)
                            print(f"  [{rep + 1}] httpx AsyncClient, {conc} task(s): {h['rate']:,.0f} PURGE/s "
                                  f"(Varnish counted {h['varnish_purges']:,} of {h['count']:,})")
                print(f"  -- {n} node(s), medians of {args.repeats}:")
                if ceil:
                    print(f"     wrk ceiling       PURGE/s: {fmt_repeats([c['rate'] for c in ceil])}")
                    print(f"       Varnish us CPU per PURGE: {fmt_repeats([c['varnish_us'] for c in ceil], '{:.1f}')}")
                best = None
                for setting, rs in runs.items():
                    rate = median([r["rate"] for r in rs])
                    print(f"     purged {label(setting):>8} PURGE/s: {fmt_repeats([r['rate'] for r in rs])}")
                    if ceil:
                        print(f"                 ratio to ceiling: {fmt_repeats([r['ratio'] for r in rs], '{:.2f}')}")
                    print(f"                 us CPU per PURGE: {fmt_repeats([r['cpu_us'] for r in rs], '{:.1f}')}")
                    if ceil:
                        shares = [r["varnish_share"] for r in rs]
                        print(f"       share of Varnish's per PURGE: {fmt_repeats(shares, '{:.2f}')}")
                    if best is None or rate > best[1]:
                        best = (setting, rate)
                if best:
                    print(f"     best setting: window {label(best[0])} ({best[1]:,.0f} PURGE/s median)")
                for conc, hs in hx.items():
                    if hs:
                        print(f"     httpx {conc:>2} task(s) PURGE/s: {fmt_repeats([h['rate'] for h in hs])}")
                results["runs"][n] = {
                    "wrk": ceil,
                    "purged": {label(setting).replace(" ", ""): rs for setting, rs in runs.items()},
                    "httpx": {str(c): hs for c, hs in hx.items() if hs},
                }
            finally:
                for v in varnishes:
                    v.stop()
        if profile_dir:
            for name in sorted(os.listdir(profile_dir)):
                path = os.path.join(profile_dir, name)
                print(f"\n== profile {name}")
                if name.endswith(".txt"):
                    print(summarize(path))
                else:
                    import pstats

                    pstats.Stats(path).sort_stats("tottime").print_stats(25)
    finally:
        if profile_dir and not args.profile_out:
            shutil.rmtree(profile_dir, ignore_errors=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
