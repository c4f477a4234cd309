"""Configuration: the fleet keys, ``name`` and ``bus.nats.*`` (docs/fleet.md, docs/config.md).

Pure like :mod:`purged.config`, which calls :func:`parse_name` and :func:`parse_bus`; every problem names its
dotted key path. Without ``bus`` the daemon runs alone, exactly as before.
"""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from .validate import Errors, fields, join, list_of, mapping, positive, show, string

DEFAULT_STREAM = "PURGED"
_STREAM_RE = re.compile(r"[A-Za-z0-9_-]{1,64}\Z")  # NATS forbids . * > whitespace and path separators
_SCHEMES = ("nats", "tls", "ws", "wss")


@dataclass(frozen=True)
class NatsSettings:
    servers: tuple[str, ...]
    stream: str = DEFAULT_STREAM
    replicas: int = 1  # when purged creates the stream (3 in a real cluster)
    ack_wait: float = 30.0  # seconds a delivered message may stay unacked before JetStream redelivers it
    max_ack_pending: int = 4096  # messages handed to this daemon and not yet acked, at most
    publish_timeout: float = 5.0  # seconds to wait for JetStream's ack of a publish; past it: 503
    connect_timeout: float = 2.0
    fetch_batch: int = 64  # messages asked for per pull
    randomize: bool = True  # False: try the servers in the order listed (this DC's first: no WAN hop to the bus)


@dataclass(frozen=True)
class Bus:
    nats: NatsSettings


def default_name() -> str:
    return socket.gethostname() or "purged"


def parse_name(value: Any, path: str, errs: Errors) -> str | None:
    text = string(value, path, errs)
    if text is None:
        return None
    if len(text) > 255 or not text.isprintable():
        errs.add(path, f"expected 1 to 255 printable characters, got {show(text)}")
        return None
    return text


def _servers(value: Any, path: str, errs: Errors) -> tuple[str, ...] | None:
    items = list_of(value, path, errs)
    if items is None:
        return None
    if not items:
        errs.add(path, "must list at least one server")
        return None
    out = []
    for i, item in enumerate(items):
        text = string(item, f"{path}[{i}]", errs)
        if text is None:
            continue
        url = text if "://" in text else f"nats://{text}"
        try:
            split = urlsplit(url)
            port = split.port
        except ValueError:
            split, port = None, None
        if split is None or split.scheme not in _SCHEMES or not split.hostname or any(c.isspace() for c in text) \
                or (split.path not in ("", "/")):
            errs.add(f"{path}[{i}]", f"expected nats://host:port, got {show(text)}")
            continue
        out.append(url if port else url.rstrip("/") + ":4222")
    return tuple(out)


def _boolean(value: Any, path: str, errs: Errors) -> bool | None:
    if not isinstance(value, bool):
        errs.add(path, f"expected true or false, got {show(value)}")
        return None
    return value


def _stream(value: Any, path: str, errs: Errors) -> str | None:
    text = string(value, path, errs)
    if text is not None and not _STREAM_RE.match(text):
        errs.add(path, f"stream names are 1 to 64 letters, digits, - and _; got {show(text)}")
        return None
    return text


def _parse_nats(value: Any, path: str, errs: Errors) -> NatsSettings | None:
    spec = {
        "servers": _servers,
        "stream": _stream,
        "replicas": positive(minimum=1, maximum=5, integer=True),
        "ack_wait": positive(minimum=0.5, maximum=86400),
        "max_ack_pending": positive(minimum=1, maximum=1_000_000, integer=True),
        "publish_timeout": positive(minimum=0.01, maximum=600),
        "connect_timeout": positive(minimum=0.01, maximum=600),
        "fetch_batch": positive(minimum=1, maximum=10_000, integer=True),
        "randomize": _boolean,
    }
    m = mapping(value, path, errs, set(spec))
    if m is None:
        return None
    before = len(errs.items)
    if "servers" not in m:
        errs.add(join(path, "servers"), "required")
    kw = fields(m, path, errs, spec)
    if len(errs.items) != before:
        return None
    return NatsSettings(**kw)


def parse_bus(value: Any, path: str, errs: Errors) -> Bus | None:
    """``bus: {nats: {...}}``; ``bus: null`` is the same as no ``bus`` (one daemon alone)."""
    m = mapping(value, path, errs, {"nats"})
    if m is None:
        return None
    if "nats" not in m:
        errs.add(join(path, "nats"), "required (the only bus so far)")
        return None
    nats = _parse_nats(m["nats"], join(path, "nats"), errs)
    return None if nats is None else Bus(nats)
