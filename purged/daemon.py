"""Daemon: builds the engine and every adapter from the config, starts each with ``nursery.start``, and handles
signals (SIGTERM/SIGINT: stop intake, drain under a deadline, exit).

:class:`Service` is the small shared context adapters talk to: the engine, the clock, and the wake-ups that
turn the synchronous engine's state changes into trio scheduling.
"""

from __future__ import annotations

import logging
import secrets
import signal
from dataclasses import dataclass, field

import trio
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from .config import Config
from .core.engine import Engine, Policy, Receipt
from .core.topology import DatacenterSpec, TierSpec, Topology
from .metrics import EngineCollector
from .net import systemd
from .net.http_api import API, serve_http
from .net.sender import NodeSender

log = logging.getLogger("purged")


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
        self.accepting = True
        self.heartbeat = trio.current_time()
        self.registry.register(EngineCollector(lambda: self.engine, trio.current_time))

    def submit(self, targets: list[str], source: str, priority: str = "bulk") -> Receipt:
        receipt = self.engine.submit(targets, trio.current_time(), source, priority)
        self.work.fire()
        return receipt

    def changed(self) -> None:
        """Called by senders after they fed the engine: wake whoever may now proceed."""
        engine = self.engine
        self.progress.fire()
        self.timers.fire()
        if engine.gates_changed:
            engine.gates_changed = False
            self.work.fire()

    async def wait_for_work(self, name: str) -> None:
        while not self.engine.has_work(name, trio.current_time()):
            await self.work.wait()

    async def run_timers(self, *, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        """Drive the engine's timers (retries falling due, tier delays ending)."""
        task_status.started()
        engine = self.engine
        while True:
            now = trio.current_time()
            self.heartbeat = now
            when = engine.get_timer()
            # Wake at least once a second: the heartbeat tells the systemd watchdog this loop is alive.
            with trio.move_on_at(min(when, now + 1.0) if when is not None else now + 1.0):
                await self.timers.wait()
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
            "status": "ok" if self.accepting else "draining",
            "log_entries": stats["log_entries"],
            "unique_pending": stats["unique_pending"],
            "nodes": stats["nodes"],
        }

    def render_metrics(self, accept: str) -> tuple[bytes, str]:
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type


async def serve(config: Config, *, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
    """Run the daemon until cancelled or signalled; ``task_status.started(service)`` once every part is up."""
    service = Service(config)
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            await nursery.start(service.run_timers)
            for dc in config.datacenters:
                for tier in dc.tiers:
                    for address in tier.nodes:
                        sender = NodeSender(service, address, config.sender)
                        service.senders[sender.name] = sender
                        await nursery.start(sender.run)
            intake = trio.CancelScope()
            if config.listen.http is not None:
                listeners = await nursery.start(_run_intake, intake, API(service), config.listen.http)
                service.http_port = listeners[0].socket.getsockname()[1]
            log.info(
                "purged ready: http %s, %d nodes in %d data centres",
                f"{config.listen.http.host}:{service.http_port}" if config.listen.http else "off",
                len(service.senders),
                len(config.datacenters),
            )
            await nursery.start(systemd.serve_watchdog, service.alive)
            systemd.ready(f"{len(service.senders)} nodes")
            task_status.started(service)
            async for signum in signals:
                log.info("received %s: stopping intake, draining for up to %gs",
                         signal.Signals(signum).name, config.shutdown_timeout)
                systemd.stopping()
                systemd.extend_timeout(config.shutdown_timeout + 5)
                service.accepting = False
                intake.cancel()
                await _drain(service, config.shutdown_timeout)
                nursery.cancel_scope.cancel()
                break


async def _run_intake(scope: trio.CancelScope, api: API, address, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    with scope:
        await serve_http(api, address.host, address.port, task_status=task_status)


async def _drain(service: Service, timeout: float) -> None:
    with trio.move_on_after(timeout):
        while service.backlog():
            await service.progress.wait()
    left = service.backlog()
    if left:
        log.warning("shutdown: %d purges still owed to nodes after %gs", left, timeout)
    else:
        log.info("shutdown: every accepted purge delivered")
