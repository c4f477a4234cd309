"""Test support: signalling, freezing and reaping process groups we started (by PID, never by name)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time


def _pgroup_members(pgid: int, zombies: bool = True) -> list[int]:
    """PIDs of the processes in process group ``pgid``."""
    members = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2 :].split()
        if int(fields[2]) == pgid and (zombies or fields[0] != b"Z"):  # state, ppid, pgrp, ...
            members.append(int(entry.name))
    return members


def _freeze(pgid: int, timeout: float = 2.0) -> None:
    """SIGSTOP a process group and wait until every thread of it has stopped.

    kill() only queues the stop: one thread takes it and stops the others as they next leave the
    kernel, which on a busy machine can be milliseconds later, time enough to serve requests.
    """
    os.killpg(pgid, signal.SIGSTOP)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(state in b"TtZX" for pid in _pgroup_members(pgid) for state in _thread_states(pid)):
            return
        time.sleep(0.001)


def _thread_states(pid: int) -> list[bytes]:
    states = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return states
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        states.append(stat[stat.rfind(b")") + 2 : stat.rfind(b")") + 3])
    return states


def _terminate(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM one process we started, SIGKILL it after ``timeout``, reap it."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
