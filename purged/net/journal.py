"""Trio/file adapter layer: the purge journal's running writer, the engine's logs as segment files on disk.

One writer task (:meth:`Journal.serve`) appends what the engine reports (``take_appended``) and, every
``checkpoint_interval``, the nodes' positions; it starts a new segment past ``segment_bytes`` and deletes the
segments whose entries every node has. Group commit: every request that arrived while a write was in progress
shares the next write and ``fsync``. :meth:`Journal.commit` is what the HTTP API awaits before answering; what it
waits for depends on ``durability``: ``fsync`` (on disk), ``batch`` (written to the OS; fsync every
``sync_interval``) or ``none`` (nothing). File I/O runs in worker threads. A write error (disk full...) makes
:meth:`Journal.check` refuse new batches with a 503 until a retry succeeds; what the engine holds is still
delivered. Start-up (:meth:`Journal.open`: lock, replay, snapshot) is :mod:`purged.net.journal_replay`.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import trio

from ..core.engine import Engine
from ..core.errors import PurgedError
from ..core.journal_format import MAGIC, encode_appended, encode_checkpoint
from .journal_replay import SUFFIX, JournalSetupError, open_journal

__all__ = ["Journal", "JournalError", "JournalSetupError", "JournalStats"]

log = logging.getLogger("purged.journal")

RETRY_AFTER = 1.0  # seconds between attempts to write again after an error


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


class Journal:
    def __init__(
        self,
        directory: str | os.PathLike[str],
        durability: str = "fsync",
        *,
        segment_bytes: int = 16 * 1024 * 1024,
        sync_interval: float = 0.1,
        checkpoint_interval: float = 1.0,
    ):
        if durability not in ("fsync", "batch", "none"):
            raise ValueError(f"durability: expected fsync, batch or none, got {durability!r}")
        self.dir = Path(directory)
        self.durability = durability
        self.segment_bytes = segment_bytes
        self.sync_interval = sync_interval
        self.checkpoint_interval = checkpoint_interval
        self.stats = JournalStats()
        self.error: JournalError | None = None
        self._engine: Engine | None = None
        self._wall_offset = 0.0  # wall time - engine time
        self._segments: dict[int, dict[int, int]] = {}  # segment -> lane -> highest seq in it
        self._active = 0
        self._fd: int | None = None
        self._size = 0
        self._lock_fd: int | None = None
        self._pending: list[bytes] = []  # encoded but not yet written (a failed write is retried)
        self._pending_top: dict[int, int] = {}
        self._pending_entries = 0
        self._written_head: list[int] = []  # per lane: one past the highest seq written
        self._unsynced = False
        self._roll_needed = False
        self._last_positions: list[dict[str, int]] | None = None
        self._checkpoint_at = 0.0
        self._sync_at = 0.0
        self._retry_at = 0.0
        self._started = 0  # flushes begun
        self._done = 0  # flushes finished, failed or not
        self._durable = 0  # everything taken by this flush number is written (and synced, with fsync)
        self._kick = trio.Event()
        self._flushed = trio.Event()
        self._lock = trio.Lock()
        self._closed = False

    def open(self, engine: Engine) -> None:
        """Lock the directory, replay it into ``engine`` (before any submit) and start a new segment."""
        open_journal(self, engine)

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

    # -- running ----------------------------------------------------------------------------------------------

    def check(self) -> None:
        """Raise :class:`JournalError` while the journal cannot write (the API answers 503)."""
        if self.error is not None:
            raise self.error

    def kick(self) -> None:
        """New entries in the engine: write them soon."""
        self._kick.set()

    def checkpoint_soon(self) -> None:
        """Positions moved in a way a replay must not undo (a purge set aside): checkpoint at the next write."""
        self._checkpoint_at = 0.0
        self._kick.set()

    async def commit(self) -> None:
        """Return once everything submitted so far is as durable as ``durability`` promises."""
        if self.durability == "none":
            self._kick.set()
            return
        needed = self._started + 1  # a flush under way took its data before ours arrived
        self._kick.set()
        while self._done < needed:
            await self._flushed.wait()
        if self._durable < needed:
            raise self.error or JournalError("the journal could not write this batch")

    async def serve(self, *, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        """The writer task; runs until cancelled or :meth:`close`."""
        task_status.started()
        while not self._closed:
            now = trio.current_time()
            deadline = self._checkpoint_at
            if self._unsynced and self.durability == "batch":
                deadline = min(deadline, self._sync_at)
            if self.error is not None:
                deadline = min(deadline, self._retry_at)
            with trio.move_on_at(max(deadline, now)):
                await self._kick.wait()
            self._kick = trio.Event()
            await self.flush()

    async def flush(self, *, final: bool = False) -> None:
        """Write what the engine appended; a checkpoint when due; fsync per ``durability`` (always if final)."""
        async with self._lock:
            self._started += 1
            number = self._started
            ok = False
            try:
                ok = await self._flush(final)
            finally:
                self._done = number
                if ok:
                    self._durable = number
                self._flushed.set()
                self._flushed = trio.Event()

    async def _flush(self, final: bool) -> bool:
        engine = self._engine
        assert engine is not None
        if self.error is not None:
            if trio.current_time() < self._retry_at and not final:
                return False  # still failing: do not hammer the disk; retried every RETRY_AFTER
            await self._relieve(engine)
        # From here to the first await, one synchronous step: the entries taken and the positions checkpointed
        # describe the same moment, so no checkpoint names a position past the entries written before it.
        now = trio.current_time()
        items = engine.take_appended()
        if items:
            frames, top = encode_appended(items, self._wall_offset)
            self._pending.extend(frames)
            self._pending_entries += len(items)
            for lane, seq in top.items():
                self._pending_top[lane] = max(self._pending_top.get(lane, -1), seq)
        roll = self._roll_needed or self._fd is None or self._size >= self.segment_bytes
        positions = None
        if roll or final or now >= self._checkpoint_at:
            positions = engine.positions()
            heads = engine.heads()  # everything below is in this write or before
            if positions == self._last_positions and not (roll or final or self._pending):
                positions = None
            self._checkpoint_at = now + self.checkpoint_interval
        data = b"".join(self._pending)
        if positions is not None:
            data += encode_checkpoint(time.time(), positions, heads)
        sync = final or self.durability == "fsync" or (self.durability == "batch" and now >= self._sync_at)
        if positions is not None and self.durability != "none":
            sync = True  # segments may be deleted on the strength of this checkpoint
        if not data and not (sync and self._unsynced):
            return True
        try:
            if roll:
                await trio.to_thread.run_sync(self._create_segment, self._active + 1)
                self._roll_needed = False
            await trio.to_thread.run_sync(self._write_blocking, data, sync)
        except OSError as exc:
            self._failed(exc, now)
            return False
        if sync:
            self._sync_at = now + self.sync_interval
        top = self._segments.setdefault(self._active, {})
        for lane, seq in self._pending_top.items():
            top[lane] = max(top.get(lane, -1), seq)
            self._written_head[lane] = max(self._written_head[lane], seq + 1)
        self.stats.entries_written += self._pending_entries
        self._pending.clear()
        self._pending_top.clear()
        self._pending_entries = 0
        if self.error is not None:
            log.warning("journal: writing again after %s", self.error.reason)
            self.error = None
        if positions is not None:
            self.stats.checkpoints += 1
            self._last_positions = positions
            try:
                await trio.to_thread.run_sync(self._delete_below, positions)
            except OSError as exc:
                log.warning("journal: deleting old segments failed: %s", exc)
        return True

    async def _relieve(self, engine: Engine) -> None:
        """After a write error (a full disk): a small checkpoint of what was written before the pending data,
        so that segments every node is done with can go and free space for the rest."""
        if self._roll_needed or self._fd is None:
            return
        heads = self._written_head
        positions = [{n: min(p, heads[li]) for n, p in lane.items()} for li, lane in enumerate(engine.positions())]
        try:
            frame = encode_checkpoint(time.time(), positions, list(heads))
            await trio.to_thread.run_sync(self._write_blocking, frame, True)
            await trio.to_thread.run_sync(self._delete_below, positions)
        except OSError:
            return

    def _failed(self, exc: OSError, now: float) -> None:
        reason = "disk_full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else "journal_error"
        self.stats.write_errors[reason] = self.stats.write_errors.get(reason, 0) + 1
        if self.error is None or self.error.reason != reason:
            log.error("journal: write to %s failed (%s): refusing new batches with 503 until it works again",
                      self.dir, exc)
        self.error = JournalError(f"cannot write the journal in {self.dir}: {exc.strerror or exc}", reason=reason)
        self._retry_at = now + RETRY_AFTER

    async def close(self) -> None:
        """Final flush and checkpoint (shielded, bounded); what is left is replayed at the next start."""
        with trio.CancelScope(shield=True), trio.move_on_after(30):
            await self.flush(final=True)
        if self.error is not None:
            log.error("journal: final checkpoint failed (%s); the next start replays from the last one",
                      self.error.reason)
        self.release()

    def release(self) -> None:
        """Close the files and unlock the directory (idempotent); no flush: see :meth:`close`."""
        self._closed = True
        self._kick.set()
        for fd in (self._fd, self._lock_fd):
            if fd is not None:
                os.close(fd)
        self._fd = self._lock_fd = None

    @property
    def segment_count(self) -> int:
        return len(self._segments)
