"""Core layer: URL validation and the split into (host, path) that a PURGE request needs.

A purge target is kept as one string ``host + path`` (the path always starts with ``/`` and a host never
contains one, so the split is unambiguous); one string per log entry keeps memory low.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable

from .errors import InvalidURL

DEFAULT_MAX_LENGTH = 8192  # resource_change's meta.uri limit

# RFC 3986 reg-name characters we accept in a host (no percent-escapes, no userinfo), plus '_' seen in the wild.
_HOST_RE = re.compile(r"[a-z0-9](?:[a-z0-9_.-]*[a-z0-9_])?\Z")
_IPV6_RE = re.compile(r"\[[0-9a-f:.]+\]\Z")
# C0 and C1 controls, CR, LF, DEL and space (they would break the request line or a log line), and lone surrogates
# (JSON's "\ud800" escape decodes to one; it is not a character and has no UTF-8 form to percent-encode).
_BAD_CHAR_RE = re.compile("[\x00-\x20\x7f-\x9f\ud800-\udfff]")
# The common case in one regex match (several times faster than the general path, which the multicast hot path
# needs): a lower-case scheme, a lower-case DNS name without port, a printable ASCII path without fragment.
_LABEL = r"[a-z0-9](?:[a-z0-9-]*[a-z0-9])?"
_FAST_RE = re.compile(rf"(?:https?:)?//({_LABEL}(?:\.{_LABEL})*)(/[!-\"$-~]*)?\Z")


def _reject(reason: str, detail: str) -> InvalidURL:
    return InvalidURL(detail, reason=reason)


def _check_chars(text: str, what: str) -> None:
    m = _BAD_CHAR_RE.search(text)
    if m is not None:
        c = m.group()
        kind = "a lone surrogate" if "\ud800" <= c <= "\udfff" else "a space" if c == " " else "a control character"
        raise _reject("control_char", f"{what} contains {kind} (U+{ord(c):04X}) at {m.start()}")


def validate_host(host: str) -> str:
    """Return the canonical (lower-case, ASCII) form of ``host[:port]`` or raise :class:`InvalidURL`."""
    if not host:
        raise _reject("bad_host", "empty host")
    _check_chars(host, "host")
    if "@" in host:
        raise _reject("userinfo", "userinfo (user@) is not allowed")
    host = host.lower()
    name, port = host, ""
    if host.startswith("["):
        end = host.find("]")
        if end < 0:
            raise _reject("bad_host", "unterminated IPv6 literal")
        name, rest = host[: end + 1], host[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise _reject("bad_host", "garbage after IPv6 literal")
            port = rest[1:]
        if "%" in name:  # RFC 6874 zone ids: local to the sender, meaningless in a Host header
            raise _reject("bad_host", f"IPv6 zone ids are not allowed: {name[:60]!r}")
        if not _IPV6_RE.match(name):
            raise _reject("bad_host", f"bad IPv6 literal {name[:60]!r}")
        try:
            ipaddress.IPv6Address(name[1:-1])
        except ValueError:
            raise _reject("bad_host", f"bad IPv6 literal {name[:60]!r}: not an IPv6 address") from None
    else:
        if ":" in host:
            name, _, port = host.partition(":")
        if not name.isascii():
            try:
                name = name.encode("idna").decode("ascii")
            except UnicodeError as exc:
                raise _reject("bad_host", f"host is not a valid IDN: {exc}") from None
        if len(name) > 253 or not _HOST_RE.match(name) or ".." in name:
            raise _reject("bad_host", f"invalid host name {name[:80]!r}")
    if port or host.endswith(":"):
        if not port.isascii() or not port.isdigit() or len(port) > 5 or not 0 < int(port) < 65536:
            raise _reject("bad_port", f"invalid port {port[:10]!r}")
        return f"{name}:{int(port)}"
    return name


def _encode_path(path: str) -> str:
    """Percent-encode non-ASCII characters as UTF-8; existing escapes and the query stay untouched."""
    if path.isascii():
        return path
    return "".join(c if c.isascii() else "".join(f"%{b:02X}" for b in c.encode("utf-8")) for c in path)


def parse_url(url: str, *, max_length: int = DEFAULT_MAX_LENGTH, allow_bare_host: bool = False) -> str:
    """Validate ``url`` and return its purge target ``host + path`` (path with query, no fragment).

    Accepts ``http://``, ``https://`` and scheme-relative ``//host/path`` URLs (change-propagation sends the
    latter). With ``allow_bare_host`` a string without ``/`` is read as ``http://<it>/`` (HTCP's ``test.com``).
    """
    if url.__class__ is str and len(url) <= max_length:
        m = _FAST_RE.match(url)
        if m is not None and len(m.group(1)) <= 253:
            return m.group(1) + (m.group(2) or "/")
    return _parse_url(url, max_length, allow_bare_host)


# What _FAST_RE accepts, in parts: a host (at most 253 long), and the bytes of a whole URL (its scheme and path,
# and so its host too).
_FAST_HOST_RE = re.compile(rf"{_LABEL}(?:\.{_LABEL})*\Z")
_URL_BYTES = bytes(range(0x21, 0x7F)).replace(b"#", b"")
_SCHEME_RE = re.compile(r"\n(?:https?:)?//")  # at the start of each line of a batch joined after a newline
_PATH_RE = re.compile(r"/[^\n]*")  # what follows each host


def parse_urls_fast(urls: list, max_length: int, max_target: int) -> list[str] | None:
    """The targets of ``urls`` if every one of them takes :func:`parse_url`'s fast path and is at most
    ``max_target`` long, else None (then each URL goes through :func:`parse_url`). The same answers, with the
    checks done once over the whole batch joined by newlines (C string operations; regexes only where they
    start with a literal, as an anchor such as ``^`` makes ``re`` try every position) and each distinct host
    checked once. The common batch, one scheme and one host, is one ``count`` and one ``split``."""
    try:
        text = "\n" + "\n".join(urls)
    except TypeError:
        return None  # not all strings
    n = len(urls)
    # Only bytes a URL of the fast form may hold, but for the n newlines that separate them.
    if not text.isascii() or text.encode("ascii").translate(None, _URL_BYTES) != b"\n" * n:
        return None  # non-ASCII (an IDN, to percent-encode), a space, a control character or a fragment
    longest = max(map(len, urls), default=0)
    if longest > max_length:
        return None
    first = urls[0] if n else ""
    scheme = next((s for s in ("https://", "http://", "//") if first.startswith(s)), None)
    targets = None
    if scheme is not None:
        sep = "\n" + scheme
        found = _few_hosts(text, sep, first[len(scheme) :].partition("/")[0], n)
        if found is not None:  # every URL has this scheme and one of these hosts, then a path
            hosts: Iterable[str] = found
            targets = text.split(sep)
            del targets[0]
    if targets is None:
        joined, cut = _SCHEME_RE.subn("\n", text)
        if cut != n:
            return None  # a URL without http://, https:// or //
        names, paths = _PATH_RE.subn("", joined)
        targets = joined[1:].split("\n")
        if paths != n:  # a bare host: its target is "host/"
            targets = [target if "/" in target else target + "/" for target in targets]
        hosts = set(names[1:].split("\n"))
    for host in hosts:
        if len(host) > 253 or _FAST_HOST_RE.match(host) is None:
            return None
    # A target is at least one character shorter than its URL ("//" goes, at most "/" comes).
    if longest > max_target and max(map(len, targets)) > max_target:
        return None
    return targets


_FEW_HOSTS = 8  # a batch of more distinct hosts is cut with regexes instead


def _few_hosts(text: str, sep: str, host: str, n: int) -> list[str] | None:
    """The hosts of the ``n`` URLs joined in ``text``, each line ``sep + host + "/" + ...``, found one
    ``str.count`` per host (a batch often holds a site's desktop and mobile hosts); None if a line is not of
    that form or there are more than ``_FEW_HOSTS`` hosts."""
    hosts = [host]
    seen = text.count(sep + host + "/")
    while seen != n:
        if len(hosts) == _FEW_HOSTS:
            return None
        # The first line with another host (re caches the pattern: batches repeat their hosts).
        other = "(?!(?:" + "|".join(map(re.escape, hosts)) + ")/)"
        m = re.compile(re.escape(sep) + other + "([^/\n]*)/").search(text)
        if m is None:
            return None  # a line without a path
        hosts.append(m.group(1))
        seen += text.count(sep + m.group(1) + "/")
    return hosts


def _parse_url(url: str, max_length: int, allow_bare_host: bool) -> str:
    """The general path of :func:`parse_url`: every form and every error."""
    if url is None:
        raise _reject("missing_url", "no URL given")
    if not isinstance(url, str):
        raise _reject("not_a_string", f"URL must be a string, not {type(url).__name__}")
    if not url:
        raise _reject("empty", "empty URL")
    if len(url) > max_length:
        raise _reject("too_long", f"URL is {len(url)} characters, the limit is {max_length}")
    _check_chars(url, "URL")
    lower = url[:8].lower()
    if lower.startswith("http://"):
        rest = url[7:]
    elif lower.startswith("https://"):
        rest = url[8:]
    elif url.startswith("//"):
        rest = url[2:]
    elif allow_bare_host and "/" not in url:
        rest = url
    else:
        scheme = url.partition(":")[0] if ":" in url else ""
        if scheme and scheme.isalpha():
            raise _reject("bad_scheme", f"scheme {scheme[:20]!r} is not http or https")
        raise _reject("bad_scheme", "URL must start with http://, https:// or //")
    cut = len(rest)
    for sep in "/?#":
        i = rest.find(sep)
        if 0 <= i < cut:
            cut = i
    host, path = rest[:cut], rest[cut:]
    host = validate_host(host)
    path = path.partition("#")[0]
    if not path.startswith("/"):
        path = "/" + path  # "host?q" -> "/?q"
    return host + _encode_path(path)


def split_target(target: str) -> tuple[str, str]:
    """Split a purge target back into (host, path)."""
    i = target.find("/")
    return target[:i], target[i:]
