"""The pieces ``fleet_bench.py`` drives: purged daemons on a bus, the edge stubs, the paced poster, statistics.

Every process is started here (from the main thread, so ``PR_SET_PDEATHSIG`` ties it to this process) and
stopped by its PID; every wait is bounded. Posting and reading status happen inside a DC's namespace via
``in_netns`` on the calling thread (each daemon's API listens on 127.0.0.1 of its own namespace).
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

from common import PYTHON, ROOT, cpu_seconds, purged_config, stop_process
from netns_delay import in_netns
from netns_topology import die_with_parent

BENCH = Path(__file__).resolve().parent
READY = re.compile(r"purged ready: http [^\s]*:(\d+)")


def ns_context(netns: str | None):
    return in_netns(netns) if netns else nullcontext()


# -- purged on a bus ------------------------------------------------------------------------------------------------


def fleet_config(name: str, nodes: list[str], servers: list[str] | None, *, state_dir: str, replicas: int,
                 stream: str = "PURGED", window: int = 128, connections: int = 1) -> str:
    """One daemon of the fleet: common.purged_config (one DC named after the daemon, one tier holding ``nodes``)
    plus its name and the bus (none if ``servers`` is None: a daemon alone)."""
    config = purged_config(nodes, window=window, connections=connections, dc=name, state_dir=state_dir)
    if servers is None:
        return config
    return config + "\n".join([
        f"name: {json.dumps(name)}",
        "bus:",
        "  nats:",
        "    servers: [" + ", ".join(json.dumps(s) for s in servers) + "]",
        f"    stream: {stream}",
        f"    replicas: {int(replicas)}",
    ]) + "\n"


class FleetDaemon:
    """``purged --config`` for one fleet member, in namespace ``netns`` (or here). Its state dir outlives a
    :meth:`kill`, so :meth:`start` again is the same daemon coming back (same name, same consumer)."""

    def __init__(self, name: str, nodes: list[str], servers: list[str] | None, *, netns: str | None = None,
                 replicas: int = 3, window: int = 128, connections: int = 1):
        self.name, self.netns = name, netns
        self.tmp = tempfile.mkdtemp(prefix=f"purged-fleet-{name}-")
        self.config = os.path.join(self.tmp, "purged.yaml")
        with open(self.config, "w") as f:
            f.write(fleet_config(name, nodes, servers, state_dir=os.path.join(self.tmp, "state"),
                                 replicas=replicas, window=window, connections=connections))
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None
        self.starts = 0
        self._cpu_before_kill = 0.0  # CPU of earlier incarnations, so cpu_seconds() spans restarts

    @property
    def log_path(self) -> str:
        return os.path.join(self.tmp, f"purged.{self.starts}.log")

    def start(self, timeout: float = 30.0) -> FleetDaemon:
        self.starts += 1
        cmd = [PYTHON, "-m", "purged", "--config", self.config, "--log-level", "info"]
        if self.netns:
            cmd = ["ip", "netns", "exec", self.netns, *cmd]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        src = os.environ.get("PURGED_BENCH_SRC")
        if src:
            env["PYTHONPATH"] = src
        log = open(self.log_path, "wb")  # noqa: SIM115 - the child holds it
        try:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=env, cwd=src or str(ROOT), preexec_fn=die_with_parent)
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while True:
            m = READY.search(self.log_text())
            if m:
                self.port = int(m.group(1))
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"purged {self.name} exited ({self.proc.returncode}): {self.log_text()[-3000:]}")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"purged {self.name} did not report ready: {self.log_text()[-3000:]}")
            time.sleep(0.05)

    def log_text(self) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def cpu_seconds(self) -> float:
        live = cpu_seconds(self.proc.pid) if self.proc is not None and self.proc.poll() is None else 0.0
        return self._cpu_before_kill + live

    def kill(self) -> None:
        """SIGKILL (by PID): a crash, no chance to checkpoint or say goodbye to NATS."""
        if self.proc is not None and self.proc.poll() is None:
            self._cpu_before_kill += cpu_seconds(self.proc.pid)
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        stop_process(self.proc)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)

    # -- its API (called from any thread; enters the daemon's namespace for the call) --

    def request(self, method: str, path: str, body: bytes | None = None, timeout: float = 60.0) -> tuple[int, dict]:
        with ns_context(self.netns):
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
            try:
                headers = {"Content-Type": "application/json"} if body is not None else {}
                conn.request(method, path, body=body, headers=headers)
                r = conn.getresponse()
                data = r.read()
            finally:
                conn.close()
        try:
            return r.status, json.loads(data or b"{}")
        except ValueError:
            return r.status, {"raw": data[:200].decode(errors="replace")}

    def wait_bus(self, timeout: float = 60.0) -> None:
        """Wait (bounded) until ``/healthz`` says the bus is connected with its stream and consumer set up: a
        daemon reports ready before that, and answers 503 ``bus_unavailable`` to purges meanwhile."""
        deadline = time.monotonic() + timeout
        state = None
        while time.monotonic() < deadline:
            try:
                _, body = self.request("GET", "/healthz", timeout=5)
                state = (body.get("bus") or {}).get("state")
            except OSError as exc:
                state = str(exc)
            if state == "connected":
                return
            time.sleep(0.1)
        raise TimeoutError(f"{self.name}: bus not set up after {timeout}s (state {state})")

    def fleet(self) -> dict:
        status, body = self.request("GET", "/v1/fleet", timeout=10)
        if status != 200:
            raise RuntimeError(f"GET /v1/fleet on {self.name}: {status} {body}")
        return body


def fleet_lags(view: dict) -> dict[str, dict]:
    """``GET /v1/fleet``'s daemons as ``{name: {"lag": int|None, ...}}``, whether it lists or maps them."""
    daemons = view.get("daemons", view)
    if isinstance(daemons, list):
        daemons = {d.get("name"): d for d in daemons}
    return {name: d for name, d in daemons.items() if isinstance(d, dict)}


# -- the edge stubs -------------------------------------------------------------------------------------------------


class EdgeStubs:
    """``fleet_edges.py`` serving ``ports`` ports on ``host`` (in ``netns``); :meth:`stats` asks it for counters."""

    def __init__(self, host: str, ports: int, *, netns: str | None = None, base_port: int = 0):
        cmd = [PYTHON, str(BENCH / "fleet_edges.py"), "--host", host, "--ports", str(ports),
               "--base-port", str(base_port)]
        if netns:
            cmd = ["ip", "netns", "exec", netns, *cmd]
        self.host = host
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     preexec_fn=die_with_parent)
        line = self.proc.stdout.readline().split()
        if not line or line[0] != "ready":
            stop_process(self.proc)
            raise RuntimeError(f"edge stub did not start: {line}")
        self.ports = [int(p) for p in line[1].split(",")]
        self._lock = threading.Lock()

    @property
    def nodes(self) -> list[str]:
        return [f"{self.host}:{p}" for p in self.ports]

    def stats(self) -> dict:
        with self._lock:
            self.proc.stdin.write("stats\n")
            self.proc.stdin.flush()
            return json.loads(self.proc.stdout.readline())

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                pass
        stop_process(self.proc)


# -- the paced poster -----------------------------------------------------------------------------------------------


@dataclass
class Posted:
    group: str  # the stub's group key: /fb/<run>/<batch>
    urls: int
    daemon: str
    sent: float  # monotonic, request written
    acked: float  # monotonic, 2xx read
    id: str | None


@dataclass
class PostLog:
    posted: list[Posted] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    behind_max: float = 0.0  # worst lateness of a post against its schedule, s
    lock: threading.Lock = field(default_factory=threading.Lock)


def batch_body(run: str, batch: int, urls: int) -> tuple[str, bytes]:
    group = f"/fb/{run}/b{batch}"
    body = json.dumps({"urls": [f"http://en.wikipedia.org{group}/{i}" for i in range(urls)]}).encode()
    return group, body


def post_paced(daemons: list[FleetDaemon], run: str, rate: float, batch_urls: int, seconds: float,
               log: PostLog, *, first_batch: int = 0, stop: threading.Event | None = None,
               per_daemon: int = 3) -> int:
    """Post ``rate`` URLs/s for ``seconds`` in batches of ``batch_urls``, round robin over ``daemons``, on a
    fixed schedule by ``per_daemon`` threads per daemon (open loop: a slow 2xx delays the offered rate only
    once that many posts to one daemon are outstanding). Returns how many batches were scheduled."""
    interval = batch_urls / rate
    total = max(1, int(seconds / interval))
    t0 = time.monotonic() + 0.2
    stop = stop or threading.Event()
    n = len(daemons)

    def worker(k: int, j: int) -> None:
        daemon = daemons[k]
        for b in range(k + j * n, total, n * per_daemon):
            if stop.is_set():
                return
            due = t0 + b * interval
            delay = due - time.monotonic()
            if delay > 0:
                stop.wait(delay)
            group, body = batch_body(run, first_batch + b, batch_urls)
            sent = time.monotonic()
            try:
                status, reply = daemon.request("POST", "/v1/purge", body)
            except OSError as exc:
                with log.lock:
                    log.errors.append(f"{daemon.name}: {exc}")
                continue
            acked = time.monotonic()
            with log.lock:
                log.behind_max = max(log.behind_max, sent - due)
                if status in (200, 201, 202) and reply.get("accepted") == batch_urls:
                    log.posted.append(Posted(group, batch_urls, daemon.name, sent, acked, reply.get("id")))
                else:
                    log.errors.append(f"{daemon.name}: {status} {reply}")

    threads = [threading.Thread(target=worker, args=(k, j), daemon=True) for k in range(n) for j in range(per_daemon)]
    for t in threads:
        t.start()
    deadline = t0 + seconds + 120
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    stop.set()
    return total


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, from /proc/stat (every process, ours or not)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    from common import CLK_TCK

    return (sum(fields) - idle) / CLK_TCK, sum(fields) / CLK_TCK


# -- statistics ----------------------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); NaN for no values."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(round(q / 100 * len(s) + 0.5)) - 1))
    return s[k]


def latencies(posted: list[Posted], groups: dict[str, list], nodes: int) -> tuple[list[float], int]:
    """Per posted batch, last arrival at this DC's stubs minus its 2xx (complete batches only); and how many
    batches were incomplete (some node lacked some URL)."""
    out, incomplete = [], 0
    for p in posted:
        g = groups.get(p.group)
        if g is None or g[0] < p.urls * nodes:
            incomplete += 1
            continue
        out.append(g[1] - p.acked)
    return out, incomplete


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True))
    sep = "  ".join("-" * w for w in widths)
    body = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(["  " + line, "  " + sep, *("  " + b for b in body)])


def cores_note(cores: dict[str, float]) -> str:
    """"daemons 0.61, stubs 0.10, ... of 2" (cores each kind used; machine: every process, others' too)."""
    return ", ".join(f"{k} {v:.2f}" for k, v in cores.items()) + f" of {os.cpu_count()} cores"


def ms(x: float) -> str:
    return "n/a" if x != x else f"{x * 1000:,.0f}"


def errors_note(errors: list[str]) -> str:
    return f" (first: {errors[0][:300]})" if errors else ""


def sec(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1f}"
