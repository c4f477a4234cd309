"""Benchmark and simulation of a purged fleet on NATS JetStream (issue 13; docs/fleet.md, "Topology and
simulation").

**throughput** (loopback, no namespaces): a 3-server JetStream cluster (stream with 3 replicas), ``--tp-daemons``
daemons each purging ``--tp-nodes`` stub nodes (2: a cache host's ATS and Varnish, the per-host shape).
``--tp-posters`` threads post ``--tp-batches`` batches of ``--tp-batch`` unique URLs (bodies encoded beforehand)
to the first daemon's ``POST /v1/purge``: accepted URLs/s = URLs / (last 2xx - first request). Delivery per
daemon = URLs / (time its nodes had every URL - first request, or - resume for a paused daemon). Two rounds:
every daemon running, then the others paused (SIGSTOP) while posting.

**simulation** (``netns_topology.Topology``): ``--dcs`` data centres as namespaces around a hub, ``--link-ms``
one way per spoke (20: an 80 ms DC-to-DC round trip); 3 NATS servers in three of them (stream with 3
replicas); in each DC one purged daemon purging ``--nodes`` stub nodes (``fleet_edges.py``, one process per
DC) and one real ``varnishd``. Then:
  1. steady: ``--rate`` URLs/s for ``--seconds``, batches of ``--batch`` URLs posted round robin to every
     daemon. Per DC: publish-to-last-node latency = the last stub PURGE of a batch in that DC (the stub's
     ``time.monotonic()``) minus the time the poster read the batch's 2xx; p50/p99 over batches. CPU per
     PURGE per daemon = its user+sys (/proc/PID/stat) delta / PURGEs it delivered (stubs + Varnish).
  2. catch-up: the last DC's daemon (no NATS server there) is SIGKILLed (by PID) while the others keep
     receiving ``--rate``; after ``--down`` s it is started again with the same name and state dir; time until
     ``GET /v1/fleet`` shows its lag 0, and until its stubs had every URL posted meanwhile.
  3. most URLs/s sustained: ``--rate`` doubled each ``--step-seconds`` step (batches of rate/5 URLs), until
     a step fails (a batch not at every node of every DC ``--drain`` s after the last post, p99 over ``--slo``
     s, or posting late by over 1 s) or ``--max-rate``; the last passing step is the figure.

    .venv/bin/python bench/fleet_bench.py --quick                 # ~2 minutes: both parts, small counts
    .venv/bin/python bench/fleet_bench.py                         # the full run: 6 DCs x (50 stubs + 1 Varnish)
    .venv/bin/python bench/fleet_bench.py --only throughput --tp-batches 80
    .venv/bin/python bench/fleet_bench.py --only simulation --hosts 4   # per-host shape: 4 daemons per DC, 2 nodes each

Needs root (namespaces, TUN) for the simulation, nats-server and varnishd. Every loop is bounded in count and
time; processes are stopped by PID; namespaces are deleted by name on exit, also on error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import machine_note, median  # noqa: E402
from fleet_harness import (  # noqa: E402
    EdgeStubs,
    FleetDaemon,
    PostLog,
    batch_body,
    cores_note,
    errors_note,
    latencies,
    ms,
    percentile,
    post_paced,
    sec,
    table,
)
from fleet_nats import NatsCluster  # noqa: E402
from fleet_sim import Fleet, catch_up, max_rate, steady  # noqa: E402
from netns_topology import Topology  # noqa: E402

# -- throughput on loopback --------------------------------------------------------------------------------------


def throughput(args) -> list[str]:
    """Two rounds on one cluster: every daemon running (they share the 2 cores: the single-machine picture),
    then the other daemons paused (SIGSTOP) while posting, as if each had a host of its own; after SIGCONT
    they work off the backlog, so their delivery rate there is a catch-up rate."""
    lines = []
    with NatsCluster([(None, "127.0.0.1")] * 3) as nats:
        stubs = EdgeStubs("127.0.0.1", args.tp_daemons * args.tp_nodes)
        n = args.tp_nodes
        daemons: list[FleetDaemon] = []
        try:
            for k in range(args.tp_daemons):
                d = FleetDaemon(f"tp{k}", stubs.nodes[k * n : (k + 1) * n], nats.urls, replicas=3, window=256,
                                connections=2)
                daemons.append(d.start())
            for d in daemons:
                d.wait_bus()
            run = f"tp{os.getpid()}x{int(time.time())}"
            _, warm = batch_body(run, 999999, 10)
            status, reply = daemons[0].request("POST", "/v1/purge", warm)
            if status // 100 != 2:
                raise RuntimeError(f"warm-up post: {status} {reply}")
            wait_total(stubs, {p: 10 for p in stubs.ports}, 30)
            lines.append(f"throughput (loopback, 3 NATS servers, stream replicas 3): {args.tp_batches} batches x "
                         f"{args.tp_batch:,} URLs by {args.tp_posters} posters to {daemons[0].name}; each daemon "
                         f"purges {args.tp_nodes} stub node(s) (2: the per-host shape, an ATS and a Varnish)")
            print(lines[-1], flush=True)
            for paused in (False, True):
                rows = throughput_round(args, stubs, daemons, f"{run}{'p' if paused else 'a'}", paused)
                lines.append(f"  {'others paused (SIGSTOP) while posting' if paused else 'all daemons running'}:")
                lines.append(table(["daemon", "accepted URLs/s", "delivered URLs/s", "CPU s", "us CPU/URL"], rows))
                print("\n".join(lines[-2:]), flush=True)
        finally:
            for d in daemons:
                if d.proc is not None and d.proc.poll() is None:
                    os.kill(d.proc.pid, signal.SIGCONT)
                d.cleanup()
            stubs.stop()
    return lines


def throughput_round(args, stubs: EdgeStubs, daemons: list[FleetDaemon], run: str, paused: bool) -> list[list[str]]:
    base = stubs.stats()["ports"]
    bodies = [batch_body(run, b, args.tp_batch)[1] for b in range(args.tp_batches)]
    total = args.tp_batch * args.tp_batches
    acked: list[float] = []
    errors: list[str] = []
    lock, nxt = threading.Lock(), [0]
    cpu0 = [d.cpu_seconds() for d in daemons]
    if paused:
        for d in daemons[1:]:
            os.kill(d.proc.pid, signal.SIGSTOP)
    t0 = time.monotonic()

    def poster() -> None:
        while time.monotonic() - t0 < args.timeout:
            with lock:
                b = nxt[0]
                nxt[0] += 1
            if b >= len(bodies):
                return
            status, reply = daemons[0].request("POST", "/v1/purge", bodies[b])
            with lock:
                if status // 100 == 2 and reply.get("accepted") == args.tp_batch:
                    acked.append(time.monotonic())
                else:
                    errors.append(f"{status} {reply}")

    threads = [threading.Thread(target=poster, daemon=True) for _ in range(args.tp_posters)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(args.timeout + 60)
    finally:
        t_resume = time.monotonic()
        if paused:
            for d in daemons[1:]:
                os.kill(d.proc.pid, signal.SIGCONT)
    if errors or len(acked) != len(bodies):
        raise RuntimeError(f"{len(errors)} posts failed, {len(acked)} of {len(bodies)} accepted; first: {errors[:1]}")
    reached = wait_total(stubs, {p: base[str(p)] + total for p in stubs.ports}, args.timeout)
    cpu1 = [d.cpu_seconds() for d in daemons]
    acc = total / (max(acked) - t0)
    rows = []
    for k, d in enumerate(daemons):
        mine = stubs.ports[k * args.tp_nodes : (k + 1) * args.tp_nodes]
        t = max(reached[p] for p in mine) if all(p in reached for p in mine) else None
        start = t_resume if paused and k else t0
        rows.append([d.name + (" (posted to)" if k == 0 else " (paused)" if paused else ""),
                     f"{acc:,.0f}" if k == 0 else "", f"{total / (t - start):,.0f}" if t else "not all",
                     f"{cpu1[k] - cpu0[k]:.2f}", f"{(cpu1[k] - cpu0[k]) / total * 1e6:.1f}"])
    return rows


def wait_total(stubs: EdgeStubs, targets: dict[int, int], timeout: float) -> dict[int, float]:
    """Poll the stub until each port's count reached its target (bounded); when each did (monotonic)."""
    reached: dict[int, float] = {}
    deadline = time.monotonic() + timeout
    while len(reached) < len(targets) and time.monotonic() < deadline:
        ports = stubs.stats()["ports"]
        now = time.monotonic()
        for p, target in targets.items():
            if p not in reached and ports[str(p)] >= target:
                reached[p] = now
        time.sleep(0.05)
    return reached


# -- the simulation ------------------------------------------------------------------------------------------------


def steady_rows(fleet: Fleet, r: dict) -> list[list[str]]:
    rows = []
    nodes = f"{fleet.ports}+1" if fleet.hosts == 1 else f"{fleet.hosts}x2"
    for i, dc in enumerate(r["per_dc"]):
        purges, cpu = dc["purges"], dc["cpu"]
        rows.append([
            dc["name"], "yes" if i in fleet.nats_dcs else "", nodes,
            ms(percentile(dc["post_lat"], 50)), ms(percentile(dc["post_lat"], 99)),
            ms(percentile(dc["lat"], 50)), ms(percentile(dc["lat"], 99)), ms(max(dc["lat"], default=float("nan"))),
            f"{len(dc['lat'])}/{len(r['posted'])}", f"{purges:,}",
            f"{cpu / purges * 1e6:.1f}" if purges else "n/a",
            f"{(cpu - fleet.idle[i] * r['elapsed']) / purges * 1e6:.1f}" if purges else "n/a",
            f"{cpu / r['elapsed']:.2f}",
        ])
    return rows


STEADY_HEADERS = ["DC", "NATS", "nodes", "2xx p50 ms", "2xx p99 ms", "last node p50 ms", "p99 ms", "max ms",
                  "batches at all nodes", "PURGEs", "us CPU/PURGE", "net of idle", "cores"]


def simulation(args) -> list[str]:
    out: list[str] = []

    def say(*lines: str) -> None:
        out.extend(lines)
        print("\n".join(lines), flush=True)

    with Topology(dcs=args.dcs, link_ms=args.link_ms) as topo, Fleet(topo, args) as fleet:
        per_url = fleet.nodes_per_dc * args.dcs  # PURGEs one URL makes in the whole fleet
        say(f"simulation: {args.dcs} DCs (namespaces), star with {args.link_ms:g} ms spokes = "
            f"{4 * args.link_ms:g} ms DC-to-DC RTT; NATS servers in {', '.join(f'dc{i}' for i in fleet.nats_dcs)} "
            f"(stream replicas 3); {fleet.shape} ({len(fleet.daemons)} daemons)")
        where = {f"n{k}": f"dc{i}" for k, i in enumerate(fleet.nats_dcs)}
        leader = fleet.nats.stream_leader("PURGED")
        clients = fleet.nats.clients()
        say(f"  stream leader {leader} (in {where.get(leader)}); each daemon's NATS connection (nats-py picks a "
            "server of its list at random): " + ", ".join(
                f"{d.name}->{where.get(clients.get(f'purged {d.name}'), '?')}" for d in fleet.daemons))
        run = f"sim{os.getpid()}x{int(time.time())}"
        warm = steady(fleet, run + "w", 10, 1, 1.0, 60)  # connections up, consumers created, caches warm
        if not all(dc["complete"] for dc in warm["per_dc"]):
            raise RuntimeError(f"warm-up batches did not reach every node within 60 s{errors_note(warm['errors'])}")
        if warm["errors"]:
            print(f"warm-up: {len(warm['errors'])} post errors{errors_note(warm['errors'])}", flush=True)
        idle_s = 3.0 if args.quick else 10.0
        idle = fleet.measure_idle(idle_s)
        say(f"idle: each daemon uses {median(idle) / fleet.hosts:.3f} cores with nothing to purge (median over "
            f"{idle_s:g} s: the bus's pulls and heartbeats, timers)")
        r = steady(fleet, run + "a", args.rate, args.batch, args.seconds, args.drain)
        say(f"steady: {args.rate:g} URLs/s for {args.seconds:g} s in batches of {args.batch} "
            f"({args.rate * per_url:,.0f} PURGE/s in all), {len(r['posted'])} batches posted round robin to the "
            f"daemons; {len(r['errors'])} post errors{errors_note(r['errors'])}; posting late by up to "
            f"{r['behind'] * 1000:,.0f} ms")
        say(table(STEADY_HEADERS, steady_rows(fleet, r)))
        total_cpu = sum(dc["cpu"] for dc in r["per_dc"])
        total_purges = sum(dc["purges"] for dc in r["per_dc"])
        say(f"  all daemons: {total_cpu / total_purges * 1e6:.1f} us CPU per PURGE "
            f"(median per DC {median([dc['cpu'] / dc['purges'] * 1e6 for dc in r['per_dc']]):.1f}); "
            f"cores used while it ran: {cores_note(r['cores'])}")
        c = catch_up(fleet, run + "c", args.rate, args.batch, args.down, args.timeout)
        sd = c["status_down"] or ("n/a", "n/a")
        say(f"catch-up: {c['victim']} SIGKILLed, down {c['down']:.1f} s while {c['urls']:,} URLs were posted "
            f"to the others (its lag then: {c['lag_before']} messages; a batch posted meanwhile, asked on "
            f"another daemon: done={sd[0]}, {c['victim']} done={sd[1]}); restarted: ready in "
            f"{c['ready']:.1f} s, lag 0 after {sec(c['lag0'])} s, every URL at every stub of its DC "
            f"after {sec(c['stubs'])} s; {len(c['errors'])} post errors{errors_note(c['errors'])}")
        best, lines = max_rate(fleet, run, args)
        say(f"most URLs/s sustained (steps of {args.step_seconds:g} s, p99 <= {args.slo:g} s, all "
            f"delivered within {args.drain:g} s): {best:,.0f} URLs/s = {best * per_url:,.0f} PURGE/s in all")
        out.extend(lines)
    say(f"  hub: {', '.join(f'{k} {v}' for k, v in (topo.stats or {}).items() if k != 'packets_by_pair')}")
    return out


def infra(args) -> list[str]:
    """The simulation's set-up without the bus: each DC's daemon gets its own batches only. Checks the pieces
    (namespaces, hub, NATS spread over three DCs, stubs, Varnish, daemons) and gives the local baseline."""
    out = []
    args.hosts = 1
    with Topology(dcs=args.dcs, link_ms=args.link_ms) as topo, Fleet(topo, args, bus=False) as fleet:
        leader = fleet.nats.wait_ready()
        out.append(f"infra: {args.dcs} DCs, NATS servers in {', '.join(f'dc{i}' for i in fleet.nats_dcs)} "
                   f"(JetStream meta leader {leader}); per DC one daemon (no bus) purging {args.nodes} stubs + 1 "
                   f"varnishd")
        run = f"infra{os.getpid()}x{int(time.time())}"
        rows = []
        for i, d in enumerate(fleet.daemons):
            log = PostLog()
            post_paced([d], f"{run}d{i}", args.rate, args.batch, max(1.0, args.batch / args.rate * 5), log)
            done = fleet.wait_complete(log.posted, [i], 60)
            lat, incomplete = latencies(log.posted, fleet.stubs[i].stats()["groups"], fleet.ports)
            posts = [p.acked - p.sent for p in log.posted]
            rows.append([d.name, "yes" if i in fleet.nats_dcs else "", str(len(log.posted)),
                         ms(percentile(posts, 50)), ms(percentile(lat, 50)), ms(max(lat, default=float("nan"))),
                         "yes" if i in done else f"NO ({incomplete} incomplete)",
                         str(fleet.varnish[i].n_purges())])
        out.append(table(["DC", "NATS", "batches", "2xx p50 ms", "last node p50 ms", "max ms", "all delivered",
                          "varnish n_purges"], rows))
    out.append(f"  hub: {', '.join(f'{k} {v}' for k, v in (topo.stats or {}).items() if k != 'packets_by_pair')}")
    return out


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=("throughput", "simulation", "infra"),
                   help="one part; infra: the simulation's set-up with daemons alone (no bus), a check")
    p.add_argument("--quick", action="store_true", help="a short run with small counts")
    p.add_argument("--tp-batches", type=int, default=40)
    p.add_argument("--tp-batch", type=int, default=5000)
    p.add_argument("--tp-posters", type=int, default=4)
    p.add_argument("--tp-daemons", type=int, default=3)
    p.add_argument("--tp-nodes", type=int, default=2, help="stub nodes per daemon in the throughput run")
    p.add_argument("--dcs", type=int, default=6)
    p.add_argument("--link-ms", type=float, default=20.0, help="one-way spoke delay (20: 80 ms DC-to-DC RTT)")
    p.add_argument("--nodes", type=int, default=50, help="stub nodes per DC (plus one varnishd)")
    p.add_argument("--hosts", type=int, default=1,
                   help="daemons per DC: 1 = the per-DC shape (--nodes stubs + 1 varnishd each); N > 1 = the "
                        "per-host shape, N daemons per DC each purging its own 2 stub nodes (no varnishd)")
    p.add_argument("--window", type=int, default=64, help="sender window per node connection")
    p.add_argument("--rate", type=float, default=50.0, help="URLs/s of the steady run")
    p.add_argument("--batch", type=int, default=10, help="URLs per posted batch")
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--down", type=float, default=30.0, help="seconds the catch-up victim stays down")
    p.add_argument("--step-seconds", type=float, default=15.0)
    p.add_argument("--max-rate", type=float, default=3200.0)
    p.add_argument("--slo", type=float, default=2.0, help="p99 bound of a sustained step, seconds")
    p.add_argument("--drain", type=float, default=15.0)
    p.add_argument("--timeout", type=float, default=180.0, help="bound on any one wait, seconds")
    args = p.parse_args(argv)
    if args.quick:
        args.tp_batches, args.seconds, args.down, args.step_seconds = 8, 10.0, 5.0, 5.0
        args.max_rate = min(args.max_rate, args.rate * 4)
    # SIGTERM unwinds like Ctrl-C, so every finally (processes, namespaces) runs; Ctrl-C works even when
    # started in the background by a shell that ignores SIGINT for its jobs.
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    print(f"fleet_bench: {machine_note()}", flush=True)
    out = []
    if args.only in (None, "throughput"):
        out += throughput(args)
    if args.only in (None, "simulation", "infra"):
        if os.geteuid() != 0:
            raise SystemExit("the simulation needs root (network namespaces, /dev/net/tun)")
        out += infra(args) if args.only == "infra" else simulation(args)
    print("\n== fleet_bench figures ==")
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
