"""Core layer (sans-IO): a strict codec for HTCP CLR datagrams as MediaWiki and npm ``htcp-purge`` send them.

This is the dialect of Squid's HTCP implementation rather than RFC 2756 to the letter (big-endian throughout,
the opcode in the low nibble of byte 6). ``docs/wire.md`` draws the layout::

    0   total length L (= 36 + N)   2  version 0.0           4  DATA length (= L - 6)
    6   0x04 (CLR)  7  flags        8  transaction id (u32)  12 CLR reason/reserved
    14  countstr method ("HEAD")    countstr URI (N bytes)   countstr version ("HTTP/1.0")
        countstr headers ("")       then the AUTH length, 2 (no AUTH)

A datagram is accepted only when every length agrees with the datagram size. Each rejection raises
:class:`HtcpError` whose ``reason`` is one of :data:`REASONS` (a metric label).
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from .errors import DecodeError
from .urls import parse_url

OPCODE_CLR = 0x04
HEADER_SIZE = 14  # fixed part up to the first countstr
MIN_SIZE = HEADER_SIZE + 4 * 2 + 2  # four empty countstrs and the AUTH length
MAX_URI_BYTES = 8192  # resource_change's meta.uri limit; MediaWiki URLs are far shorter
MAX_TRANS_ID = 0xFFFFFFFF

REASONS = (
    "truncated",  # shorter than the smallest CLR, or a countstr runs past the DATA section
    "bad_length",  # the total, DATA or AUTH length disagrees with the datagram size
    "bad_version",  # version other than 0.0
    "bad_opcode",  # byte 6 is not 0x04 (CLR)
    "bad_auth",  # an AUTH section is present; we cannot verify it, so we refuse rather than pretend
    "empty_uri",
    "uri_too_long",
    "not_utf8",
)

# length, major, minor, DATA length, opcode, (flags), transaction id, (CLR reason)
_FIXED = struct.Struct("!HBBHBxIxx")
_U16 = struct.Struct("!H")
_unpack_fixed = _FIXED.unpack_from
_unpack_u16 = _U16.unpack_from


class HtcpError(DecodeError):
    """A datagram that is not a well-formed HTCP CLR; ``reason`` is one of :data:`REASONS`."""

    reason = "malformed"


class HtcpClr(NamedTuple):
    trans_id: int
    uri: str


def decode_clr(data: bytes | bytearray | memoryview, max_uri: int = MAX_URI_BYTES) -> HtcpClr:
    """Decode one CLR datagram. Method, HTTP version and headers are checked for framing, then ignored."""
    size = len(data)
    if size < MIN_SIZE:
        raise HtcpError(f"datagram of {size} bytes is shorter than {MIN_SIZE}", reason="truncated")
    length, major, minor, data_length, opcode, trans_id = _unpack_fixed(data)
    if length != size:
        raise HtcpError(f"length field says {length}, datagram has {size} bytes", reason="bad_length")
    if major or minor:
        raise HtcpError(f"version {major}.{minor}, expected 0.0", reason="bad_version")
    if opcode != OPCODE_CLR:
        raise HtcpError(f"opcode byte 0x{opcode:02x}, expected 0x04 (CLR)", reason="bad_opcode")
    end = 4 + data_length  # the AUTH length sits here
    if end + 2 != size:
        if end + 2 > size:
            raise HtcpError(f"DATA length {data_length} runs past the datagram", reason="bad_length")
        # DATA leaves room after it: either an AUTH section or garbage; the AUTH length tells which.
        (auth,) = _unpack_u16(data, end)
        if end + auth == size and auth > 2:
            raise HtcpError("signed datagrams (AUTH) are not supported", reason="bad_auth")
        raise HtcpError(f"DATA length {data_length} leaves {size - end} bytes for AUTH", reason="bad_length")
    (auth,) = _unpack_u16(data, end)
    if auth != 2:
        raise HtcpError(f"AUTH length {auth}, expected 2", reason="bad_length")

    # method, then URI; each countstr must end inside DATA.
    (n,) = _unpack_u16(data, HEADER_SIZE)
    pos = HEADER_SIZE + 2 + n
    if pos + 2 > end:
        raise HtcpError("method runs past DATA", reason="truncated")
    (n,) = _unpack_u16(data, pos)
    start = pos + 2
    pos = start + n
    if pos + 2 > end:
        raise HtcpError(f"URI of {n} bytes runs past DATA", reason="truncated")
    if n == 0:
        raise HtcpError("empty URI", reason="empty_uri")
    if n > max_uri:
        raise HtcpError(f"URI of {n} bytes is over {max_uri}", reason="uri_too_long")
    uri_bytes = data[start:pos]
    # version, then headers; the headers must end exactly where DATA ends.
    (n,) = _unpack_u16(data, pos)
    pos += 2 + n
    if pos + 2 > end:
        raise HtcpError("HTTP version runs past DATA", reason="truncated")
    (n,) = _unpack_u16(data, pos)
    pos += 2 + n
    if pos != end:
        if pos > end:
            raise HtcpError("headers run past DATA", reason="truncated")
        raise HtcpError(f"{end - pos} stray bytes after the headers", reason="bad_length")
    try:
        uri = str(uri_bytes, "utf-8")
    except UnicodeDecodeError:
        raise HtcpError("URI is not UTF-8", reason="not_utf8") from None
    return HtcpClr(trans_id, uri)


def _countstr(value: bytes) -> bytes:
    if len(value) > 0xFFFF:
        raise ValueError(f"countstr of {len(value)} bytes does not fit 16 bits")
    return _U16.pack(len(value)) + value


def encode_clr(uri: str, trans_id: int, *, method: str = "HEAD", version: str = "HTTP/1.0") -> bytes:
    """Build a CLR datagram as MediaWiki's ``CdnCacheUpdate::HTCPPurge`` does; the URI goes as is (UTF-8)."""
    if not 0 <= trans_id <= MAX_TRANS_ID:
        raise ValueError(f"transaction id {trans_id} does not fit 32 bits")
    specifier = (
        _countstr(method.encode("ascii"))
        + _countstr(uri.encode("utf-8"))
        + _countstr(version.encode("ascii"))
        + _countstr(b"")
    )
    data_length = 8 + 2 + len(specifier)  # DATA header, CLR reason, specifier
    length = 4 + data_length + 2
    if length > 0xFFFF:
        raise ValueError(f"URI too long for one datagram ({length} bytes)")
    return _FIXED.pack(length, 0, 0, data_length, OPCODE_CLR, trans_id) + specifier + _U16.pack(2)


def targets_from_htcp(data: bytes | bytearray | memoryview, max_length: int = MAX_URI_BYTES) -> str:
    """Decode a CLR datagram and return its purge target ``host + path``.

    Raises :class:`HtcpError` for a bad datagram and :class:`~purged.core.errors.InvalidURL` for a URL that
    decodes but that purged refuses (a bare host such as ``test.com`` is accepted and means ``/``).
    """
    return parse_url(decode_clr(data, max_length).uri, max_length=max_length, allow_bare_host=True)
