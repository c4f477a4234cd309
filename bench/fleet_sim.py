"""The simulated fleet inside a ``netns_topology.Topology``, and the runs ``fleet_bench.py`` makes on it.

Per DC: one ``fleet_edges.py`` stub process, and either (``hosts=1``, the per-DC shape) one daemon purging
``nodes`` stub ports and one real ``varnishd``, or (``hosts=N``, the per-host shape) N daemons, each a cache host
purging its own two stub ports (its ATS and its Varnish). NATS: 3 servers spread over three DCs. Figures are
per DC: a batch is at a DC when it is at every stub port of that DC.
"""

from __future__ import annotations

import os
import threading
import time

from common import cpu_seconds
from edges import Varnish
from fleet_harness import (
    EdgeStubs,
    FleetDaemon,
    PostLog,
    cores_note,
    errors_note,
    fleet_lags,
    latencies,
    machine_busy,
    ms,
    percentile,
    post_paced,
)
from fleet_nats import NatsCluster
from netns_topology import Topology


class Fleet:
    """NATS, and per DC the stubs, Varnish (per-DC shape) and the daemons; started and stopped together."""

    def __init__(self, topo: Topology, args, *, bus: bool = True):
        self.topo, self.args, self.bus = topo, args, bus
        n = len(topo)
        self.hosts = max(1, getattr(args, "hosts", 1))
        self.nats_dcs = sorted({round(i * n / 3) for i in range(3)})
        self.nats = NatsCluster([(topo.netns[i], topo.addr[i]) for i in self.nats_dcs])
        self.stubs: list[EdgeStubs] = []
        self.varnish: dict[int, Varnish] = {}  # by DC; the per-DC shape only
        self.daemons: list[FleetDaemon] = []
        self.dc_of: list[int] = []  # the DC of each daemon
        self.ports = args.nodes if self.hosts == 1 else 2 * self.hosts  # stub ports per DC
        self.idle = [0.0] * n  # cores a DC's daemons use with nothing to do (measured by the caller)

    @property
    def shape(self) -> str:
        if self.hosts == 1:
            return f"per DC: one daemon purging {self.ports} stub nodes + 1 varnishd"
        return f"per host: {self.hosts} daemons per DC, each purging its own 2 stub nodes"

    @property
    def nodes_per_dc(self) -> int:
        return self.ports + (1 if self.hosts == 1 else 0)

    def dc_daemons(self, i: int) -> list[FleetDaemon]:
        return [d for d, dc in zip(self.daemons, self.dc_of, strict=True) if dc == i]

    def __enter__(self) -> Fleet:
        try:
            self.nats.__enter__()
            for i, (ns, addr) in enumerate(zip(self.topo.netns, self.topo.addr, strict=True)):
                self.stubs.append(EdgeStubs(addr, self.ports, netns=ns, base_port=10000))
                if self.hosts == 1:
                    self.varnish[i] = Varnish(addr, 6081, netns=ns).start()
            for i in range(len(self.topo)):
                local = [u for j, u in zip(self.nats_dcs, self.nats.urls, strict=True) if j == i]
                servers = local + [u for u in self.nats.urls if u not in local]
                for h in range(self.hosts):
                    if self.hosts == 1:
                        name, nodes = f"dc{i}", [*self.stubs[i].nodes, self.varnish[i].address]
                    else:
                        name, nodes = f"dc{i}h{h}", self.stubs[i].nodes[2 * h : 2 * h + 2]
                    d = FleetDaemon(name, nodes, servers if self.bus else None, netns=self.topo.netns[i],
                                    replicas=3, window=self.args.window, connections=1)
                    self.daemons.append(d.start(timeout=60))
                    self.dc_of.append(i)
            if self.bus:
                for d in self.daemons:
                    d.wait_bus()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for d in self.daemons:
            d.cleanup()
        for v in self.varnish.values():
            v.stop()
        for s in self.stubs:
            s.stop()
        self.nats.stop()

    def stats(self) -> list[dict]:
        return [s.stats() for s in self.stubs]

    def varnish_purges(self) -> list[int]:
        return [self.varnish[i].n_purges() if i in self.varnish else 0 for i in range(len(self.topo))]

    def cpu(self) -> dict[str, float]:
        """CPU seconds so far of each kind of process we run, and of the whole machine (others' load too)."""
        out = {
            "daemons": sum(d.cpu_seconds() for d in self.daemons),
            "stubs": sum(s.cpu_seconds() for s in self.stubs),
            "varnish": sum(v.cpu_seconds() for v in self.varnish.values()),
            "nats": sum(cpu_seconds(pid) for pid in self.nats.pids() if os.path.exists(f"/proc/{pid}")),
            "hub": self.topo.hub_cpu_seconds(),
            "bench": cpu_seconds(os.getpid()),  # the poster and the polls
        }
        out["machine"], _ = machine_busy()
        return out

    def dc_cpu(self) -> list[float]:
        return [sum(d.cpu_seconds() for d in self.dc_daemons(i)) for i in range(len(self.topo))]

    def measure_idle(self, seconds: float) -> list[float]:
        c0 = self.dc_cpu()
        time.sleep(seconds)
        self.idle = [(b - a) / seconds for a, b in zip(c0, self.dc_cpu(), strict=True)]
        return self.idle

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
        """Poll every DC's stub until each posted batch is at each of its ports; when each DC got there."""
        need = {p.group: p.urls * self.ports for p in posted}
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
    """Post ``rate`` URLs/s for ``seconds``, wait (up to ``drain`` s) until every DC has every batch; per DC:
    latencies, PURGEs delivered, its daemons' CPU."""
    dcs = range(len(fleet.topo))
    v0, s0, cpu0 = fleet.varnish_purges(), [s["total"] for s in fleet.stats()], fleet.dc_cpu()
    parts0 = fleet.cpu()
    log = PostLog()
    t0 = time.monotonic()
    post_paced(fleet.daemons, run, rate, batch, seconds, log)
    t_post = time.monotonic()
    done = fleet.wait_complete(log.posted, list(dcs), drain)
    t_end = time.monotonic()
    cpu1 = fleet.dc_cpu()
    parts = {k: (v - parts0[k]) / (t_end - t0) for k, v in fleet.cpu().items()}
    stats, v1 = fleet.stats(), fleet.varnish_purges()
    per_dc = []
    for i in dcs:
        lat, incomplete = latencies(log.posted, stats[i]["groups"], fleet.ports)
        names = {d.name for d in fleet.dc_daemons(i)}
        per_dc.append({"name": f"dc{i}", "daemons": names, "lat": lat, "incomplete": incomplete,
                       "purges": (stats[i]["total"] - s0[i]) + (v1[i] - v0[i]), "cpu": cpu1[i] - cpu0[i],
                       "complete": i in done,
                       "post_lat": [p.acked - p.sent for p in log.posted if p.daemon in names]})
    return {"per_dc": per_dc, "posted": log.posted, "errors": log.errors, "behind": log.behind_max,
            "elapsed": t_end - t0, "posting": t_post - t0, "cores": parts,
            "urls": sum(p.urls for p in log.posted)}


def catch_up(fleet: Fleet, run: str, rate: float, batch: int, down: float, timeout: float) -> dict:
    """SIGKILL the last daemon (in the last DC, which has no NATS server), keep posting to the others for
    ``down`` s, start it again under the same name: how long until it caught up."""
    victim = fleet.daemons[-1]
    victim_dc = fleet.dc_of[-1]
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
        if fleet_lags(observer.fleet()).get(victim.name, {}).get("lag") == 0:
            t_lag0 = time.monotonic()
            break
        time.sleep(0.1)
    done = fleet.wait_complete(log.posted, [victim_dc], max(1.0, deadline - time.monotonic()))
    return {"victim": victim.name, "down": t_restart - t_kill, "urls": sum(p.urls for p in log.posted),
            "lag_before": lag_before, "ready": t_ready - t_restart, "status_down": status_down,
            "lag0": None if t_lag0 is None else t_lag0 - t_restart,
            "stubs": done[victim_dc] - t_restart if victim_dc in done else None, "errors": log.errors}


def max_rate(fleet: Fleet, run: str, args) -> tuple[float, list[str]]:
    """Double the rate from ``--rate`` until a step fails, then bisect twice between the last good and the
    failed rate. Before each step the fleet drains (every daemon's lag 0, bounded) so steps do not mix."""
    best, lines, rate, step, failed = 0.0, [], args.rate, 0, None
    per_url = fleet.nodes_per_dc * len(fleet.topo)
    while rate <= args.max_rate and step < 12:
        fleet.wait_idle(args.timeout)
        batch = max(args.batch, int(rate / 5))
        r = steady(fleet, f"{run}s{step}", rate, batch, args.step_seconds, args.drain)
        p99 = max((percentile(dc["lat"], 99) for dc in r["per_dc"]), default=float("nan"))
        ok = (all(dc["complete"] for dc in r["per_dc"]) and not r["errors"] and r["behind"] < 1.0
              and p99 == p99 and p99 <= args.slo)
        us = sum(dc["cpu"] for dc in r["per_dc"]) / max(1, sum(dc["purges"] for dc in r["per_dc"])) * 1e6
        lines.append(f"  {rate:>7,.0f} URLs/s ({rate * per_url:>9,.0f} PURGE/s in all; batches of {batch}): worst "
                     f"DC p99 {ms(p99)} ms, posting late by up to {r['behind'] * 1000:,.0f} ms, {us:.1f} us "
                     f"CPU/PURGE in daemons; cores: {cores_note(r['cores'])}; {len(r['errors'])} post errors"
                     f"{errors_note(r['errors'])} -> {'ok' if ok else 'FAILED'}")
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
