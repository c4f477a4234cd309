"""Trio adapter: receive HTCP CLR or msgpack batch datagrams on a multicast group and hand URLs to ingest.

One task per listener, started with ``await nursery.start(serve_multicast, listen, ingest, stats, key=...)``.
The loop waits for the socket to become readable, then drains it with non-blocking ``recvfrom_into`` until
``BlockingIOError`` (DESIGN.md §2: >= 300k datagrams/s against ~120k/s with one ``await`` per datagram),
decodes in place, and calls ``ingest(urls, sender_ip)`` (admission) once per drained batch and sending host.
Multicast cannot push back, so everything that is not accepted is counted in :class:`MulticastStats` by reason.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import struct
from collections.abc import Callable

import trio

from ..config import MulticastListen
from ..core.admission import Refused
from ..core.batchcodec import decode_batch
from ..core.errors import DecodeError
from ..core.htcp import decode_clr
from ..core.udploss import LossTracker
from ..core.urls import DEFAULT_MAX_LENGTH
from .ratelog import RateLimitedLog as _RateLimitedLog

log = logging.getLogger("purged.multicast")

SO_MEMINFO = getattr(socket, "SO_MEMINFO", 55)  # Linux; the stdlib does not export it
SK_MEMINFO_DROPS = 8  # index of the socket's drop counter in SO_MEMINFO (Linux >= 4.7)
IP_MULTICAST_ALL = getattr(socket, "IP_MULTICAST_ALL", 49)
MAX_DRAIN = 2048  # datagrams per wakeup before ingest runs and other tasks get a turn
LINGER = 0.002  # 2 ms: next to a purge's journey (~1 s tier delay) nothing, to the CPU a lot

PACKET_STATES = ("good", "bad", "filtered")
DROP_REASONS = ("malformed", "source", "overload", "rate_limited", "journal", "kernel", "invalid_url")


class MulticastSetupError(OSError):
    """Binding or joining failed; the message starts with the config key (``listen.multicast[0]: ...``)."""


class MulticastStats:
    """Plain counters for one or more listeners; the metrics collector reads :meth:`statistics`."""

    def __init__(self, loss: LossTracker | None = None):
        self.packets = dict.fromkeys(PACKET_STATES, 0)
        self.drops = dict.fromkeys(DROP_REASONS, 0)
        self.malformed: dict[str, int] = {}  # decoder reason -> datagrams
        self.bytes_read = 0
        self.urls_accepted = 0
        self.ingest_calls = 0
        self.rcvbuf_bytes = 0  # what the kernel granted (sum over listeners)
        self.loss = loss if loss is not None else LossTracker()

    def statistics(self) -> dict[str, int]:
        """Flat counters; ``docs/wire.md`` maps each key to its Prometheus family.

        ``packets_{good,bad,filtered}``, ``bytes_read``, ``urls_accepted``, ``ingest_calls``,
        ``drops_{malformed,source,overload,rate_limited,journal,kernel,invalid_url}``, ``malformed_<decoder reason>``,
        ``rcvbuf_bytes`` (a gauge), ``loss_{received,lost,duplicates,reordered,resets,sources,evicted}``.
        """
        out = {f"packets_{k}": v for k, v in self.packets.items()}
        out["bytes_read"] = self.bytes_read
        out["urls_accepted"] = self.urls_accepted
        out["ingest_calls"] = self.ingest_calls
        out |= {f"drops_{k}": v for k, v in self.drops.items()}
        out |= {f"malformed_{k}": v for k, v in sorted(self.malformed.items())}
        out["rcvbuf_bytes"] = self.rcvbuf_bytes
        loss = self.loss.statistics()
        out |= {f"loss_{k}": v for k, v in loss.items() if k != "per_source"}
        return out


def open_multicast_socket(listen: MulticastListen, key: str) -> socket.socket:
    """Bind and join as ``listen`` says; return the non-blocking socket.

    """
    try:
        group = ipaddress.IPv4Address(listen.group)
    except ValueError:
        raise MulticastSetupError(f"{key}.group: {listen.group!r} is not an IPv4 address") from None
    if not group.is_multicast:
        raise MulticastSetupError(f"{key}.group: {listen.group} is not a multicast address")
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if hasattr(socket, "SO_REUSEPORT"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        _set_rcvbuf(sock, listen.rcvbuf, key)
        try:
            sock.bind((str(group), listen.port))
        except OSError as exc:
            raise MulticastSetupError(
                exc.errno, f"{key}: cannot bind {group}:{listen.port}: {exc.strerror}"
            ) from exc
        _join(sock, group, listen.interface, key)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


def kernel_drops(sock: socket.socket) -> int | None:
    """The socket's count of datagrams the kernel dropped (receive buffer full), or None if unavailable.

    One ``getsockopt(SO_MEMINFO)`` reads the current count; ``SO_RXQ_OVFL`` would need ``recvmsg`` and only
    reports drops once a later datagram arrives.
    """
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_MEMINFO, 64)
    except OSError:
        return None
    if len(raw) < 4 * (SK_MEMINFO_DROPS + 1):
        return None
    return struct.unpack_from("=I", raw, 4 * SK_MEMINFO_DROPS)[0]


def _set_rcvbuf(sock: socket.socket, wanted: int, key: str) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, wanted)
    got = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    # Linux doubles the value for its bookkeeping and caps the request at net.core.rmem_max first.
    if got < 2 * wanted:
        log.warning(
            "%s: asked for SO_RCVBUF %d, the kernel capped it at %d: raise the sysctl net.core.rmem_max "
            "to at least %d (SO_RCVBUFFORCE needs CAP_NET_ADMIN, which the unit drops)",
            key,
            wanted,
            got // 2,
            wanted,
        )


def _join(sock: socket.socket, group: ipaddress.IPv4Address, interface: str, key: str) -> None:
    try:
        mreq = group.packed + ipaddress.IPv4Address(interface).packed
    except ValueError:
        try:  # an interface name: struct ip_mreqn {multiaddr, address, ifindex}
            mreq = struct.pack("=4s4si", group.packed, bytes(4), socket.if_nametoindex(interface))
        except OSError:
            raise MulticastSetupError(f"{key}.interface: no interface named {interface!r}") from None
    try:
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
    except OSError as exc:
        raise MulticastSetupError(
            exc.errno, f"{key}: cannot join {group} on interface {interface}: {exc.strerror}"
        ) from exc
    try:  # we bind to the group, but do not also receive every other group some process on the host joined
        sock.setsockopt(socket.IPPROTO_IP, IP_MULTICAST_ALL, 0)
    except OSError:
        pass


class _SourceFilter:
    """``sources`` as a cached membership test (an ``ip_address in network`` costs microseconds)."""

    def __init__(self, networks: tuple):
        self._networks = networks
        self._cache: dict[str, bool] = {}

    def __call__(self, ip: str) -> bool:
        ok = self._cache.get(ip)
        if ok is None:
            addr = ipaddress.ip_address(ip)
            ok = any(addr in net for net in self._networks)
            if len(self._cache) >= 4096:
                self._cache.clear()
            self._cache[ip] = ok
        return ok


async def serve_multicast(
    listen: MulticastListen,
    ingest: Callable[[list[str], str], list[dict]],
    stats: MulticastStats,
    *,
    key: str = "listen.multicast",
    max_url_length: int = DEFAULT_MAX_LENGTH,
    linger: float = LINGER,
    task_status=trio.TASK_STATUS_IGNORED,
) -> None:
    """Receive until cancelled. ``task_status.started((host, port))`` once bound and joined.

    ``ingest(urls, sender_ip)`` admits the URLs of a drain from one sender (admission validates them) and
    returns the per-URL rejections; it raises :class:`~purged.core.admission.Refused` when nothing was
    accepted, which drops (and counts) that batch by reason. After a drain
    that emptied the socket the task sleeps ``linger`` seconds, so that a trickle costs a wakeup per few
    milliseconds rather than one per datagram; the socket buffer absorbs the pause.
    """
    if listen.format not in ("htcp", "msgpack"):
        raise MulticastSetupError(f"{key}.format: expected htcp or msgpack, got {listen.format!r}")
    sock = open_multicast_socket(listen, key)
    with sock:
        stats.rcvbuf_bytes += sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        if kernel_drops(sock) is None:
            log.warning("%s: SO_MEMINFO unavailable: kernel drops will not be counted", key)
        log.info("%s: receiving %s on %s:%d", key, listen.format, listen.group, sock.getsockname()[1])
        task_status.started(sock.getsockname())
        await _receive_loop(sock, listen, ingest, stats, max_url_length, linger)


def _drop_reason(refused: Refused) -> str:
    return refused.reason if refused.reason in ("overload", "rate_limited") else "journal"


async def _receive_loop(sock, listen, ingest, stats: MulticastStats, max_url_length: int, linger: float):
    buf = bytearray(65536)
    view = memoryview(buf)
    htcp = listen.format == "htcp"
    allowed = _SourceFilter(tuple(listen.sources)) if listen.sources else None
    observe = stats.loss.observe
    packets, drops, malformed = stats.packets, stats.drops, stats.malformed
    limited = _RateLimitedLog(log)
    recvfrom_into = sock.recvfrom_into
    last_drops = kernel_drops(sock)

    while True:
        await trio.lowlevel.wait_readable(sock)
        groups: dict[str, list[str]] = {}
        good = bad = filtered = nbytes = 0
        emptied = False
        for _ in range(MAX_DRAIN):
            try:
                n, addr = recvfrom_into(buf)
            except BlockingIOError:
                emptied = True
                break
            except OSError as exc:  # e.g. ENOMEM; the next wakeup tries again
                limited.warning("recv", "multicast receive failed: %s", exc)
                emptied = True
                break
            nbytes += n
            ip = addr[0]
            if allowed is not None and not allowed(ip):
                filtered += 1
                limited.warning("source", "dropping datagram from %s: not in sources", ip)
                continue
            try:
                if htcp:
                    clr = decode_clr(view[:n], max_url_length)
                    observe(ip, clr.trans_id)
                    urls: tuple[str, ...] | list[str] = (clr.uri,)
                else:
                    batch = decode_batch(view[:n])
                    observe(f"{batch.sender}@{ip}", batch.seq)
                    urls = batch.urls
            except DecodeError as exc:
                bad += 1
                malformed[exc.reason] = malformed.get(exc.reason, 0) + 1
                limited.warning(exc.reason, "dropping a datagram from %s: %s: %s", ip, exc.reason, exc)
                continue
            good += 1
            pending = groups.get(ip)
            if pending is None:
                groups[ip] = list(urls)
            else:
                pending.extend(urls)

        stats.bytes_read += nbytes
        packets["good"] += good
        packets["bad"] += bad
        packets["filtered"] += filtered
        drops["malformed"] += bad
        drops["source"] += filtered
        if last_drops is not None:
            count = kernel_drops(sock)
            if count is not None:
                drops["kernel"] += (count - last_drops) & 0xFFFFFFFF  # a u32 in the kernel: may wrap
                last_drops = count
        for ip, urls in groups.items():
            if not urls:
                continue
            stats.ingest_calls += 1
            try:
                rejected = ingest(urls, ip)
            except Refused as exc:
                reason = _drop_reason(exc)
                drops[reason] += len(urls)
                limited.warning(reason, "dropped %d purges from %s: %s", len(urls), ip, exc.detail)
                continue
            if rejected:
                drops["invalid_url"] += len(rejected)
                first = rejected[0]
                limited.warning("url", "dropping %d URLs from %s, e.g. %.200r: %s", len(rejected), ip,
                                urls[first["index"]], first["reason"])
            stats.urls_accepted += len(urls) - len(rejected)
        if emptied and linger > 0:
            await trio.sleep(linger)
