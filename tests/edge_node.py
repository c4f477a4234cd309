"""What the tests' edge-cache processes (``VarnishNode``, ``AtsNode``) share: an address on 127.0.0.1, one
process (and its group) started by the test, the context-manager convention, and reading their request logs
as they grow (:class:`LogTail`).

A subclass sets ``error`` (its exception type) and ``_port``/``_proc``/``name``/``host``, and implements
``start(timeout)``, ``stop()`` and ``kill()``.
"""

from __future__ import annotations

import atexit
import contextlib
import subprocess
import threading
from pathlib import Path
from typing import Any

_live: set[EdgeNode] = set()  # started and not yet seen stopped: killed at interpreter exit, whatever happened
_live_lock = threading.Lock()


@atexit.register
def _kill_leftovers() -> None:
    for node in list(_live):
        with contextlib.suppress(Exception):
            node.kill(sync=False)


class EdgeNode:
    error: type[Exception] = RuntimeError
    name: str
    host: str
    _port: int
    _proc: subprocess.Popen[bytes] | None

    # -- addresses -----------------------------------------------------------------------------

    @property
    def port(self) -> int:
        if not self._port:
            raise self.error(f"{self.name}: not started yet, no port")
        return self._port

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    @property
    def pid(self) -> int | None:
        """PID of the node's main process (also its process group), None when not running."""
        return self._proc.pid if self.running else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<{type(self).__name__} {self.name} {self.host}:{self._port} {state}>"

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self, timeout: float) -> Any:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def kill(self, sync: bool = True) -> None:
        raise NotImplementedError

    def _track(self, live: bool) -> None:
        """Record that this node's process runs (True) or is gone (False), for the kill at exit."""
        with _live_lock:
            if live:
                _live.add(self)
            else:
                _live.discard(self)

    def __enter__(self) -> Any:
        if not self.running:
            self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class LogTail:
    """An edge's request log read as it grows: :meth:`refresh` hands every newly completed line to
    :meth:`parse` (a line is complete once its newline is there); thread-safe."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._lock = threading.Lock()

    def refresh(self) -> None:
        with self._lock:
            try:
                with open(self.path, "rb") as f:
                    f.seek(self._offset)
                    data = f.read()
            except FileNotFoundError:
                return
            end = data.rfind(b"\n") + 1
            self._offset += end
            self.parse(data[:end])

    def parse(self, data: bytes) -> None:
        raise NotImplementedError
