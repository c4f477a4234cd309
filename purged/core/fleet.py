"""Core layer (sans-IO): the fleet's rules on a replicated purge stream (docs/fleet.md).

- The **message**: one msgpack map per batch (or per part of a batch above the server's max payload)::

      {"v": 1, "origin": "cp3050", "at": 1.7e9, "priority": "bulk", "part": 0, "parts": 1, "total": 5000,
       "urls": ["//en.wikipedia.org/wiki/Foo", ...]}

  ``urls`` are the publishing daemon's validated purge targets as scheme-relative URLs (every consumer
  validates them again with its own rules); ``at`` is the wall-clock time the origin accepted the batch;
  ``part``/``parts``/``total`` say which part of how many, and how many URLs the whole batch had. Unknown keys
  are ignored (a later writer may add some); a known key with a wrong type is a :class:`BadMessage`.
- **Fleet ids** come from stream sequences: ``s1234`` for one message, ``s1234-1236`` for a batch split into
  messages published as sequences 1234 to 1236 (others' messages may sit in between; status then waits for
  them too, which only makes "done" later, never wrong).
- **Consumer names** derive from the daemon's ``name`` (characters NATS forbids replaced).
- **Status** is positions: a message is delivered by a daemon when its durable consumer's ack floor reached the
  message's sequence (each daemon acks a message only once every one of its nodes has its purges).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import msgpack

from .errors import PurgedError

VERSION = 1
PRIORITIES = ("high", "bulk")
MAX_URL_CHARS = 16384  # a target longer than any PURGE request we would send
MAX_ORIGIN = 255
MAX_SEQ = 2**63 - 1  # JetStream sequences are uint64; ids beyond int64 are a typo
MAX_ID_SPAN = 100_000  # a split batch of 100k URLs (limits.max_urls_per_batch) is at most that many messages
HEADER_ROOM = 512  # bytes a message's keys and scalars take at most, besides its URLs (origin up to 255)


class BadMessage(PurgedError):
    """A stream message this daemon cannot read; counted by ``reason``, terminated, never retried."""

    reason = "bad_message"


class BadFleetId(PurgedError):
    """A status id that is not a fleet id (the API answers 404 with this reason)."""

    reason = "bad_batch_id"
    status = 404


@dataclass(frozen=True, slots=True)
class BusMessage:
    urls: list[str]
    priority: str
    origin: str
    accepted_at: float
    part: int = 0
    parts: int = 1
    total: int = 0  # URLs of the whole batch (all parts)


# -- the message codec -----------------------------------------------------------------------------------------

def _packed_str(n: int) -> int:
    return n + (1 if n < 32 else 2 if n < 256 else 3 if n < 65536 else 5)


def encode_message(msg: BusMessage) -> bytes:
    return msgpack.packb(
        {"v": VERSION, "origin": msg.origin, "at": float(msg.accepted_at), "priority": msg.priority,
         "part": msg.part, "parts": msg.parts, "total": msg.total, "urls": msg.urls},
        use_bin_type=True,
    )


def encode_batch(targets: list[str], *, priority: str, origin: str, accepted_at: float,
                 max_payload: int) -> list[bytes]:
    """The messages for one accepted batch of purge targets (``host + path``): one message, or several of
    at most ``max_payload`` bytes each when it does not fit (the server's max payload, 1 MiB by default)."""
    if priority not in PRIORITIES:
        raise ValueError(f"priority must be one of {PRIORITIES}")
    if not 0 < len(origin) <= MAX_ORIGIN:
        raise ValueError(f"origin must have 1 to {MAX_ORIGIN} characters")
    room = max_payload - HEADER_ROOM
    chunks: list[list[str]] = []
    chunk: list[str] = []
    size = 0
    for target in targets:
        url = "//" + target
        cost = _packed_str(len(url.encode("utf-8")))
        if cost > room:
            raise ValueError(f"one URL of {cost} bytes does not fit a message of {max_payload} bytes")
        if chunk and size + cost > room:
            chunks.append(chunk)
            chunk, size = [], 0
        chunk.append(url)
        size += cost
    if chunk or not chunks:
        chunks.append(chunk)
    total = len(targets)
    return [encode_message(BusMessage(c, priority, origin, accepted_at, i, len(chunks), total))
            for i, c in enumerate(chunks)]


def _fail(reason: str, detail: str) -> BadMessage:
    return BadMessage(detail, reason=reason)


def decode_message(data: bytes | bytearray | memoryview, *, max_urls: int = 1_000_000) -> BusMessage:
    """Decode one stream message strictly; every failure is a :class:`BadMessage` with a ``reason``."""
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True, max_ext_len=0, max_bin_len=0)
    except UnicodeDecodeError:
        raise _fail("not_utf8", "a string is not UTF-8") from None
    except msgpack.ExtraData:
        raise _fail("extra_data", "bytes after the message") from None
    except msgpack.OutOfData:
        raise _fail("truncated", "the message ends early") from None
    except (msgpack.UnpackException, ValueError, TypeError, OverflowError, RecursionError) as exc:
        text = str(exc)
        if "incomplete input" in text or ("exceeds max_" in text and "bin" not in text and "ext" not in text):
            raise _fail("truncated", "the message ends early") from None
        raise _fail("not_msgpack", f"not msgpack: {type(exc).__name__} {exc}"[:200]) from None
    if type(obj) is not dict:
        raise _fail("bad_shape", "a message is a msgpack map")
    if obj.get("v") != VERSION or type(obj.get("v")) is not int:
        raise _fail("bad_version", f"version {obj.get('v')!r:.20}, expected {VERSION}")
    origin, at, priority = obj.get("origin"), obj.get("at"), obj.get("priority")
    part, parts, total, urls = obj.get("part", 0), obj.get("parts", 1), obj.get("total"), obj.get("urls")
    if type(origin) is not str or not 0 < len(origin) <= MAX_ORIGIN:
        raise _fail("bad_origin", f"origin must be a string of 1 to {MAX_ORIGIN} characters")
    if type(at) not in (float, int) or not math.isfinite(at) or at < 0:
        raise _fail("bad_time", "at must be a non-negative finite number")
    if priority not in PRIORITIES:
        raise _fail("bad_priority", f"priority must be one of {', '.join(PRIORITIES)}")
    for key, value in (("part", part), ("parts", parts)):
        if type(value) is not int or not 0 <= value <= MAX_ID_SPAN:
            raise _fail("bad_part", f"{key} must be an integer from 0 to {MAX_ID_SPAN}")
    if not part < parts:
        raise _fail("bad_part", f"part {part} of {parts}")
    if type(urls) is not list:
        raise _fail("bad_shape", "urls must be an array")
    if len(urls) > max_urls:
        raise _fail("too_many_urls", f"{len(urls)} URLs, the limit is {max_urls}")
    if total is None:
        total = len(urls)
    if type(total) is not int or not len(urls) <= total <= MAX_SEQ:
        raise _fail("bad_total", "total must be an integer at least the number of URLs")
    for url in urls:
        if type(url) is not str:
            raise _fail("bad_shape", f"a URL must be a string, not {type(url).__name__}")
        if not url:
            raise _fail("empty_url", "empty URL")
        if len(url) > MAX_URL_CHARS:
            raise _fail("url_too_long", f"URL of {len(url)} characters is over {MAX_URL_CHARS}")
    return BusMessage(urls, priority, origin, float(at), part, parts, total)


# -- fleet ids ------------------------------------------------------------------------------------------------

_ID_RE = re.compile(r"s([1-9][0-9]{0,18})(?:-([1-9][0-9]{0,18}))?\Z")


def format_fleet_id(first: int, last: int) -> str:
    return f"s{first}" if first == last else f"s{first}-{last}"


def is_fleet_id(text: str) -> bool:
    """Whether ``text`` is meant as a fleet id (local batch ids are ``<8 hex>-<n>``: never an ``s``)."""
    return text.startswith("s")


def parse_fleet_id(text: str) -> tuple[int, int]:
    """``"s1234"`` -> (1234, 1234); ``"s1234-1236"`` -> (1234, 1236); else :class:`BadFleetId`."""
    m = _ID_RE.match(text) if len(text) <= 41 and text.isascii() else None
    if m is None:
        raise BadFleetId(f"{text[:60]!r} is not a fleet id (s<seq> or s<first>-<last>)")
    first = int(m.group(1))
    last = int(m.group(2)) if m.group(2) else first
    if first > MAX_SEQ or last > MAX_SEQ:
        raise BadFleetId(f"{text[:60]!r}: sequence out of range")
    if m.group(2) and not first < last <= first + MAX_ID_SPAN:
        raise BadFleetId(f"{text[:60]!r}: the range must go up, by at most {MAX_ID_SPAN}")
    return first, last


# -- consumer names -------------------------------------------------------------------------------------------

_FORBIDDEN = re.compile(r"[^A-Za-z0-9_-]")
MAX_CONSUMER_NAME = 64


def consumer_name(name: str) -> str:
    """A durable consumer name for daemon ``name``: NATS forbids ``.``, ``*``, ``>``, whitespace and path
    separators; anything but letters, digits, ``-`` and ``_`` becomes ``_`` (the raw name is kept in the
    consumer's metadata and description). Long names are cut with a hash of the whole kept."""
    out = _FORBIDDEN.sub("_", name)
    if len(out) > MAX_CONSUMER_NAME:
        import hashlib

        digest = hashlib.sha256(name.encode("utf-8", "surrogatepass")).hexdigest()[:12]
        out = f"{out[: MAX_CONSUMER_NAME - 13]}_{digest}"
    return out or "_"


# -- status ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class ConsumerPosition:
    """What the stream says about one durable consumer (one daemon)."""

    daemon: str  # the raw daemon name (from the consumer's metadata), else the consumer name
    consumer: str
    ack_floor: int  # every stream sequence up to this one is acked (delivered to all the daemon's nodes)
    delivered: int  # highest stream sequence handed to the daemon
    pending: int  # messages not yet handed to the daemon
    ack_pending: int  # handed, not acked yet
    redelivered: int
    last_active: float | None  # epoch seconds of the daemon's last ack (or delivery), None: never


@dataclass(frozen=True, slots=True)
class DaemonProgress:
    done: bool
    ack_floor: int
    lag: int  # stream messages the daemon has not acked yet (last_seq - ack_floor)


def daemon_progress(last: int, last_seq: int, pos: ConsumerPosition) -> DaemonProgress:
    return DaemonProgress(pos.ack_floor >= last, pos.ack_floor, max(0, last_seq - pos.ack_floor))


def fleet_progress(last: int, last_seq: int, consumers: list[ConsumerPosition],
                   missing: int = 0) -> tuple[bool, dict[str, DaemonProgress]]:
    """Is the message at sequence ``last`` (and all before it) delivered by every daemon? Conservative: a
    daemon counts as done only once its ack floor passed it (a daemon down or behind is not done); a stream
    with no consumer at all is not done, and neither is anything while ``missing`` consumers could not be
    asked (the stream counts more consumers than answered: one's leader is failing over)."""
    daemons = {pos.daemon: daemon_progress(last, last_seq, pos) for pos in consumers}
    return not missing and bool(daemons) and all(p.done for p in daemons.values()), daemons


def fleet_table(last_seq: int, consumers: list[ConsumerPosition]) -> dict[str, dict]:
    """``GET /v1/fleet``'s daemons: each one's lag, pending counts and last activity."""
    return {
        pos.daemon: {
            "consumer": pos.consumer,
            "ack_floor": pos.ack_floor,
            "lag": max(0, last_seq - pos.ack_floor),
            "pending": pos.pending,
            "ack_pending": pos.ack_pending,
            "redelivered": pos.redelivered,
            "last_active": pos.last_active,
        }
        for pos in sorted(consumers, key=lambda p: p.daemon)
    }
