"""Process faults under load, judged by the oracle from Varnish's own logs (issue 14):

- SIGSTOP of a node's varnishd child for a few seconds, then SIGCONT: nothing lost, nothing set aside, purges
  resume after SIGCONT, the other data centre never noticed;
- SIGKILL of purged at seeded random moments (0-0.8 s after its 5th accepted batch) while batches flow and the nodes deliver (checkpoints, segment
  deletion and replay all mid-flight), restarted on the same journal each time: nothing accepted is lost;
- SIGHUP adding a node and removing one while batches flow, then SIGTERM mid-load and a restart on the journal:
  the kept node loses nothing, the added one gets everything accepted after the reload, what the removed one
  still owed is counted (``node_removed``), and nothing is lost across the restart.

The disk-full scenario is ``test_rel_process_disk.py``. A blocked event loop caught by the watchdog is
``tests/test_signals.py::test_watchdog_pings_stop_while_the_loop_is_blocked`` (the real daemon and a notify
socket of the test's own: an end-to-end test already, so not repeated here).
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time

import httpx
import oracle
import pytest
import trio
import yaml
from daemon_helpers import running_daemon
from harness import post_batch, purged_view, wait_done
from test_signals import Notifications, PurgedProcess, free_port, write_config

pytestmark = pytest.mark.integration

SENDER = {"connect_timeout": 0.5, "timeout": 0.5, "retry_initial": 0.05, "retry_max": 0.3, "down_after": 3}


def varnish_child(node) -> int:
    """PID of the varnishd worker child (the manager's child in its process group)."""
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat", "rb") as f:
                    stat = f.read()
            except OSError:
                continue
            fields = stat[stat.rfind(b")") + 2:].split()
            if int(fields[1]) == node.pid and int(fields[2]) == node.pid:  # ppid, pgrp
                return int(entry.name)
    raise AssertionError(f"no varnishd child under {node.pid}")


class Load:
    """A thread posting batches of fresh URLs to one daemon until stopped (bounded in count and time).

    2xx answers go into ``ledger``; URLs of a request without a 2xx answer (refused, or the daemon died with it)
    are *in doubt*: a node may get them (the journal may hold them) without the oracle calling them unexpected.
    """

    def __init__(self, url: str, ledger: oracle.Ledger, tag: str, *, batch: int = 20, interval: float = 0.02,
                 limit: float = 30.0, host: str = "w.example.org"):
        self.url, self.ledger, self.tag, self.batch, self.interval = url, ledger, tag, batch, interval
        self.limit, self.host = limit, host
        self.doubt: set[tuple[str, str]] = set()
        self.statuses: dict[object, int] = {}
        self.answers: list[object] = []  # in order
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.count = 0

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def wait_accepted(self, batches: int, timeout: float = 20.0) -> None:
        """Until ``batches`` were answered 202 in all (a loaded machine may take a while)."""
        self.wait_answers(batches, timeout, status=202)

    def wait_answers(self, count: int, timeout: float = 20.0, status: object = None) -> None:
        deadline = time.monotonic() + timeout
        while (self.statuses.get(status, 0) if status is not None else len(self.answers)) < count:
            assert time.monotonic() < deadline, f"only {self.statuses} after {timeout}s"
            time.sleep(0.01)

    def _run(self) -> None:
        deadline = time.monotonic() + self.limit
        with httpx.Client(base_url=self.url, timeout=5) as http:
            while not self._stop.is_set() and time.monotonic() < deadline and self.count < 5000:
                self.count += 1
                urls = [f"http://{self.host}/{self.tag}/{self.count}/{i}" for i in range(self.batch)]
                sent_at = time.time()
                try:
                    r = http.post("/v1/purge", json={"urls": urls})
                    status: object = r.status_code
                except httpx.TransportError as exc:
                    status = type(exc).__name__
                self.statuses[status] = self.statuses.get(status, 0) + 1
                self.answers.append(status)
                if status in (200, 201, 202):
                    self.ledger.add(urls, sent_at, r.json())
                else:
                    self.doubt.update(oracle.split_url(u) for u in urls)
                self._stop.wait(self.interval)


def without(records, doubt: set) -> list:
    return [r for r in records if (r.host.lower(), r.url) not in doubt]


def only(node) -> dict:
    """A config naming one node, for the oracle to judge that node alone."""
    return {"datacenters": {"a": {"tiers": [{"nodes": [node.address]}]}}}


def wait_drained(url: str, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        health = httpx.get(url + "/healthz", timeout=10).json()
        if all(s["backlog"] == 0 for s in health["nodes"].values()):
            return health
        assert time.monotonic() < deadline, health
        time.sleep(0.1)


# -- SIGSTOP / SIGCONT of a node ---------------------------------------------------------------------------------


async def test_a_node_stopped_for_seconds_then_continued_loses_nothing(varnish_factory):
    stopped, other = varnish_factory(2)
    cfg = {"listen": {"http": "127.0.0.1:0"}, "state_dir": None, "sender": SENDER,
           "datacenters": {"frozen": {"tiers": [{"nodes": [stopped.address]}]},
                           "clean": {"tiers": [{"nodes": [other.address]}]}}}
    ledger = oracle.Ledger()
    child = varnish_child(stopped)
    async with running_daemon(cfg) as (service, client):
        batches = []

        async def load(rounds: int) -> None:
            for _ in range(rounds):
                batches.append(await post_batch(client, ledger, [f"http://w.example.org/stop/{len(batches)}/{j}"
                                                                 for j in range(10)]))
                await trio.sleep(0.05)

        await load(10)
        os.kill(child, signal.SIGSTOP)
        stopped_at = time.time()
        await load(40)  # ~2.5 s: the sender times out, reconnects (the kernel still accepts), times out...
        os.kill(child, signal.SIGCONT)
        continued_at = time.time()
        await load(10)
        assert await wait_done(client, batches, timeout=30), (await purged_view(client))[0]
        health, metrics = await purged_view(client)
    logs = {stopped.address: await trio.to_thread.run_sync(stopped.purges),
            other.address: await trio.to_thread.run_sync(other.purges)}
    report = oracle.check(ledger, cfg, logs, health, metrics)
    print(f"stopped {continued_at - stopped_at:.1f}s", report, sep="\n")
    report.assert_complete()  # nothing lost, nothing pending, nothing set aside
    during = [r for r in logs[stopped.address] if stopped_at + 0.1 < r.time < continued_at - 0.1]
    after = [r for r in logs[stopped.address] if r.time >= continued_at]
    assert not during and after  # frozen meant frozen; it resumed after SIGCONT
    assert [r for r in logs[other.address] if stopped_at < r.time < continued_at]  # the clean DC kept going
    assert oracle.metric_sum(metrics, "purged_retries_total", node=stopped.address) > 0


# -- SIGKILL of purged at random moments, with the journal -------------------------------------------------------


def test_sigkill_at_random_moments_under_delivery_loses_nothing_accepted(varnish_factory, tmp_path):
    seed = int(os.environ.get("PURGED_SEED", time.time()))
    print(f"seed {seed} (PURGED_SEED={seed} reruns these kill moments)")
    rng = random.Random(seed)
    backend, frontend = varnish_factory(2)
    port = free_port()
    config = write_config(tmp_path / "purged.yaml", [[backend.address], [frontend.address]], port,
                          tmp_path / "state", durability="fsync", sender=SENDER)
    cfg = yaml.safe_load(config.read_text())
    ledger, doubt = oracle.Ledger(), set()
    t0 = time.monotonic()
    for round_ in range(4):
        purged = PurgedProcess(config, port, tmp_path)
        try:
            purged.wait_listening()
            kill_after = rng.uniform(0.0, 0.8)
            with Load(purged.url, ledger, f"k{round_}", interval=0.01) as load:
                load.wait_accepted(5)  # a loaded machine may take a while to answer the first batches
                time.sleep(kill_after)
                purged.proc.kill()
                assert purged.wait(10) == -signal.SIGKILL
            doubt |= load.doubt
            print(f"round {round_}: SIGKILL {kill_after:.2f}s after the 5th accepted batch; answers {load.statuses}")
        finally:
            purged.kill()
    purged = PurgedProcess(config, port, tmp_path)
    try:
        purged.wait_listening()
        health = wait_drained(purged.url)
        metrics = httpx.get(purged.url + "/metrics", timeout=10).text
        purged.signal(signal.SIGTERM)
        assert purged.wait(15) == 0
    finally:
        purged.kill()
    logs = {n.address: without(n.purges(), doubt) for n in (backend, frontend)}
    report = oracle.check(ledger, cfg, logs, health, metrics)
    print(report, f"{len(ledger.accepted)} accepted over 4 SIGKILLs, {time.monotonic() - t0:.1f}s", sep="\n")
    report.assert_complete()
    assert len(ledger.accepted) >= 4 * 5 * 20
    assert not oracle.tier_order(ledger, cfg, logs)  # the replay kept tier order too


# -- SIGHUP adding and removing nodes, then SIGTERM, under load --------------------------------------------------


def test_sighup_adds_and_removes_nodes_then_sigterm_and_restart_lose_nothing(varnish_factory, tmp_path):
    kept, removed, added = varnish_factory(3)
    port = free_port()
    state = tmp_path / "state"
    before_cfg = write_config(tmp_path / "before.yaml", [[kept.address, removed.address]], port, state,
                              sender=SENDER, shutdown_timeout=5)
    after_cfg = yaml.safe_load(before_cfg.read_text())
    after_cfg["datacenters"]["a"]["tiers"][0]["nodes"] = [kept.address, added.address]
    config = tmp_path / "purged.yaml"
    config.write_text(before_cfg.read_text())
    notify = Notifications(tmp_path / "notify")
    ledger = oracle.Ledger()
    child = varnish_child(removed)
    purged = PurgedProcess(config, port, tmp_path, notify=str(notify.path))
    try:
        notify.expect("READY=1")
        with Load(purged.url, ledger, "hup") as load:
            load.wait_accepted(10)
            os.kill(child, signal.SIGSTOP)  # the node to remove falls behind: it will owe purges
            load.wait_accepted(20)
            config.write_text(yaml.safe_dump(after_cfg))
            hup_at = time.time()
            purged.signal(signal.SIGHUP)
            notify.expect("RELOADING=1")
            notify.expect("READY=1")
            ready_at = time.time()
            load.wait_accepted(load.statuses.get(202, 0) + 10)  # batches accepted for the added node
            removed_metrics = httpx.get(purged.url + "/metrics", timeout=10).text
            purged.signal(signal.SIGTERM)  # mid-load, with the journal: exits at once, the rest replayed
            assert purged.wait(20) == 0, purged.output()[-2000:]
            load_statuses_at_term = dict(load.statuses)
            purged = PurgedProcess(config, port, tmp_path)
            purged.wait_listening()
            load.wait_accepted(load.statuses.get(202, 0) + 5)  # and some after the restart
        os.kill(child, signal.SIGCONT)
        health = wait_drained(purged.url)
        metrics = httpx.get(purged.url + "/metrics", timeout=10).text
        purged.signal(signal.SIGTERM)
        assert purged.wait(15) == 0
    finally:
        os.kill(child, signal.SIGCONT)
        purged.kill()
        notify.close()
    logs = {n.address: without(n.purges(), load.doubt) for n in (kept, removed, added)}
    print(f"answers at SIGTERM {load_statuses_at_term}, in all {load.statuses}")
    # The kept node: everything accepted, across the reload and the restart.
    report = oracle.check(ledger, only(kept), logs, health, metrics)
    print(report)
    report.assert_complete()
    # The added node: everything accepted after the reload (requests sent after READY), nothing from before it.
    after = oracle.Ledger([a for a in ledger.accepted if a[1] > ready_at])
    before = oracle.Ledger([a for a in ledger.accepted if a[2] < hup_at])
    assert after.accepted and before.accepted
    got = {(r.host, r.url) for r in logs[added.address]}
    assert after.keys() <= got
    assert not before.keys() & got, "the added node got purges accepted before it was added"
    # The removed node: what it got before the reload, or counted as dropped with it.
    gone = oracle.check(before, only(removed), logs, None, removed_metrics).nodes[removed.address]
    print(gone.summary())
    assert gone.missing and gone.drops.get("node_removed", 0) >= len(gone.missing) and gone.lost == 0
