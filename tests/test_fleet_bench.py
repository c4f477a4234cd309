"""The fleet bench (bench/fleet_*.py): its many-port edge stub answers pipelined PURGEs split anywhere, in
order, counts them per port and per batch group, and closes only a connection that sends nonsense; and a smoke
run of the throughput part with tiny counts, so the script does not rot (the simulation needs namespaces and a
few minutes: it is not run here)."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

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


def test_throughput_smoke():
    """3 NATS servers, 2 daemons with 2 stub nodes each, 4 batches of 500 URLs: both rounds print figures."""
    r = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "fleet_bench.py"), "--only", "throughput", "--tp-daemons", "2",
         "--tp-batches", "4", "--tp-batch", "500", "--tp-posters", "2", "--timeout", "30"],
        capture_output=True, text=True, timeout=90, cwd=ROOT,
    )
    assert r.returncode == 0, f"fleet_bench failed:\n{r.stdout}\n{r.stderr}"
    out = r.stdout.split("== fleet_bench figures ==")[1]
    assert "all daemons running:" in out and "others paused (SIGSTOP) while posting:" in out
    rows = [line.split() for line in out.splitlines() if line.strip().startswith(("tp0", "tp1"))]
    assert len(rows) == 4, out
    assert all("not" not in row for row in rows), out  # every daemon's nodes got every URL, in both rounds
