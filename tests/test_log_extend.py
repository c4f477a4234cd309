"""``PurgeLog.extend`` (a batch in bulk when nothing in it merges) leaves the log exactly as appending its
targets one at a time does: the same entries, index, byte count, merges, per-mask counts and journal rows."""

from __future__ import annotations

import gc

from hypothesis import given, settings
from hypothesis import strategies as st

from purged.core.log import PurgeLog

# Hosts routed to different masks, a target without a path and one holding a newline (never valid URLs, but
# extend must still cut hosts as the per-target loop does), and targets repeated within and across batches.
POOL = ["a.org/1", "a.org/2", "a.org/3", "b.org/1", "b.org/2", "c.org/x", "[::1]:80/p", "a.org:8080/q", "nopath",
        "", "x\ny/z", "b.org/" + "p" * 40]
MASKS = {"a.org": 1, "b.org": 3, "[::1]:80": 2}


def route(host: str) -> int:
    return MASKS.get(host, 4)


def one_at_a_time(log: PurgeLog, targets: list[str], now: float, dc_mask, journal: list | None):
    hi, merged, new = -1, 0, {}
    for target in targets:
        mask = dc_mask if isinstance(dc_mask, int) else dc_mask(target[: target.find("/")])
        seq, was_merged = log.append(target, now, mask)
        if was_merged:
            merged += 1
        else:
            new[mask] = new.get(mask, 0) + 1
            if journal is not None:
                journal.append((seq, target, now))
        hi = max(hi, seq)
    return hi, merged, new


def state(log: PurgeLog) -> tuple:
    return (log.entries(), log.index, log.bytes, log.base, log.head, log.read_mark)


fresh = st.lists(st.integers(0, 10**6).map(lambda i: f"a.org/u{i}"), min_size=2, max_size=30, unique=True)
batch = st.one_of(st.lists(st.sampled_from(POOL), max_size=8), fresh,
                  st.lists(st.sampled_from(POOL[:6]), min_size=2, max_size=6, unique=True))
step = st.tuples(batch, st.floats(0, 1), st.floats(0, 1), st.booleans())


@settings(max_examples=300, deadline=None)
@given(st.lists(step, min_size=1, max_size=8), st.sampled_from(["routed", "int"]), st.booleans())
def test_extend_is_append_one_at_a_time(steps, routing, journaled):
    dc_mask = route if routing == "routed" else 5
    bulk, loop = PurgeLog(), PurgeLog()
    bulk_journal: list | None = [] if journaled else None
    loop_journal: list | None = [] if journaled else None
    for i, (targets, read, trim, gc_off) in enumerate(steps):
        if gc_off:
            gc.disable()  # extend pauses the GC itself and must leave it as it found it
        try:
            got = bulk.extend(list(targets), float(i), dc_mask, bulk_journal)
            assert gc.isenabled() is not gc_off
        finally:
            gc.enable()
        want = one_at_a_time(loop, list(targets), float(i), dc_mask, loop_journal)
        assert got == want
        assert state(bulk) == state(loop)
        assert bulk_journal == loop_journal
        # A node reads part of the log (later batches then append instead of merging), trimming follows.
        for log in (bulk, loop):
            seq = log.base + int(read * (log.head - log.base))
            if seq < log.head:
                log.mark_read(seq)
            log.trim(log.base + int(trim * (min(log.read_mark, log.head) - log.base)))
        assert state(bulk) == state(loop)


def test_a_batch_of_new_targets_takes_the_bulk_path_and_a_merge_or_repeat_falls_back():
    log = PurgeLog()
    journal: list = []
    assert log.extend(["a.org/1", "b.org/1", "a.org/2"], 1.0, route, journal) == (2, 0, {1: 2, 3: 1})
    assert [e.dc_mask for _, e in log.entries()] == [1, 3, 1]
    assert journal == [(0, "a.org/1", 1.0), (1, "b.org/1", 1.0), (2, "a.org/2", 1.0)]
    # "a.org/1" is unread: it merges; "c.org/1" is new; "c.org/1" twice merges into itself.
    assert log.extend(["c.org/1", "a.org/1", "c.org/1"], 2.0, route, None) == (3, 2, {4: 1})
    log.mark_read(3)
    # Every target held is read: each gets a new entry, in bulk.
    assert log.extend(["a.org/1", "c.org/1"], 3.0, 7, None) == (5, 0, {7: 2})
    assert log.index == {"a.org/1": 4, "b.org/1": 1, "a.org/2": 2, "c.org/1": 5}
    assert log.bytes == sum(len(e.target) for _, e in log.entries())


def test_submit_routes_as_dc_mask_whether_or_not_the_topology_has_host_patterns():
    from purged.core.engine import Engine
    from purged.core.topology import DatacenterSpec, TierSpec, Topology

    targets = ["a.org/1", "b.org/2", "[::1]:8080/x", "a.org/3"]
    for dcs in (
        [DatacenterSpec("one", (), (TierSpec("t", 0.0, ("n1",)),))],
        [DatacenterSpec("one", (), (TierSpec("t", 0.0, ("n1",)),)),
         DatacenterSpec("two", (), (TierSpec("t", 0.0, ("n2",)),))],
        [DatacenterSpec("one", ("a.org",), (TierSpec("t", 0.0, ("n1",)),)),
         DatacenterSpec("two", (), (TierSpec("t", 0.0, ("n2",)),))],
    ):
        topology = Topology(dcs)
        engine = Engine(topology, now=0.0)
        engine.submit(targets, 1.0)
        masks = [e.dc_mask for _, e in engine.lanes[1].log.entries()]
        assert masks == [topology.dc_mask(t[: t.find("/")]) for t in targets]
        assert engine.lanes[1].dc_appended == [sum(1 for m in masks if m >> i & 1) for i in range(len(dcs))]
