"""Trio/file adapter layer: the start-up side of the purge journal (:meth:`Journal.open <.journal.Journal.open>`).

Runs once, before any listener: lock ``state_dir``, replay every segment into the engine (``Engine.restore``),
truncate a torn or corrupt tail (counted, logged, never fatal), set aside a file that is not a segment, delete
the segments a snapshot's reset made obsolete, then start a new segment with a checkpoint. If a corrupt segment
lost entries some node needed, the lanes are renumbered: everything held is rewritten as one snapshot segment
instead, so no old segment refers to the old numbering. File I/O here blocks (nothing else runs yet).

These functions take the :class:`~.journal.Journal` whose state they set up; its running writer (group commit,
checkpoints, segment rolling) is :mod:`purged.net.journal`, the format :mod:`purged.core.journal_format`.
"""

from __future__ import annotations

import fcntl
import gc
import logging
import os
import time
from typing import TYPE_CHECKING

import trio

from ..core.engine import Engine
from ..core.errors import PurgedError
from ..core.journal_format import (
    MAGIC,
    LanePlan,
    Replay,
    decode,
    encode_checkpoint,
    encode_entries,
    encode_reset,
)

if TYPE_CHECKING:
    from .journal import Journal

log = logging.getLogger("purged.journal")

SUFFIX = ".seg"
SNAPSHOT_CHUNK = 10_000  # entries per record in a rewritten snapshot


class JournalSetupError(PurgedError):
    """The state directory cannot be used at all (not writable, locked by another purged)."""

    reason = "journal_setup"


def open_journal(journal: Journal, engine: Engine) -> None:
    """Lock the directory, replay it into ``engine`` (before any submit) and start a new segment."""
    t0 = time.perf_counter()
    journal._engine = engine
    journal._wall_offset = time.time() - trio.current_time()
    directory, stats = journal.dir, journal.stats
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        journal._lock_fd = os.open(directory / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        fcntl.flock(journal._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise JournalSetupError(f"{directory} is in use by another purged process") from None
    except OSError as exc:
        raise JournalSetupError(f"cannot use state_dir {directory}: {exc.strerror or exc}") from None
    for leftover in directory.glob("*.tmp"):  # an unfinished snapshot; the segments it replaced still exist
        leftover.unlink()
    numbers = sorted(int(p.stem) for p in directory.glob("*" + SUFFIX) if p.stem.isdigit())
    # Replay allocates millions of acyclic objects; the cyclic GC would scan them again and again (about
    # half of a 1M-entry replay). Nothing here makes cycles, so it waits until the engine is rebuilt.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        plans, obsolete = _replay(journal, numbers, engine)
    finally:
        if gc_was_enabled:
            gc.enable()
    journal._written_head = engine.heads()
    stats.replayed = sum(len(p.items) for p in plans)
    stats.lost = sum(p.lost for p in plans)
    journal._active = (numbers[-1] if numbers else 0) + 1
    for number in obsolete:
        journal._segments.pop(number, None)
        journal._unlink(number)
    if any(p.renumbered for p in plans):
        log.error("journal: %d entries missing (corrupt segment); rewriting the journal as a snapshot", stats.lost)
        try:
            _write_snapshot(journal, engine)
        except OSError as exc:  # the old segments still hold the old numbering: cannot go on safely
            raise JournalSetupError(f"cannot rewrite the journal in {directory}: {exc.strerror or exc}") from None
    else:
        try:
            journal._create_segment(journal._active)
            heads = engine.heads()
            journal._write_blocking(encode_checkpoint(time.time(), engine.positions(), heads), sync=True)
        except OSError as exc:  # e.g. a full disk: start anyway, deliver what was replayed, answer 503
            journal._failed(exc, trio.current_time())
            journal._roll_needed = True
    journal._last_positions = engine.positions()
    journal._delete_below(journal._last_positions)
    stats.replay_seconds = time.perf_counter() - t0
    log.info(
        "journal: replayed %d pending purges from %d segments in %.2fs (durability %s)",
        stats.replayed, len(numbers), stats.replay_seconds, journal.durability,
    )


def _replay(journal: Journal, numbers: list[int], engine: Engine) -> tuple[list[LanePlan], set[int]]:
    """Restore the engine's lanes from the segments ``numbers``; return the plans and the obsolete segments."""
    replay = Replay(lanes=len(engine.lanes))
    for number in numbers:
        _replay_segment(journal, number, replay)
    plans = replay.plan(list(engine.nodes), -journal._wall_offset)
    if replay.checkpoint is not None:
        gone = sorted({n for lane in replay.checkpoint.positions for n in lane} - set(engine.nodes))
        if gone:
            log.warning("journal: nodes no longer configured, their backlogs dropped: %s", ", ".join(gone))
    for li, plan in enumerate(plans):
        engine.restore(li, plan.base, plan.items, plan.positions)
    engine.record_appends()
    return plans, replay.obsolete


def _replay_segment(journal: Journal, number: int, replay: Replay) -> None:
    path = journal._path(number)
    data = path.read_bytes()
    records, good, error = decode(data)
    replay.segment_top.setdefault(number, {})
    for record in records:
        replay.add(number, record)
    journal._segments[number] = replay.segment_top[number]
    if error is None:
        return
    stats = journal.stats
    stats.truncated[error] = stats.truncated.get(error, 0) + 1
    stats.truncated_bytes += len(data) - good
    if good == 0 and error == "bad_magic":
        path.rename(path.with_name(path.name + ".corrupt"))
        journal._segments.pop(number)
        log.error("journal: %s is not a journal segment (bad header); renamed to *.corrupt", path.name)
        return
    log.warning("journal: %s: %s at byte %d; truncating %d bytes after it", path.name, error, good,
                len(data) - good)
    if good == 0:  # not even a whole header: nothing in it
        path.unlink()
        journal._segments.pop(number)
    else:
        os.truncate(path, good)


def _write_snapshot(journal: Journal, engine: Engine) -> None:
    """Rewrite everything held as one new segment that starts with a reset, then drop the old segments."""
    number = journal._active
    frames = [MAGIC, encode_reset()]
    top: dict[int, int] = {}
    for li in range(len(engine.lanes)):
        rows = list(engine.held(li))
        for i in range(0, len(rows), SNAPSHOT_CHUNK):
            chunk = rows[i : i + SNAPSHOT_CHUNK]
            frames.append(encode_entries(li, chunk[0][0], [e.target for _, e in chunk],
                                         [e.accepted_at + journal._wall_offset for _, e in chunk]))
        if rows:
            top[li] = rows[-1][0]
    frames.append(encode_checkpoint(time.time(), engine.positions(), engine.heads()))
    tmp = journal.dir / f"{number:016d}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        journal._write_all(fd, b"".join(frames))
        os.fsync(fd)
    except OSError:
        tmp.unlink()
        raise
    finally:
        os.close(fd)
    os.rename(tmp, journal._path(number))
    journal._sync_dir()
    for old in list(journal._segments):
        journal._unlink(old)
    journal._segments = {number: top}
    journal._fd = os.open(journal._path(number), os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
    journal._size = os.fstat(journal._fd).st_size
