"""Daemon: builds the engine, admission, driver and every adapter from the config, starts each with
``nursery.start``, and passes the signals on (:mod:`purged.signals`: SIGTERM/SIGINT stop intake, checkpoint or
drain, exit; SIGHUP reloads).

:class:`Service` is the composition root: it owns the parts and hands each adapter the narrow port it needs
(the :class:`~purged.net.driver.Driver` for senders, the API and multicast); no adapter imports this module.
"""

from __future__ import annotations

import logging
import resource
import secrets
import signal
import ssl
from dataclasses import dataclass, field
from functools import partial

import trio
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from .config import Config, ConfigError, is_loopback
from .core.admission import Admission
from .core.engine import Engine
from .core.reload import reconfigure
from .core.status import statistics
from .core_parts import admission_limits, build_policy, build_topology, node_rates
from .metrics import (
    APICollector,
    BusCollector,
    EngineCollector,
    JournalCollector,
    MulticastCollector,
    SenderCollector,
)
from .net import systemd
from .net.bus import NatsBus
from .net.driver import Driver
from .net.fleet import Fleet
from .net.http_api import API
from .net.http_server import TLSContext, serve_http
from .net.journal import Journal
from .net.multicast import MulticastStats, serve_multicast
from .net.pipeline import Pacer
from .net.sender import NodeSender
from .signals import reload, stop
from .tokens import load_tokens

log = logging.getLogger("purged")
STATUS_INTERVAL = 5.0  # seconds between STATUS= lines to systemd (backlog and rate)


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
        self.admission = Admission(self.engine, **admission_limits(cfg))
        self.driver = Driver(self.engine, self.admission, max_waiters=cfg.limits.max_waiters)
        self.pacer = Pacer()  # every sender's read pause: one timer for all connections
        self.senders: dict[str, NodeSender] = {}
        self.http_port: int | None = None
        self.journal: Journal | None = None
        # A bad tokens file or certificate at start is a ConfigError (exit 2); on SIGHUP the old ones stay.
        tokens = load_tokens(cfg.auth.tokens_file) if cfg.auth.tokens_file else None
        self.tls: TLSContext | None = None
        if cfg.listen.https is not None:
            self.tls = _tls_context(cfg.listen.https)
        self.https_port: int | None = None
        # A fleet (docs/fleet.md): accepted batches go to the stream; this daemon consumes it like the others.
        self.bus: NatsBus | None = None
        self.fleet: Fleet | None = None
        if cfg.bus is not None:
            self.bus = NatsBus(cfg.bus.nats, cfg.name)
            self.fleet = Fleet(self.driver, self.bus, name=cfg.name)
        self.api = API(self.driver, cfg.limits, health=self.health, metrics=self.render_metrics, tokens=tokens,
                       allow=cfg.listen.http_allow, protect_metrics=cfg.auth.protect_metrics, fleet=self.fleet)
        self.nursery: trio.Nursery | None = None  # where senders run (set by serve)
        self._sender_scopes: dict[str, tuple[trio.CancelScope, trio.Event]] = {}
        self.reloads = {"ok": 0, "error": 0}
        self.removed_drops: dict[tuple[str, str, str], int] = {}  # (dc, tier, node) -> backlog dropped
        self.multicast: dict[str, MulticastStats] = {}  # "group:port" -> its listener's counters
        self.registry.register(MulticastCollector(lambda: self.multicast))
        self.registry.register(EngineCollector(lambda: self.engine, trio.current_time, lambda: self.removed_drops))
        self.registry.register(JournalCollector(lambda: self.journal, lambda: self.reloads))
        self.registry.register(SenderCollector(lambda: self.senders, lambda: self.engine))
        self.registry.register(APICollector(lambda: self.api.refused))
        if self.fleet is not None:
            self.registry.register(BusCollector(self.fleet))

    def open_journal(self) -> None:
        j, cfg = self.config.journal, self.config
        assert cfg.state_dir is not None
        journal = Journal(cfg.state_dir, cfg.durability, segment_bytes=j.segment_bytes,
                          sync_interval=j.sync_interval, checkpoint_interval=j.checkpoint_interval)
        journal.open(self.engine)
        self.journal = self.driver.journal = journal
        self.driver.poke()

    def multicast_ingest(self, listen):
        """The ingest callback of one multicast listener: admission with the group's own ``rate``, never
        waiting on the journal (``durability`` batches datagrams with the next write)."""
        source = f"multicast:{listen.group}:{listen.port}"
        self.admission.limit_source(source, listen.rate, listen.burst, trio.current_time())

        def ingest(urls: list[str], sender: str) -> list[dict]:
            return self.driver.ingest(urls, source, bare_host=True).rejected

        return ingest

    async def start_sender(self, address) -> None:
        """Run a :class:`NodeSender` for ``address`` in the daemon nursery, in a scope of its own."""
        assert self.nursery is not None
        sender = NodeSender(self.driver, address, self.config.sender, pacer=self.pacer)
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
        self.driver.forget(name)

    async def reload(self, new: Config) -> None:
        """Apply ``new`` (already validated): nodes, data centres, limits, shaping. Listeners and the journal
        settings need a restart. Accepted purges are neither lost nor sent again (see core/reload.py)."""
        old = self.config
        for key in ("listen", "state_dir", "durability", "journal", "name", "bus"):
            if getattr(old, key) != getattr(new, key):
                log.warning("reload: %s changed; it applies at the next restart", key)
        names = {str(a) for dc in new.datacenters for t in dc.tiers for a in t.nodes}
        for name in [n for n in self.senders if n not in names]:
            await self.stop_sender(name)  # before the engine forgets the node: no task asks about it after
        report = reconfigure(self.engine, build_topology(new), build_policy(new), node_rates(new),
                             trio.current_time())
        self.admission.configure(**admission_limits(new))
        self.driver.max_waiters = new.limits.max_waiters
        self.config = new
        for sender in self.senders.values():
            sender.reconfigure(new.sender)
        for dc in new.datacenters:
            for tier in dc.tiers:
                for address in tier.nodes:
                    if str(address) not in self.senders:
                        await self.start_sender(address)
        self.api.limits = new.limits
        self.api.protect_metrics = new.auth.protect_metrics
        self.reload_credentials(new)
        for name, count in report.removed.items():
            dc, tier = report.removed_place[name]
            self.removed_drops[(dc, tier, name)] = self.removed_drops.get((dc, tier, name), 0) + count
        log.info(
            "reload: %d nodes (added %s; removed %s, %d purges of their backlogs dropped; moved %s)",
            len(self.senders), ", ".join(report.added) or "none", ", ".join(report.removed) or "none",
            sum(report.removed.values()), ", ".join(report.moved) or "none",
        )
        self.driver.poke()

    def reload_credentials(self, new: Config) -> None:
        """SIGHUP: re-read tokens.yaml and the TLS certificate and key. A bad file is logged and the old
        tokens (or context) kept; the API never falls open because a file broke."""
        path = new.auth.tokens_file
        if path is None and self.api.tokens is not None and not new.auth.allow_anonymous and not all(
                is_loopback(a.host) for a in _listen_addresses(self.config)):
            log.error("reload: auth.tokens_file removed, but the running listeners are not all loopback (they "
                      "change at a restart); keeping the tokens")
        elif path is None:
            if self.api.tokens is not None:
                log.warning("reload: auth.tokens_file removed; the API takes requests without a token")
            self.api.tokens = None
        else:
            try:
                table = load_tokens(path)
            except ConfigError as exc:
                for line in exc.errors:
                    log.error("reload: %s", line)
                log.error("reload: %s has %d error(s); keeping the %d tokens loaded before", path,
                          len(exc.errors), len(self.api.tokens or ()))
            else:
                self.api.tokens = table
                self.admission.forget_tokens({t.name for t in table.tokens})
                log.info("reload: %d tokens from %s", len(table), path)
        if self.tls is not None:
            try:
                self.tls.load()
            except (OSError, ssl.SSLError) as exc:
                log.error("reload: TLS certificate %s / key %s: %s; new connections keep the old ones",
                          self.tls.cert, self.tls.key, exc)
            else:
                log.info("reload: TLS certificate %s re-read", self.tls.cert)

    async def serve_status(self, *, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        """Every few seconds, one STATUS= line to systemd: what is owed and the PURGE rate."""
        task_status.started()
        engine = self.engine
        before, then = 0, trio.current_time()
        while True:
            await trio.sleep(STATUS_INTERVAL)
            sent, now = sum(node.stats.sent for node in engine.nodes.values()), trio.current_time()
            systemd.status(f"{self.backlog()} purges owed to {len(engine.nodes)} nodes, "
                           f"{(sent - before) / (now - then):.0f} PURGE/s")
            before, then = sent, now

    def backlog(self) -> int:
        return self.engine.total_backlog()

    def health(self) -> dict:
        stats = statistics(self.engine, trio.current_time())
        journal = self.journal
        health = {
            "status": "draining" if self.api.stopping.is_set() else "ok",
            # "ok", "off" (no state_dir), or why it cannot write (disk_full, journal_error): new batches get 503s
            "journal": "off" if journal is None else journal.error.reason if journal.error is not None else "ok",
            "log_entries": stats["log_entries"],
            "unique_pending": stats["unique_pending"],
            "nodes": stats["nodes"],
        }
        if self.fleet is not None:
            health["bus"] = self.fleet.health()
        return health

    def render_metrics(self, accept: str) -> tuple[bytes, str]:
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type


def _listen_addresses(config: Config) -> list:
    listen = config.listen
    return [a for a in (listen.http, listen.https and listen.https.address) if a is not None]


def _tls_context(https) -> TLSContext:
    try:
        return TLSContext(https.cert, https.key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError([f"listen.https: cannot load the certificate {https.cert} and key {https.key}: "
                           f"{exc}"]) from None


def _raise_fd_limit(config: Config) -> None:
    """Raise the soft descriptor limit towards the hard one, so that ``limits.max_connections`` (plus the
    nodes' connections and the journal) is reached before EMFILE; warn when the hard limit is too low."""
    want = config.limits.max_connections + 1024
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != resource.RLIM_INFINITY and soft < want:
            new = want if hard == resource.RLIM_INFINITY else min(want, hard)
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
            soft = new
    except (OSError, ValueError):
        return
    if soft != resource.RLIM_INFINITY and soft < want:
        log.warning("open files limit %d is below limits.max_connections + 1024 (%d): raise LimitNOFILE",
                    soft, want)


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
    _raise_fd_limit(config)
    service = Service(config)
    if config.state_dir is not None:
        service.open_journal()
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
            await nursery.start(service.driver.run_timers)
            await nursery.start(service.serve_status)
            for dc in config.datacenters:
                for tier in dc.tiers:
                    for address in tier.nodes:
                        await service.start_sender(address)
            intake: list[trio.CancelScope] = []  # one per intake server: SIGTERM cancels them all
            if service.bus is not None and service.fleet is not None:
                # Returns at once: the connection, stream and consumer come up in the background (purges
                # posted meanwhile get 503 bus_unavailable). The consumer's pull is an intake.
                await nursery.start(service.bus.serve)
                await nursery.start(service.fleet.serve_acks)
                await nursery.start(service.fleet.serve_monitor)
                await nursery.start(_in_scope, intake, service.fleet.serve_intake)
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
            if config.listen.https is not None:
                address = config.listen.https.address
                listeners = await nursery.start(partial(serve_http, service.api, address.host, address.port,
                                                        tls=service.tls))
                service.https_port = listeners[0].socket.getsockname()[1]
            log.info(
                "purged ready: http %s, https %s, auth %s, %d nodes in %d data centres, journal %s, bus %s",
                f"{config.listen.http.host}:{service.http_port}" if config.listen.http else "off",
                f"{config.listen.https.address.host}:{service.https_port}" if config.listen.https else "off",
                f"{len(service.api.tokens)} tokens" if service.api.tokens is not None else "off (anonymous)",
                len(service.senders),
                len(config.datacenters),
                f"{config.state_dir} ({config.durability})" if config.state_dir else "off",
                f"nats stream {config.bus.nats.stream} as {config.name!r}" if config.bus else "off",
            )
            await nursery.start(systemd.serve_watchdog, service.driver.alive)
            systemd.ready(f"{len(service.senders)} nodes")
            task_status.started(service)
            async for signum in signals:
                if signum == signal.SIGHUP:
                    await reload(service, config_path)
                    continue
                await stop(service, signal.Signals(signum).name, intake)
                nursery.cancel_scope.cancel()
                break


async def _in_scope(scopes: list, serve, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Run an intake server in a cancel scope of its own, listed in ``scopes``: SIGTERM cancels every intake
    at once while the senders keep going."""
    with trio.CancelScope() as scope:
        scopes.append(scope)
        await serve(task_status=task_status)
