"""The journal adapter on real files: replay, checkpoints, rotation and deletion, torn and corrupt segments,
group commit, write errors (and a full tmpfs through the API: 503, no crash), the directory lock."""

from __future__ import annotations

import contextlib
import errno
import os
import random
import subprocess
import uuid

import pytest
import trio
from daemon_helpers import config_for, running_daemon
from stub_edge import StubEdge, serve_stub_edge

from purged.core.engine import BULK, HIGH, Engine, Policy
from purged.core.journal_format import MAGIC
from purged.core.status import oldest_pending_age
from purged.core.topology import DatacenterSpec, TierSpec, Topology
from purged.net.journal import Journal, JournalError, JournalSetupError

TOPO = Topology([
    DatacenterSpec("a", (), (TierSpec("backend", 0.0, ("b1", "b2")), TierSpec("frontend", 0.0, ("f1",)))),
])


def engine(topology=TOPO) -> Engine:
    return Engine(topology, now=trio.current_time(), policy=Policy(), rng=random.Random(1))


def drain(e: Engine, node: str, limit: int = 1_000_000) -> list[str]:
    sent = e.take(node, limit, trio.current_time())
    for ident, _ in sent:
        e.ack(node, ident, 200, trio.current_time())
    return [t for _, t in sent]


def segments(path) -> list:
    return sorted(p for p in path.iterdir() if p.suffix == ".seg")


async def open_journal(path, e=None, **kw) -> tuple[Journal, Engine]:
    e = e or engine()
    j = Journal(path, kw.pop("durability", "fsync"), **kw)
    j.open(e)
    return j, e


@contextlib.asynccontextmanager
async def running(path, **kw):
    j, e = await open_journal(path, **kw)
    async with trio.open_nursery() as nursery:
        await nursery.start(j.serve)
        yield j, e
        await j.close()
        nursery.cancel_scope.cancel()


async def test_replay_restores_pending_entries_and_positions(tmp_path):
    async with running(tmp_path) as (j, e):
        e.submit([f"h.org/{i}" for i in range(5)], trio.current_time())
        e.submit(["h.org/high"], trio.current_time(), priority="high")
        await j.commit()
        assert drain(e, "b1", 3) == ["h.org/high", "h.org/0", "h.org/1"]
    j2, e2 = await open_journal(tmp_path)
    assert j2.stats.replayed == 6
    assert drain(e2, "b1") == ["h.org/2", "h.org/3", "h.org/4"]  # the final checkpoint had b1's progress
    assert drain(e2, "b2") == ["h.org/high"] + [f"h.org/{i}" for i in range(5)]
    # Nothing was acked by the backends before the restart: the frontend waits for them, as before.
    assert drain(e2, "f1") == ["h.org/high"] + [f"h.org/{i}" for i in range(5)]
    # Sequence numbers continue where they stopped, and times come back on this process's clock.
    assert e2.lanes[BULK].log.head == 5 and e2.lanes[HIGH].log.head == 1
    assert abs(oldest_pending_age(e2, "b1", trio.current_time())) < 5
    await j2.close()


async def test_new_node_at_head_removed_node_ignored(tmp_path):
    async with running(tmp_path) as (j, e):
        e.submit(["h.org/1"], trio.current_time())
        await j.commit()
    topo = Topology([DatacenterSpec("a", (), (TierSpec("backend", 0.0, ("b1", "b9")),))])
    j2, e2 = await open_journal(tmp_path, engine(topo))
    assert drain(e2, "b9") == [] and drain(e2, "b1") == ["h.org/1"]
    await j2.close()


async def test_crash_without_close_replays_from_last_checkpoint(tmp_path):
    j, e = await open_journal(tmp_path)
    async with trio.open_nursery() as nursery:
        await nursery.start(j.serve)
        e.submit([f"h.org/{i}" for i in range(3)], trio.current_time())
        await j.commit()
        nursery.cancel_scope.cancel()  # no close(): like a SIGKILL after the write
    j.release()  # the process is gone: its descriptors and lock with it
    j2, e2 = await open_journal(tmp_path)
    assert j2.stats.replayed == 3 and drain(e2, "b1") == ["h.org/0", "h.org/1", "h.org/2"]
    await j2.close()


async def test_torn_tail_is_truncated_and_counted(tmp_path):
    async with running(tmp_path) as (j, e):
        e.submit([f"h.org/{i}" for i in range(4)], trio.current_time())
        await j.commit()
    last = segments(tmp_path)[-1]
    good = last.stat().st_size
    with open(last, "ab") as f:
        f.write(b"\x40\x00\x00\x00\x01\x02")  # a header promising 64 bytes, then the crash
    j2, e2 = await open_journal(tmp_path)
    assert j2.stats.truncated == {"torn": 1} and j2.stats.truncated_bytes == 6
    assert last.stat().st_size == good
    assert j2.stats.replayed == 4
    await j2.close()
    j3, _ = await open_journal(tmp_path)
    assert j3.stats.truncated == {} and j3.stats.replayed == 4
    await j3.close()


async def test_corrupt_middle_segment_is_rewritten_as_a_snapshot(tmp_path):
    async with running(tmp_path, segment_bytes=65536) as (j, e):
        for batch in range(6):  # several segments of ~25 KiB records
            e.submit([f"h.org/{batch}/{i}/" + "x" * 40 for i in range(500)], trio.current_time())
            await j.commit()
            await j.flush()  # roll when over size
    segs = segments(tmp_path)
    assert len(segs) >= 3
    victim = segs[1]
    data = bytearray(victim.read_bytes())
    data[len(MAGIC) + 20] ^= 0xFF
    victim.write_bytes(bytes(data))
    j2, e2 = await open_journal(tmp_path)
    assert j2.stats.truncated.get("bad_checksum") == 1
    assert 0 < j2.stats.lost < 3000
    assert j2.stats.replayed == 3000 - j2.stats.lost
    assert len(segments(tmp_path)) == 1  # the snapshot
    got = drain(e2, "b1")
    assert len(got) == j2.stats.replayed and len(set(got)) == len(got)
    await j2.close()
    j3, e3 = await open_journal(tmp_path)  # the snapshot replays cleanly
    assert j3.stats.truncated == {} and j3.stats.replayed == 3000 - j2.stats.lost  # b2, f1 still owe them
    await j3.close()


async def test_garbage_file_is_set_aside(tmp_path):
    (tmp_path / "0000000000000001.seg").write_bytes(b"not a journal at all")
    (tmp_path / "0000000000000002.seg").write_bytes(b"")
    j, _ = await open_journal(tmp_path)
    assert j.stats.truncated == {"bad_magic": 1, "torn": 1}
    assert (tmp_path / "0000000000000001.seg.corrupt").exists()
    await j.close()


async def test_segments_below_every_position_are_deleted(tmp_path):
    async with running(tmp_path, segment_bytes=65536, checkpoint_interval=0.01) as (j, e):
        for batch in range(8):
            e.submit([f"h.org/{batch}/{i}/" + "x" * 40 for i in range(500)], trio.current_time())
            await j.commit()
            await j.flush()
        assert len(segments(tmp_path)) >= 3
        for node in ("b1", "b2", "f1"):
            drain(e, node)
        await trio.sleep(0.02)
        await j.flush()
        assert len(segments(tmp_path)) == 1 and j.stats.segments_deleted >= 2
    j2, _ = await open_journal(tmp_path)
    assert j2.stats.replayed == 0
    await j2.close()


async def test_group_commit_shares_fsyncs(tmp_path):
    async with running(tmp_path) as (j, e):
        before = j.stats.fsyncs

        async def client(i):
            e.submit([f"h.org/{i}"], trio.current_time())
            await j.commit()

        async with trio.open_nursery() as nursery:
            for i in range(200):
                nursery.start_soon(client, i)
        assert j.stats.fsyncs - before < 50
        assert j.stats.entries_written == 200


@pytest.mark.parametrize("mode", ["batch", "none"])
async def test_batch_and_none_modes_still_replay(tmp_path, mode):
    async with running(tmp_path, durability=mode, sync_interval=0.01) as (j, e):
        e.submit(["h.org/1", "h.org/2"], trio.current_time())
        j.kick()
        await j.commit()
        await trio.sleep(0.05)
    j2, _ = await open_journal(tmp_path)
    assert j2.stats.replayed == 2
    await j2.close()


async def test_write_error_refuses_then_recovers(tmp_path, monkeypatch):
    async with running(tmp_path) as (j, e):
        real = Journal._write_all

        def full(fd, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        monkeypatch.setattr(Journal, "_write_all", staticmethod(full))
        e.submit(["h.org/1"], trio.current_time())
        with pytest.raises(JournalError) as err:
            await j.commit()
        assert err.value.reason == "disk_full" and err.value.status == 503
        with pytest.raises(JournalError):
            j.check()
        monkeypatch.setattr(Journal, "_write_all", staticmethod(real))
        with trio.fail_after(5):
            while j.error is not None:
                await trio.sleep(0.05)
        j.check()
        await j.commit()
        assert j.stats.write_errors == {"disk_full": 1} or j.stats.write_errors["disk_full"] >= 1
    j2, _ = await open_journal(tmp_path)
    assert j2.stats.replayed == 1  # the batch that failed at first was written on the retry
    await j2.close()


async def test_second_process_is_locked_out(tmp_path):
    j, _ = await open_journal(tmp_path)
    with pytest.raises(JournalSetupError):
        await open_journal(tmp_path)
    await j.close()


# -- through the daemon ------------------------------------------------------------------------------------------


async def test_daemon_restart_keeps_accepted_purges(tmp_path):
    cfg = config_for({"a": [["127.0.0.1:9"]]}, state_dir=str(tmp_path))
    async with running_daemon(cfg) as (service, client):
        r = await client.post("/v1/purge", json={"urls": [f"http://h.org/{i}" for i in range(100)]})
        assert r.status_code == 202
        assert service.journal.stats.fsyncs >= 1
    async with running_daemon(cfg) as (service, client):
        assert service.backlog() == 100
        text = (await client.get("/metrics")).text
        assert "purged_journal_replayed_entries 100.0" in text
        assert "purged_journal_writable 1.0" in text


@pytest.fixture
def small_tmpfs(tmp_path):
    if os.geteuid() != 0:
        pytest.fail("the disk-full test mounts a tmpfs and needs root (as CI runs)")
    mnt = tmp_path / f"tmpfs-{uuid.uuid4().hex[:8]}"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True)
    if res.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs: {res.stderr.decode(errors='replace')}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


async def test_disk_full_answers_503_and_keeps_delivering(small_tmpfs):
    edge = StubEdge()
    async with trio.open_nursery() as nursery:
        port = await nursery.start(serve_stub_edge, edge)
        edge.stall()  # the node holds everything back: the journal fills the disk
        cfg = config_for({"a": [[f"127.0.0.1:{port}"]]}, state_dir=str(small_tmpfs),
                         journal={"segment_bytes": 262144}, sender={"timeout": 60})
        async with running_daemon(cfg) as (service, client):
            accepted, statuses = 0, []
            for b in range(200):
                urls = [f"http://h.org/{b}/{i}/" + "x" * 60 for i in range(500)]
                r = await client.post("/v1/purge", json={"urls": urls})
                statuses.append(r.status_code)
                if r.status_code == 202:
                    accepted += len(urls)
                else:
                    assert r.status_code == 503 and r.json()["error"] == "disk_full", r.text
                    assert r.headers["retry-after"]
                    if statuses.count(503) >= 3:
                        break
            assert 503 in statuses and accepted > 0
            text = (await client.get("/metrics")).text
            assert "purged_journal_writable 0.0" in text
            assert 'purged_purges_rejected_total{reason="disk_full",source="http"}' in text
            assert (await client.get("/healthz")).status_code == 200
            # The node comes back: everything accepted is delivered, the journal frees space and works again.
            edge.resume()
            with trio.fail_after(30):
                while service.backlog():
                    await trio.sleep(0.05)
            with trio.fail_after(10):
                while service.journal.error is not None:
                    await trio.sleep(0.1)
            r = await client.post("/v1/purge", json={"urls": ["http://h.org/after"]})
            assert r.status_code == 202
        nursery.cancel_scope.cancel()
    assert len({req.path for req in edge.answered}) >= accepted
