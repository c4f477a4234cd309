"""Daemon layer: what the signals do to a running :class:`~purged.daemon.Service`: SIGTERM and SIGINT stop the
intake and then checkpoint (a healthy journal keeps what is owed) or drain under ``shutdown_timeout``; SIGHUP
reloads the config file, keeping the running configuration when the new one has errors.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

import trio

from .config import Config, ConfigError, load_config
from .net import systemd
from .net.driver import Driver
from .net.http_api import API
from .net.journal import Journal

log = logging.getLogger("purged")
JOURNAL_STOP_GRACE = 1.0  # on SIGTERM with a healthy journal: time for answers already on the wire


class Service(Protocol):
    """What the signals need of the running daemon (:class:`purged.daemon.Service` is it)."""

    config: Config
    journal: Journal | None
    api: API
    driver: Driver
    senders: dict[str, Any]
    reloads: dict[str, int]

    def backlog(self) -> int: ...
    async def reload(self, new: Config) -> None: ...


async def stop(service: Service, signame: str, intake: list[trio.CancelScope]) -> None:
    """Stop intake; then, with a healthy journal, checkpoint and exit at once (the purges still owed are safe
    on disk and replayed at the next start); without one, or while it cannot write, drain under the deadline."""
    journal = service.journal
    timeout = service.config.shutdown_timeout
    if journal is not None and journal.error is None:
        timeout = min(timeout, JOURNAL_STOP_GRACE)
        log.info("received %s: stopping intake; the journal keeps what is owed (grace %gs)", signame, timeout)
    else:
        log.info("received %s: stopping intake, draining for up to %gs", signame, timeout)
    systemd.stopping()
    systemd.extend_timeout(timeout + 35)  # the drain, then the final journal flush (bounded at 30 s)
    service.api.stopping.set()
    for scope in intake:
        scope.cancel()
    await drain(service, timeout)
    if journal is not None:
        await journal.close()  # what is left is replayed at the next start


async def reload(service: Service, path: str | None) -> None:
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


async def drain(service: Service, timeout: float) -> None:
    """Until every node has what it is owed, or ``timeout``; says how it ended."""
    deadline = trio.current_time() + timeout
    extended = trio.current_time()
    with trio.move_on_at(deadline):
        while service.backlog():
            await service.driver.wait_progress(1.0)
            now = trio.current_time()
            if now - extended >= 5.0:  # keep systemd's stop timeout ahead of our own deadline
                extended = now
                systemd.extend_timeout(deadline - now + 5)
    left = service.backlog()
    if left and service.journal is not None and service.journal.error is None:
        log.info("shutdown: %d purges still owed to nodes; the journal holds them for the next start", left)
    elif left:
        log.warning("shutdown: %d purges still owed to nodes after %gs", left, timeout)
    else:
        log.info("shutdown: every accepted purge delivered")
