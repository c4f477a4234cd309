"""Test support: the purge records a node's ``varnishncsa`` writes, and their incremental parser."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from edge_node import LogTail

#: Requests to this path are only markers for the log reader (they get a 503 and no purge).
SYNC_PATH = "/__varnish_fixture_sync__"

_LOG_FORMAT = "%{Varnish:vxid}x\t%{VSL:Timestamp:Start[1]}x\t%m\t%s\t%{Host}i\t%U%q"
_LOG_QUERY = f'ReqMethod eq "PURGE" or ReqURL ~ "^{SYNC_PATH}"'


class Purge(NamedTuple):
    """One PURGE a node executed (answered 200)."""

    time: float  # when the request started, wall clock (time.time()), microsecond resolution
    host: str  # the Host header ("" if none)
    url: str  # path and query, as received


class _PurgeFile(LogTail):
    """Incremental parser of one varnishncsa output file (one per varnishd run)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.purges: list[Purge] = []
        self.markers: set[str] = set()
        self._seen: set[str] = set()  # vxids: a backfill from the head of the log may repeat records

    def parse(self, data: bytes) -> None:
        for raw in data.decode("utf-8", "surrogateescape").split("\n"):
            fields = raw.split("\t", 5)
            if len(fields) != 6 or fields[0] in self._seen:
                continue
            vxid, ts, method, status, host, url = fields
            self._seen.add(vxid)
            if method == "PURGE":
                if status == "200":
                    self.purges.append(Purge(float(ts), "" if host == "-" else host, url))
            elif url.startswith(SYNC_PATH):
                self.markers.add(url)

    def backfill(self, data: bytes) -> None:
        """Add records read from the head of the shared memory log (``varnishncsa -d``)."""
        with self._lock:
            self.parse(data[: data.rfind(b"\n") + 1])
