"""Smoke runs of the sender benchmarks with tiny counts, so the scripts in bench/ do not rot.

They check that each script runs end to end and prints its figures, not how fast anything is.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"

# Nothing here is skipped: .ci/test installs varnish and wrk, and CI runs as root (namespaces, /dev/net/tun).
pytestmark = pytest.mark.integration


def run(*args: str, timeout: float = 60) -> str:
    r = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert r.returncode == 0, f"{args[0]} failed:\n{r.stdout}\n{r.stderr}"
    return r.stdout


def test_sender_bench_smoke():
    assert shutil.which("wrk"), "wrk is missing: bash .ci/test installs it (Debian package wrk)"
    out = run(str(BENCH / "sender_bench.py"), "--nodes", "1", "--urls", "3000", "--batch", "1000",
              "--repeats", "1", "--settings", "16x2", "--wrk-seconds", "1", "--timeout", "30")
    assert "wrk ceiling" in out and "(match)" in out
    assert "purged window 16 x 2 conn" in out and "x that ceiling" in out
    assert "best setting: window 16 x 2" in out


def _can_netns() -> bool:
    return os.geteuid() == 0 and os.path.exists("/dev/net/tun") and shutil.which("ip") is not None


def test_crossdc_bench_smoke():
    assert _can_netns(), "the cross-DC bench needs root, /dev/net/tun and ip (iproute2)"
    out = run(str(BENCH / "crossdc_bench.py"), "--delay-ms", "5", "--repeats", "1", "--settings", "16x2",
              "--urls", "500", "--seconds", "0.5", "--timeout", "30")
    assert "RTT to 198.18.1.1:6081: TCP connect min" in out
    assert "window   16 x 2 conn:" in out
    assert "'dropped_queue_full': 0" in out


def test_soak_bench_smoke():
    out = run(str(BENCH / "soak_bench.py"), "--minutes", "0.05", "--ceiling-urls", "5000", "--sample", "0.5",
              "--wrk-seconds", "1", "--drain-timeout", "30")
    assert "wrk ceiling" in out and "purged ceiling:" in out
    assert "RSS: start" in out and "slope after warm-up" in out and "429 answers: 0 batches" in out
    assert "verdict: nothing lost" in out
