"""The systemd adapter: sd_notify datagrams on a real socket, the watchdog on trio's MockClock, the unit file."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import trio

from purged.net import systemd

UNIT = Path(__file__).resolve().parent.parent / "systemd" / "purged.service"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(systemd, "_warned", False)


def _drain(sock: socket.socket) -> list[bytes]:
    # Everything already queued: notify() is synchronous, so datagrams are there by the time we look.
    out = []
    while True:
        try:
            out.append(sock.recv(4096))
        except BlockingIOError:
            return out


@pytest.fixture
def notify_socket(tmp_path, monkeypatch):
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        sock.setblocking(False)
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        yield sock


@pytest.fixture
def abstract_socket(monkeypatch):
    name = f"purged-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.setblocking(False)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        yield sock


# -- sd_notify ----------------------------------------------------------------------------------------------------


def test_unset_notify_socket_is_a_quiet_no_op(caplog):
    assert systemd.notify("READY=1") is False
    assert systemd.ready("x") is False
    assert systemd.reloading() is False
    assert systemd.stopping() is False
    assert systemd.status("x") is False
    assert systemd.extend_timeout(1) is False
    assert caplog.records == []


def test_notify_sends_one_datagram(notify_socket):
    assert systemd.notify("A=1", "B=two words") is True
    assert _drain(notify_socket) == [b"A=1\nB=two words"]


@pytest.mark.parametrize("sock_fixture", ["notify_socket", "abstract_socket"])
def test_helpers_send_exact_datagrams(sock_fixture, request):
    sock = request.getfixturevalue(sock_fixture)
    assert systemd.ready()
    assert systemd.ready("3 nodes")
    assert systemd.stopping()
    assert systemd.status("draining: 12 owed")
    assert systemd.extend_timeout(35)
    assert systemd.extend_timeout(0.25)
    assert _drain(sock) == [
        b"READY=1",
        b"READY=1\nSTATUS=3 nodes",
        b"STOPPING=1",
        b"STATUS=draining: 12 owed",
        b"EXTEND_TIMEOUT_USEC=35000000",
        b"EXTEND_TIMEOUT_USEC=250000",
    ]


def test_status_cannot_inject_assignments(notify_socket):
    systemd.status("line one\nWATCHDOG=1")
    assert _drain(notify_socket) == [b"STATUS=line one WATCHDOG=1"]


@pytest.mark.parametrize("sock_fixture", ["notify_socket", "abstract_socket"])
def test_reloading_carries_clock_monotonic(sock_fixture, request):
    sock = request.getfixturevalue(sock_fixture)
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert systemd.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    [datagram] = _drain(sock)
    m = re.fullmatch(rb"RELOADING=1\nMONOTONIC_USEC=(\d+)", datagram)
    assert m, datagram
    assert before <= int(m.group(1)) <= after


def test_send_failure_returns_false_and_warns_once(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    with caplog.at_level("WARNING", logger="purged.systemd"):
        assert systemd.notify("READY=1") is False
        assert systemd.notify("WATCHDOG=1") is False
    assert len(caplog.records) == 1
    assert "nobody-listens" in caplog.records[0].getMessage()


def test_unsupported_address_is_not_an_error(monkeypatch):
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    assert systemd.notify("READY=1") is False


# -- watchdog -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        (None, None, None),
        ("30000000", None, 30.0),
        ("500000", "self", 0.5),
        ("30000000", "other", None),
        ("0", None, None),
        ("soon", None, None),
        ("30000000", "junk", None),
    ],
)
def test_watchdog_interval(monkeypatch, usec, pid, expected):
    if usec is not None:
        monkeypatch.setenv("WATCHDOG_USEC", usec)
    if pid is not None:
        monkeypatch.setenv(
            "WATCHDOG_PID", {"self": str(os.getpid()), "other": str(os.getpid() + 1)}.get(pid, pid)
        )
    assert systemd.watchdog_interval() == expected


async def test_serve_watchdog_returns_without_watchdog(notify_socket):
    async with trio.open_nursery() as nursery:
        await nursery.start(systemd.serve_watchdog, lambda: True)
    assert _drain(notify_socket) == []


async def test_serve_watchdog_pings_at_half_interval_while_alive(notify_socket, monkeypatch, autojump_clock):
    monkeypatch.setenv("WATCHDOG_USEC", "10000000")
    alive = True
    async with trio.open_nursery() as nursery:
        t0 = trio.current_time()
        await nursery.start(systemd.serve_watchdog, lambda: alive)
        # The first ping goes out at once (startup may have used part of the interval), then every 5 s.
        await trio.sleep(0.1)
        assert _drain(notify_socket) == [b"WATCHDOG=1"]
        await trio.sleep_until(t0 + 4.9)
        assert _drain(notify_socket) == []
        await trio.sleep_until(t0 + 5.1)
        assert _drain(notify_socket) == [b"WATCHDOG=1"]
        await trio.sleep_until(t0 + 20.1)
        assert _drain(notify_socket) == [b"WATCHDOG=1"] * 3  # at 10, 15 and 20 s

        alive = False  # the engine loop stalls: systemd must be left to time out
        await trio.sleep_until(t0 + 60.1)
        assert _drain(notify_socket) == []

        alive = True  # a stall that cleared (had systemd not acted yet) resumes the pings
        await trio.sleep_until(t0 + 65.1)
        assert _drain(notify_socket) == [b"WATCHDOG=1"]
        nursery.cancel_scope.cancel()


async def test_serve_watchdog_ignores_watchdog_meant_for_another_pid(
    notify_socket, monkeypatch, autojump_clock
):
    monkeypatch.setenv("WATCHDOG_USEC", "10000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    async with trio.open_nursery() as nursery:
        await nursery.start(systemd.serve_watchdog, lambda: True)
    assert _drain(notify_socket) == []


# -- the unit file ------------------------------------------------------------------------------------------------

SYSTEMD_ANALYZE = shutil.which("systemd-analyze") or "/usr/bin/systemd-analyze"


def _unit_with_existing_binary(tmp_path: Path) -> Path:
    # verify rejects an ExecStart whose binary is missing; /usr/local/bin/purged exists only once installed.
    text = UNIT.read_text()
    assert "ExecStart=/usr/local/bin/purged " in text
    copy = tmp_path / "purged.service"
    copy.write_text(text.replace("/usr/local/bin/purged", "/bin/true"))
    return copy


def test_unit_passes_systemd_analyze_verify(tmp_path):
    unit = _unit_with_existing_binary(tmp_path)
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stderr.strip() == "", result.stderr


def test_unit_security_exposure_stays_low(tmp_path):
    unit = _unit_with_existing_binary(tmp_path)
    # A regression in the hardening (a dropped line) pushes the score over the threshold.
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "security", "--offline=true", "--threshold=20", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
