"""Configuration: ``parse_config(mapping) -> Config``, one frozen, validated object tree.

Pure (no I/O) except :func:`load_config`. Every problem is collected, not just the first, and each names its dotted
key path (``datacenters.eqiad.tiers[1].nodes[0]: ...``) so that ``purged --check-config`` can list them all.
Unknown keys and wrong types are errors.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .config_bus import Bus, default_name, parse_bus, parse_name
from .config_listen import (  # noqa: F401  (re-exported: Address, Listen and is_loopback are used as config.X)
    Address,
    Auth,
    HTTPSListen,
    Listen,
    MulticastListen,
    check_secure_default,
    is_loopback,
    parse_address,
    parse_auth,
    parse_listen,
)
from .validate import Errors, fields, join, list_of, mapping, number, positive, show, string, type_name


class ConfigError(Exception):
    """The configuration is invalid; ``errors`` lists each problem as ``"dotted.path: message"``."""

    reason = "invalid_config"

    def __init__(self, errors: list[str]):
        super().__init__("\n".join(errors))
        self.errors = errors


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 16 * 1024 * 1024
    max_urls_per_batch: int = 100_000
    max_url_length: int = 8192
    max_wait: float = 60.0  # longest ?wait= a status request may hold the connection
    recent_batches: int = 100_000  # batch ids whose status stays queryable
    max_pending: int = 2_000_000  # unique pending URLs; past it: HTTP 429, multicast drops. 0: no ceiling
    max_lag: int = 0  # a node owing more purges is declared out of sync (its backlog dropped). 0: off
    max_age: float = 0.0  # purges older than this when a node reaches them are dropped for it. 0: off
    # Safe defaults for a 2-core, 24 GB machine (docs/config.md): a client address gets 10k URLs/s (a 100k-URL
    # batch passes when its bucket is full); 2M unique URLs or 256 MiB of URL bytes pending (~0.5 GB RSS).
    max_pending_bytes: int = 256 * 1024 * 1024  # sum of the pending targets' lengths; 0: no ceiling
    client_rate: float = 10_000.0  # purges/s accepted per HTTP client address; 0: unlimited
    client_burst: float = 100_000.0
    header_timeout: float = 10.0  # the request head must arrive within this (a new connection: from accept)
    body_timeout: float = 30.0  # the body must arrive (and the response be taken) within this
    max_connections: int = 10_000  # open API connections; past it 503 (a small reserve answers /healthz)
    max_request_bytes: int = 16384  # a URL whose PURGE request would be larger is rejected (Varnish: 32 KB)
    max_waiters: int = 1000  # open ?wait= long-polls; past it a status answers at once


@dataclass(frozen=True)
class Dedup:
    window: float = 0.0  # a URL is sent to a node at most once per window (trailing edge); 0: off
    linger: float = 0.0  # new purges wait this long before their first send, so duplicates merge; 0: off


@dataclass(frozen=True)
class Sender:
    connections: int = 4  # persistent connections per node
    window: int = 256  # requests in flight per connection at first (pipelined); the window adapts from here
    max_window: int = 2048  # ... up to this per connection (4 x 2048 carry ~100k/s at 80 ms RTT); <= window: fixed
    timeout: float = 10.0  # seconds without a response before the connection is deemed stuck
    connect_timeout: float = 5.0
    retry_initial: float = 0.1  # first backoff, seconds; doubles per consecutive failure
    retry_max: float = 30.0
    down_after: int = 5  # consecutive failures before a node is marked down and only probed
    poison_after: int = 5  # failures following the same purge before it is set aside for that node; 0: never


@dataclass(frozen=True)
class Tier:
    name: str
    nodes: tuple[Address, ...]
    delay: float = 0.0
    rate: float | None = None  # purges/s per node of this tier; None: the data centre's
    burst: float | None = None


@dataclass(frozen=True)
class Datacenter:
    name: str
    tiers: tuple[Tier, ...]
    hosts: tuple[str, ...] = ()  # glob patterns; empty means every host
    rate: float = 0.0  # purges/s per node of this data centre; 0: unlimited
    burst: float = 0.0  # tokens saved up; 0: one second's worth

    def node_rate(self, tier: Tier) -> tuple[float, float]:
        """(rate, burst) for each node of ``tier``: the tier's values, else the data centre's."""
        rate = self.rate if tier.rate is None else tier.rate
        burst = self.burst if tier.burst is None else tier.burst
        return rate, burst or rate


@dataclass(frozen=True)
class JournalTuning:
    segment_bytes: int = 16 * 1024 * 1024  # a segment file is closed and a new one started past this size
    sync_interval: float = 0.1  # durability batch: seconds between fsyncs
    checkpoint_interval: float = 1.0  # seconds between checkpoints of the nodes' positions


DURABILITY = ("fsync", "batch", "none")


@dataclass(frozen=True)
class Config:
    datacenters: tuple[Datacenter, ...]
    listen: Listen = field(default_factory=Listen)
    auth: Auth = field(default_factory=Auth)
    limits: Limits = field(default_factory=Limits)
    sender: Sender = field(default_factory=Sender)
    dedup: Dedup = field(default_factory=Dedup)
    shutdown_timeout: float = 30.0
    state_dir: str | None = "/var/lib/purged"  # the journal; None: no journal (purges live in memory only)
    durability: str = "fsync"  # fsync | batch | none: what a 2xx promises (docs/durability.md)
    journal: JournalTuning = field(default_factory=JournalTuning)
    name: str = field(default_factory=default_name)  # this daemon's name in a fleet (config_bus.py)
    bus: Bus | None = None  # None: one daemon alone; else a fleet on a replicated stream (docs/fleet.md)


# -- the parser ---------------------------------------------------------------------------------------------------

def _parse_limits(value: Any, path: str, errs: Errors) -> Limits | None:
    spec = {
        "max_body_bytes": positive(minimum=1024, integer=True),
        "max_urls_per_batch": positive(minimum=1, integer=True),
        "max_url_length": positive(minimum=16, integer=True),
        "max_wait": positive(),
        "recent_batches": positive(minimum=1, integer=True),
        "max_pending": positive(integer=True),
        "max_lag": positive(integer=True),
        "max_age": positive(),
        "client_rate": positive(),
        "client_burst": positive(),
        "max_request_bytes": positive(minimum=256, integer=True),
        "max_waiters": positive(integer=True),
        "max_pending_bytes": positive(integer=True),
        "header_timeout": positive(minimum=0.01),
        "body_timeout": positive(minimum=0.01),
        "max_connections": positive(minimum=1, integer=True),
    }
    m = mapping(value, path, errs, set(spec))
    return None if m is None else Limits(**fields(m, path, errs, spec))


def _parse_dedup(value: Any, path: str, errs: Errors) -> Dedup | None:
    spec = {"window": positive(), "linger": positive()}
    m = mapping(value, path, errs, set(spec))
    return None if m is None else Dedup(**fields(m, path, errs, spec))


def _parse_sender(value: Any, path: str, errs: Errors) -> Sender | None:
    spec = {
        "connections": positive(minimum=1, integer=True),
        "window": positive(minimum=1, integer=True),
        "max_window": positive(minimum=1, integer=True),
        "timeout": positive(minimum=0.001),
        "connect_timeout": positive(minimum=0.001),
        "retry_initial": positive(minimum=0.001),
        "retry_max": positive(minimum=0.001),
        "down_after": positive(minimum=1, integer=True),
        "poison_after": positive(integer=True),
    }
    m = mapping(value, path, errs, set(spec))
    return None if m is None else Sender(**fields(m, path, errs, spec))


def _parse_tier(value: Any, path: str, errs: Errors, index: int) -> Tier | None:
    m = mapping(value, path, errs, {"name", "nodes", "delay", "rate", "burst"})
    if m is None:
        return None
    rates = fields(m, path, errs, {"rate": positive(), "burst": positive()})
    name = string(m["name"], join(path, "name"), errs) if "name" in m else f"tier{index}"
    delay = number(m["delay"], join(path, "delay"), errs) if "delay" in m else 0.0
    nodes: list[Address] = []
    if "nodes" not in m:
        errs.add(join(path, "nodes"), "required")
    else:
        items = list_of(m["nodes"], join(path, "nodes"), errs) or []
        if not items and isinstance(m["nodes"], list):
            errs.add(join(path, "nodes"), "must list at least one node")
        nodes = [a for i, v in enumerate(items) if (a := parse_address(v, f"{path}.nodes[{i}]", errs))]
    if name is None or delay is None:
        return None
    return Tier(name=name, nodes=tuple(nodes), delay=float(delay), **rates)


def _parse_datacenter(name: str, value: Any, path: str, errs: Errors) -> Datacenter | None:
    m = mapping(value, path, errs, {"hosts", "tiers", "rate", "burst"})
    if m is None:
        return None
    rates = fields(m, path, errs, {"rate": positive(), "burst": positive()})
    hosts: list[str] = []
    if "hosts" in m:
        for i, h in enumerate(list_of(m["hosts"], join(path, "hosts"), errs) or []):
            pattern = string(h, f"{path}.hosts[{i}]", errs)
            if pattern is not None:
                if any(c.isspace() or ord(c) < 0x20 for c in pattern):
                    errs.add(f"{path}.hosts[{i}]", "host pattern contains whitespace or control characters")
                hosts.append(pattern.lower())
    tiers: list[Tier] = []
    if "tiers" not in m:
        errs.add(join(path, "tiers"), "required")
    else:
        items = list_of(m["tiers"], join(path, "tiers"), errs) or []
        if not items and isinstance(m["tiers"], list):
            errs.add(join(path, "tiers"), "must list at least one tier")
        tiers = [t for i, v in enumerate(items) if (t := _parse_tier(v, f"{path}.tiers[{i}]", errs, i))]
        names = [t.name for t in tiers]
        for dup in sorted({n for n in names if names.count(n) > 1}):
            errs.add(join(path, "tiers"), f"tier name {dup!r} is used twice")
    return Datacenter(name=name, tiers=tuple(tiers), hosts=tuple(hosts), **rates)


def _parse_journal(value: Any, path: str, errs: Errors) -> JournalTuning | None:
    spec = {
        "segment_bytes": positive(minimum=65536, integer=True),
        "sync_interval": positive(minimum=0.001),
        "checkpoint_interval": positive(minimum=0.01),
    }
    m = mapping(value, path, errs, set(spec))
    return None if m is None else JournalTuning(**fields(m, path, errs, spec))


def _parse_state_dir(value: Any, path: str, errs: Errors) -> Any:
    if value is None:
        return _NULL
    text = string(value, path, errs)
    if text is not None and "\0" in text:
        errs.add(path, "contains a NUL byte")
        return None
    return text


def _parse_durability(value: Any, path: str, errs: Errors) -> str | None:
    if value not in DURABILITY:
        errs.add(path, f"expected one of {', '.join(DURABILITY)}, got {show(value)}")
        return None
    return value


_NULL = object()  # a parsed null: fields() drops None (an error), so null state_dir needs a marker

_TOP_KEYS = {"listen", "datacenters", "limits", "sender", "dedup", "shutdown_timeout", "state_dir", "durability",
             "journal", "auth", "name", "bus"}


def parse_config(data: Any) -> Config:
    """Validate a mapping (as loaded from YAML) into a frozen :class:`Config`, or raise :class:`ConfigError`."""
    errs = Errors()
    m = mapping(data, "", errs, _TOP_KEYS)
    if m is None:
        raise ConfigError(errs.items)
    kw: dict[str, Any] = {}
    dcs: list[Datacenter] = []
    if "datacenters" not in m:
        errs.add("datacenters", "required")
    elif not isinstance(m["datacenters"], Mapping) or not m["datacenters"]:
        errs.add("datacenters", f"expected a non-empty mapping of name: datacenter, got {type_name(m['datacenters'])}")
    else:
        for name, value in m["datacenters"].items():
            path = join("datacenters", name)
            if not isinstance(name, str) or not name.replace("-", "").replace("_", "").isalnum():
                errs.add(path, "data centre names must be letters, digits, - and _")
                continue
            dc = _parse_datacenter(name, value, path, errs)
            if dc is not None:
                dcs.append(dc)
    seen: dict[Address, str] = {}
    for dc in dcs:
        for ti, tier in enumerate(dc.tiers):
            for ni, node in enumerate(tier.nodes):
                path = f"datacenters.{dc.name}.tiers[{ti}].nodes[{ni}]"
                if node in seen:
                    errs.add(path, f"node {node} is already listed at {seen[node]}")
                seen.setdefault(node, path)
    kw.update(
        fields(
            m,
            "",
            errs,
            {
                "listen": parse_listen,
                "auth": parse_auth,
                "limits": _parse_limits,
                "sender": _parse_sender,
                "dedup": _parse_dedup,
                "shutdown_timeout": positive(),
                "state_dir": _parse_state_dir,
                "durability": _parse_durability,
                "journal": _parse_journal,
                "name": parse_name,
                "bus": lambda v, p, e: None if v is None else parse_bus(v, p, e),
            },
        )
    )
    if kw.get("state_dir") is _NULL:
        kw["state_dir"] = None
    if "listen" in kw or "auth" in kw:
        check_secure_default(kw.get("listen", Listen()), kw.get("auth", Auth()), errs)
    if errs.items:
        raise ConfigError(errs.items)
    return Config(datacenters=tuple(dcs), **kw)


MAX_CONFIG_BYTES = 16 * 1024 * 1024  # a config file past this is a mistake (or /dev/zero)


def _yaml_loader() -> type:
    """``yaml.SafeLoader`` that refuses duplicate keys (YAML 1.2 forbids them; PyYAML silently keeps the last,
    so a second ``sender:`` would quietly undo the first) and reports a value it cannot build (an integer past
    4300 digits, a 30th of February) as a YAML error at its line instead of a bare ValueError."""
    import yaml

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):  # type: ignore[no-untyped-def]
            if isinstance(node, yaml.MappingNode):
                seen: set = set()
                for key_node, _ in node.value:
                    if key_node.tag == "tag:yaml.org,2002:merge":  # "<<: *base": explicit keys may override
                        continue
                    key = self.construct_object(key_node, deep=True)
                    try:
                        duplicate = key in seen
                        seen.add(key)
                    except TypeError:  # unhashable: the base class reports it
                        continue
                    if duplicate:
                        raise yaml.constructor.ConstructorError(
                            "while constructing a mapping", node.start_mark, f"found duplicate key {show(key)}",
                            key_node.start_mark,
                        )
            return super().construct_mapping(node, deep=deep)

        def construct_object(self, node, deep=False):  # type: ignore[no-untyped-def]
            try:
                return super().construct_object(node, deep=deep)
            except (ValueError, TypeError, OverflowError) as exc:
                raise yaml.constructor.ConstructorError(
                    None, None, f"cannot read this value: {exc}", node.start_mark
                ) from None

    return Loader


def load_config(path: str) -> Config:
    """Read a YAML file and parse it. Every problem with the file (unreadable, not UTF-8, not YAML, not a
    mapping, bad values) is a :class:`ConfigError`; nothing else escapes (SIGHUP relies on it)."""
    return parse_config(read_yaml(path))


def read_yaml(path: str) -> Any:
    """The data of a YAML file (the config, tokens.yaml); any problem with the file is a :class:`ConfigError`."""
    import yaml

    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror or exc}"]) from None
    except ValueError as exc:  # a NUL byte or an unencodable character in the path
        raise ConfigError([f"{path}: cannot read: {exc}"]) from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError([f"{path}: larger than {MAX_CONFIG_BYTES} bytes; is it the config file?"])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise ConfigError(
            [f"{path}: line {line}, column {column}: not UTF-8 (byte 0x{raw[exc.start]:02x}); save the file as UTF-8"]
        ) from None
    try:
        stream = io.StringIO(text.removeprefix("\ufeff"))
        stream.name = path  # marks name the file, not "<unicode string>"
        loader = _yaml_loader()(stream)
        try:
            data = loader.get_single_data()
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path}: not valid YAML: {exc}"]) from None
    except RecursionError:
        raise ConfigError([f"{path}: not valid YAML: nested too deeply"]) from None
    return data
