"""Real Varnish edge nodes for integration tests and the demo.

``VarnishNode`` runs one ``varnishd -F`` (manager and worker child) on a loopback port with
``conf/varnish-demo.vcl``, plus one ``varnishncsa`` that writes every PURGE it serves to a file,
so that a test can ask which purges reached the node, with their Host header, URL and arrival time.

    node = VarnishNode(tmp_path / "edge1")
    node.start()                  # ~0.2-0.5 s; start_all(nodes) starts several at once
    httpx.request("PURGE", f"{node.url}/wiki/Foo", headers={"Host": "en.wikipedia.org"})
    node.n_purges()               # 1  (MAIN.n_purges of the running varnishd)
    node.purges()                 # [Purge(time=1.7e9, host='en.wikipedia.org', url='/wiki/Foo')]
    node.restart()                # same port; node.kill() is the hard variant of node.stop()

All methods are synchronous and thread-safe enough for one caller at a time; from trio, call
the slow ones (start, stop, restart, kill, purges, wait_for_purges) through
``trio.to_thread.run_sync``.

How purges are recorded. Varnish writes each transaction to its shared-memory log (VSL), a ring
of ``vsl_space`` bytes that a slow reader can fall behind by at most that much. A
``varnishncsa`` started with the node tails it from the moment it attaches (``start()`` returns
only after a marker request has shown up in its output, so nothing sent after ``start()`` is
missed) and writes one line per PURGE: ``Timestamp:Start`` (wall-clock epoch, microseconds),
status, Host, URL. ``purges()`` first waits until the file holds as many executed purges as the
exact ``MAIN.n_purges`` counter says (Varnish bumps it under a lock, not in batched per-thread
stats), so a purge the node answered is never missing from the list; a reader that overran
raises ``VarnishError`` instead of returning a short list. ``stop()`` and ``kill()`` freeze the
node with SIGSTOP first and read the log up to the last request it processed, so the record of a
stopped node is exact as well. The record survives restarts (one file per run).

Processes are handled by PID only: varnishd runs in its own process group (manager and child), the
reader in another, and teardown signals exactly those. Running as root, varnishd's default jail
switches to the ``varnish``/``vcache`` users, which cannot read pytest's 0700 temporary
directories; ``-j none`` keeps everything as the calling user.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from edge_node import EdgeNode
from procgroup import _freeze, _pgroup_members, _terminate
from varnish_log import _LOG_FORMAT, _LOG_QUERY, SYNC_PATH, Purge, _PurgeFile

REPO = Path(__file__).resolve().parent.parent


class VarnishError(RuntimeError):
    pass

DEMO_VCL = REPO / "conf" / "varnish-demo.vcl"


def _which(name: str) -> str:
    found = shutil.which(name, path=os.environ.get("PATH", "") + os.pathsep + "/usr/sbin:/usr/bin")
    return found or name


VARNISHD = _which("varnishd")
VARNISHADM = _which("varnishadm")
VARNISHSTAT = _which("varnishstat")
VARNISHNCSA = _which("varnishncsa")


#: ``-p`` settings for a small, fast-starting node. Override or extend them per node.
DEFAULT_PARAMS: dict[str, str] = {
    # One pool of 10 threads instead of 2 pools of 100 threads each: starts faster, enough for tests.
    "thread_pools": "1",
    "thread_pool_min": "10",
    # A dead child stays dead: stop() and kill() end the child themselves, and a test that kills a
    # node expects it to stay down until restart().
    "auto_restart": "off",
    # The log ring (a file in the work dir): the reader may lag this far behind, ~40k purges.
    "vsl_space": "32M",
    # Leave out log records nobody reads here (the default mask plus these), ~1/3 less to log and parse.
    "vsl_mask": "-RespHeader,-RespProtocol,-RespReason,-Storage,-Filters,-ReqAcct,-VCL_use",
}

#: Compiled VCL, keyed by a hash of the generated C and the compiler command. varnishd spends ~90 %
#: of its start-up in gcc (-O2 -g, ~0.4 s CPU): a node starts in 0.2-0.4 s with it, 1-1.7 s without.
CC_CACHE = Path(tempfile.gettempdir()) / f"purged-varnish-vcl-{os.getuid()}"
# cc_command runs under /bin/sh -c; %s/%o are the C source/shared object, %D the stock compiler command.
_CACHING_CC_COMMAND = (
    "k=$({ echo '%D'; cat %s; } | sha256sum | cut -c1-64); c=\"CACHE/$k.so\"; "
    'if [ -f "$c" ]; then cp "$c" %o; else (%D) && cp %o "$c.$$" && mv "$c.$$" "$c"; fi'
)

class VarnishNode(EdgeNode):
    """One varnishd edge node on ``host``:``port`` (port 0: an ephemeral port, kept across restarts)."""

    error = VarnishError

    def __init__(
        self,
        workdir: str | os.PathLike[str],
        *,
        vcl: str | os.PathLike[str] = DEMO_VCL,
        host: str = "127.0.0.1",
        port: int = 0,
        storage: str = "malloc,32m",
        params: Mapping[str, str] | None = None,
        name: str | None = None,
        netns: str | None = None,
    ) -> None:
        self.workdir = Path(workdir).resolve()
        self.netns = netns  # run varnishd (and varnishadm) inside this network namespace (tests/netns.py)
        self.vcl = Path(vcl).resolve()
        self.host = host
        self._port = port
        self.storage = storage
        self.params = {**DEFAULT_PARAMS, **(params or {})}
        if "cc_command" not in self.params:
            CC_CACHE.mkdir(mode=0o700, exist_ok=True)
            self.params["cc_command"] = _CACHING_CC_COMMAND.replace("CACHE", str(CC_CACHE))
        self.name = name or self.workdir.name
        self.instance_dir = self.workdir / "varnishd"  # varnishd -n: VSM, compiled VCL, _.secret
        self.generation = -1  # how many times start() ran, minus one
        self.start_seconds: float | None = None  # how long the last start() took
        self._proc: subprocess.Popen[bytes] | None = None
        self._reader: subprocess.Popen[bytes] | None = None
        self._files: list[_PurgeFile] = []
        self._out_path = self.workdir / "varnishd.0.out"
        self._reader_err = self.workdir / "varnishncsa.0.err"
        self._spawned_at = 0.0

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self, timeout: float = 20.0) -> VarnishNode:
        """Start varnishd and its log reader; return once both serve. Returns self."""
        self.spawn()
        self.wait_ready(timeout)
        return self

    def spawn(self) -> None:
        """First half of start(): launch varnishd without waiting (see start_all)."""
        if self.running:
            raise VarnishError(f"{self.name}: already running")
        self._cleanup()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.generation += 1
        log = self.workdir / f"purges.{self.generation}.log"
        log.unlink(missing_ok=True)  # left by an earlier VarnishNode in the same work dir
        self._files.append(_PurgeFile(log))
        argv = [
            VARNISHD,
            "-F",  # foreground: the manager is our child process
            "-j", "none",  # no privilege separation (see module docstring)
            "-n", str(self.instance_dir),
            "-a", f"{self.host}:{self._port}",
            "-T", "127.0.0.1:0",  # management CLI for varnishadm, on an ephemeral port
            "-f", str(self.vcl),
            "-s", self.storage,
        ]  # fmt: skip
        for key, value in self.params.items():
            argv += ["-p", f"{key}={value}"]
        if self.netns:  # `ip netns exec` execs varnishd: the PID (and process group) stay varnishd's
            argv = ["ip", "netns", "exec", self.netns, *argv]
        self._out_path = self.workdir / f"varnishd.{self.generation}.out"
        self._spawned_at = time.monotonic()
        with open(self._out_path, "wb") as out:
            self._proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # own process group: manager + child, signalled as one
                cwd=self.workdir,
            )
        self._track(True)

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Second half of start(): wait for the child, learn the port, attach the log reader."""
        deadline = time.monotonic() + timeout
        try:
            self._wait_child_launched(deadline)
            if not self._port:
                self._port = self._listen_port()
            self._start_reader()
            self._wait_marker(deadline)
        except BaseException:
            self.kill(sync=False)
            raise
        self.start_seconds = time.monotonic() - self._spawned_at

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the node; every purge it answered is in purges() afterwards.

        Freezes varnishd (SIGSTOP), lets the log reader catch up with MAIN.n_purges, ends the
        reader, SIGKILLs the worker child (so nothing is served after the last logged request),
        then SIGTERMs the manager, which reaps the child and exits (SIGKILL after ``timeout``).
        """
        self._shutdown(hard=False, sync=True, timeout=timeout)

    def kill(self, sync: bool = True) -> None:
        """Hard stop, like a crash or ``kill -9``: SIGKILL for the worker child, then the manager.

        With ``sync`` (the default) the node is frozen first and its log read to the end, as in
        stop(), so purges() stays exact. The manager is let run just long enough to reap the child
        (else init inherits it and reaps it only after ~1 s here).
        """
        self._shutdown(hard=True, sync=sync, timeout=5.0)

    def restart(self, *, hard: bool = False, timeout: float = 20.0) -> VarnishNode:
        """Stop (or with ``hard``, kill) and start again on the same port."""
        if hard:
            self.kill()
        else:
            self.stop()
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self.start(timeout=max(1.0, deadline - time.monotonic()))
            except VarnishError as exc:
                # Only a port still (or suddenly) in use by someone else is worth a retry.
                if "in use" not in str(exc) or time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    # -- observations --------------------------------------------------------------------------

    def stats(self, *names: str) -> dict[str, int]:
        """Counters of the running varnishd, e.g. stats("MAIN.n_purges", "MAIN.client_req")."""
        if not self.running:
            raise VarnishError(f"{self.name}: not running")
        argv = [VARNISHSTAT, "-n", str(self.instance_dir), "-1", "-j"]
        for name in names:
            argv += ["-f", name]
        res = subprocess.run(argv, capture_output=True, timeout=10)
        if res.returncode != 0:
            raise VarnishError(f"{self.name}: varnishstat failed: {res.stderr.decode(errors='replace')}")
        counters = json.loads(res.stdout)["counters"]
        return {name: int(c["value"]) for name, c in counters.items() if "value" in c}

    def n_purges(self) -> int:
        """MAIN.n_purges: purges executed by the running varnishd (restarts reset it to 0)."""
        return self.stats("MAIN.n_purges")["MAIN.n_purges"]

    def purges(self, timeout: float = 10.0) -> list[Purge]:
        """Every PURGE this node executed (answered 200), in all its runs, in arrival order."""
        if self.running:
            self._sync(timeout)
        for f in self._files:
            f.refresh()
        return sorted((p for f in self._files for p in f.purges), key=lambda p: p.time)

    def wait_for_purges(self, count: int, timeout: float = 10.0) -> list[Purge]:
        """Wait until purges() holds at least ``count`` entries; return them all."""
        deadline = time.monotonic() + timeout
        while True:
            for f in self._files:
                f.refresh()
            have = sum(len(f.purges) for f in self._files)
            if have >= count:
                return self.purges(timeout=max(1.0, deadline - time.monotonic()))
            if time.monotonic() > deadline:
                raise VarnishError(f"{self.name}: {have} purges after {timeout} s, wanted {count}")
            time.sleep(0.02)

    def log_tail(self, lines: int = 20) -> str:
        """The end of varnishd's own output (for error messages)."""
        try:
            text = self._out_path.read_text(errors="replace")
        except (AttributeError, OSError):
            return ""
        return "\n".join(text.splitlines()[-lines:])

    # -- internals -----------------------------------------------------------------------------

    def _wait_child_launched(self, deadline: float) -> None:
        assert self._proc is not None
        while True:
            text = self._out_path.read_bytes()
            if b"Child launched OK" in text:
                return
            if self._proc.poll() is not None or time.monotonic() > deadline:
                out = text.decode(errors="replace").strip()
                what = "exited" if self._proc.poll() is not None else "did not start in time"
                if "Address already in use" in out:
                    what += " (address in use)"
                raise VarnishError(f"{self.name}: varnishd {what} on {self.host}:{self._port}:\n{out}")
            time.sleep(0.005)

    def _adm(self, *args: str) -> str:
        argv = [VARNISHADM, "-n", str(self.instance_dir), "-t", "5", *args]
        if self.netns:  # -T listens on the namespace's own 127.0.0.1
            argv = ["ip", "netns", "exec", self.netns, *argv]
        res = subprocess.run(argv, capture_output=True, timeout=10)
        if res.returncode != 0:
            raise VarnishError(f"{self.name}: varnishadm {' '.join(args)}: {res.stdout!r} {res.stderr!r}")
        return res.stdout.decode()

    def _listen_port(self) -> int:
        # "a0 127.0.0.1 41234" per listen address
        for line in self._adm("debug.listen_address").splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[2].isdigit():
                return int(parts[2])
        raise VarnishError(f"{self.name}: no listen address reported")

    def _start_reader(self) -> None:
        f = self._files[-1]
        self._reader_err = self.workdir / f"varnishncsa.{self.generation}.err"
        argv = [
            VARNISHNCSA,
            "-n", str(self.instance_dir),
            "-t", "10",  # seconds to retry attaching to the shared memory
            "-q", _LOG_QUERY,  # only PURGEs and our marker requests
            "-F", _LOG_FORMAT,
            "-w", str(f.path),  # flushed whenever the reader is idle, and on exit
        ]  # fmt: skip
        with open(self._reader_err, "wb") as err:
            self._reader = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                start_new_session=True,  # not frozen with varnishd's group
                cwd=self.workdir,
            )

    def _wait_marker(self, deadline: float) -> None:
        """Send marker requests until one shows up in the reader's file: port up, reader attached."""
        f = self._files[-1]
        attempt = 0
        while True:
            attempt += 1
            target = f"{SYNC_PATH}?g{self.generation}a{attempt}"
            with contextlib.suppress(OSError):
                with socket.create_connection((self.host, self._port), timeout=2) as s:
                    s.sendall(
                        f"HEAD {target} HTTP/1.1\r\nHost: varnish-fixture\r\nConnection: close\r\n\r\n".encode()
                    )
                    while s.recv(4096):
                        pass
            poll_until = time.monotonic() + 0.05
            while time.monotonic() < poll_until:
                f.refresh()
                if f.markers:
                    return
                if self._reader is not None and self._reader.poll() is not None:
                    raise VarnishError(f"{self.name}: varnishncsa exited: {self._reader_stderr()}")
                time.sleep(0.005)
            if time.monotonic() > deadline:
                raise VarnishError(f"{self.name}: log reader did not see the marker request in time")

    def _reader_stderr(self) -> str:
        try:
            return self._reader_err.read_text(errors="replace").strip()
        except (AttributeError, OSError):
            return ""

    def _logged_count(self) -> int:
        f = self._files[-1]
        f.refresh()
        return len(f.purges)

    def _sync(self, timeout: float) -> None:
        """Wait until the reader's file holds every purge MAIN.n_purges counts (node running)."""
        target = self.n_purges()
        deadline = time.monotonic() + timeout
        backfill_at = time.monotonic() + 1.0
        while self._logged_count() < target:
            if time.monotonic() > deadline:
                raise self._lag_error(target)
            if time.monotonic() > backfill_at:
                # The reader attaches only after the port is up: a client that was already retrying (a
                # daemon under test) can get purges in before it. Those are still in the shared memory
                # log: read it from its head once.
                backfill_at = float("inf")
                self._backfill()
            time.sleep(0.005)

    def _backfill(self) -> None:
        argv = [VARNISHNCSA, "-n", str(self.instance_dir), "-t", "5", "-d", "-q", _LOG_QUERY, "-F", _LOG_FORMAT]
        out = subprocess.run(argv, capture_output=True, timeout=30, stdin=subprocess.DEVNULL)
        self._files[-1].backfill(out.stdout)

    def _lag_error(self, target: int) -> VarnishError:
        return VarnishError(
            f"{self.name}: log reader has {self._logged_count()} of {target} purges"
            f" (overrun? raise vsl_space); varnishncsa said: {self._reader_stderr()!r}"
        )

    def _frozen_sync(self, pgid: int, timeout: float) -> None:
        """With the group stopped: wait for the reader to hold every counted purge.

        A worker frozen between counting a purge and flushing its log records would keep the
        file one short forever, so on a slow catch-up the node runs for a few ms now and then.
        """
        deadline = time.monotonic() + timeout
        nudge_at = time.monotonic() + 0.05
        target = self.n_purges()
        while self._logged_count() < target:
            now = time.monotonic()
            if now > deadline:
                raise self._lag_error(target)
            if now > nudge_at:
                os.killpg(pgid, signal.SIGCONT)
                time.sleep(0.005)
                _freeze(pgid)
                target = self.n_purges()
                nudge_at = time.monotonic() + 0.05
            time.sleep(0.005)

    def _shutdown(self, *, hard: bool, sync: bool, timeout: float) -> None:
        proc = self._proc
        error: BaseException | None = None
        if proc is not None and proc.poll() is None:
            pgid = proc.pid  # start_new_session: the group is the manager's PID, held while unreaped
            _freeze(pgid)
            if sync and self._reader is not None and self._reader.poll() is None:
                try:
                    self._frozen_sync(pgid, timeout=5.0)
                except (VarnishError, subprocess.SubprocessError, OSError, ValueError) as exc:
                    error = exc
            if self._reader is not None:
                _terminate(self._reader, 5.0)
            # Kill the worker child while all is frozen: nothing is served after the last logged
            # request. Then let the manager run so that it reaps the child (auto_restart=off: no
            # new one) rather than orphan it to init, which here reaps only after ~1 s.
            for pid in _pgroup_members(pgid):
                if pid != pgid:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
            if hard:
                os.killpg(pgid, signal.SIGCONT)
                reaped_by = time.monotonic() + 1.0
                while (
                    _pgroup_members(pgid, zombies=False) not in ([pgid], []) and time.monotonic() < reaped_by
                ):
                    time.sleep(0.002)
                os.killpg(pgid, signal.SIGKILL)
            else:
                os.kill(pgid, signal.SIGTERM)
                os.killpg(pgid, signal.SIGCONT)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(pgid, signal.SIGKILL)
                proc.wait()
            # Anything left (a child orphaned after all) is gone before we return: port closed.
            # Zombies hold nothing and init reaps them (here after ~1 s); the group's ID cannot be
            # reused while any member exists, so signalling it stays safe.
            gone_by = time.monotonic() + 5.0
            while (left := _pgroup_members(pgid, zombies=False)) and time.monotonic() < gone_by:
                for pid in left:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                time.sleep(0.01)
        else:
            if self._reader is not None:
                _terminate(self._reader, 5.0)
            if proc is not None:
                # The manager died on its own (someone else killed it): end a child it left behind.
                for pid in _pgroup_members(proc.pid):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
        self._cleanup()
        for f in self._files:
            f.refresh()
        if error is not None:
            raise error

    def _cleanup(self) -> None:
        if self._reader is not None and self._reader.poll() is None:
            _terminate(self._reader, 5.0)
        self._reader = None
        if self._proc is not None and self._proc.poll() is not None:
            self._proc = None
        if self._proc is None:
            self._track(False)


def start_all(nodes: Iterable[VarnishNode], timeout: float = 30.0) -> list[VarnishNode]:
    """Start several nodes concurrently (their VCL compiles overlap); on failure stop them all."""
    nodes = list(nodes)
    try:
        for node in nodes:
            node.spawn()
        if nodes:
            with ThreadPoolExecutor(len(nodes)) as pool:
                for future in [pool.submit(node.wait_ready, timeout) for node in nodes]:
                    future.result()
    except BaseException:
        stop_all(nodes)
        raise
    return nodes


def stop_all(nodes: Iterable[VarnishNode]) -> list[BaseException]:
    """Stop every node (concurrently), even if some fail; return the errors (empty if none)."""
    nodes = list(nodes)
    if not nodes:
        return []
    with ThreadPoolExecutor(len(nodes)) as pool:
        futures = [pool.submit(node.stop) for node in nodes]
    return [exc for f in futures if (exc := f.exception()) is not None]
