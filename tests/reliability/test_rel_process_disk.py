"""Disk full under a live daemon (issue 14): the journal's ``state_dir`` is a 2 MiB tmpfs that only purged sees.

purged runs under ``unshare -m`` (a private mount namespace: the tmpfs vanishes with the process, whatever
happens to the test; nothing is mounted on the host). The test fills the tmpfs through ``/proc/PID/root`` (the
path resolves in purged's namespace) until ENOSPC, then expects: new batches refused with ``503 disk_full`` and a
``Retry-After`` (docs/durability.md) rather than accepted without being stored, ``/healthz`` saying
``"journal": "disk_full"``, ``purged_journal_writable`` 0, everything accepted before delivered to Varnish; once
the filler is deleted, writes resume on their own and batches are accepted again. Nothing accepted is lost
(oracle, from Varnish's log).
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import httpx
import oracle
import pytest
import yaml
from test_rel_process import SENDER, Load, wait_drained, without
from test_signals import PYTHON, ROOT, PurgedProcess, free_port, write_config

pytestmark = pytest.mark.integration


class NamespacedPurged(PurgedProcess):
    """``python -m purged`` in a mount namespace of its own, with a ``size`` tmpfs mounted on ``state``."""

    def __init__(self, config: Path, port: int, workdir: Path, state: Path, size: str = "2m"):
        self.config, self.port, self.workdir, self.state = config, port, workdir, state
        self.log_path = workdir / f"purged-{time.monotonic_ns()}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in wait()
        env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
        script = f'mount -t tmpfs -o size={size},mode=0700 purged-state "$0" && exec "$@"'
        self.proc = subprocess.Popen(
            [shutil.which("unshare") or "unshare", "-m", "--propagation", "private", "sh", "-c", script, str(state),
             PYTHON, "-m", "purged", "--config", str(config)],
            cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
        )
        self.url = f"http://127.0.0.1:{port}"

    def inside(self, name: str) -> Path:
        """A path in the state directory as purged sees it (its mount namespace)."""
        return Path(f"/proc/{self.proc.pid}/root") / self.state.relative_to("/") / name


def fill(path: Path) -> int:
    """Write zeros to ``path`` until the filesystem is full; returns the bytes written."""
    written = 0
    with open(path, "wb", buffering=0) as f:
        for size in (1 << 16, 1 << 12, 1 << 9, 1):
            try:
                while written < 64 << 20:
                    written += f.write(b"\0" * size)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
    return written


def health(url: str) -> dict:
    return httpx.get(url + "/healthz", timeout=10).json()


def test_disk_full_refuses_with_503_says_so_delivers_what_it_accepted_and_recovers(varnish_factory, tmp_path):
    if os.geteuid() != 0:
        pytest.fail("the disk-full scenario mounts a tmpfs in a mount namespace and needs root (as CI runs)")
    (node,) = varnish_factory(1)
    port = free_port()
    state = tmp_path / "state"
    state.mkdir()
    config = write_config(tmp_path / "purged.yaml", [[node.address]], port, state, sender=SENDER,
                          durability="fsync", journal={"segment_bytes": 65536})
    cfg = yaml.safe_load(config.read_text())
    ledger = oracle.Ledger()
    purged = NamespacedPurged(config, port, tmp_path, state)
    try:
        purged.wait_listening()
        assert not any(state.iterdir()), "the tmpfs leaked into the host's mount namespace"
        assert health(purged.url)["journal"] == "ok"
        with Load(purged.url, ledger, "before", batch=50, interval=0.01) as before:
            before.wait_accepted(10)
        assert set(before.statuses) == {202}, before.statuses
        wait_drained(purged.url)  # only the active segment is left: nothing the journal could free by itself

        filled = fill(purged.inside("filler"))
        refused = Load(purged.url, ledger, "full", batch=50, interval=0.05)
        with refused:
            refused.wait_answers(5)
        r = httpx.post(purged.url + "/v1/purge", json={"urls": ["http://w.example.org/full/probe"]}, timeout=10)
        refused.doubt.add(("w.example.org", "/full/probe"))  # a batch that failed to write may still be delivered
        assert r.status_code == 503 and r.json()["error"] == "disk_full" and r.headers["retry-after"], r.text
        assert r.headers["retry-after"] == "5"
        # Nothing accepted that could not be stored: a first small batch may still fit the slack of the segment's
        # last page (tmpfs allocates pages), and is then stored and accepted; once one is refused, all are.
        first = refused.answers.index(503)
        assert first <= 1 and set(refused.answers[first:]) == {503}, refused.answers
        state_now = health(purged.url)
        assert state_now["journal"] == "disk_full", state_now
        metrics = httpx.get(purged.url + "/metrics", timeout=10).text
        assert oracle.metric_sum(metrics, "purged_journal_writable") == 0
        assert oracle.metric_sum(metrics, "purged_purges_rejected_total", reason="disk_full") >= 50
        wait_drained(purged.url)  # what was accepted before is delivered meanwhile

        purged.inside("filler").unlink()
        deadline = time.monotonic() + 10
        while health(purged.url)["journal"] != "ok":
            assert time.monotonic() < deadline, "the journal did not write again once space returned"
            time.sleep(0.1)
        with Load(purged.url, ledger, "after", batch=50, interval=0.01) as after:
            after.wait_accepted(10)
        assert set(after.statuses) == {202}, after.statuses
        final = wait_drained(purged.url)
        metrics = httpx.get(purged.url + "/metrics", timeout=10).text
        purged.signal(signal.SIGTERM)
        assert purged.wait(15) == 0, purged.output()[-2000:]
    finally:
        purged.kill()
    assert not any(state.iterdir())  # the namespace and its tmpfs are gone with the process
    logs = {node.address: without(node.purges(), refused.doubt)}
    report = oracle.check(ledger, cfg, logs, final, metrics)
    print(f"filled {filled} bytes; answers before {before.statuses}, full {refused.statuses}, after {after.statuses}",
          report, sep="\n")
    report.assert_complete()
    assert "refusing new batches with 503" in purged.output() and "writing again after disk_full" in purged.output()
