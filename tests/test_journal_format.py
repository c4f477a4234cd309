"""The journal format (sans-IO): round trips, every truncation point, flipped bytes, arbitrary bytes, and
replay planning (checkpoints, new nodes, gaps renumbered)."""

import struct
import zlib

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from purged.core.journal_format import (
    MAGIC,
    Checkpoint,
    Decoder,
    Entries,
    Replay,
    Reset,
    decode,
    encode_appended,
    encode_checkpoint,
    encode_entries,
    encode_reset,
)

RECORDS = [
    Entries(1, 0, ["h.org/a", "h.org/b", "\u00e9.org/\u00fc"], [1.5, 1.5, 2.25]),
    Checkpoint(1700000000.5, [{"n1": 0}, {"n1": 2, "n2": 1}], [0, 3]),
    Entries(0, 7, ["x.org/" + "p" * 300], [3.0]),
    Reset(),
    Entries(1, 3, [], []),
]


def segment(records=RECORDS) -> tuple[bytes, list[int]]:
    """A segment and the offset after each record."""
    data = bytearray(MAGIC)
    ends = []
    for r in records:
        if isinstance(r, Entries):
            data += encode_entries(*r)
        elif isinstance(r, Checkpoint):
            data += encode_checkpoint(*r)
        else:
            data += encode_reset()
        ends.append(len(data))
    return bytes(data), ends


def test_round_trip():
    data, ends = segment()
    records, good, error = decode(data)
    assert records == RECORDS
    assert good == len(data) and error is None


def test_incremental_feed_byte_by_byte():
    data, _ = segment()
    dec = Decoder()
    out = []
    for i in range(len(data)):
        out += dec.feed(data[i : i + 1])
    dec.finish()
    assert out == RECORDS and dec.error is None and dec.good_offset == len(data)


def test_every_truncation_point_gives_a_prefix_and_the_offset_to_cut():
    data, ends = segment()
    for cut in range(len(data)):
        records, good, error = decode(data[:cut])
        whole = [e for e in ends if e <= cut]
        assert records == RECORDS[: len(whole)], cut
        assert good == (whole[-1] if whole else (len(MAGIC) if cut >= len(MAGIC) else 0))
        assert error == ("torn" if cut != good or cut < len(MAGIC) else None), cut


def test_every_flipped_byte_is_detected_and_the_prefix_kept():
    data, ends = segment()
    for i in range(len(data)):
        bad = bytearray(data)
        bad[i] ^= 0x40
        records, good, error = decode(bytes(bad))
        assert error is not None, i
        if i < len(MAGIC):
            assert (records, good, error) == ([], 0, "bad_magic")
            continue
        intact = [e for e in ends if e <= i]
        assert records == RECORDS[: len(intact)]
        assert good == (intact[-1] if intact else len(MAGIC))


def test_valid_checksum_but_not_a_record():
    for obj in ([9], [0, 1, 0, [1], [1.0]], [0, 99, 0, [], []], [1, 1.0, [{"n": -1}], [0]], [1, 1.0, [{"n": 1}], []], {"a": 1}, [0, 0, 0, ["a"], []]):
        payload = msgpack.packb(obj)
        data = MAGIC + struct.pack("<II", len(payload), zlib.crc32(payload)) + payload
        assert decode(data) == ([], len(MAGIC), "bad_record"), obj
    garbage = b"\xc1"
    data = MAGIC + struct.pack("<II", 1, zlib.crc32(garbage)) + garbage
    assert decode(data)[2] == "bad_record"


def test_absurd_length_is_corruption_not_a_wait():
    data = MAGIC + struct.pack("<II", 1 << 31, 0) + b"x" * 10
    assert decode(data) == ([], len(MAGIC), "bad_length")


def test_zero_filled_tail_is_detected():
    data, ends = segment()
    records, good, error = decode(data + b"\0" * 64)
    assert records == RECORDS and good == len(data) and error == "bad_record"


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300), st.integers(min_value=0, max_value=400))
def test_any_bytes_decode_to_a_prefix_or_stop_cleanly(tail, cut):
    data, ends = segment()
    blob = data[: min(cut, len(data))] + tail
    records, good, error = decode(blob)
    assert 0 <= good <= len(blob)
    assert error in (None, "torn", "bad_magic", "bad_length", "bad_checksum", "bad_record")
    assert all(isinstance(r, Entries | Checkpoint | Reset) for r in records)
    # What decoded is exactly what the valid prefix holds.
    assert decode(blob[:good])[0] == records


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_after_magic(blob):
    records, good, error = decode(MAGIC + blob)
    assert good >= len(MAGIC) and (error is not None or good == len(MAGIC) + len(blob))


def test_encode_appended_groups_consecutive_runs_per_lane():
    items = [(1, 5, "h/a", 1.0), (0, 0, "h/b", 1.0), (1, 6, "h/c", 2.0), (1, 9, "h/d", 3.0)]
    frames, top = encode_appended(items, shift=100.0)
    records, _, error = decode(MAGIC + b"".join(frames))
    assert error is None
    assert records == [
        Entries(1, 5, ["h/a", "h/c"], [101.0, 102.0]),
        Entries(1, 9, ["h/d"], [103.0]),
        Entries(0, 0, ["h/b"], [101.0]),
    ]
    assert top == {1: 9, 0: 0}


# -- replay planning --------------------------------------------------------------------------------------------


def ents(lane, first, n, tag="u"):
    return Entries(lane, first, [f"h.org/{tag}{first + i}" for i in range(n)], [float(first + i) for i in range(n)])


def test_plan_from_checkpoint_new_node_at_head_and_shift():
    r = Replay(lanes=2)
    r.add(1, ents(1, 0, 5))
    r.add(1, Checkpoint(0.0, [{}, {"a": 2, "b": 4, "gone": 0}], [0, 0]))
    r.add(2, ents(1, 5, 3))
    plans = r.plan(["a", "b", "new"], shift=-10.0)
    lane = plans[1]
    assert (lane.base, lane.head, lane.positions, lane.renumbered) == (2, 8, {"a": 2, "b": 4}, False)
    assert lane.items[0] == ("h.org/u2", -8.0)
    assert plans[0].items == [] and plans[0].positions == {}


def test_plan_without_checkpoint_resends_everything_held():
    r = Replay(lanes=2)
    r.add(3, ents(1, 10, 4))
    plan = r.plan(["a", "b"], 0.0)[1]
    assert (plan.base, plan.head, plan.positions) == (10, 14, {"a": 10, "b": 10})


def test_plan_repeated_records_are_stitched():
    r = Replay(lanes=2)
    r.add(1, ents(1, 0, 5))
    r.add(2, ents(1, 3, 5))  # overlaps 3..4
    r.add(2, Checkpoint(0.0, [{}, {"a": 0}], [0, 0]))
    plan = r.plan(["a"], 0.0)[1]
    assert not plan.renumbered and [t for t, _ in plan.items] == [f"h.org/u{i}" for i in range(8)]


def test_plan_gap_renumbers_and_counts_lost():
    r = Replay(lanes=2)
    r.add(1, Checkpoint(0.0, [{}, {"a": 0, "b": 6}], [0, 0]))
    r.add(1, ents(1, 0, 3))  # 0..2
    r.add(3, ents(1, 5, 4))  # 5..8: 3 and 4 were in a corrupt segment
    plan = r.plan(["a", "b"], 0.0)[1]
    assert plan.renumbered and plan.lost == 2
    assert [t for t, _ in plan.items] == ["h.org/u0", "h.org/u1", "h.org/u2", "h.org/u5", "h.org/u6",
                                          "h.org/u7", "h.org/u8"]
    # b had everything below old seq 6, i.e. u0..u5 of the retained: new position 4.
    assert plan.positions == {"a": 0, "b": 4}


def test_plan_position_above_everything_held():
    r = Replay(lanes=2)
    r.add(1, ents(1, 0, 3))
    r.add(1, Checkpoint(0.0, [{}, {"a": 1, "b": 9}], [0, 0]))
    plan = r.plan(["a", "b"], 0.0)[1]
    assert plan.renumbered and plan.lost == 6 and plan.positions == {"a": 1, "b": 3}


def test_checkpoint_head_reveals_a_lost_tail():
    r = Replay(lanes=2)
    r.add(1, ents(1, 0, 3))
    r.add(3, Checkpoint(0.0, [{}, {"a": 0}], [0, 8]))  # 3..7 were in a segment that is gone
    plan = r.plan(["a"], 0.0)[1]
    assert plan.renumbered and plan.lost == 5 and plan.head == 3 and plan.positions == {"a": 0}


def test_reset_discards_what_came_before():
    r = Replay(lanes=2)
    r.add(1, ents(1, 0, 5, "old"))
    r.add(1, Checkpoint(0.0, [{}, {"a": 0}], [0, 0]))
    r.add(2, Reset())
    r.add(2, ents(1, 0, 2, "new"))
    r.add(2, Checkpoint(0.0, [{}, {"a": 0}], [0, 0]))
    plan = r.plan(["a"], 0.0)[1]
    assert [t for t, _ in plan.items] == ["h.org/new0", "h.org/new1"]
    assert r.obsolete == {1}


@pytest.mark.parametrize("lanes", [1, 2])
def test_unknown_lane_is_ignored(lanes):
    r = Replay(lanes=lanes)
    r.add(1, ents(5, 0, 2))
    assert r.ignored == 2
