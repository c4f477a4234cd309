"""Adapter: the NATS JetStream bus, with the official asyncio client ``nats-py`` on an event loop of its own.

nats-py is asyncio; purged is trio. The bridge is one dedicated thread running one asyncio event loop, owned
here (:class:`~purged.net.aioloop.AsyncioThread`): trio submits coroutines to it and awaits their results.
Only this direction crosses:
the consumer's fetch loop runs in trio (each pull is one submitted coroutine), so backpressure is simply
"trio does not ask for more", and the asyncio loop never blocks on trio (its pings, publishes and acks keep
going while the daemon waits for local capacity). The connection callbacks only set plain attributes.

:class:`NatsBus` connects (retrying for ever; the daemon serves meanwhile and answers 503 to purges),
creates the stream when missing and this daemon's durable pull consumer, and offers ``publish``, ``fetch``,
``ack``/``in_progress``/``nak``/``term`` and ``positions`` (stream head and every consumer's position) to
:mod:`purged.net.fleet`. A Kafka adapter would offer the same methods.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from ..config_bus import NatsSettings
from ..core.errors import PurgedError
from ..core.fleet import ConsumerPosition, consumer_name
from ..core.histogram import Histogram
from .aioloop import AsyncioThread

log = logging.getLogger("purged.bus")

PUBLISH_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, float("inf"))
SETUP_RETRY = 1.0  # seconds between attempts to create the stream and consumer (no meta leader yet, ...)
FETCH_WAIT = 1.0  # seconds a pull waits for messages
CLOSE_TIMEOUT = 2.0
STREAM_MAX_AGE = 7 * 86400.0  # a message nobody acked in a week is dropped by the stream (docs/fleet.md)
ERROR_LOG_INTERVAL = 10.0
RECOVER_AFTER = 25  # consecutive failed fetches (~5 s) before the stream and consumer are set up again


class BusUnavailable(PurgedError):
    """The bus cannot take a publish (not connected, timeout, no stream leader); the API answers 503."""

    reason = "bus_unavailable"
    status = 503


class BusSetupError(PurgedError):
    """A configuration problem the daemon must not paper over (another daemon's consumer under our name)."""

    reason = "bus_setup"


@dataclass
class BusStats:
    published_messages: int = 0
    published_urls: int = 0
    publish_failures: dict[str, int] = field(default_factory=dict)
    publish_seconds: Histogram = field(default_factory=lambda: Histogram(PUBLISH_BUCKETS))
    consumed_messages: int = 0
    consumed_urls: int = 0
    redelivered: int = 0
    acked: int = 0
    bad_messages: dict[str, int] = field(default_factory=dict)
    disconnects: int = 0
    reconnects: int = 0


class NatsBus:
    """This daemon's connection to the stream and its durable consumer."""

    def __init__(self, settings: NatsSettings, name: str):
        self.settings = settings
        self.name = name
        self.consumer = consumer_name(name)
        self.subject = f"{settings.stream}.batches"
        self.state = "connecting"  # connecting, connected, disconnected, closed
        self.ready = trio.Event()  # connected once, stream and consumer exist
        self.max_payload = 1024 * 1024
        self.stats = BusStats()
        self.before_close: list[Callable[[], None]] = []  # run (sync) before the connection closes
        self._thread = AsyncioThread()
        self._nc: Any = None
        self._js: Any = None
        self._sub: Any = None
        self._logged = 0.0
        self._fetch_failures = 0
        self._msg_prefix = f"{self.consumer}-{secrets.token_hex(4)}-"  # Nats-Msg-Id: the stream's dedup key
        self._msg_ids = itertools.count(1)

    @property
    def connected(self) -> bool:
        return self.state == "connected" and self.ready.is_set()

    # -- the task --------------------------------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
        """Start the loop thread and return at once (``task_status.started()``); then connect, set up the
        stream and the consumer (retrying), set :attr:`ready`, and hold the connection until cancelled."""
        self._thread.start()
        try:
            task_status.started()
            await self._thread.run(self._connect())
            while True:
                try:
                    await self._thread.run(self._setup())
                    break
                except BusSetupError:
                    raise
                except Exception as exc:
                    self._log_error(f"bus: setting up stream {self.settings.stream} and consumer "
                                    f"{self.consumer}: {exc!r}; retrying")
                    await trio.sleep(SETUP_RETRY)
            log.info("bus: connected to %s, stream %s, consumer %s (daemon %r)", self._server(),
                     self.settings.stream, self.consumer, self.name)
            self.ready.set()
            await trio.sleep_forever()
        finally:
            for hook in self.before_close:
                with contextlib.suppress(Exception):
                    hook()
            with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT):
                await self._thread.run(self._close())
            self.state = "closed"
            self._thread.stop()

    # -- asyncio side (run on the loop thread) -----------------------------------------------------------------

    async def _connect(self) -> None:
        import nats

        async def disconnected() -> None:
            if self.state == "closing":
                return
            if self.state == "connected":
                self.stats.disconnects += 1
                log.warning("bus: disconnected; reconnecting")
            self.state = "disconnected"

        async def reconnected() -> None:
            self.state = "connected"
            self.stats.reconnects += 1
            log.info("bus: reconnected to %s", self._server())

        async def error(exc: Exception) -> None:
            self._log_error(f"bus: {exc!r}")

        s = self.settings
        self._nc = await nats.connect(
            list(s.servers), name=f"purged {self.name}", connect_timeout=s.connect_timeout,
            allow_reconnect=True, max_reconnect_attempts=-1, reconnect_time_wait=0.5, dont_randomize=not s.randomize,
            ping_interval=5, max_outstanding_pings=3,
            disconnected_cb=disconnected, reconnected_cb=reconnected, error_cb=error,
        )
        self.state = "connected"
        self.max_payload = self._nc.max_payload or self.max_payload
        self._js = self._nc.jetstream(timeout=s.publish_timeout)

    async def _setup(self) -> None:
        from nats.js.api import (
            AckPolicy,
            ConsumerConfig,
            DeliverPolicy,
            RetentionPolicy,
            StorageType,
            StreamConfig,
        )
        from nats.js.errors import NotFoundError

        s, js = self.settings, self._js
        try:
            await js.stream_info(s.stream)
        except NotFoundError:
            # Interest retention: a message is kept until every consumer (daemon) acked it, like the local
            # log kept down to the slowest node; max_age bounds what a daemon that never returns holds.
            await js.add_stream(StreamConfig(
                name=s.stream, subjects=[self.subject], num_replicas=s.replicas, storage=StorageType.FILE,
                retention=RetentionPolicy.INTEREST, max_age=STREAM_MAX_AGE,
                description="purged: accepted purge batches, one msgpack message each (docs/fleet.md)",
            ))
            log.info("bus: created stream %s (subject %s, %d replicas)", s.stream, self.subject, s.replicas)
        try:
            info = await js.consumer_info(s.stream, self.consumer)
        except NotFoundError:
            info = None
        if info is not None:
            owner = (info.config.metadata or {}).get("purged_name")
            if owner is not None and owner != self.name:
                raise BusSetupError(f"consumer {self.consumer} of stream {s.stream} belongs to daemon {owner!r}, "
                                    f"not {self.name!r}: give this daemon another name")
        await js.add_consumer(s.stream, ConsumerConfig(
            durable_name=self.consumer, description=f"purged daemon {self.name}",
            metadata={"purged_name": self.name}, deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.EXPLICIT,
            ack_wait=s.ack_wait, max_ack_pending=s.max_ack_pending, max_deliver=-1,
        ))
        if self._sub is not None:  # set up again (_recover): drop the old binding's inbox
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
        self._sub = await js.pull_subscribe_bind(durable=self.consumer, stream=s.stream)

    async def _close(self) -> None:
        self.state = "closing"
        if self._nc is not None and not self._nc.is_closed:
            with contextlib.suppress(Exception):
                await self._nc.flush(timeout=1)
            with contextlib.suppress(Exception):
                await self._nc.close()

    async def _fetch(self, batch: int) -> list:
        import nats.errors

        try:
            return await self._sub.fetch(batch, timeout=FETCH_WAIT)
        except (TimeoutError, nats.errors.TimeoutError):
            return []
        except nats.errors.ConnectionClosedError:
            if self.state == "closing":  # cancelled by our own close: nobody is waiting for the answer
                return []
            raise

    async def _positions(self) -> tuple[int, list[ConsumerPosition], int]:
        s = self.settings
        info = await self._js.stream_info(s.stream)
        expected = info.state.consumer_count
        consumers: list = []
        while len(consumers) < expected:  # the server answers at most 256 a page
            page = await self._js.consumers_info(s.stream, offset=len(consumers) or None)
            if not page:
                break
            consumers += page
        # A consumer whose leader is failing over is left out of the list: count it as missing (not done).
        missing = max(0, expected - len(consumers))
        return info.state.last_seq, [_position(c) for c in consumers if c.config.durable_name], missing

    # -- trio side ---------------------------------------------------------------------------------------------

    def _server(self) -> str:
        try:
            url = self._nc.connected_url
            return f"{url.hostname}:{url.port}"
        except AttributeError:
            return "?"

    def _log_error(self, text: str) -> None:
        now = time.monotonic()
        if now - self._logged >= ERROR_LOG_INTERVAL:
            self._logged = now
            log.warning("%s", text)

    def fail(self, reason: str, detail: str) -> BusUnavailable:
        """Count a publish that cannot be done (``reason`` labels purged_bus_publish_failures_total)."""
        self.stats.publish_failures[reason] = self.stats.publish_failures.get(reason, 0) + 1
        return BusUnavailable(detail)

    async def publish(self, payloads: list[bytes], urls: int) -> list[int]:
        """Publish each message in order; the stream sequences once JetStream stored each (with its
        replicas). Within ``publish_timeout`` a failover is waited out: while disconnected, or when the
        stream has no leader for a moment, the same message is published again, with the same
        ``Nats-Msg-Id`` so that the stream stores it once. :class:`BusUnavailable` past the deadline, at once
        before the bus was ever set up, and on an error that a retry cannot cure."""
        if not self.ready.is_set():
            raise self.fail("not_ready", f"the bus is {self.state} (not set up yet); retry later")
        start = trio.current_time()
        deadline = start + self.settings.publish_timeout
        seqs = [await self._publish_one(data, f"{self._msg_prefix}{next(self._msg_ids)}", deadline)
                for data in payloads]
        st = self.stats
        st.publish_seconds.observe(trio.current_time() - start)
        st.published_messages += len(seqs)
        st.published_urls += urls
        return seqs

    async def _publish_one(self, data: bytes, msg_id: str, deadline: float) -> int:
        import nats.errors
        import nats.js.errors

        reason, detail = "timeout", "the stream did not acknowledge in bus.nats.publish_timeout"
        while True:
            remaining = deadline - trio.current_time()
            if remaining <= 0:
                raise self.fail(reason, detail)
            if self.state != "connected":
                reason, detail = "disconnected", f"the bus is {self.state}"
                await trio.sleep(min(0.1, remaining))
                continue
            publish = self._js.publish(self.subject, data, timeout=remaining, stream=self.settings.stream,
                                       headers={"Nats-Msg-Id": msg_id})
            try:
                with trio.fail_after(remaining + 1):
                    return (await self._thread.run(publish)).seq
            except (TimeoutError, trio.TooSlowError, nats.errors.TimeoutError):
                reason, detail = "timeout", "the stream did not acknowledge in bus.nats.publish_timeout"
                continue
            except (nats.js.errors.NoStreamResponseError, nats.errors.NoRespondersError):
                reason, detail = "no_responders", "no stream leader answered (failing over, or no stream)"
            except nats.js.errors.ServiceUnavailableError:
                reason, detail = "unavailable", "JetStream is unavailable (failing over)"
            except nats.js.errors.APIError as exc:  # a refusal a retry cannot cure (a stream limit, ...)
                raise self.fail("api_error", f"JetStream refused the publish: {exc.description}") from None
            except (nats.errors.Error, OSError) as exc:
                reason, detail = "disconnected", f"bus error: {type(exc).__name__}"
            await trio.sleep(min(0.2, max(0.0, deadline - trio.current_time())))

    async def fetch(self, batch: int) -> list:
        """Up to ``batch`` messages for this daemon's consumer (waits up to a second; [] when none)."""
        import nats.errors
        import nats.js.errors

        if not self.connected:
            await trio.sleep(0.2)
            return []
        try:
            msgs = await self._thread.run(self._fetch(batch))
        except (nats.errors.Error, nats.js.errors.Error, OSError) as exc:
            self._log_error(f"bus: fetch from consumer {self.consumer}: {exc!r}")
            self._fetch_failures += 1
            if self._fetch_failures % RECOVER_AFTER == 0:
                await self._recover()
            await trio.sleep(0.2)
            return []
        self._fetch_failures = 0
        return msgs

    async def _recover(self) -> None:
        """Fetches keep failing: a leader election takes seconds, but the consumer (or the whole stream) may
        also have been deleted by an operator. Set them up again (idempotent); a live daemon keeps its place."""
        try:
            with trio.fail_after(self.settings.publish_timeout * 3):
                await self._thread.run(self._setup())
        except BusSetupError as exc:
            self._log_error(f"bus: {exc.detail}")
        except Exception as exc:
            self._log_error(f"bus: setting up consumer {self.consumer} again: {exc!r}")

    async def positions(self) -> tuple[int, list[ConsumerPosition], int]:
        """The stream's last sequence, every durable consumer's position, and how many consumers the stream
        counts but did not describe (:class:`BusUnavailable` when the bus cannot tell)."""
        import nats.errors
        import nats.js.errors

        if not self.ready.is_set() or self.state != "connected":
            raise BusUnavailable(f"the bus is {self.state}; retry later")
        try:
            with trio.fail_after(self.settings.publish_timeout + 1):
                return await self._thread.run(self._positions())
        except trio.TooSlowError:
            raise BusUnavailable("the stream did not answer in time") from None
        except (nats.errors.Error, nats.js.errors.Error, OSError) as exc:
            raise BusUnavailable(f"bus error: {type(exc).__name__}") from None

    async def get_message(self, seq: int) -> bytes | None:
        """The stored message at ``seq`` (None: gone, or the bus cannot tell)."""
        try:
            with trio.move_on_after(self.settings.publish_timeout):
                msg = await self._thread.run(self._js.get_msg(self.settings.stream, seq))
                return msg.data
        except Exception:
            return None
        return None

    async def delete_consumer(self, consumer: str) -> bool:
        return await self._thread.run(self._js.delete_consumer(self.settings.stream, consumer))

    def ack(self, msg: Any) -> None:
        self.stats.acked += 1
        self._thread.submit(msg.ack())

    def in_progress(self, msg: Any) -> None:
        self._thread.submit(msg.in_progress())

    def nak(self, msg: Any) -> None:
        self._thread.submit(msg.nak())

    def term(self, msg: Any) -> None:
        self._thread.submit(msg.term())


def _position(info: Any) -> ConsumerPosition:
    config = info.config
    daemon = (config.metadata or {}).get("purged_name")
    if daemon is None:
        desc = config.description or ""
        daemon = desc[len("purged daemon "):] if desc.startswith("purged daemon ") else info.name
    floor, delivered = info.ack_floor, info.delivered
    last = None
    for seqinfo in (floor, delivered):
        if seqinfo is not None and seqinfo.last_active is not None:
            t = seqinfo.last_active.timestamp()
            last = t if last is None else max(last, t)
    return ConsumerPosition(
        daemon=daemon, consumer=info.name,
        ack_floor=floor.stream_seq if floor is not None else 0,
        delivered=delivered.stream_seq if delivered is not None else 0,
        pending=info.num_pending or 0, ack_pending=info.num_ack_pending or 0,
        redelivered=info.num_redelivered or 0, last_active=last,
    )
