"""Tests for the sans-IO in-flight window controller (purged.core.window), with explicit ``now`` floats.

A simulated node: with ``limit`` in flight over a path of ``rtt`` seconds to an edge that serves at most
``capacity`` PURGEs/s, one read per millisecond brings ``min(limit / rtt, capacity) * 0.001`` answers.
"""

from __future__ import annotations

from purged.config import Sender
from purged.core.window import WindowControl


def drive(ctl: WindowControl, *, rtt: float, capacity: float, seconds: float, now: float = 0.0,
          work: float | None = None) -> float:
    """Run ``seconds`` of 1 ms reads; ``work``: PURGEs/s the engine has for the node (None: unlimited)."""
    step = 0.001
    for _ in range(round(seconds / step)):
        now += step
        served = min(ctl.limit / rtt, capacity)  # Little's law: a full window waits max(rtt, limit/capacity)
        if work is None or work >= served:
            ctl.full(now)  # the sender had more to send than the window let out
            ctl.acked(round(served * step) or 1, max(rtt, ctl.limit / capacity), now)
        else:
            ctl.acked(round(work * step) or 1, rtt, now)
    return now


def test_grows_to_the_bandwidth_delay_product_across_80_ms():
    ctl = WindowControl(1024, 16384, now=0.0)
    drive(ctl, rtt=0.080, capacity=40_000, seconds=10.0)
    # 40k/s x 80 ms = 3,200 in flight: 4,096 carries it all; 8,192 was tried and given back (only latency).
    assert ctl.limit == 4096
    assert ctl.grown >= 3 and ctl.shrunk >= 1


def test_stops_at_the_cap():
    ctl = WindowControl(256, 1024, now=0.0)
    drive(ctl, rtt=0.080, capacity=1e9, seconds=10.0)
    assert ctl.limit == 1024


def test_on_loopback_growth_that_buys_no_throughput_is_given_back():
    ctl = WindowControl(1024, 8192, now=0.0)
    now = drive(ctl, rtt=0.0005, capacity=60_000, seconds=1.0)
    # 1,024 in flight already exceed 60k/s x 0.5 ms: a larger window only queues at the edge.
    assert ctl.limit == 1024 and ctl.shrunk >= 1
    grown = ctl.grown
    drive(ctl, rtt=0.0005, capacity=60_000, seconds=10.0, now=now)
    assert ctl.limit in (1024, 2048)  # at most a probe on trial
    assert ctl.grown - grown <= 10_000 // 50 // 40 + 1  # one probe per 40 full rounds


def test_a_rate_limited_node_stays_at_its_start():
    ctl = WindowControl(1024, 8192, now=0.0)
    drive(ctl, rtt=0.080, capacity=60_000, seconds=10.0, work=1000)  # a DC with rate: 1000
    assert ctl.limit == 1024 and ctl.grown == 0


def test_failures_halve_down_to_the_start_and_delay_the_next_probe():
    ctl = WindowControl(1000, 8000, now=0.0)
    now = drive(ctl, rtt=0.080, capacity=1e9, seconds=5.0)
    assert ctl.limit == 8000
    ctl.failed(now)
    assert ctl.limit == 4000
    ctl.failed(now)
    ctl.failed(now)
    ctl.failed(now)
    assert ctl.limit == 1000
    grown = ctl.grown
    now = drive(ctl, rtt=0.080, capacity=1e9, seconds=0.9, now=now)
    assert ctl.grown == grown  # no probe right after a failure


def test_fixed_when_the_cap_is_the_start():
    ctl = WindowControl(256, 100, now=0.0)
    assert not ctl.adaptive and ctl.cap == 256
    drive(ctl, rtt=0.080, capacity=1e9, seconds=3.0)
    assert ctl.limit == 256 and ctl.grown == 0


def test_latency_inflation_shrinks_toward_the_start():
    ctl = WindowControl(1000, 8000, now=0.0)
    now = drive(ctl, rtt=0.080, capacity=1e9, seconds=5.0)
    assert ctl.limit == 8000
    # The edge slows down: 20k/s now, so 8,000 in flight queue 400 ms at it (RTT 5x the base).
    drive(ctl, rtt=0.080, capacity=20_000, seconds=5.0, now=now)
    assert ctl.limit < 8000 and ctl.shrunk >= 1


def test_the_default_cap_reaches_past_30k_per_second_at_80_ms_and_is_not_taken_where_it_does_not_pay():
    cfg = Sender()  # the shipped defaults: 256 x 4 at first, up to 2,048 x 4
    start, cap = cfg.window * cfg.connections, cfg.max_window * cfg.connections
    far = WindowControl(start, cap, now=0.0)
    drive(far, rtt=0.080, capacity=100_000, seconds=10.0)
    assert far.limit == cap and cap / 0.080 >= 100_000  # 1,024 x 4 would stop at 51k/s
    near = WindowControl(start, cap, now=0.0)
    drive(near, rtt=0.0005, capacity=60_000, seconds=10.0)
    assert near.limit <= 2 * start  # loopback: at most a probe above the start
    limited = WindowControl(start, cap, now=0.0)
    drive(limited, rtt=0.080, capacity=60_000, seconds=10.0, work=1000)
    assert limited.limit == start and limited.grown == 0
