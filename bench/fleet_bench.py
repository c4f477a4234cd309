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

from common import Varnish, machine_note, median  # noqa: E402
from fleet_harness import (  # noqa: E402
    EdgeStubs,
    FleetDaemon,
    PostLog,
    batch_body,
    fleet_lags,
    latencies,
    machine_busy,
    percentile,
    post_paced,
    table,
)
from fleet_nats import NatsCluster  # noqa: E402
from netns_topology import Topology  # noqa: E402


def cores_note(cores: dict[str, float]) -> str:
    """"daemons 0.61, stubs 0.10, ... of 2" (cores each kind used; machine: every process, others' too)."""
    return ", ".join(f"{k} {v:.2f}" for k, v in cores.items()) + f" of {os.cpu_count()} cores"


def ms(x: float) -> str:
    return "n/a" if x != x else f"{x * 1000:,.0f}"


def errors_note(errors: list[str]) -> str:
    return f" (first: {errors[0][:300]})" if errors else ""


def sec(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1f}"


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


class Fleet:
    """The simulated fleet inside a topology: NATS, and per DC stubs + Varnish + one daemon."""

    def __init__(self, topo: Topology, args, *, bus: bool = True):
        self.topo, self.args, self.bus = topo, args, bus
        n = len(topo)
        self.nats_dcs = sorted({round(i * n / 3) for i in range(3)})
        self.nats = NatsCluster([(topo.netns[i], topo.addr[i]) for i in self.nats_dcs])
        self.stubs: list[EdgeStubs] = []
        self.varnish: list[Varnish] = []
        self.daemons: list[FleetDaemon] = []
        self.idle = [0.0] * n  # cores each daemon uses with nothing to do (measured by simulation())

    def __enter__(self) -> Fleet:
        try:
            self.nats.__enter__()
            for ns, addr in zip(self.topo.netns, self.topo.addr, strict=True):
                self.stubs.append(EdgeStubs(addr, self.args.nodes, netns=ns, base_port=10000))
                self.varnish.append(Varnish(addr, 6081, netns=ns).start())
            for i in range(len(self.topo)):
                local = [u for j, u in zip(self.nats_dcs, self.nats.urls, strict=True) if j == i]
                servers = local + [u for u in self.nats.urls if u not in local]
                nodes = [*self.stubs[i].nodes, self.varnish[i].address]
                d = FleetDaemon(f"dc{i}", nodes, servers if self.bus else None, netns=self.topo.netns[i], replicas=3,
                                window=self.args.window, connections=1)
                self.daemons.append(d.start(timeout=60))
            for d in self.daemons:
                if self.bus:
                    d.wait_bus()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for d in self.daemons:
            d.cleanup()
        for v in self.varnish:
            v.stop()
        for s in self.stubs:
            s.stop()
        self.nats.stop()

    def stats(self) -> list[dict]:
        return [s.stats() for s in self.stubs]

    def cpu(self) -> dict[str, float]:
        """CPU seconds so far of each kind of process we run, and of the whole machine (others' load too)."""
        from common import cpu_seconds

        out = {
            "daemons": sum(d.cpu_seconds() for d in self.daemons),
            "stubs": sum(s.cpu_seconds() for s in self.stubs),
            "varnish": sum(v.cpu_seconds() for v in self.varnish),
            "nats": sum(cpu_seconds(pid) for pid in self.nats.pids() if os.path.exists(f"/proc/{pid}")),
            "hub": self.topo.hub_cpu_seconds(),
            "bench": cpu_seconds(os.getpid()),  # the poster and the polls
        }
        out["machine"], _ = machine_busy()
        return out

    def wait_idle(self, timeout: float) -> bool:
        """Wait (bounded) until every daemon's lag is 0 in ``GET /v1/fleet``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            lags = fleet_lags(self.daemons[0].fleet())
            if lags and all(d.get("lag") == 0 for d in lags.values()):
                return True
            time.sleep(0.25)
        return False

    def wait_complete(self, posted, dcs: list[int], timeout: float) -> dict[int, float]:
        """Poll every DC's stub until each posted batch is at each of its nodes; when each DC got there."""
        need = {p.group: p.urls * self.args.nodes for p in posted}
        done: dict[int, float] = {}
        deadline = time.monotonic() + timeout
        while len(done) < len(dcs) and time.monotonic() < deadline:
            for i in dcs:
                if i in done:
                    continue
                groups = self.stubs[i].stats()["groups"]
                if all(groups.get(g, (0,))[0] >= n for g, n in need.items()):
                    done[i] = time.monotonic()
            time.sleep(0.25)
        return done


def steady(fleet: Fleet, run: str, rate: float, batch: int, seconds: float, drain: float) -> dict:
    daemons = fleet.daemons
    v0 = [v.n_purges() for v in fleet.varnish]
    s0 = [s["total"] for s in fleet.stats()]
    cpu0 = [d.cpu_seconds() for d in daemons]
    parts0 = fleet.cpu()
    log = PostLog()
    t0 = time.monotonic()
    post_paced(daemons, run, rate, batch, seconds, log)
    t_post = time.monotonic()
    done = fleet.wait_complete(log.posted, list(range(len(daemons))), drain)
    t_end = time.monotonic()
    cpu1 = [d.cpu_seconds() for d in daemons]
    parts = {k: (v - parts0[k]) / (t_end - t0) for k, v in fleet.cpu().items()}
    stats = fleet.stats()
    v1 = [v.n_purges() for v in fleet.varnish]
    per_dc = []
    for i, d in enumerate(daemons):
        lat, incomplete = latencies(log.posted, stats[i]["groups"], fleet.args.nodes)
        purges = (stats[i]["total"] - s0[i]) + (v1[i] - v0[i])
        per_dc.append({"name": d.name, "lat": lat, "incomplete": incomplete, "purges": purges,
                       "varnish": v1[i] - v0[i], "cpu": cpu1[i] - cpu0[i], "complete": i in done})
    posts = [p.acked - p.sent for p in log.posted]
    return {"per_dc": per_dc, "posted": log.posted, "errors": log.errors, "behind": log.behind_max,
            "post_lat": posts, "elapsed": t_end - t0, "posting": t_post - t0, "cores": parts,
            "urls": sum(p.urls for p in log.posted)}


def steady_rows(fleet: Fleet, r: dict) -> list[list[str]]:
    rows = []
    for i, dc in enumerate(r["per_dc"]):
        posts = [p.acked - p.sent for p in r["posted"] if p.daemon == dc["name"]]
        rows.append([
            dc["name"], "yes" if i in fleet.nats_dcs else "", f"{fleet.args.nodes}+1",
            ms(percentile(posts, 50)), ms(percentile(posts, 99)),
            ms(percentile(dc["lat"], 50)), ms(percentile(dc["lat"], 99)), ms(max(dc["lat"], default=float("nan"))),
            f"{len(dc['lat'])}/{len(r['posted'])}", f"{dc['purges']:,}",
            f"{dc['cpu'] / dc['purges'] * 1e6:.1f}" if dc["purges"] else "n/a",
            f"{(dc['cpu'] - fleet.idle[i] * r['elapsed']) / dc['purges'] * 1e6:.1f}" if dc["purges"] else "n/a",
            f"{dc['cpu'] / r['elapsed']:.2f}",
        ])
    return rows


STEADY_HEADERS = ["DC", "NATS", "nodes", "2xx p50 ms", "2xx p99 ms", "last node p50 ms", "p99 ms", "max ms",
                  "batches at all nodes", "PURGEs", "us CPU/PURGE", "net of idle", "cores"]


def catch_up(fleet: Fleet, run: str, rate: float, batch: int, down: float, timeout: float) -> dict:
    victim_i = len(fleet.daemons) - 1
    victim = fleet.daemons[victim_i]
    others = [d for d in fleet.daemons if d is not victim]
    observer = others[0]
    log, stop = PostLog(), threading.Event()
    t_kill = time.monotonic()
    victim.kill()
    poster = threading.Thread(target=post_paced, args=(others, run, rate, batch, down, log),
                              kwargs={"stop": stop}, daemon=True)
    poster.start()
    poster.join(down + 130)
    stop.set()
    # A batch posted while it was down: does the fleet say so? (done false, the victim not done)
    status_down = None
    if log.posted and log.posted[-1].id:
        _, body = observer.request("GET", f"/v1/purge/{log.posted[-1].id}")
        status_down = (body.get("done"), ((body.get("daemons") or {}).get(victim.name) or {}).get("done"))
    lag_before = fleet_lags(observer.fleet()).get(victim.name, {}).get("lag")
    t_restart = time.monotonic()
    victim.start(timeout=60)
    victim.wait_bus()
    t_ready = time.monotonic()
    t_lag0 = None
    deadline = t_restart + timeout
    while time.monotonic() < deadline:
        lag = fleet_lags(observer.fleet()).get(victim.name, {}).get("lag")
        if lag == 0:
            t_lag0 = time.monotonic()
            break
        time.sleep(0.1)
    done = fleet.wait_complete(log.posted, [victim_i], max(1.0, deadline - time.monotonic()))
    return {"victim": victim.name, "down": t_restart - t_kill, "urls": sum(p.urls for p in log.posted),
            "lag_before": lag_before, "ready": t_ready - t_restart, "status_down": status_down,
            "lag0": None if t_lag0 is None else t_lag0 - t_restart,
            "stubs": done[victim_i] - t_restart if victim_i in done else None, "errors": log.errors}


def max_rate(fleet: Fleet, run: str, args) -> tuple[float, list[str]]:
    """Double the rate from ``--rate`` until a step fails, then bisect twice between the last good and the
    failed rate. Before each step the fleet drains (every daemon's lag 0, bounded) so steps do not mix."""
    best, lines, rate, step, failed = 0.0, [], args.rate, 0, None
    while rate <= args.max_rate and step < 12:
        fleet.wait_idle(args.timeout)
        batch = max(args.batch, int(rate / 5))
        r = steady(fleet, f"{run}s{step}", rate, batch, args.step_seconds, args.drain)
        p99 = max((percentile(dc["lat"], 99) for dc in r["per_dc"]), default=float("nan"))
        ok = (all(dc["complete"] for dc in r["per_dc"]) and not r["errors"] and r["behind"] < 1.0
              and p99 == p99 and p99 <= args.slo)
        us = sum(dc["cpu"] for dc in r["per_dc"]) / max(1, sum(dc["purges"] for dc in r["per_dc"])) * 1e6
        lines.append(f"  {rate:>7,.0f} URLs/s ({rate * (args.nodes + 1) * len(fleet.daemons):>9,.0f} PURGE/s in "
                     f"all; batches of {batch}): worst DC p99 {ms(p99)} ms, posting late by up to "
                     f"{r['behind'] * 1000:,.0f} ms, {us:.1f} us CPU/PURGE in daemons; cores: {cores_note(r['cores'])}; "
                     f"{len(r['errors'])} post errors{errors_note(r['errors'])} -> {'ok' if ok else 'FAILED'}")
        print(lines[-1], flush=True)
        step += 1
        if ok:
            best = rate
        else:
            failed = rate
        if failed is None:
            rate *= 2
        elif failed - best <= max(args.rate / 2, best * 0.2) or step >= 12:
            break
        else:
            rate = round((best + failed) / 2)
    return best, lines


def simulation(args) -> list[str]:
    out: list[str] = []

    def say(*lines: str) -> None:
        out.extend(lines)
        print("\n".join(lines), flush=True)

    with Topology(dcs=args.dcs, link_ms=args.link_ms) as topo, Fleet(topo, args) as fleet:
        say(f"simulation: {args.dcs} DCs (namespaces), star with {args.link_ms:g} ms spokes = "
                   f"{4 * args.link_ms:g} ms DC-to-DC RTT; NATS servers in "
                   f"{', '.join(f'dc{i}' for i in fleet.nats_dcs)} (stream replicas 3); per DC one daemon "
                   f"purging {args.nodes} stub nodes + 1 varnishd")
        where = {f"n{k}": f"dc{i}" for k, i in enumerate(fleet.nats_dcs)}
        leader = fleet.nats.stream_leader("PURGED")
        clients = fleet.nats.clients()
        say(f"  stream leader {leader} (in {where.get(leader)}); each daemon's NATS connection (nats-py "
                   f"picks a server of its list at random): " + ", ".join(
                       f"{d.name}->{where.get(clients.get(f'purged {d.name}'), '?')}" for d in fleet.daemons))
        run = f"sim{os.getpid()}x{int(time.time())}"
        warm = steady(fleet, run + "w", 10, 1, 1.0, 60)  # connections up, consumers created, caches warm
        if not all(dc["complete"] for dc in warm["per_dc"]):
            raise RuntimeError(f"warm-up batches did not reach every node within 60 s{errors_note(warm['errors'])}")
        if warm["errors"]:
            print(f"warm-up: {len(warm['errors'])} post errors{errors_note(warm['errors'])}", flush=True)
        idle_s = 3.0 if args.quick else 10.0
        c0 = [d.cpu_seconds() for d in fleet.daemons]
        time.sleep(idle_s)
        idle = [(d.cpu_seconds() - a) / idle_s for d, a in zip(fleet.daemons, c0, strict=True)]
        say(f"idle: each daemon uses {median(idle):.3f} cores with nothing to purge (median over "
                   f"{idle_s:g} s: the bus's pulls and heartbeats, timers)")
        fleet.idle = idle
        r = steady(fleet, run + "a", args.rate, args.batch, args.seconds, args.drain)
        say(f"steady: {args.rate:g} URLs/s for {args.seconds:g} s in batches of {args.batch} "
                   f"({args.rate * (args.nodes + 1) * args.dcs:,.0f} PURGE/s in all), {len(r['posted'])} batches "
                   f"posted round robin; {len(r['errors'])} post errors{errors_note(r['errors'])}; posting late "
                   f"by up to {r['behind'] * 1000:,.0f} ms")
        say(table(STEADY_HEADERS, steady_rows(fleet, r)))
        total_cpu = sum(dc["cpu"] for dc in r["per_dc"])
        total_purges = sum(dc["purges"] for dc in r["per_dc"])
        say(f"  all daemons: {total_cpu / total_purges * 1e6:.1f} us CPU per PURGE "
                   f"(median per daemon {median([dc['cpu'] / dc['purges'] * 1e6 for dc in r['per_dc']]):.1f}); "
                   f"cores used while it ran: {cores_note(r['cores'])}")
        c = catch_up(fleet, run + "c", args.rate, args.batch, args.down, args.timeout)
        sd = c["status_down"] or ("n/a", "n/a")
        say(f"catch-up: {c['victim']} SIGKILLed, down {c['down']:.1f} s while {c['urls']:,} URLs were posted "
                   f"to the others (its lag then: {c['lag_before']} messages; a batch posted meanwhile, asked on "
                   f"another daemon: done={sd[0]}, {c['victim']} done={sd[1]}); restarted: ready in "
                   f"{c['ready']:.1f} s, lag 0 after {sec(c['lag0'])} s, every URL at its {args.nodes} stubs "
                   f"after {sec(c['stubs'])} s; {len(c['errors'])} post errors{errors_note(c['errors'])}")
        best, lines = max_rate(fleet, run, args)
        say(f"most URLs/s sustained (steps of {args.step_seconds:g} s, p99 <= {args.slo:g} s, all "
                   f"delivered within {args.drain:g} s): {best:,.0f} URLs/s = "
                   f"{best * (args.nodes + 1) * args.dcs:,.0f} PURGE/s in all")
        out.extend(lines)
    say(f"  hub: {', '.join(f'{k} {v}' for k, v in (topo.stats or {}).items() if k != 'packets_by_pair')}")
    return out


def infra(args) -> list[str]:
    """The simulation's set-up without the bus: each DC's daemon gets its own batch only. Checks the pieces
    (namespaces, hub, NATS spread over three DCs, stubs, Varnish, daemons) and gives the local baseline."""
    out = []
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
            lat, incomplete = latencies(log.posted, fleet.stubs[i].stats()["groups"], args.nodes)
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
