"""Loss accounting from per-sender sequence numbers."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from purged.core.udploss import LossTracker


def feed(tracker: LossTracker, source: str, seqs) -> dict:
    for seq in seqs:
        tracker.observe(source, seq)
    return tracker.statistics()["per_source"][source]


def test_in_order_stream_has_no_loss():
    t = LossTracker()
    s = feed(t, "a", range(100, 1100))
    assert s == {"received": 1000, "lost": 0, "duplicates": 0, "reordered": 0, "resets": 0, "last_seq": 1099}


def test_a_gap_counts_as_lost_once_it_leaves_the_window():
    t = LossTracker(window=16)
    feed(t, "a", [1, 2, 3, 7])  # 4, 5, 6 missing but may still come
    assert t.statistics()["lost"] == 0
    feed(t, "a", range(8, 30))
    assert t.statistics()["lost"] == 3


def test_late_arrival_inside_the_window_is_reordered_not_lost():
    t = LossTracker(window=16)
    s = feed(t, "a", [1, 2, 4, 3, 5, 6] + list(range(7, 40)))
    assert (s["lost"], s["reordered"], s["duplicates"]) == (0, 1, 0)


def test_duplicates():
    t = LossTracker(window=16)
    s = feed(t, "a", [1, 2, 3, 3, 2, 4, 4])
    assert (s["duplicates"], s["reordered"], s["lost"]) == (3, 0, 0)


def test_gap_wider_than_the_window():
    t = LossTracker(window=8, max_gap=1000)
    feed(t, "a", [1, 2, 503])  # 500 missing: 493 leave at once, 7 still in the window
    assert t.statistics()["lost"] == 493
    feed(t, "a", range(504, 520))
    assert t.statistics()["lost"] == 500


def test_restart_to_one_is_a_reset_not_two_billion_losses():
    t = LossTracker(window=64)
    s = feed(t, "npm", list(range(1, 50)) + list(range(1, 50)))  # a process restart: numbering begins again
    assert (s["resets"], s["lost"], s["duplicates"]) == (1, 0, 0)
    s = feed(t, "npm", [2**31 - 1, 2**31 + 5])  # the leap forward is a reset too; then a small gap
    assert s["resets"] == 2
    assert s["lost"] == 0


def test_restart_from_zero_and_wraparound():
    t = LossTracker(window=64, restart_max=1)
    s = feed(t, "a", [0, 1, 2, 3, 0, 1, 2])  # htcp-purge's post-increment numbers from 0
    assert (s["resets"], s["duplicates"]) == (1, 0)
    s = feed(t, "b", [2**32 - 2, 2**32 - 1, 0, 1, 2])  # a 32-bit wrap
    assert (s["resets"], s["lost"]) == (1, 0)


def test_far_step_back_is_a_reset():
    t = LossTracker(window=16)
    s = feed(t, "a", [1000, 1001, 500, 501])
    assert (s["resets"], s["lost"], s["reordered"]) == (1, 0, 0)


def test_reset_settles_the_old_window():
    t = LossTracker(window=16)
    feed(t, "a", [10, 11, 14])  # 12, 13 pending
    s = feed(t, "a", [1])  # restart: they will not come any more
    assert (s["lost"], s["resets"]) == (2, 1)


def test_sources_are_independent():
    t = LossTracker(window=8)
    feed(t, "a", range(1, 20))
    feed(t, "b", [1, 3] + list(range(4, 20)))
    stats = t.statistics()
    assert stats["per_source"]["a"]["lost"] == 0
    assert stats["per_source"]["b"]["lost"] == 1
    assert stats["sources"] == 2


def test_lru_cap_bounds_memory_and_totals_stay_monotonic():
    t = LossTracker(window=8, max_sources=3)
    for name in "abc":
        feed(t, name, [1, 2, 4])
    feed(t, "a", [5])  # refresh a: b is now the oldest
    feed(t, "d", [1])
    stats = t.statistics()
    assert set(stats["per_source"]) == {"a", "c", "d"}
    assert stats["evicted"] == 1
    assert stats["lost"] == 1  # b's pending gap settled when it was evicted
    assert stats["received"] == 11
    assert len(t) == 3
    t.forget("a")
    assert len(t) == 2 and t.statistics()["lost"] == 2


def test_bad_parameters():
    with pytest.raises(ValueError):
        LossTracker(window=0)
    with pytest.raises(ValueError):
        LossTracker(window=100, max_gap=10)


@given(
    st.lists(st.tuples(st.sampled_from("abc"), st.integers(0, 2**32 - 1) | st.integers(0, 300)), max_size=300)
)
def test_counters_are_consistent(events):
    t = LossTracker(window=32, max_gap=1000, max_sources=2)
    before = t.statistics()
    for source, seq in events:
        t.observe(source, seq)
        now = t.statistics()
        for key in ("received", "lost", "duplicates", "reordered", "resets"):
            assert now[key] >= before[key] >= 0
        before = now
    assert before["received"] == len(events)
    assert before["sources"] <= 2
    assert before["duplicates"] + before["reordered"] + before["resets"] <= len(events)
