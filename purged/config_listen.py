"""Configuration: where purged listens and who may use its API, ``listen.*`` and ``auth.*`` (docs/config.md).

Pure like :mod:`purged.config`, which calls :func:`parse_listen`, :func:`parse_auth` and
:func:`check_secure_default`; every problem names its dotted key path.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

from .core.errors import InvalidURL
from .core.urls import validate_host
from .validate import Errors, fields, join, list_of, mapping, positive, show, string


@dataclass(frozen=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class MulticastListen:
    group: str
    port: int
    interface: str = "0.0.0.0"
    format: str = "htcp"
    sources: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    rcvbuf: int = 8 * 1024 * 1024
    rate: float = 0.0  # purges/s accepted from this group; 0: unlimited
    burst: float = 0.0


@dataclass(frozen=True)
class HTTPSListen:
    address: Address
    cert: str  # PEM certificate chain; cert and key are re-read on SIGHUP
    key: str


Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Listen:
    http: Address | None = Address("127.0.0.1", 8090)
    multicast: tuple[MulticastListen, ...] = ()
    https: HTTPSListen | None = None
    http_allow: tuple[Network, ...] = ()  # API clients (both listeners, every path) outside these get 403; (): all


@dataclass(frozen=True)
class Auth:
    tokens_file: str | None = None  # tokens.yaml; with it every API request needs a Bearer token
    allow_anonymous: bool = False  # without tokens_file, allow listening beyond loopback anyway
    protect_metrics: bool = False  # /metrics and /healthz need a token with scope read



def parse_address(value: Any, path: str, errs: Errors, *, listen: bool = False) -> Address | None:
    """``host:port`` (IPv6 in brackets). Port 0 (any free port) only for addresses we listen on."""
    text = string(value, path, errs)
    if text is None:
        return None
    host, sep, port = text.rpartition(":")
    lowest = 0 if listen else 1
    if not sep or not port.isascii() or not port.isdigit() or len(port) > 5 or not lowest <= int(port) < 65536 \
            or not host:
        errs.add(path, f"expected host:port, got {show(text)}")
        return None
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        validate_host(host if ":" not in host else f"[{host}]")
    except InvalidURL as exc:
        errs.add(path, f"invalid host {show(host)}: {exc.detail}")
        return None
    return Address(host, int(port))


def _parse_multicast(value: Any, path: str, errs: Errors) -> MulticastListen | None:
    allowed = {"group", "port", "interface", "format", "sources", "rcvbuf", "rate", "burst"}
    m = mapping(value, path, errs, allowed)
    if m is None:
        return None
    before = len(errs.items)
    for key in ("group", "port"):
        if key not in m:
            errs.add(join(path, key), "required")
    kw = fields(
        m,
        path,
        errs,
        {
            "port": positive(minimum=1, integer=True),
            "rcvbuf": positive(minimum=4096, maximum=2**31 - 1, integer=True),  # SO_RCVBUF is a C int
            "rate": positive(),
            "burst": positive(),
        },
    )
    if kw.get("port", 1) > 65535:
        errs.add(join(path, "port"), "must be <= 65535")
    for key in ("group", "interface"):
        if key in m:
            try:
                ip = ipaddress.ip_address(m[key])
            except (ValueError, TypeError):
                errs.add(join(path, key), f"expected an IP address, got {show(m[key])}")
                continue
            if key == "group" and not ip.is_multicast:
                errs.add(join(path, key), f"{ip} is not a multicast address")
            kw[key] = str(ip)
    if "format" in m:
        if m["format"] not in ("htcp", "msgpack"):
            errs.add(join(path, "format"), f"expected htcp or msgpack, got {show(m['format'])}")
        else:
            kw["format"] = m["format"]
    if "sources" in m:
        kw["sources"] = _networks(m["sources"], join(path, "sources"), errs)
    return MulticastListen(**kw) if len(errs.items) == before else None


def _parse_https(value: Any, path: str, errs: Errors) -> HTTPSListen | None:
    m = mapping(value, path, errs, {"address", "cert", "key"})
    if m is None:
        return None
    for key in ("address", "cert", "key"):
        if key not in m:
            errs.add(join(path, key), "required")
    address = parse_address(m["address"], join(path, "address"), errs, listen=True) if "address" in m else None
    files = {k: _path_string(m[k], join(path, k), errs) for k in ("cert", "key") if k in m}
    if address is None or files.get("cert") is None or files.get("key") is None:
        return None
    return HTTPSListen(address, files["cert"], files["key"])


def _path_string(value: Any, path: str, errs: Errors) -> str | None:
    text = string(value, path, errs)
    if text is not None and "\0" in text:
        errs.add(path, "contains a NUL byte")
        return None
    return text


def _networks(value: Any, path: str, errs: Errors) -> tuple[Network, ...]:
    nets = []
    for i, item in enumerate(list_of(value, path, errs) or []):
        try:
            nets.append(ipaddress.ip_network(item, strict=False))
        except (ValueError, TypeError):
            errs.add(f"{path}[{i}]", f"expected a network like 10.0.0.0/8, got {show(item)}")
    return tuple(nets)


def parse_listen(value: Any, path: str, errs: Errors) -> Listen | None:
    m = mapping(value, path, errs, {"http", "multicast", "https", "http_allow"})
    if m is None:
        return None
    kw: dict[str, Any] = {}
    if "http" in m:
        kw["http"] = None if m["http"] is None else parse_address(m["http"], join(path, "http"), errs, listen=True)
    if "https" in m and m["https"] is not None:
        kw["https"] = _parse_https(m["https"], join(path, "https"), errs)
    if "http_allow" in m:
        kw["http_allow"] = _networks(m["http_allow"], join(path, "http_allow"), errs)
    if "multicast" in m:
        items = list_of(m["multicast"], join(path, "multicast"), errs) or []
        kw["multicast"] = tuple(
            x for i, v in enumerate(items) if (x := _parse_multicast(v, f"{path}.multicast[{i}]", errs))
        )
    return Listen(**kw)


def _boolean(value: Any, path: str, errs: Errors) -> bool | None:
    if not isinstance(value, bool):
        errs.add(path, f"expected true or false, got {show(value)}")
        return None
    return value


def parse_auth(value: Any, path: str, errs: Errors) -> Auth | None:
    spec = {"allow_anonymous": _boolean, "protect_metrics": _boolean}
    m = mapping(value, path, errs, set(spec) | {"tokens_file"})
    if m is None:
        return None
    kw = fields(m, path, errs, spec)
    if m.get("tokens_file") is not None:
        kw["tokens_file"] = _path_string(m["tokens_file"], join(path, "tokens_file"), errs)
    return Auth(**kw)


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or ``localhost``: the only listen addresses that need no token (guarantee 7)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_secure_default(listen: Listen, auth: Auth, errs: Errors) -> None:
    """Refuse an API beyond loopback without tokens, unless the operator said so (one line naming the fix)."""
    if auth.tokens_file is not None or auth.allow_anonymous:
        return
    for key, address in (("http", listen.http), ("https", listen.https and listen.https.address)):
        if address is not None and not is_loopback(address.host):
            errs.add(f"listen.{key}", f"{address} is not loopback and auth.tokens_file is not set: anyone who "
                     "reaches it could purge; set auth.tokens_file (see docs/operations.md), listen on "
                     "127.0.0.1, or set auth.allow_anonymous: true")
