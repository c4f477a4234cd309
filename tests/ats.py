"""Real Apache Traffic Server (9.2) edge nodes for tests, and a tiny origin for them.

``AtsNode`` runs one ``traffic_server`` (no ``traffic_manager``) on 127.0.0.1 with its own run root:
config, runtime, log and cache directories under ``workdir``. Its configuration is written at each
start, in 9.2's formats (checked against the Debian package's shipped defaults in /etc/trafficserver):

- ``records.config`` (9.2 still reads ``records.config``; ``records.yaml`` is 10.x): the listening port
  in ``proxy.config.http.server_ports`` bound to 127.0.0.1 (``PORT:ip-in=127.0.0.1``), one net thread,
  ``proxy.config.admin.user_id #-1`` (stay the calling user: as root ATS otherwise switches to
  ``trafficserver`` and cannot read pytest's 0700 directories; ``root`` itself is refused),
  ``pristine_host_hdr 1`` so the log shows the Host header the client sent.
- ``ip_allow.yaml`` (9.2's YAML form): every method, PURGE included, from 127.0.0.1 only.
- ``remap.config``: ``map / http://ORIGIN/`` (every host; ``remap_required`` stays on).
- ``storage.config``: a 64 MiB sparse cache file in the node's own ``cache/`` directory.
- ``logging.yaml``: one ASCII log, ``requests.log``, a line per transaction:
  ``%<cqtq>`` (request time, epoch seconds, ms resolution), method, status, Host header, URL (path+query).

ATS answers PURGE with 200 when it held the object and 404 when it did not; both are recorded, both
count as delivered (purged treats both as success).

    node = AtsNode(tmp_path / "ats1", origin=origin.address).start()
    node.purges()        # [Request(time, "PURGE", 200, "en.wikipedia.org", "/wiki/Foo"), ...]

How the record is made exact. ATS writes log entries from its buffers at most about a second after the
transaction ends (``proxy.config.log.max_secs_per_buffer 1``), in the order transactions completed
(one net thread, one log object). ``sync()`` sends a marker request on a new connection and waits until
it shows up in the log: every request answered before the marker was sent is in the file by then.
``purges()`` and ``stop()`` sync first. ``kill()`` (SIGKILL, a crash) may lose the last unflushed second
unless ``sync`` is asked for first (the default).

Processes are handled by PID only: ``traffic_server`` runs in its own session/process group, which
teardown signals (SIGTERM, then SIGKILL); the crash-log helper it would spawn is ``/bin/true``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import NamedTuple

from edge_node import EdgeNode, LogTail
from procgroup import _pgroup_members

TRAFFIC_SERVER = shutil.which("traffic_server", path=os.environ.get("PATH", "") + ":/usr/bin:/usr/sbin") or (
    "traffic_server"
)
SYNC_PATH = "/__ats_fixture_sync__"
_LOG_FORMAT = "%<cqtq>\t%<cqhm>\t%<pssc>\t%<{Host}cqh>\t%<cquup>"


class AtsError(RuntimeError):
    pass


class Request(NamedTuple):
    """One request an ATS node logged."""

    time: float  # when the request arrived, wall clock (time.time()), millisecond resolution
    method: str
    status: int
    host: str  # the Host header ("" if none)
    url: str  # path and query as received


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class _LogFile(LogTail):
    """Incremental parser of one run's requests.log."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.requests: list[Request] = []
        self.markers: set[str] = set()

    def parse(self, data: bytes) -> None:
        for raw in data.decode("utf-8", "surrogateescape").split("\n"):
            fields = raw.split("\t", 4)
            if len(fields) != 5:
                continue
            ts, method, status, host, url = fields
            if url.startswith(SYNC_PATH):
                self.markers.add(url)
                continue
            self.requests.append(
                Request(float(ts), method, int(status) if status.isdigit() else 0, "" if host == "-" else host, url)
            )


class AtsNode(EdgeNode):
    """One traffic_server on 127.0.0.1:``port`` (0: a free port picked at the first start, kept after)."""

    error = AtsError

    def __init__(
        self,
        workdir: str | os.PathLike[str],
        *,
        origin: str | None = None,
        port: int = 0,
        name: str | None = None,
        cache_mb: int = 64,
    ) -> None:
        self.workdir = Path(workdir).resolve()
        self.origin = origin or "127.0.0.1:9"  # discard port: nothing listens, a GET gets 502
        self.host = "127.0.0.1"
        self._port = port
        self._fixed_port = bool(port)
        self.name = name or self.workdir.name
        self.cache_mb = cache_mb
        self.generation = -1
        self.start_seconds: float | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._logs: list[_LogFile] = []
        self._marker_seq = 0

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> AtsNode:
        """Start traffic_server; return once it serves and its log records requests. Returns self."""
        deadline = time.monotonic() + timeout
        tries = 0
        while True:
            tries += 1
            self.spawn()
            try:
                self.wait_ready(max(1.0, deadline - time.monotonic()))
                return self
            except AtsError as exc:
                # A port picked free and taken before ATS bound it: pick another (never for a fixed port).
                port_taken = "in use" in str(exc) or "error listenting on ports" in str(exc)  # (sic) ATS 9.2
                if not port_taken or self._fixed_port or tries >= 5 or time.monotonic() > deadline:
                    raise
                if self.start_seconds is None:  # never served: the port was only picked, pick another
                    self._port = 0

    def spawn(self) -> None:
        if self.running:
            raise AtsError(f"{self.name}: already running")
        if not self._port:
            self._port = free_port(self.host)
        self.generation += 1
        root = self.workdir
        etc, run, cache = root / "etc", root / "run", root / "cache"
        logdir = root / f"log.{self.generation}"
        for d in (etc, run, cache, logdir):
            d.mkdir(parents=True, exist_ok=True)
        (logdir / "requests.log").unlink(missing_ok=True)
        self._logs.append(_LogFile(logdir / "requests.log"))
        self._write_config(etc, run, cache, logdir)
        self._out_path = root / f"traffic_server.{self.generation}.out"
        self._spawned_at = time.monotonic()
        with open(self._out_path, "wb") as out:
            self._proc = subprocess.Popen(
                [TRAFFIC_SERVER, f"--run-root={root / 'runroot.yaml'}"],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=root,
            )
        self._track(True)

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        try:
            while True:
                if self._proc is not None and self._proc.poll() is not None:
                    raise AtsError(f"{self.name}: traffic_server exited:\n{self.log_tail()}")
                with contextlib.suppress(OSError):
                    socket.create_connection((self.host, self._port), timeout=0.5).close()
                    break
                if time.monotonic() > deadline:
                    raise AtsError(f"{self.name}: traffic_server did not listen in time:\n{self.log_tail()}")
                time.sleep(0.02)
            self.sync(timeout=max(1.0, deadline - time.monotonic()))
        except BaseException:
            self.kill(sync=False)
            raise
        self.start_seconds = time.monotonic() - self._spawned_at

    def stop(self, timeout: float = 10.0, *, sync: bool = True) -> None:
        """Sync the log (unless told not to), then SIGTERM (SIGKILL after ``timeout``) the process group."""
        self._shutdown(sync=sync, hard=False, timeout=timeout)

    def kill(self, sync: bool = True) -> None:
        """SIGKILL the node (a crash); with ``sync`` the log is read up to now first."""
        self._shutdown(sync=sync, hard=True, timeout=5.0)

    def restart(self, *, hard: bool = False, timeout: float = 30.0) -> AtsNode:
        if hard:
            self.kill()
        else:
            self.stop()
        return self.start(timeout)

    # -- observations --------------------------------------------------------------------------

    def sync(self, timeout: float = 10.0) -> None:
        """Return once every request answered before this call is in requests()."""
        if not self.running:
            raise AtsError(f"{self.name}: not running")
        log = self._logs[-1]
        deadline = time.monotonic() + timeout
        while True:
            self._marker_seq += 1
            marker = f"{SYNC_PATH}?g{self.generation}m{self._marker_seq}"
            with contextlib.suppress(OSError):
                with socket.create_connection((self.host, self._port), timeout=5) as s:
                    s.sendall(f"HEAD {marker} HTTP/1.1\r\nHost: ats-fixture\r\nConnection: close\r\n\r\n".encode())
                    while s.recv(4096):
                        pass
            resend_at = time.monotonic() + 3.0
            while time.monotonic() < resend_at:
                log.refresh()
                if marker in log.markers:
                    return
                if not self.running:
                    raise AtsError(f"{self.name}: traffic_server exited:\n{self.log_tail()}")
                if time.monotonic() > deadline:
                    raise AtsError(f"{self.name}: marker {marker} not logged after {timeout} s")
                time.sleep(0.02)

    def requests(self, sync: bool = True) -> list[Request]:
        """Every request this node logged, all runs, markers left out, in arrival order."""
        if sync and self.running:
            self.sync()
        for f in self._logs:
            f.refresh()
        return sorted((r for f in self._logs for r in f.requests), key=lambda r: r.time)

    def purges(self, sync: bool = True) -> list[Request]:
        """Every PURGE the node executed: answered 200 (held the object) or 404 (did not)."""
        return [r for r in self.requests(sync) if r.method == "PURGE" and r.status in (200, 404)]

    def log_tail(self, lines: int = 20) -> str:
        parts = []
        for path in (getattr(self, "_out_path", None), self.workdir / f"log.{self.generation}" / "diags.log"):
            with contextlib.suppress(OSError, TypeError):
                parts += Path(path).read_text(errors="replace").splitlines()[-lines:]
        return "\n".join(parts)

    # -- internals -----------------------------------------------------------------------------

    def _write_config(self, etc: Path, run: Path, cache: Path, logdir: Path) -> None:
        root = self.workdir
        (root / "runroot.yaml").write_text(
            "\n".join(
                f"{k}: {v}"
                for k, v in {
                    "prefix": root,
                    "exec_prefix": "/usr",
                    "bindir": "/usr/bin",
                    "sbindir": "/usr/sbin",
                    "sysconfdir": etc,
                    "datadir": etc,
                    "includedir": "/usr/include",
                    "libdir": "/usr/lib/trafficserver",
                    "libexecdir": "/usr/lib/trafficserver/modules",
                    "localstatedir": run,
                    "runtimedir": run,
                    "logdir": logdir,
                    "cachedir": cache,
                }.items()
            )
            + "\n"
        )
        records = {
            "proxy.config.http.server_ports": ("STRING", f"{self._port}:ip-in=127.0.0.1"),
            "proxy.config.admin.user_id": ("STRING", "#-1"),
            "proxy.config.crash_log_helper": ("STRING", "/bin/true"),
            "proxy.config.exec_thread.autoconfig": ("INT", 0),
            "proxy.config.exec_thread.limit": ("INT", 1),
            "proxy.config.accept_threads": ("INT", 0),
            "proxy.config.task_threads": ("INT", 1),
            "proxy.config.cache.threads_per_disk": ("INT", 2),
            "proxy.config.net.connections_throttle": ("INT", 1000),
            "proxy.config.url_remap.remap_required": ("INT", 1),
            "proxy.config.url_remap.pristine_host_hdr": ("INT", 1),
            "proxy.config.reverse_proxy.enabled": ("INT", 1),
            "proxy.config.http.cache.required_headers": ("INT", 0),
            "proxy.config.http.insert_response_via_str": ("INT", 0),
            "proxy.config.http.keep_alive_no_activity_timeout_in": ("INT", 120),
            "proxy.config.log.logging_enabled": ("INT", 3),
            "proxy.config.log.max_secs_per_buffer": ("INT", 1),
            "proxy.config.log.periodic_tasks_interval": ("INT", 1),
            "proxy.config.log.rolling_enabled": ("INT", 0),
            "proxy.config.log.logfile_dir": ("STRING", logdir),
            "proxy.config.local_state_dir": ("STRING", run),
            "proxy.config.cache.ram_cache.size": ("INT", 8 << 20),
            "proxy.config.diags.debug.enabled": ("INT", 0),
        }
        (etc / "records.config").write_text("".join(f"CONFIG {k} {t} {v}\n" for k, (t, v) in records.items()))
        (etc / "ip_allow.yaml").write_text(
            "ip_allow:\n"
            "  - apply: in\n    ip_addrs: 127.0.0.1\n    action: allow\n    methods: ALL\n"
            "  - apply: in\n    ip_addrs: 0/0\n    action: deny\n    methods: ALL\n"
            "  - apply: in\n    ip_addrs: ::/0\n    action: deny\n    methods: ALL\n"
        )
        (etc / "remap.config").write_text(f"map / http://{self.origin}/\n")
        (etc / "storage.config").write_text(f"{cache} {self.cache_mb}M\n")
        (etc / "logging.yaml").write_text(
            "logging:\n  formats:\n    - name: purged_test\n"
            f"      format: '{_LOG_FORMAT}'\n"
            "  logs:\n    - filename: requests\n      format: purged_test\n      mode: ascii\n"
        )
        for empty in (
            "plugin.config", "hosting.config", "volume.config", "cache.config", "parent.config", "socks.config",
            "splitdns.config", "ssl_multicert.config", "sni.yaml", "strategies.yaml",
        ):  # fmt: skip
            (etc / empty).touch()
        body_factory = Path("/etc/trafficserver/body_factory")
        if body_factory.is_dir() and not (etc / "body_factory").exists():
            shutil.copytree(body_factory, etc / "body_factory")

    def _shutdown(self, *, sync: bool, hard: bool, timeout: float) -> None:
        proc = self._proc
        error: BaseException | None = None
        if proc is not None and proc.poll() is None:
            if sync:
                try:
                    self.sync()
                except AtsError as exc:
                    error = exc
            pgid = proc.pid
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pgid, signal.SIGKILL if hard else signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(pgid, signal.SIGKILL)
                proc.wait()
            gone_by = time.monotonic() + 5.0
            while (left := _pgroup_members(pgid, zombies=False)) and time.monotonic() < gone_by:
                for pid in left:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                time.sleep(0.01)
        self._proc = None
        self._track(False)
        for f in self._logs:
            f.refresh()
        if error is not None:
            raise error


def purges_of(nodes: Iterable[object]) -> dict[str, list]:
    """``{node.address: node.purges()}`` for ATS and Varnish nodes alike, read concurrently (each sync ~2 s)."""
    nodes = list(nodes)
    with ThreadPoolExecutor(max(1, len(nodes))) as pool:
        return dict(zip([n.address for n in nodes], pool.map(lambda n: n.purges(), nodes), strict=True))


def start_all(nodes: Iterable[AtsNode], timeout: float = 30.0) -> list[AtsNode]:
    nodes = list(nodes)
    try:
        if nodes:
            with ThreadPoolExecutor(len(nodes)) as pool:
                for future in [pool.submit(node.start, timeout) for node in nodes]:
                    future.result()
    except BaseException:
        stop_all(nodes)
        raise
    return nodes


def stop_all(nodes: Iterable[AtsNode], *, sync: bool = True) -> list[BaseException]:
    nodes = list(nodes)
    if not nodes:
        return []
    with ThreadPoolExecutor(len(nodes)) as pool:
        futures = [pool.submit(node.stop, sync=sync) for node in nodes]
    return [exc for f in futures if (exc := f.exception()) is not None]


class Origin:
    """A tiny HTTP origin in a thread: any GET/HEAD gets 200 with a cacheable body naming the path."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body are two writes: no 40 ms delayed-ACK stall

            def do_GET(self) -> None:  # noqa: N802
                body = f"origin copy of {self.headers.get('Host', '')}{self.path}\n".encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "public, max-age=3600")
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_HEAD = do_GET  # noqa: N815

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer((host, 0), Handler)
        self.server.daemon_threads = True
        self.address = f"{host}:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, name="origin", daemon=True)

    def start(self) -> Origin:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
