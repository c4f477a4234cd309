"""Trio/file adapter layer: the purge journal's running writer, the engine's logs as segment files on disk.

One writer task (:meth:`Journal.serve`) appends what the engine reports (``take_appended``) and, every
``checkpoint_interval``, the nodes' positions; it starts a new segment past ``segment_bytes`` and deletes the
segments whose entries every node has. Group commit: every request that arrived while a write was in progress
shares the next write and ``fsync``. :meth:`Journal.commit` is what the HTTP API awaits before answering; what it
waits for depends on ``durability``: ``fsync`` (on disk), ``batch`` (written to the OS; fsync every
``sync_interval``) or ``none`` (nothing). File I/O runs in worker threads. A write error (disk full...) makes
:meth:`Journal.check` refuse new batches with a 503 until a retry succeeds; what the engine holds is still
delivered. Its files and start-up (lock, replay, snapshot) are the base class, :mod:`purged.net.journal_files`.
"""

from __future__ import annotations

import logging
import os
import time

import trio

from ..core.engine import Engine
from ..core.journal_format import encode_appended, encode_checkpoint
from .journal_files import JournalError, JournalFiles, JournalSetupError, JournalStats

__all__ = ["Journal", "JournalError", "JournalSetupError", "JournalStats"]

log = logging.getLogger("purged.journal")


class Journal(JournalFiles):
    def __init__(
        self,
        directory: str | os.PathLike[str],
        durability: str = "fsync",
        *,
        segment_bytes: int = 16 * 1024 * 1024,
        sync_interval: float = 0.1,
        checkpoint_interval: float = 1.0,
    ):
        super().__init__(directory, durability)
        self.segment_bytes = segment_bytes
        self.sync_interval = sync_interval
        self.checkpoint_interval = checkpoint_interval
        self._pending: list[bytes] = []  # encoded but not yet written (a failed write is retried)
        self._pending_top: dict[int, int] = {}
        self._pending_entries = 0
        self._checkpoint_at = 0.0
        self._sync_at = 0.0
        self._started = 0  # flushes begun
        self._done = 0  # flushes finished, failed or not
        self._durable = 0  # everything taken by this flush number is written (and synced, with fsync)
        self._kick = trio.Event()
        self._flushed = trio.Event()
        self._lock = trio.Lock()
        self._closed = False

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
