"""purged as a real process: the notify protocol on a test NOTIFY_SOCKET (READY after bind and replay,
RELOADING/READY on SIGHUP, STOPPING and EXTEND_TIMEOUT_USEC on SIGTERM), SIGHUP adding and removing nodes and
an invalid config, SIGTERM draining under load and exiting 0 with the rest replayed at the next start.

Every process is started here and stopped by its PID; every directory is pytest's tmp_path.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import trio
import yaml
from stub_edge import StubEdge, serve_stub_edge

from purged.core.engine import Engine
from purged.core.topology import DatacenterSpec, TierSpec, Topology
from purged.net.journal import Journal

ROOT = Path(__file__).resolve().parent.parent
PYTHON = str(ROOT / ".venv" / "bin" / "python") if (ROOT / ".venv" / "bin" / "python").exists() else sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(path: Path, nodes: list[list[str]], http_port: int, state_dir: Path | None, **extra) -> Path:
    """One data centre ``a``; ``nodes`` is a list of tiers."""
    cfg = {
        "listen": {"http": f"127.0.0.1:{http_port}"},
        "state_dir": str(state_dir) if state_dir else None,
        "datacenters": {"a": {"tiers": [{"name": f"t{i}", "nodes": t} for i, t in enumerate(nodes)]}},
        "sender": {"connect_timeout": 0.5, "retry_initial": 0.05, "retry_max": 0.5},
    }
    cfg.update(extra)
    path.write_text(yaml.safe_dump(cfg))
    return path


class PurgedProcess:
    """``python -m purged --config FILE`` with its output in a file; stopped by PID."""

    def __init__(self, config: Path, port: int, workdir: Path, notify: str | None = None):
        self.config, self.port, self.workdir = config, port, workdir
        env = dict(os.environ)
        for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
            env.pop(name, None)
        if notify:
            env["NOTIFY_SOCKET"] = notify
        self.log_path = workdir / f"purged-{time.monotonic_ns()}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in wait()
        self.proc = subprocess.Popen(
            [PYTHON, "-m", "purged", "--config", str(config)],
            cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
        )
        self.url = f"http://127.0.0.1:{port}"

    def wait_listening(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"purged exited {self.proc.returncode}:\n{self.output()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.02)
        raise TimeoutError(f"purged did not listen on {self.port}:\n{self.output()}")

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.wait(10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.wait(10)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")


class Notifications:
    """A datagram socket standing in for systemd's NOTIFY_SOCKET."""

    def __init__(self, path: Path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.seen: list[str] = []

    def expect(self, key: str, timeout: float = 20.0) -> str:
        """The next datagram holding ``key`` (datagrams before it are kept in ``seen``)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {key} notification; got {self.seen}")
            self.sock.settimeout(left)
            try:
                msg = self.sock.recv(4096).decode()
            except TimeoutError:
                continue
            self.seen.append(msg)
            if key in msg.split("\n") or any(line.startswith(key) for line in msg.split("\n")):
                return msg

    def close(self) -> None:
        self.sock.close()


def prefill(state_dir: Path, nodes: list[str], count: int) -> None:
    """A journal holding ``count`` pending purges for ``nodes`` (one tier), as a crashed purged leaves it."""
    async def main():
        engine = Engine(Topology([DatacenterSpec("a", (), (TierSpec("t0", 0.0, tuple(nodes)),))]),
                        now=trio.current_time())
        journal = Journal(state_dir)
        journal.open(engine)
        engine.submit([f"h.test/pre/{i}" for i in range(count)], trio.current_time())
        await journal.flush(final=True)
        journal.release()

    trio.run(main)


def metric(text: str, prefix: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(prefix):
            total += float(line.rsplit(" ", 1)[1])
    return total


# -- notify, reload, stop ----------------------------------------------------------------------------------------


def test_notify_ready_after_replay_then_reload_then_stop(tmp_path):
    state = tmp_path / "state"
    dead = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]  # nothing listens: backlog stays
    prefill(state, dead, 5000)
    port = free_port()
    config = write_config(tmp_path / "purged.yaml", [dead], port, state, shutdown_timeout=1.0)
    notify = Notifications(tmp_path / "notify")
    purged = PurgedProcess(config, port, tmp_path, notify=str(notify.path))
    try:
        ready = notify.expect("READY=1")
        assert "STATUS=2 nodes" in ready
        # At READY the API is bound and the journal replayed: the backlog is there at once.
        health = httpx.get(purged.url + "/healthz", timeout=5).json()
        assert {n: s["backlog"] for n, s in health["nodes"].items()} == {dead[0]: 5000, dead[1]: 5000}

        # SIGHUP: one node removed (its backlog dropped and counted), one added (starts at the head).
        added = f"127.0.0.1:{free_port()}"
        write_config(config, [[dead[0], added]], port, state, shutdown_timeout=1.0)
        purged.signal(signal.SIGHUP)
        reloading = notify.expect("RELOADING=1")
        usec = int(next(x for x in reloading.split("\n") if x.startswith("MONOTONIC_USEC="))[15:])
        assert abs(usec / 1e6 - time.clock_gettime(time.CLOCK_MONOTONIC)) < 30
        notify.expect("READY=1")
        health = httpx.get(purged.url + "/healthz", timeout=5).json()
        assert {n: s["backlog"] for n, s in health["nodes"].items()} == {dead[0]: 5000, added: 0}
        text = httpx.get(purged.url + "/metrics", timeout=5).text
        removed = f'purged_node_dropped_total{{dc="a",layer="t0",node="{dead[1]}",reason="node_removed"}}'
        assert metric(text, removed) == 5000
        assert metric(text, 'purged_config_reloads_total{result="ok"}') == 1

        # An invalid config: every error logged, the running config kept.
        config.write_text(config.read_text().replace("shutdown_timeout: 1.0", "shutdown_timeout: -3\nbogus: 1"))
        purged.signal(signal.SIGHUP)
        notify.expect("RELOADING=1")
        notify.expect("READY=1")
        health = httpx.get(purged.url + "/healthz", timeout=5).json()
        assert set(health["nodes"]) == {dead[0], added}
        text = httpx.get(purged.url + "/metrics", timeout=5).text
        assert metric(text, 'purged_config_reloads_total{result="error"}') == 1

        purged.signal(signal.SIGTERM)
        notify.expect("STOPPING=1")
        extend = notify.expect("EXTEND_TIMEOUT_USEC")
        assert int(extend.split("=", 1)[1]) >= 1_000_000
        assert purged.wait(15) == 0
        out = purged.output()
        assert "shutdown_timeout: must be >= 0" in out and "bogus: unknown key" in out
        assert "keeping the running configuration" in out
    finally:
        purged.kill()
        notify.close()
    # What the removed node owed is gone from the journal too; the rest is replayed.
    j = Journal(state)

    async def replayed():
        engine = Engine(Topology([DatacenterSpec("a", (), (TierSpec("t0", 0.0, (dead[0], added)),))]),
                        now=trio.current_time())
        j.open(engine)
        j.release()
        return engine.backlog(dead[0]), engine.backlog(added)

    assert trio.run(replayed) == (5000, 0)


def test_sigterm_with_a_journal_checkpoints_at_once_then_the_rest_is_replayed(tmp_path):
    edge = StubEdge(latency=0.0)
    state = tmp_path / "state"
    port = free_port()
    accepted: set[str] = set()

    async def main():
        async with trio.open_nursery() as nursery:
            edge_port = await nursery.start(serve_stub_edge, edge)
            node = f"127.0.0.1:{edge_port}"
            # 200 purges/s at most to the node: 5000 purges would take 25 s to drain, within shutdown_timeout.
            config = write_config(tmp_path / "purged.yaml", [[node]], port, state, shutdown_timeout=30)
            cfg = yaml.safe_load(config.read_text())
            cfg["datacenters"]["a"]["rate"] = 200
            config.write_text(yaml.safe_dump(cfg))
            purged = PurgedProcess(config, port, tmp_path)
            try:
                await trio.to_thread.run_sync(purged.wait_listening)
                async with httpx.AsyncClient(base_url=purged.url, timeout=10) as client:
                    for b in range(5):
                        urls = [f"http://h.test/drain/{b}/{i}" for i in range(1000)]
                        r = await client.post("/v1/purge", json={"urls": urls})
                        assert r.status_code == 202
                        accepted.update(u[len("http://h.test"):] for u in urls)
                with trio.fail_after(20):  # delivery under way; a fixed sleep is not enough on a loaded machine
                    while not edge.answered:
                        await trio.sleep(0.02)
                t0 = time.monotonic()
                purged.signal(signal.SIGTERM)
                code = await trio.to_thread.run_sync(purged.wait, 25)
                took = time.monotonic() - t0
                assert code == 0, purged.output()
                # With a healthy journal the purges still owed are safe on disk: a short grace for answers on
                # the wire and a final checkpoint, not a drain of 25 s (issue 11 #10). Generous for a loaded
                # machine, still well short of the drain.
                assert took < 15, took
                delivered_first = {r.path for r in edge.answered}
                assert 0 < len(delivered_first) < len(accepted)
                assert "the journal holds them for the next start" in purged.output()
                # Restart (unpaced): what was left is replayed and delivered.
                del cfg["datacenters"]["a"]["rate"]
                config.write_text(yaml.safe_dump(cfg))
                purged = PurgedProcess(config, port, tmp_path)
                await trio.to_thread.run_sync(purged.wait_listening)
                with trio.fail_after(60):
                    while not accepted <= {r.path for r in edge.answered}:
                        await trio.sleep(0.1)
                resent = len(edge.answered) - len(accepted)
                assert resent < 300, resent  # at-least-once: only what was in flight at the checkpoint
            finally:
                await trio.to_thread.run_sync(purged.stop)
            nursery.cancel_scope.cancel()

    trio.run(main)


# -- reload in process: delivery across it ----------------------------------------------------------------------


async def test_reload_adds_and_removes_senders_without_resending(tmp_path):
    from daemon_helpers import config_for, running_daemon

    from purged.config import parse_config

    edges = [StubEdge() for _ in range(3)]
    async with trio.open_nursery() as nursery:
        ports = [await nursery.start(serve_stub_edge, e) for e in edges]
        a, b, c = (f"127.0.0.1:{p}" for p in ports)
        async with running_daemon(config_for({"a": [[a, b]]}, state_dir=str(tmp_path))) as (service, client):
            r = await client.post("/v1/purge", json={"urls": [f"http://h.test/one/{i}" for i in range(300)]})
            assert r.status_code == 202
            with trio.fail_after(10):
                while service.backlog():
                    await trio.sleep(0.02)
            await service.reload(parse_config(config_for({"a": [[a, c]]}, state_dir=str(tmp_path))))
            assert set(service.senders) == {a, c}
            r = await client.post("/v1/purge", json={"urls": [f"http://h.test/two/{i}" for i in range(300)]})
            assert r.status_code == 202
            with trio.fail_after(10):
                while service.backlog():
                    await trio.sleep(0.02)
        nursery.cancel_scope.cancel()
    paths = [[r.path for r in e.answered] for e in edges]
    assert sorted(paths[0]) == sorted([f"/one/{i}" for i in range(300)] + [f"/two/{i}" for i in range(300)])
    assert sorted(paths[1]) == sorted(f"/one/{i}" for i in range(300))  # removed: nothing after
    assert sorted(paths[2]) == sorted(f"/two/{i}" for i in range(300))  # added: only what came after


def test_config_new_keys_and_their_errors():
    from purged.config import ConfigError, parse_config

    base = {"datacenters": {"a": {"tiers": [{"nodes": ["127.0.0.1:1"]}]}}}
    cfg = parse_config(base)
    assert cfg.state_dir == "/var/lib/purged" and cfg.durability == "fsync"
    cfg = parse_config({**base, "state_dir": None, "durability": "batch",
                        "journal": {"segment_bytes": 1 << 20, "sync_interval": 0.05, "checkpoint_interval": 2}})
    assert cfg.state_dir is None and cfg.durability == "batch" and cfg.journal.segment_bytes == 1 << 20
    with pytest.raises(ConfigError) as err:
        parse_config({**base, "state_dir": "", "durability": "always", "journal": {"segment_bytes": 10, "x": 1}})
    text = "\n".join(err.value.errors)
    for needle in ("state_dir: expected a non-empty string", "durability: expected one of fsync, batch, none",
                   "journal.segment_bytes: must be >= 65536", "journal.x: unknown key"):
        assert needle in text, text


async def test_watchdog_pings_stop_while_the_loop_is_blocked(tmp_path, monkeypatch):
    from daemon_helpers import config_for, running_daemon

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    monkeypatch.setenv("WATCHDOG_USEC", "200000")  # a ping every 0.1 s
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    pings: list[float] = []

    async def collect():
        while True:
            await trio.lowlevel.wait_readable(sock)
            while True:
                try:
                    msg = sock.recv(4096)
                except BlockingIOError:
                    break
                if msg == b"WATCHDOG=1":
                    pings.append(time.monotonic())

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(collect)
            async with running_daemon(config_for({"a": [["127.0.0.1:9"]]}, state_dir=str(tmp_path / "s"))):
                await trio.sleep(0.5)
                blocked_at = time.monotonic()
                time.sleep(1.0)  # the whole trio loop is stuck: no task runs, the watchdog included
                await trio.sleep(0.5)
            nursery.cancel_scope.cancel()
    finally:
        sock.close()
    before = [t for t in pings if t < blocked_at]
    after = [t for t in pings if t > blocked_at]
    assert len(before) >= 3 and after
    assert after[0] - blocked_at >= 0.95  # nothing while blocked: systemd would kill us past WatchdogSec
    assert max(b - a for a, b in zip(before, before[1:], strict=False)) < 0.5
