"""The edges the sender benchmarks purge: real ``varnishd`` nodes with a PURGE VCL, and their purge counters.

Each ``varnishd`` runs in the foreground with its own ``-n`` work dir (a ``tempfile.mkdtemp()``), is stopped by
its PID and has its dir removed; it listens only where the caller says (loopback, or a 198.18.0.0/15 namespace
of ``netns_delay.py``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time

from common import free_port, stop_process, tree_cpu_seconds, wait_listening

VARNISHD = shutil.which("varnishd") or "/usr/sbin/varnishd"
VARNISHSTAT = shutil.which("varnishstat") or "/usr/bin/varnishstat"

PURGE_VCL = """vcl 4.1;
# Bench VCL: no backend; PURGE purges, everything else is a synthetic 404.
backend default none;
sub vcl_recv {
    if (req.method == "PURGE") {
        return (purge);
    }
    return (synth(404));
}
"""


class Varnish:
    """One ``varnishd -F`` with its own ``-n`` work dir (a mkdtemp dir) and the PURGE VCL.

    ``netns``: run it inside that network namespace (``ip netns exec``); the VSM files still live in the
    work dir on the shared file system, so ``varnishstat -n`` works from anywhere.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, netns: str | None = None,
                 extra_params: tuple[str, ...] = ()):
        self.host = host
        self.port = port or free_port(host)
        self.netns = netns
        self.extra_params = extra_params
        self.tmp: str | None = None
        self.proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def workdir(self) -> str:
        assert self.tmp is not None
        return os.path.join(self.tmp, "n")

    def start(self) -> Varnish:
        self.tmp = tempfile.mkdtemp(prefix="purged-bench-varnish-")
        vcl = os.path.join(self.tmp, "purge.vcl")
        with open(vcl, "w") as f:
            f.write(PURGE_VCL)
        cmd = [
            VARNISHD, "-F", "-j", "none", "-n", self.workdir,
            "-a", f"{self.host}:{self.port}", "-T", "127.0.0.1:0", "-s", "malloc,64m", "-f", vcl,
            # Few threads: with pipelining each connection is served by one worker thread anyway.
            "-p", "thread_pools=1", "-p", "thread_pool_min=20", "-p", "thread_pool_max=200",
        ]
        for p in self.extra_params:
            cmd += ["-p", p]
        if self.netns:
            cmd = ["ip", "netns", "exec", self.netns, *cmd]  # ip execs varnishd: same PID
        self._log = open(os.path.join(self.tmp, "varnishd.log"), "wb")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            if self.netns:
                self._wait_netns_listening()
            else:
                wait_listening(self.host, self.port, proc=self.proc)
            # The counters appear a moment after the listener.
            deadline = time.monotonic() + 10
            while True:
                try:
                    self.n_purges()
                    break
                except (RuntimeError, ValueError, KeyError, subprocess.TimeoutExpired):
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.1)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_netns_listening(self) -> None:
        # From outside the namespace we cannot connect; wait for the VSM counters and the listen log line.
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"varnishd exited ({self.proc.returncode}): {self.log_tail()}")
            try:
                self.n_purges()
                return
            except (RuntimeError, ValueError, KeyError, subprocess.TimeoutExpired):
                time.sleep(0.1)
        raise TimeoutError("varnishd did not come up")

    def log_tail(self) -> str:
        try:
            with open(os.path.join(self.tmp, "varnishd.log"), "rb") as f:
                return f.read()[-2000:].decode(errors="replace")
        except OSError:
            return ""

    def counters(self, *names: str) -> dict[str, int]:
        cmd = [VARNISHSTAT, "-n", self.workdir, "-1", "-j"]
        for n in names:
            cmd += ["-f", n]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        if r.returncode != 0:
            raise RuntimeError(f"varnishstat failed: {r.stderr.strip()}")
        data = json.loads(r.stdout)
        counters = data.get("counters", data)  # varnish >= 6.5 nests them under "counters"
        return {k: int(v["value"]) for k, v in counters.items() if isinstance(v, dict) and "value" in v}

    def n_purges(self) -> int:
        return self.counters("MAIN.n_purges")["MAIN.n_purges"]

    def cpu_seconds(self) -> float:
        return tree_cpu_seconds(self.proc.pid)

    def stop(self) -> None:
        stop_process(self.proc)
        if getattr(self, "_log", None):
            self._log.close()
        if self.tmp:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None

    def __enter__(self) -> Varnish:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class PurgeSampler:
    """A thread polling every node's ``MAIN.n_purges`` (one ``varnishstat`` each, ~2.5 ms CPU) every
    ``interval`` s until each delta reached ``target`` or ``timeout`` passed. ``reached_at``: the
    ``time.monotonic()`` of the first poll that saw every node at its target (None if none did)."""

    def __init__(self, varnishes: list[Varnish], target: int, *, interval: float = 0.05, timeout: float = 300.0):
        import threading

        self.varnishes, self.target, self.interval, self.timeout = varnishes, target, interval, timeout
        self.before = [v.n_purges() for v in varnishes]
        self.samples: list[tuple[float, list[int]]] = []
        self.reached_at: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.error: BaseException | None = None

    def start(self) -> PurgeSampler:
        self._thread.start()
        return self

    def _run(self) -> None:
        deadline = time.monotonic() + self.timeout
        try:
            while not self._stop.is_set() and time.monotonic() < deadline:
                deltas = [v.n_purges() - b for v, b in zip(self.varnishes, self.before, strict=True)]
                now = time.monotonic()
                self.samples.append((now, deltas))
                if all(d >= self.target for d in deltas):
                    self.reached_at = now
                    return
                self._stop.wait(self.interval)
        except BaseException as exc:  # reported by join()
            self.error = exc

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the target (bounded by the sampler's own timeout); True if every node reached it."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            self._stop.set()
            self._thread.join(5)
        if self.error is not None:
            raise self.error
        return self.reached_at is not None

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def deltas(self) -> list[int]:
        return self.samples[-1][1] if self.samples else [0] * len(self.varnishes)

    def steady_rate(self, lo: float = 0.1, hi: float = 0.9) -> float:
        """PURGE/s (all nodes together) between the polls that first saw lo and hi of the total target."""
        total = self.target * len(self.varnishes)
        first = next(((t, sum(d)) for t, d in self.samples if sum(d) >= lo * total), None)
        last = next(((t, sum(d)) for t, d in self.samples if sum(d) >= hi * total), None)
        if first is None or last is None or last[0] <= first[0]:
            return float("nan")
        return (last[1] - first[1]) / (last[0] - first[0])


def wait_purges(varnishes: list[Varnish], targets: list[int], timeout: float, interval: float = 0.2) -> bool:
    """Poll until every Varnish's n_purges reached its target (bounded); True if they did."""
    deadline = time.monotonic() + timeout
    while True:
        if all(v.n_purges() >= t for v, t in zip(varnishes, targets, strict=True)):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
