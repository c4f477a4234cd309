"""Trio adapter: the systemd service-manager protocol (sd_notify and the watchdog), written by hand.

The protocol is one ``KEY=VALUE\\n...`` datagram per message to the AF_UNIX socket named by ``$NOTIFY_SOCKET``
(see sd_notify(3)); that is too small to justify a dependency. Outside systemd every call is a cheap no-op.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable

import trio

log = logging.getLogger("purged.systemd")

# A blocking send on a full AF_UNIX datagram queue would stall the whole trio loop; PID 1 drains its queue fast,
# so a short bound only matters when systemd itself is wedged, and then a lost notification is the lesser harm.
SEND_TIMEOUT = 1.0

_warned = False


def _address(value: str) -> str | None:
    if value.startswith("@"):
        # Abstract namespace: the name is the rest of the string after a leading NUL byte.
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None  # e.g. systemd 254's "vsock:" addresses, which a Python AF_UNIX socket cannot reach


def _warn_once(message: str, *args: object) -> None:
    # The watchdog would repeat a failing send every few seconds: one line in the journal is enough.
    global _warned
    if not _warned:
        _warned = True
        log.warning(message, *args)


def notify(*lines: str) -> bool:
    """Send ``lines`` as one notification; True if it was sent, False if not under systemd or the send failed."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    address = _address(path)
    if address is None:
        _warn_once("sd_notify: unsupported NOTIFY_SOCKET %r; systemd will not hear from purged", path)
        return False
    payload = "\n".join(lines).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(SEND_TIMEOUT)
            sock.sendto(payload, address)
    except OSError as exc:
        _warn_once("sd_notify to %r failed (%s); further failures are not logged", path, exc)
        return False
    return True


def _one_line(text: str) -> str:
    # A newline would end the STATUS= field and start a bogus assignment.
    return " ".join(text.splitlines())


def ready(status: str | None = None) -> bool:
    """Startup (or a reload) finished: every listener is bound and the journal replayed."""
    if status is None:
        return notify("READY=1")
    return notify("READY=1", f"STATUS={_one_line(status)}")


def reloading() -> bool:
    """A reload started; systemd waits for the next ``READY=1``. MONOTONIC_USEC lets it order the two."""
    # trio.current_time() has a random offset, so it cannot be compared with systemd's CLOCK_MONOTONIC.
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify("RELOADING=1", f"MONOTONIC_USEC={usec}")


def stopping() -> bool:
    """Shutdown started (draining); systemd shows the unit as deactivating."""
    return notify("STOPPING=1")


def status(text: str) -> bool:
    """Free-form status line for ``systemctl status``."""
    return notify(f"STATUS={_one_line(text)}")


def extend_timeout(seconds: float) -> bool:
    """Ask for ``seconds`` more before the current start/stop timeout fires (repeat it to keep extending)."""
    return notify(f"EXTEND_TIMEOUT_USEC={max(0, int(seconds * 1_000_000))}")


def watchdog_interval() -> float | None:
    """The watchdog timeout in seconds from ``$WATCHDOG_USEC``, or None if none applies to this process."""
    pid = os.environ.get("WATCHDOG_PID")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None  # set for our parent (e.g. a wrapper that did not exec us)
        except ValueError:
            return None
    try:
        usec = int(os.environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 1_000_000 if usec > 0 else None


async def serve_watchdog(
    is_alive: Callable[[], bool], *, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED
) -> None:
    """Send ``WATCHDOG=1`` every half interval while ``is_alive()``; return at once if there is no watchdog.

    A False from ``is_alive`` skips the ping rather than ending the task: a stall that clears before the
    deadline is forgiven, one that lasts a full interval gets the daemon killed and restarted by systemd.
    """
    interval = watchdog_interval()
    task_status.started()
    if interval is None:
        return
    healthy = True
    while True:
        if is_alive():
            if not healthy:
                log.warning("watchdog: engine loop is making progress again; resuming pings")
            healthy = True
            notify("WATCHDOG=1")
        elif healthy:
            healthy = False
            log.error(
                "watchdog: engine loop made no recent progress; withholding WATCHDOG=1 (systemd "
                "restarts purged after %gs without one)",
                interval,
            )
        await trio.sleep(interval / 2)
