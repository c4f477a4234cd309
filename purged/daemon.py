"""Daemon: builds the engine and every adapter from the config, starts each with ``nursery.start``, and handles
signals (SIGTERM/SIGINT: stop intake, drain under a deadline, final journal checkpoint, exit; SIGHUP: reload).

:class:`Service` is the small shared context adapters talk to: the engine, the clock, and the wake-ups that
turn the synchronous engine's state changes into trio scheduling.
"""

from __future__ import annotations

import logging
import secrets
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

import trio
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from .config import Config, ConfigError, load_config
from .core.engine import Engine, Policy, Receipt
from .core.errors import Overloaded
from .core.limits import TokenBucket
from .core.reload import reconfigure
from .core.topology import DatacenterSpec, TierSpec, Topology
from .metrics import EngineCollector, JournalCollector, MulticastCollector, SenderCollector
from .net import systemd
from .net.http_api import API, serve_http
from .net.journal import Journal, JournalError
from .net.multicast import MulticastStats, serve_multicast
from .net.sender import NodeSender

log = logging.getLogger("purged")
STATUS_INTERVAL = 5.0  # seconds between STATUS= lines to systemd (backlog and rate)


class Signal:
    """A broadcast wake-up: ``await wait()`` until the next ``fire()``."""

    def __init__(self) -> None:
        self._lot = trio.lowlevel.ParkingLot()

    async def wait(self) -> None:
        await self._lot.park()

    def fire(self) -> None:
        if self._lot:
            self._lot.unpark_all()


def build_topology(config: Config) -> Topology:
    return Topology(
        [
            DatacenterSpec(
                dc.name, dc.hosts, tuple(TierSpec(t.name, t.delay, tuple(str(a) for a in t.nodes)) for t in dc.tiers)
            )
            for dc in config.datacenters
        ]
    )


def build_policy(config: Config) -> Policy:
    s, lim = config.sender, config.limits
    return Policy(
        retry_initial=s.retry_initial,
        retry_max=s.retry_max,
        down_after=s.down_after,
        dedup_window=config.dedup.window,
        linger=config.dedup.linger,
        max_pending=lim.max_pending,
        max_lag=lim.max_lag,
        max_age=lim.max_age,
        recent_batches=lim.recent_batches,
    )


def node_rates(config: Config) -> dict[str, tuple[float, float]]:
    return {str(a): dc.node_rate(t) for dc in config.datacenters for t in dc.tiers for a in t.nodes}


@dataclass
class Service:
    config: Config
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        cfg = self.config
        self.engine = Engine(
            build_topology(cfg),
            now=trio.current_time(),
            policy=build_policy(cfg),
            rates=node_rates(cfg),
            batch_prefix=secrets.token_hex(4) + "-",  # ids stay unique across restarts
        )
        self.work = Signal()  # new purges, a tier gate opened, a retry fell due
        self.progress = Signal()  # a node answered: batch status may have changed
        self.timers = Signal()  # the engine's next timer may be earlier now
        self.senders: dict[str, NodeSender] = {}
        self.http_port: int | None = None
        self.heartbeat = trio.current_time()
        self.journal: Journal | None = None
        self.api: API | None = None
        self.nursery: trio.Nursery | None = None  # where senders run (set by serve)
        self._sender_scopes: dict[str, tuple[trio.CancelScope, trio.Event]] = {}
        self.reloads = {"ok": 0, "error": 0}
        self.removed_drops: dict[tuple[str, str, str], int] = {}  # (dc, tier, node) -> backlog dropped
        self.multicast: dict[str, MulticastStats] = {}  # "group:port" -> its listener's counters
        self.registry.register(MulticastCollector(lambda: self.multicast))
        self.registry.register(EngineCollector(lambda: self.engine, trio.current_time, lambda: self.removed_drops))
        self.registry.register(JournalCollector(lambda: self.journal, lambda: self.reloads))
        self.registry.register(SenderCollector(lambda: self.senders, lambda: self.engine))

    def submit(self, targets: list[str], source: str, priority: str = "bulk") -> Receipt:
        receipt = self.engine.submit(targets, trio.current_time(), source, priority)
        self.work.fire()
        self._rearm_timer()
        if self.journal is not None:
            self.journal.kick()
        return receipt

    def multicast_ingest(self, listen) -> Callable[[list[str], str], None]:
        """The ingest callback of one multicast listener. Datagrams cannot be pushed back: over the group's
        ``rate`` or the ``max_pending`` ceiling the purges are dropped, counted (reason ``overload``) and the
        listener logs it. Not awaited on the journal either: ``durability`` batches them with the next write."""
        source = f"multicast:{listen.group}:{listen.port}"
        bucket = TokenBucket(listen.rate, listen.burst or listen.rate, trio.current_time()) if listen.rate else None

        def ingest(targets: list[str], sender: str) -> None:
            if bucket is not None:
                now = trio.current_time()
                if bucket.available(now) < min(len(targets), bucket.burst):
                    self.engine.reject(source, "rate_limited", len(targets))
                    raise Overloaded(f"{source} is over its rate of {listen.rate:g} purges/s", reason="rate_limited")
                bucket.consume(len(targets), now)
            if self.journal is not None and self.journal.error is not None:
                self.engine.reject(source, self.journal.error.reason, len(targets))
                raise Overloaded("the journal cannot write", reason=self.journal.error.reason)
            self.submit(targets, source)

        return ingest

    async def accept(self, targets: list[str], source: str, priority: str = "bulk") -> Receipt:
        """:meth:`submit`, then wait until the journal holds the batch as ``durability`` promises. Raises
        :class:`JournalError` (a 503) while the journal cannot write: nothing is accepted then. If the write of
        this very batch fails it still raises, though the purges are in memory and will be delivered: the
        client retries, and a repeated purge is harmless."""
        journal = self.journal
        if journal is not None:
            try:
                journal.check()
            except JournalError as exc:
                self.engine.reject(source, exc.reason, len(targets))
                raise
        receipt = self.submit(targets, source, priority)
        if journal is not None:
            await journal.commit()
        return receipt

    async def start_sender(self, address) -> None:
        """Run a :class:`NodeSender` for ``address`` in the daemon nursery, in a scope of its own."""
        assert self.nursery is not None
        sender = NodeSender(self, address, self.config.sender)
        scope, done = trio.CancelScope(), trio.Event()

        async def run(*, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
            try:
                with scope:
                    await sender.run(task_status=task_status)
            finally:
                done.set()

        self.senders[sender.name] = sender
        self._sender_scopes[sender.name] = (scope, done)
        await self.nursery.start(run)

    async def stop_sender(self, name: str) -> None:
        scope, done = self._sender_scopes.pop(name)
        self.senders.pop(name, None)
        scope.cancel()
        with trio.move_on_after(10):
            await done.wait()

    async def reload(self, new: Config) -> None:
        """Apply ``new`` (already validated): nodes, data centres, limits, shaping. Listeners and the journal
        settings need a restart. Accepted purges are neither lost nor sent again (see core/reload.py)."""
        old = self.config
        for key in ("listen", "state_dir", "durability", "journal"):
            if getattr(old, key) != getattr(new, key):
                log.warning("reload: %s changed; it applies at the next restart", key)
        names = {str(a) for dc in new.datacenters for t in dc.tiers for a in t.nodes}
        for name in [n for n in self.senders if n not in names]:
            await self.stop_sender(name)  # before the engine forgets the node: no task asks about it after
        report = reconfigure(self.engine, build_topology(new), build_policy(new), node_rates(new),
                             trio.current_time())
        self.config = new
        for sender in self.senders.values():
            if sender.cfg.window == sender.window:
                sender.window = new.sender.window
            sender.cfg = new.sender
        for dc in new.datacenters:
            for tier in dc.tiers:
                for address in tier.nodes:
                    if str(address) not in self.senders:
                        await self.start_sender(address)
        if self.api is not None:
            self.api.limits = new.limits
        for name, count in report.removed.items():
            dc, tier = report.removed_place[name]
            self.removed_drops[(dc, tier, name)] = self.removed_drops.get((dc, tier, name), 0) + count
        log.info(
            "reload: %d nodes (added %s; removed %s, %d purges of their backlogs dropped; moved %s)",
            len(self.senders), ", ".join(report.added) or "none", ", ".join(report.removed) or "none",
            sum(report.removed.values()), ", ".join(report.moved) or "none",
        )
        self.work.fire()
        self.timers.fire()
        self.progress.fire()

    def changed(self) -> None:
        """Called by senders after they fed the engine: wake whoever may now proceed."""
        engine = self.engine
        self.progress.fire()
        self._rearm_timer()
        if engine.gates_changed:
            engine.gates_changed = False
            self.work.fire()

    def _rearm_timer(self) -> None:
        """Wake the timer task only when the engine's next timer may have moved earlier."""
        if self.engine.timers_changed:
            self.engine.timers_changed = False
            self.timers.fire()

    async def wait_for_work(self, name: str) -> None:
        while not self.engine.has_work(name, trio.current_time()):
            self._rearm_timer()  # has_work may have found the node rate-limited: wake it when tokens return
            await self.work.wait()

    async def run_timers(self, *, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        """Drive the engine's timers (retries falling due, tier delays ending)."""
        task_status.started()
        engine = self.engine
        status_at, sent_before = trio.current_time(), 0
        while True:
            now = trio.current_time()
            self.heartbeat = now
            if now - status_at >= STATUS_INTERVAL:
                sent = sum(node.stats.sent for node in self.engine.nodes.values())
                systemd.status(f"{self.backlog()} purges owed to {len(self.engine.nodes)} nodes, "
                               f"{(sent - sent_before) / (now - status_at):.0f} PURGE/s")
                status_at, sent_before = now, sent
            when = engine.get_timer()
            # Wake at least once a second: the heartbeat tells the systemd watchdog this loop is alive.
            with trio.move_on_at(min(when, now + 1.0) if when is not None else now + 1.0):
                await self.timers.wait()
            engine.timers_changed = False  # get_timer() is read afresh at the top of the loop
            engine.handle_timer(trio.current_time())
            engine.gates_changed = False
            self.work.fire()

    def alive(self) -> bool:
        """For the systemd watchdog: the engine's timer loop ran recently (a stuck loop gets us restarted)."""
        return trio.current_time() - self.heartbeat < 5.0

    def backlog(self) -> int:
        return sum(self.engine.backlog(n) for n in self.engine.nodes)

    def health(self) -> dict:
        now = trio.current_time()
        stats = self.engine.statistics(now)
        return {
            "status": "draining" if self.api is not None and self.api.stopping.is_set() else "ok",
            "log_entries": stats["log_entries"],
            "unique_pending": stats["unique_pending"],
            "nodes": stats["nodes"],
        }

    def render_metrics(self, accept: str) -> tuple[bytes, str]:
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type


async def serve(
    config: Config,
    *,
    config_path: str | None = None,
    task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the daemon until cancelled or signalled; ``task_status.started(service)`` once every part is up.

    ``config_path`` is re-read on SIGHUP. With ``state_dir`` set the journal is replayed before anything else
    starts, so READY=1 (and the first listener) come after the replay.
    """
    service = Service(config)
    if config.state_dir is not None:
        j = config.journal
        journal = Journal(config.state_dir, config.durability, segment_bytes=j.segment_bytes,
                          sync_interval=j.sync_interval, checkpoint_interval=j.checkpoint_interval)
        journal.open(service.engine)
        service.journal = journal
    try:
        await _run(service, config, config_path, task_status)
    finally:
        if service.journal is not None:
            service.journal.release()


async def _run(service: Service, config: Config, config_path: str | None, task_status: trio.TaskStatus) -> None:
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async with trio.open_nursery() as nursery:
            service.nursery = nursery
            if service.journal is not None:
                await nursery.start(service.journal.serve)
            await nursery.start(service.run_timers)
            for dc in config.datacenters:
                for tier in dc.tiers:
                    for address in tier.nodes:
                        await service.start_sender(address)
            intake: list[trio.CancelScope] = []  # one per intake server: SIGTERM cancels them all
            service.api = API(service)
            for i, listen in enumerate(config.listen.multicast):
                stats = service.multicast[f"{listen.group}:{listen.port}"] = MulticastStats()
                serve = partial(serve_multicast, listen, service.multicast_ingest(listen), stats,
                                key=f"listen.multicast[{i}]", max_url_length=config.limits.max_url_length)
                await nursery.start(_in_scope, intake, serve)
            if config.listen.http is not None:
                # Not in ``intake``: on SIGTERM it stops by itself, answering the requests in progress.
                listeners = await nursery.start(partial(serve_http, service.api, config.listen.http.host,
                                                        config.listen.http.port))
                service.http_port = listeners[0].socket.getsockname()[1]
            log.info(
                "purged ready: http %s, %d nodes in %d data centres, journal %s",
                f"{config.listen.http.host}:{service.http_port}" if config.listen.http else "off",
                len(service.senders),
                len(config.datacenters),
                f"{config.state_dir} ({config.durability})" if config.state_dir else "off",
            )
            await nursery.start(systemd.serve_watchdog, service.alive)
            systemd.ready(f"{len(service.senders)} nodes")
            task_status.started(service)
            async for signum in signals:
                if signum == signal.SIGHUP:
                    await _reload(service, config_path)
                    continue
                timeout = service.config.shutdown_timeout
                log.info("received %s: stopping intake, draining for up to %gs", signal.Signals(signum).name, timeout)
                systemd.stopping()
                systemd.extend_timeout(timeout + 5)
                service.api.stopping.set()
                for scope in intake:
                    scope.cancel()
                await _drain(service, timeout)
                if service.journal is not None:
                    await service.journal.close()  # what is left is replayed at the next start
                nursery.cancel_scope.cancel()
                break


async def _reload(service: Service, path: str | None) -> None:
    systemd.reloading()
    if path is None:
        log.warning("SIGHUP: no config file to reload (started without one)")
    else:
        try:
            new = await trio.to_thread.run_sync(load_config, path)
        except ConfigError as exc:
            service.reloads["error"] += 1
            for line in exc.errors:
                log.error("reload: %s", line)
            log.error("reload: %s has %d error(s); keeping the running configuration", path, len(exc.errors))
        else:
            await service.reload(new)
            service.reloads["ok"] += 1
    systemd.ready(f"{len(service.senders)} nodes")


async def _in_scope(scopes: list, serve, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Run an intake server in a cancel scope of its own, listed in ``scopes``: SIGTERM cancels every intake
    at once while the senders keep going."""
    with trio.CancelScope() as scope:
        scopes.append(scope)
        await serve(task_status=task_status)


async def _drain(service: Service, timeout: float) -> None:
    deadline = trio.current_time() + timeout
    extended = trio.current_time()
    with trio.move_on_at(deadline):
        while service.backlog():
            with trio.move_on_after(1.0):
                await service.progress.wait()
            now = trio.current_time()
            if now - extended >= 5.0:  # keep systemd's stop timeout ahead of our own deadline
                extended = now
                systemd.extend_timeout(deadline - now + 5)
    left = service.backlog()
    if left:
        log.warning("shutdown: %d purges still owed to nodes after %gs", left, timeout)
    else:
        log.info("shutdown: every accepted purge delivered")
