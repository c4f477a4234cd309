"""Core layer: the journal's on-disk format and replay planning (sans-IO: bytes in, records and plans out).

A segment file is ``MAGIC`` followed by frames ``[u32 length][u32 crc32(payload)][msgpack payload]`` (little
endian). Payloads are msgpack arrays whose first item is the record kind:

- ``[0, lane, first_seq, [target, ...], [accepted_at_wall, ...]]``: new log entries of one lane, numbered
  consecutively from ``first_seq``. Times are wall-clock seconds (trio's clock restarts with each process).
- ``[1, wall, [{node: position}, ...], [head, ...]]``: a checkpoint: per lane, each node has everything below
  its position, and every entry below ``head`` was written before it (so a lost segment is noticed).
- ``[2]``: a reset: everything read before it (earlier segments) is obsolete; written at the start of a
  compacted snapshot, so a crash between writing the snapshot and deleting the old segments is harmless.

:class:`Decoder` stops at the first torn or corrupt frame and says where (``good_offset``) and why
(``error``), so the I/O layer can truncate it; it never raises on any input. :class:`Replay` collects the
records of every segment and :meth:`Replay.plan` turns them into what each engine lane restores.
"""

from __future__ import annotations

import bisect
import struct
import zlib
from dataclasses import dataclass, field
from typing import NamedTuple

import msgpack

MAGIC = b"PURGEDJ\x01"
HEADER = struct.Struct("<II")
MAX_RECORD = 64 * 1024 * 1024  # a larger length field is corruption, not a record
MAX_LANES = 16
ENTRIES, CHECKPOINT, RESET = 0, 1, 2


class Entries(NamedTuple):
    lane: int
    first_seq: int
    targets: list[str]
    times: list[float]  # wall clock


class Checkpoint(NamedTuple):
    wall: float
    positions: list[dict[str, int]]  # per lane
    heads: list[int]  # per lane: one past the highest seq written so far


class Reset(NamedTuple):
    pass


Record = Entries | Checkpoint | Reset


def _frame(payload: bytes) -> bytes:
    return HEADER.pack(len(payload), zlib.crc32(payload)) + payload


def encode_entries(lane: int, first_seq: int, targets: list[str], times: list[float]) -> bytes:
    return _frame(msgpack.packb([ENTRIES, lane, first_seq, targets, times], use_bin_type=True))


def encode_checkpoint(wall: float, positions: list[dict[str, int]], heads: list[int]) -> bytes:
    return _frame(msgpack.packb([CHECKPOINT, float(wall), positions, heads], use_bin_type=True))


def encode_reset() -> bytes:
    return _frame(msgpack.packb([RESET]))


def encode_appended(items: list[tuple[int, int, str, float]], shift: float) -> tuple[list[bytes], dict[int, int]]:
    """Frame ``Engine.take_appended()`` output as entries records, one per run of consecutive seqs of a lane;
    ``shift`` turns engine time into wall time. Returns the frames and the highest seq per lane."""
    frames: list[bytes] = []
    top: dict[int, int] = {}
    by_lane: dict[int, list[tuple[int, str, float]]] = {}
    for lane, seq, target, at in items:
        by_lane.setdefault(lane, []).append((seq, target, at))
    for lane, rows in by_lane.items():
        start = 0
        for i in range(1, len(rows) + 1):
            if i == len(rows) or rows[i][0] != rows[i - 1][0] + 1:
                run = rows[start:i]
                frames.append(encode_entries(lane, run[0][0], [r[1] for r in run], [r[2] + shift for r in run]))
                start = i
        top[lane] = rows[-1][0]
    return frames, top


def _is_int(value: object) -> bool:
    return type(value) is int


def _parse(payload: bytes | memoryview) -> Record | None:
    """A payload as a record, or None if it is not one (its CRC matched, but the writer never made it)."""
    try:
        obj = msgpack.unpackb(payload, raw=False, use_list=True, strict_map_key=True)
    except (ValueError, TypeError, msgpack.UnpackException):  # msgpack's errors are not all ValueError
        return None
    if not isinstance(obj, list) or not obj or not _is_int(obj[0]):
        return None
    kind = obj[0]
    if kind == ENTRIES and len(obj) == 5:
        _, lane, first, targets, times = obj
        if (
            _is_int(lane)
            and 0 <= lane < MAX_LANES
            and _is_int(first)
            and 0 <= first < 1 << 62
            and isinstance(targets, list)
            and isinstance(times, list)
            and len(targets) == len(times)
            and all(type(t) is str for t in targets)
            and all(type(t) is float for t in times)
        ):
            return Entries(lane, first, targets, times)
        return None
    if kind == CHECKPOINT and len(obj) == 4:
        _, wall, positions, heads = obj
        if (
            type(wall) is float
            and isinstance(positions, list)
            and len(positions) <= MAX_LANES
            and isinstance(heads, list)
            and len(heads) == len(positions)
            and all(_is_int(h) and 0 <= h < 1 << 62 for h in heads)
        ):
            for lane in positions:
                if not isinstance(lane, dict) or not all(
                    type(k) is str and _is_int(v) and 0 <= v < 1 << 62 for k, v in lane.items()
                ):
                    return None
            return Checkpoint(wall, positions, heads)
        return None
    if kind == RESET and len(obj) == 1:
        return Reset()
    return None


class Decoder:
    """Incremental segment decoder: :meth:`feed` bytes, get complete records; :meth:`finish` at end of file.

    After the first bad frame it stops for good: ``error`` names why (``bad_magic``, ``bad_length``,
    ``bad_checksum``, ``bad_record``, or ``torn`` for an incomplete tail at end of file) and ``good_offset`` is
    the length of the valid prefix, where the file should be truncated.
    """

    def __init__(self) -> None:
        self._buf = b""  # bytes not decoded yet; immutable, so a whole file fed at once is never copied
        self._consumed = 0  # file offset of _buf[0]
        self.good_offset = 0
        self.error: str | None = None
        self._magic_ok = False

    @property
    def stopped(self) -> bool:
        return self.error is not None

    def feed(self, data: bytes) -> list[Record]:
        if self.error is not None:
            return []
        buf = self._buf + bytes(data) if self._buf else bytes(data)
        pos = 0
        if not self._magic_ok:
            if len(buf) < len(MAGIC):
                if MAGIC.startswith(buf):
                    self._buf = buf
                    return []
                self.error, self._buf = "bad_magic", b""
                return []
            if buf[: len(MAGIC)] != MAGIC:
                self.error, self._buf = "bad_magic", b""
                return []
            self._magic_ok = True
            pos = self.good_offset = len(MAGIC)
        out: list[Record] = []
        view = memoryview(buf)
        size = len(buf)
        while size - pos >= HEADER.size:
            length, crc = HEADER.unpack_from(buf, pos)
            if length > MAX_RECORD:
                self.error = "bad_length"
                break
            end = pos + HEADER.size + length
            if end > size:
                break  # wait for more data (or finish() calls it torn)
            payload = view[pos + HEADER.size : end]
            if zlib.crc32(payload) != crc:
                self.error = "bad_checksum"
                break
            record = _parse(payload)
            if record is None:
                self.error = "bad_record"
                break
            out.append(record)
            pos = end
            self.good_offset = self._consumed + end
        if self.error is not None:
            self._buf = b""
        else:
            self._buf = buf[pos:]
            self._consumed += pos
        return out

    def finish(self) -> None:
        """End of file: bytes left over are a torn tail (an empty file is torn too: it lacks the magic)."""
        if self.error is None and (self._buf or not self._magic_ok):
            self.error = "torn"
        self._buf = b""


def decode(data: bytes) -> tuple[list[Record], int, str | None]:
    """A whole segment: ``(records, good_offset, error)``."""
    dec = Decoder()
    records = dec.feed(data)
    dec.finish()
    return records, dec.good_offset, dec.error


# -- replay planning ------------------------------------------------------------------------------------------


@dataclass
class LanePlan:
    """What one lane restores: entries ``items`` (engine time) numbered from ``base``, node ``positions``.

    ``renumbered``: entries were missing (a corrupt segment), so the retained ones were numbered afresh and
    the journal must be rewritten as a snapshot; ``lost`` counts the entries some node still needed that were
    missing.
    """

    base: int
    items: list[tuple[str, float]]
    positions: dict[str, int]
    lost: int = 0
    renumbered: bool = False

    @property
    def head(self) -> int:
        return self.base + len(self.items)


@dataclass
class Replay:
    """Collects the records of each segment, in segment order."""

    lanes: int = 2
    chunks: list[list[Entries]] = field(default_factory=list)
    checkpoint: Checkpoint | None = None
    segment_top: dict[int, dict[int, int]] = field(default_factory=dict)  # segment -> lane -> highest seq
    obsolete: set[int] = field(default_factory=set)  # segments before the last reset
    ignored: int = 0  # entries of lanes this build does not have

    def __post_init__(self) -> None:
        self.chunks = [[] for _ in range(self.lanes)]

    def add(self, segment: int, record: Record) -> None:
        top = self.segment_top.setdefault(segment, {})
        if isinstance(record, Entries):
            if record.lane >= self.lanes:
                self.ignored += len(record.targets)
                return
            if record.targets:
                self.chunks[record.lane].append(record)
                last = record.first_seq + len(record.targets) - 1
                top[record.lane] = max(top.get(record.lane, -1), last)
        elif isinstance(record, Checkpoint):
            self.checkpoint = record
        elif isinstance(record, Reset):
            self.obsolete.update(s for s in self.segment_top if s != segment)
            top.clear()
            self.chunks = [[] for _ in range(self.lanes)]
            self.checkpoint = None

    def plan(self, nodes: list[str], shift: float) -> list[LanePlan]:
        """Per lane, what to restore for the configured ``nodes``; ``shift`` turns wall time into engine time.

        Nodes in the last checkpoint start there; nodes without one (new in the config) start at the head;
        with no checkpoint at all every node starts at the oldest entry held (resend rather than lose).
        """
        plans = []
        for lane in range(self.lanes):
            ckpt, head = None, 0
            if self.checkpoint is not None:
                ckpt = self.checkpoint.positions[lane] if lane < len(self.checkpoint.positions) else {}
                head = self.checkpoint.heads[lane] if lane < len(self.checkpoint.heads) else 0
            plans.append(_plan_lane(self.chunks[lane], ckpt, head, nodes, shift))
        return plans


def _plan_lane(
    chunks: list[Entries], ckpt: dict[str, int] | None, written: int, nodes: list[str], shift: float
) -> LanePlan:
    # Stitch the records into runs of consecutive seqs (records may repeat after a rewrite; keep the first).
    runs: list[tuple[int, list[str], list[float]]] = []
    for rec in sorted(chunks, key=lambda r: r.first_seq):
        first, targets, times = rec.first_seq, rec.targets, rec.times
        if runs:
            start, rt, rtimes = runs[-1]
            end = start + len(rt)
            if first < end:
                skip = end - first
                if skip >= len(targets):
                    continue
                first, targets, times = end, targets[skip:], times[skip:]
            if first == end:
                rt.extend(targets)
                rtimes.extend(times)
                continue
        runs.append((first, list(targets), list(times)))
    end_seq = runs[-1][0] + len(runs[-1][1]) if runs else 0
    if ckpt is None:
        low = runs[0][0] if runs else 0
        positions = {n: low for n in nodes}
    else:
        wanted = set(nodes)
        positions = {n: p for n, p in ckpt.items() if n in wanted}
    head = max([end_seq, written, *positions.values()])
    base = min(positions.values()) if positions else head
    kept = []  # runs clipped to seq >= base
    for start, targets, times in runs:
        end = start + len(targets)
        if end <= base:
            continue
        if start < base:
            targets, times, start = targets[base - start :], times[base - start :], base
        kept.append((start, targets, times))
    contiguous = (not kept and base == head) or (
        len(kept) == 1 and kept[0][0] == base and kept[0][0] + len(kept[0][1]) == head
    )
    if contiguous:
        items = list(zip(kept[0][1], [t + shift for t in kept[0][2]], strict=True)) if kept else []
        return LanePlan(base, items, positions)
    # Entries are missing: number the retained ones afresh from base; each node's position becomes the number
    # of retained entries below its old position.
    starts = [start for start, _, _ in kept]
    counts = [0]
    for _, targets, _ in kept:
        counts.append(counts[-1] + len(targets))
    items = [(t, at + shift) for _, targets, times in kept for t, at in zip(targets, times, strict=True)]

    def renumber(pos: int) -> int:
        i = bisect.bisect_right(starts, pos) - 1
        if i < 0:
            return base
        start, targets, _ = kept[i]
        return base + counts[i] + min(pos - start, len(targets))

    lost = (head - base) - len(items)
    return LanePlan(base, items, {n: renumber(p) for n, p in positions.items()}, lost, True)
