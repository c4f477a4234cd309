"""Trio/file adapter layer: the purge journal's files, :class:`~purged.net.journal.Journal`'s base class.

The locked state directory and its segments: creating, appending to, syncing and deleting segment files (blocking
calls, run in worker threads once the daemon runs), and start-up (:meth:`JournalFiles.open`), which runs once,
before any listener: lock ``state_dir``, replay every segment into the engine (``Engine.restore``), truncate a
torn or corrupt tail (counted, logged, never fatal), set aside a file that is not a segment, delete the segments
a snapshot's reset made obsolete, then start a new segment with a checkpoint. If a corrupt segment lost entries
some node needed, the lanes are renumbered: everything held is rewritten as one snapshot segment instead, so no
old segment refers to the old numbering.

The running writer (group commit, checkpoints, segment rolling) is :mod:`purged.net.journal`, the record format
:mod:`purged.core.journal_format`.
"""

from __future__ import annotations

import errno
import fcntl
import gc
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

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

log = logging.getLogger("purged.journal")

SUFFIX = ".seg"
SNAPSHOT_CHUNK = 10_000  # entries per record in a rewritten snapshot
RETRY_AFTER = 1.0  # seconds between attempts to write again after an error


class JournalSetupError(PurgedError):
    """The state directory cannot be used at all (not writable, locked by another purged)."""

    reason = "journal_setup"


class JournalError(PurgedError):
    """The journal cannot take new purges (``disk_full`` or ``journal_error``): answered with a 503."""

    reason = "journal_error"
    status = 503
    headers = [("Retry-After", "5")]


@dataclass
class JournalStats:
    bytes_written: int = 0
    entries_written: int = 0
    writes: int = 0
    fsyncs: int = 0
    sync_seconds: float = 0.0
    checkpoints: int = 0
    write_errors: dict[str, int] = field(default_factory=dict)
    truncated: dict[str, int] = field(default_factory=dict)  # replay: torn/corrupt tails by reason
    truncated_bytes: int = 0
    replayed: int = 0  # entries restored at start
    lost: int = 0  # entries some node needed that a corrupt segment no longer held
    replay_seconds: float = 0.0
    segments_deleted: int = 0


class JournalFiles:
    def __init__(self, directory: str | os.PathLike[str], durability: str):
        if durability not in ("fsync", "batch", "none"):
            raise ValueError(f"durability: expected fsync, batch or none, got {durability!r}")
        self.dir = Path(directory)
        self.durability = durability
        self.stats = JournalStats()
        self.error: JournalError | None = None
        self._engine: Engine | None = None
        self._wall_offset = 0.0  # wall time - engine time
        self._segments: dict[int, dict[int, int]] = {}  # segment -> lane -> highest seq in it
        self._active = 0
        self._fd: int | None = None
        self._size = 0
        self._lock_fd: int | None = None
        self._written_head: list[int] = []  # per lane: one past the highest seq written
        self._unsynced = False
        self._roll_needed = False
        self._last_positions: list[dict[str, int]] | None = None
        self._retry_at = 0.0

    # -- start-up ---------------------------------------------------------------------------------------------

    def open(self, engine: Engine) -> None:
        """Lock the directory, replay it into ``engine`` (before any submit) and start a new segment."""
        t0 = time.perf_counter()
        self._engine = engine
        self._wall_offset = time.time() - trio.current_time()
        directory, stats = self.dir, self.stats
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._lock_fd = os.open(directory / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
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
            plans, obsolete = self._replay(numbers, engine)
        finally:
            if gc_was_enabled:
                gc.enable()
        self._written_head = engine.heads()
        stats.replayed = sum(len(p.items) for p in plans)
        stats.lost = sum(p.lost for p in plans)
        self._active = (numbers[-1] if numbers else 0) + 1
        for number in obsolete:
            self._segments.pop(number, None)
            self._unlink(number)
        if any(p.renumbered for p in plans):
            log.error("journal: %d entries missing (corrupt segment); rewriting the journal as a snapshot", stats.lost)
            try:
                self._write_snapshot(engine)
            except OSError as exc:  # the old segments still hold the old numbering: cannot go on safely
                raise JournalSetupError(f"cannot rewrite the journal in {directory}: {exc.strerror or exc}") from None
        else:
            try:
                self._create_segment(self._active)
                heads = engine.heads()
                self._write_blocking(encode_checkpoint(time.time(), engine.positions(), heads), sync=True)
            except OSError as exc:  # e.g. a full disk: start anyway, deliver what was replayed, answer 503
                self._failed(exc, trio.current_time())
                self._roll_needed = True
        self._last_positions = engine.positions()
        self._delete_below(self._last_positions)
        stats.replay_seconds = time.perf_counter() - t0
        log.info(
            "journal: replayed %d pending purges from %d segments in %.2fs (durability %s)",
            stats.replayed, len(numbers), stats.replay_seconds, self.durability,
        )



    def _replay(self, numbers: list[int], engine: Engine) -> tuple[list[LanePlan], set[int]]:
        """Restore the engine's lanes from the segments ``numbers``; return the plans and the obsolete segments."""
        replay = Replay(lanes=len(engine.lanes))
        for number in numbers:
            self._replay_segment(number, replay)
        plans = replay.plan(list(engine.nodes), -self._wall_offset)
        if replay.checkpoint is not None:
            gone = sorted({n for lane in replay.checkpoint.positions for n in lane} - set(engine.nodes))
            if gone:
                log.warning("journal: nodes no longer configured, their backlogs dropped: %s", ", ".join(gone))
        for li, plan in enumerate(plans):
            engine.restore(li, plan.base, plan.items, plan.positions)
        engine.record_appends()
        return plans, replay.obsolete



    def _replay_segment(self, number: int, replay: Replay) -> None:
        path = self._path(number)
        data = path.read_bytes()
        records, good, error = decode(data)
        replay.segment_top.setdefault(number, {})
        for record in records:
            replay.add(number, record)
        self._segments[number] = replay.segment_top[number]
        if error is None:
            return
        stats = self.stats
        stats.truncated[error] = stats.truncated.get(error, 0) + 1
        stats.truncated_bytes += len(data) - good
        if good == 0 and error == "bad_magic":
            path.rename(path.with_name(path.name + ".corrupt"))
            self._segments.pop(number)
            log.error("journal: %s is not a journal segment (bad header); renamed to *.corrupt", path.name)
            return
        log.warning("journal: %s: %s at byte %d; truncating %d bytes after it", path.name, error, good,
                    len(data) - good)
        if good == 0:  # not even a whole header: nothing in it
            path.unlink()
            self._segments.pop(number)
        else:
            os.truncate(path, good)



    def _write_snapshot(self, engine: Engine) -> None:
        """Rewrite everything held as one new segment that starts with a reset, then drop the old segments."""
        number = self._active
        frames = [MAGIC, encode_reset()]
        top: dict[int, int] = {}
        for li in range(len(engine.lanes)):
            rows = list(engine.held(li))
            for i in range(0, len(rows), SNAPSHOT_CHUNK):
                chunk = rows[i : i + SNAPSHOT_CHUNK]
                frames.append(encode_entries(li, chunk[0][0], [e.target for _, e in chunk],
                                             [e.accepted_at + self._wall_offset for _, e in chunk]))
            if rows:
                top[li] = rows[-1][0]
        frames.append(encode_checkpoint(time.time(), engine.positions(), engine.heads()))
        tmp = self.dir / f"{number:016d}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            self._write_all(fd, b"".join(frames))
            os.fsync(fd)
        except OSError:
            tmp.unlink()
            raise
        finally:
            os.close(fd)
        os.rename(tmp, self._path(number))
        self._sync_dir()
        for old in list(self._segments):
            self._unlink(old)
        self._segments = {number: top}
        self._fd = os.open(self._path(number), os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        self._size = os.fstat(self._fd).st_size

    # -- blocking file operations (called in worker threads once running) ----------------------------------

    def _path(self, number: int) -> Path:
        return self.dir / f"{number:016d}{SUFFIX}"

    @staticmethod
    def _write_all(fd: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]

    def _sync_dir(self) -> None:
        if self.durability == "none":
            return
        fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _create_segment(self, number: int) -> None:
        fd = os.open(self._path(number), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC, 0o600)
        try:
            self._write_all(fd, MAGIC)
        except OSError:
            os.close(fd)
            os.unlink(self._path(number))
            raise
        old, self._fd, self._size, self._active = self._fd, fd, len(MAGIC), number
        self._segments[number] = {}
        self._sync_dir()
        if old is not None:
            try:
                if self.durability != "none":
                    os.fdatasync(old)
            finally:
                os.close(old)

    def _write_blocking(self, data: bytes, sync: bool) -> None:
        assert self._fd is not None
        if data:
            try:
                self._write_all(self._fd, data)
            except OSError:
                try:  # cut the partial record so that the next write follows a whole one
                    os.ftruncate(self._fd, self._size)
                except OSError:
                    self._roll_needed = True
                raise
            self._size += len(data)
            self._unsynced = True
            self.stats.bytes_written += len(data)
            self.stats.writes += 1
        if sync and self._unsynced:
            t0 = time.perf_counter()
            try:
                os.fdatasync(self._fd)
            except OSError:
                self._roll_needed = True  # after a failed fsync the page cache may not hold the data: rewrite
                raise
            self.stats.sync_seconds += time.perf_counter() - t0
            self.stats.fsyncs += 1
            self._unsynced = False

    def _unlink(self, number: int) -> None:
        try:
            self._path(number).unlink()
            self.stats.segments_deleted += 1
        except FileNotFoundError:
            pass

    def _delete_below(self, positions: list[dict[str, int]]) -> None:
        """Delete segments whose entries every node has (per the checkpoint just written)."""
        lows = [min(p.values()) if p else 1 << 62 for p in positions]
        doomed = [
            n for n, top in self._segments.items()
            if n != self._active and all(seq < lows[lane] for lane, seq in top.items() if lane < len(lows))
        ]
        for number in doomed:
            del self._segments[number]
            self._unlink(number)
        if doomed:
            self._sync_dir()

    def _failed(self, exc: OSError, now: float) -> None:
        reason = "disk_full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else "journal_error"
        self.stats.write_errors[reason] = self.stats.write_errors.get(reason, 0) + 1
        if self.error is None or self.error.reason != reason:
            log.error("journal: write to %s failed (%s): refusing new batches with 503 until it works again",
                      self.dir, exc)
        self.error = JournalError(f"cannot write the journal in {self.dir}: {exc.strerror or exc}", reason=reason)
        self._retry_at = now + RETRY_AFTER

    @property
    def segment_count(self) -> int:
        return len(self._segments)
