"""The fleet bench's many-port edge stub (bench/fleet_edges.py): pipelined PURGEs split anywhere are all
answered, in order, and counted per port and per batch group; nonsense closes only its own connection."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

from fleet_harness import EdgeStubs  # noqa: E402

pytestmark = pytest.mark.integration

ANSWER = b"HTTP/1.1 200 Purged\r\n"


def _read_answers(sock: socket.socket, n: int) -> bytes:
    got = b""
    while got.count(ANSWER) < n:
        data = sock.recv(65536)
        assert data, f"connection closed after {got.count(ANSWER)} of {n} answers"
        got += data
    return got


def test_pipelined_purges_counted_per_port_and_group():
    stubs = EdgeStubs("127.0.0.1", 3)
    try:
        assert len(set(stubs.ports)) == 3
        requests = b"".join(
            b"PURGE /fb/run1/b%d/%d HTTP/1.1\r\nHost: en.wikipedia.org\r\nUser-Agent: purged\r\n\r\n" % (i // 100, i)
            for i in range(300)
        )
        with socket.create_connection(("127.0.0.1", stubs.ports[1]), timeout=5) as s:
            for k in range(0, len(requests), 777):  # heads split mid-line and mid-terminator
                s.sendall(requests[k : k + 777])
            answers = _read_answers(s, 300)
        assert answers.count(ANSWER) == 300
        with socket.create_connection(("127.0.0.1", stubs.ports[2]), timeout=5) as s:
            s.sendall(b"PURGE /other HTTP/1.1\r\nHost: x\r\n\r\nPURGE /fb/run1/b0/x HTTP/1.1\r\nHost: x\r\n\r\n")
            _read_answers(s, 2)
        stats = stubs.stats()
        assert stats["ports"] == {str(stubs.ports[0]): 0, str(stubs.ports[1]): 300, str(stubs.ports[2]): 2}
        assert stats["total"] == 302
        groups = stats["groups"]
        assert sorted(groups) == ["/fb/run1/b0", "/fb/run1/b1", "/fb/run1/b2"]
        assert [groups[g][0] for g in sorted(groups)] == [101, 100, 100]  # /other is counted, not grouped
        assert all(isinstance(groups[g][1], float) for g in groups)
    finally:
        stubs.stop()
    assert stubs.proc.returncode == 0


def test_bad_request_closes_only_its_connection():
    stubs = EdgeStubs("127.0.0.1", 1)
    try:
        port = stubs.ports[0]
        with socket.create_connection(("127.0.0.1", port), timeout=5) as good, \
                socket.create_connection(("127.0.0.1", port), timeout=5) as bad:
            bad.sendall(b"PURGE /a HTTP/1.1\r\nHost: x\r\n\r\nNONSENSE\r\n\r\n")
            reply = b""
            while data := bad.recv(65536):
                reply += data
            assert reply.startswith(ANSWER) and b"400 Bad Request" in reply
            good.sendall(b"PURGE /b HTTP/1.1\r\nHost: x\r\n\r\n")
            assert _read_answers(good, 1).count(ANSWER) == 1
        stats = stubs.stats()
        assert stats["total"] == 2 and stats["bad"] == 1
    finally:
        stubs.stop()
