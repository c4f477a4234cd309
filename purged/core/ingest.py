"""Core layer: decoding purge request bodies into URL lists.

Bodies come from the HTTP API: ``POST /v1/purge`` (JSON, msgpack or text/plain) and change-propagation's
``POST /sys/purge/`` (a JSON array of resource_change events). Everything here raises :class:`DecodeError`
with an HTTP status hint; the URLs themselves are validated by :mod:`purged.core.admission`, where a bad URL
inside a good body is not an error but a per-index rejection.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import msgpack

from .errors import DecodeError

JSON_TYPES = ("application/json", "text/json")
MSGPACK_TYPES = ("application/msgpack", "application/x-msgpack", "application/vnd.msgpack")
TEXT_TYPES = ("text/plain",)
PRIORITIES = ("bulk", "high")


@dataclass
class PurgeRequest:
    urls: list[Any]
    priority: str = "bulk"


def media_type(content_type: str | None) -> str:
    return (content_type or "").partition(";")[0].strip().lower()


def _bad(reason: str, detail: str, status: int = 400) -> DecodeError:
    return DecodeError(detail, reason=reason, status=status)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON (RFC 8259)")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} is out of range")
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"duplicate key {key[:80]!r}")
            seen.add(key)
    return obj


def _load_json(body: bytes) -> Any:
    """Strict JSON: no NaN/Infinity (Python's json accepts them), no number that overflows to infinity, no
    object with a key twice (which value wins differs between parsers: a proxy may have checked the other one)."""
    try:
        return json.loads(body, parse_constant=_no_constant, parse_float=_finite, object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise _bad("bad_json", f"body is not valid JSON: {exc}") from None


def _load_msgpack(body: bytes) -> Any:
    try:
        return msgpack.unpackb(body, raw=False, strict_map_key=True)
    except (msgpack.UnpackException, ValueError, TypeError, RecursionError) as exc:
        # msgpack's UnpackException subclasses are not ValueErrors: catch both.
        raise _bad("bad_msgpack", f"body is not valid msgpack: {str(exc) or type(exc).__name__}") from None


_STRIPPED_INSIDE = (" ", "\t", "\x1f")  # ASCII whitespace that str.strip removes but str.splitlines keeps


def _lines(text: str) -> list[str]:
    """The non-blank lines of ``text``, stripped. Without whitespace other than line breaks (the common body)
    stripping changes nothing: C-level ``splitlines`` and ``filter`` instead of two strips per line."""
    if text.isascii() and not any(c in text for c in _STRIPPED_INSIDE):
        return list(filter(None, text.splitlines()))
    return [line.strip() for line in text.splitlines() if line.strip()]


def decode_purge_body(content_type: str | None, body: bytes, max_urls: int) -> PurgeRequest:
    """Decode a ``POST /v1/purge`` body: ``{"urls": [...], "priority": ...}`` or text with one URL per line.

    A missing or form content type (``curl -d``) is sniffed: a body starting with ``{`` is read as JSON.
    """
    kind = media_type(content_type)
    if kind in ("", "application/x-www-form-urlencoded"):
        kind = "application/json" if body.lstrip()[:1] == b"{" else "text/plain"
    if kind in TEXT_TYPES:
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            raise _bad("not_utf8", "text/plain body is not UTF-8") from None
        urls: Any = _lines(text)
        data: Any = {"urls": urls}
    elif kind in JSON_TYPES:
        data = _load_json(body)
    elif kind in MSGPACK_TYPES:
        data = _load_msgpack(body)
    else:
        raise _bad(
            "unsupported_media_type",
            f"Content-Type {kind!r} is not one of application/json, application/msgpack, text/plain",
            status=415,
        )
    if not isinstance(data, dict):
        raise _bad("bad_body", 'expected an object {"urls": [...]}')
    unknown = set(data) - {"urls", "priority"}
    if unknown:
        raise _bad("bad_body", f"unknown fields: {', '.join(sorted(map(str, unknown)))}")
    urls = data.get("urls")
    if not isinstance(urls, list):
        raise _bad("bad_body", '"urls" must be a list of URL strings')
    priority = data.get("priority", "bulk")
    if priority not in PRIORITIES:
        raise _bad("bad_priority", f'"priority" must be one of {", ".join(PRIORITIES)}')
    if len(urls) > max_urls:
        raise _bad("too_many_urls", f"{len(urls)} URLs in one batch, the limit is {max_urls}", status=413)
    return PurgeRequest(urls, priority)


def decode_resource_changes(body: bytes, max_urls: int) -> list[Any]:
    """Decode change-propagation's ``POST /sys/purge/`` body into the list of ``meta.uri`` values.

    An event without a usable ``meta.uri`` yields ``None`` at its index, so the caller rejects that one only.
    """
    data = _load_json(body)
    if not isinstance(data, list):
        raise _bad("bad_body", "expected a JSON array of resource_change events")
    if len(data) > max_urls:
        raise _bad("too_many_urls", f"{len(data)} events in one batch, the limit is {max_urls}", status=413)
    uris: list[Any] = []
    for event in data:
        meta = event.get("meta") if isinstance(event, dict) else None
        uris.append(meta.get("uri") if isinstance(meta, dict) else None)
    return uris
