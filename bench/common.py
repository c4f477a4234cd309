"""Shared helpers for the sender benchmarks: a purged subprocess, processes and their CPU time, statistics
(the Varnish nodes they purge are :mod:`edges`).

Everything started here is stopped by its PID and every work directory is a ``tempfile.mkdtemp()`` of our own,
removed on stop. Nothing here sends traffic anywhere but the addresses the caller gives (loopback, or the
198.18.0.0/15 namespaces of ``netns_delay.py``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV_PYTHON = ROOT / ".venv" / "bin" / "python"
PYTHON = str(VENV_PYTHON) if VENV_PYTHON.exists() else sys.executable
CLK_TCK = os.sysconf("SC_CLK_TCK")

def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_listening(host: str, port: int, timeout: float = 15.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"process {proc.pid} exited ({proc.returncode}) before listening on {port}") from None
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s") from None
            time.sleep(0.05)


def stop_process(proc: subprocess.Popen | None, timeout: float = 10.0) -> None:
    """SIGTERM the process (by PID), then SIGKILL after ``timeout``; reap it."""
    if proc is None or proc.poll() is not None:
        return
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout)
    except ProcessLookupError:
        pass


# -- /proc --------------------------------------------------------------------------------------------------------


def cpu_times(pid: int) -> tuple[float, float]:
    """(utime, stime) of one process (all its threads), in seconds, from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        data = f.read()
    fields = data[data.rindex(")") + 2 :].split()  # the comm field may hold spaces; skip past it
    return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK  # fields 14 and 15 of proc(5)


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process, in seconds."""
    return sum(cpu_times(pid))


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of ``pid`` and its direct children (varnishd's manager + its cache worker)."""
    total = cpu_seconds(pid)
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            children = [int(c) for c in f.read().split()]
    except OSError:
        children = []
    for child in children:
        try:
            total += cpu_seconds(child)
        except OSError:
            pass
    return total


# -- varnishd -----------------------------------------------------------------------------------------------------


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    """A process's resident set (``VmRSS``) or its peak (``VmHWM``), in KiB, from /proc."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def metric(text: str, name: str) -> float:
    """The sum of a metric's samples over all its label sets, in a /metrics text."""
    return sum(float(m.group(1)) for m in re.finditer(rf"^{re.escape(name)}(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, re.M))


# -- purged -------------------------------------------------------------------------------------------------------


def purged_config(nodes: list[str], *, window: int = 64, connections: int = 2, listen: str = "127.0.0.1:0",
                  dc: str = "bench", state_dir: str | None = None, max_window: int | None = None) -> str:
    """A YAML config: one data centre, one tier holding ``nodes`` (no tier gates), the given sender settings.
    No journal unless ``state_dir`` is given (the daemon's default, /var/lib/purged, is never used here)."""
    lines = [
        f"state_dir: {json.dumps(state_dir)}",
        "listen:",
        f'  http: "{listen}"',
        "datacenters:",
        f"  {dc}:",
        "    tiers:",
        "      - name: frontend",
        "        nodes: [" + ", ".join(f'"{n}"' for n in nodes) + "]",
        "sender:",
        f"  window: {int(window)}",
        f"  connections: {int(connections)}",
        *([f"  max_window: {int(max_window)}"] if max_window is not None else []),  # None: the daemon's default
        "  timeout: 30",
        "limits:",
        "  max_urls_per_batch: 100000",
        "  max_wait: 120",
        "  client_rate: 0  # benchmarks post as fast as they can: no per-client rate, no pending ceilings",
        "  max_pending: 0",
        "  max_pending_bytes: 0",
        "shutdown_timeout: 2",
    ]
    return "\n".join(lines) + "\n"


class Purged:
    """``purged --config FILE`` as a subprocess; its API port is read from the "purged ready" log line."""

    READY = re.compile(r"purged ready: http [^\s]*:(\d+)")

    def __init__(self, nodes: list[str], *, window: int = 64, connections: int = 2, netns: str | None = None,
                 env: dict[str, str] | None = None, python_args: tuple[str, ...] = (), journal: bool = False,
                 max_window: int | None = None):
        self.nodes = nodes
        self.window, self.connections, self.max_window = window, connections, max_window
        self.netns = netns
        self.env = env
        self.python_args = tuple(python_args)  # e.g. ("-m", "cProfile", "-o", FILE) to profile it
        self.journal = journal  # True: a journal in our temp dir, with the daemon's default durability
        self.tmp: str | None = None
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None

    def start(self, timeout: float = 20.0) -> Purged:
        self.tmp = tempfile.mkdtemp(prefix="purged-bench-daemon-")
        cfg = os.path.join(self.tmp, "purged.yaml")
        with open(cfg, "w") as f:
            f.write(purged_config(self.nodes, window=self.window, connections=self.connections,
                                  max_window=self.max_window,
                                  state_dir=os.path.join(self.tmp, "state") if self.journal else None))
        cmd = [PYTHON, *self.python_args, "-m", "purged", "--config", cfg, "--log-level", "info"]
        if self.netns:
            cmd = ["ip", "netns", "exec", self.netns, *cmd]
        env = dict(os.environ, PYTHONUNBUFFERED="1", **(self.env or {}))
        # PURGED_BENCH_SRC=DIR runs the purged package found in DIR (e.g. a `git archive` of one commit) instead
        # of the working tree, so that edits made meanwhile do not change a long run half-way.
        src = os.environ.get("PURGED_BENCH_SRC")
        if src:
            env["PYTHONPATH"] = src
        self._log_path = os.path.join(self.tmp, "purged.log")
        self._log = open(self._log_path, "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=env, cwd=src or str(ROOT))  # python -m puts the cwd first
        deadline = time.monotonic() + timeout
        try:
            while True:
                m = self.READY.search(self.log_text())
                if m:
                    self.port = int(m.group(1))
                    return self
                if self.proc.poll() is not None:
                    raise RuntimeError(f"purged exited ({self.proc.returncode}): {self.log_text()[-2000:]}")
                if time.monotonic() > deadline:
                    raise TimeoutError("purged did not report ready")
                time.sleep(0.05)
        except BaseException:
            self.stop()
            raise

    def log_text(self) -> str:
        try:
            with open(self._log_path, "rb") as f:
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cpu_seconds(self) -> float:
        return cpu_seconds(self.proc.pid)

    def stop(self, timeout: float = 10.0) -> None:
        stop_process(self.proc, timeout)
        if getattr(self, "_log", None):
            self._log.close()
        if self.tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None

    def __enter__(self) -> Purged:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# -- the poster: POST /v1/purge batches (urllib: one keep-alive-less request per batch is plenty) -----------------


def parse_setting(text: str) -> tuple[int, int, int | None]:
    """``WINDOWxCONNECTIONS`` or ``WINDOWxCONNECTIONS:MAX_WINDOW`` (the adaptive window's cap per connection;
    without it the daemon's default applies, and a purged older than issue 15 has a fixed window)."""
    head, _, cap = text.lower().partition(":")
    window, connections = (int(x) for x in head.split("x"))
    return window, connections, int(cap) if cap else None


def make_urls(n: int, prefix: str, host: str = "en.wikipedia.org") -> list[str]:
    return [f"http://{host}/wiki/{prefix}_{i}?action=raw" for i in range(n)]


def post_batch(base_url: str, urls: list[str], timeout: float = 60.0) -> dict:
    body = json.dumps({"urls": urls}).encode()
    req = urllib.request.Request(f"{base_url}/v1/purge", data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        reply = json.loads(r.read())
    if reply.get("accepted") != len(urls):
        raise RuntimeError(f"purged accepted {reply.get('accepted')} of {len(urls)}: {reply}")
    return reply


def wait_batch(base_url: str, batch_id: str, timeout: float) -> bool:
    """Long-poll ``GET /v1/purge/{id}?wait=`` until the batch is done on every node (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        wait = max(0.1, min(left, 60.0))
        with urllib.request.urlopen(f"{base_url}/v1/purge/{batch_id}?wait={wait:.3f}", timeout=wait + 10) as r:
            if json.loads(r.read()).get("done"):
                return True


# -- figures ------------------------------------------------------------------------------------------------------


def fmt_repeats(values: list[float], fmt: str = "{:,.0f}") -> str:
    """"a, b, c (median m)"."""
    if not values:
        return "n/a"
    return ", ".join(fmt.format(v) for v in values) + f"  (median {fmt.format(statistics.median(values))})"


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def machine_note() -> str:
    load = os.getloadavg()
    src = os.environ.get("PURGED_BENCH_SRC") or "the working tree"
    return f"{os.cpu_count()} CPUs, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; purged from {src}"
