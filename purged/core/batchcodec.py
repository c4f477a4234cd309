"""Core layer (sans-IO): purged's own batch datagram, many URLs per UDP datagram, msgpack-encoded.

Layout (version 1; ``docs/wire.md`` has the details)::

    [1, sender: str, seq: uint, [url: str, ...]]    # a msgpack array of exactly 4 items

``sender`` names the sending process (1-255 characters; loss accounting is per sender), ``seq`` numbers its
datagrams (0 to 2**64-1, +1 per datagram), the URL list may be empty (a heartbeat that still carries a seq).
A future version 2 may change anything after the version number; a version-1 decoder rejects it with
``bad_version`` rather than guess. Every failure is a :class:`~purged.core.errors.DecodeError` whose
``reason`` is one of :data:`REASONS`; msgpack's own exceptions never escape.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import NamedTuple

import msgpack

from .errors import DecodeError

VERSION = 1
MAX_DATAGRAM = 65507  # largest UDP payload over IPv4
MAX_URLS = 8192
MAX_URL_BYTES = 8192
MAX_SENDER = 255
MAX_SEQ = 2**64 - 1

REASONS = (
    "too_large",  # datagram over MAX_DATAGRAM bytes
    "truncated",  # msgpack ends early
    "extra_data",  # bytes after the top-level array
    "not_msgpack",  # not valid msgpack (reserved byte, nesting too deep, ext types, bad map key, ...)
    "not_utf8",  # a str that is not UTF-8
    "bad_shape",  # not a 4-item array with the types above
    "bad_version",
    "bad_sender",
    "bad_seq",
    "too_many_urls",
    "empty_url",
    "url_too_long",
)


class Batch(NamedTuple):
    sender: str
    seq: int
    urls: list[str]


def _fail(reason: str, detail: str) -> DecodeError:
    return DecodeError(detail, reason=reason)


def _unpack(data: bytes | bytearray | memoryview) -> object:
    # ext and bin types have no use here; refusing them spares building Timestamp or bytes objects.
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=True, max_ext_len=0, max_bin_len=0)
    except UnicodeDecodeError:
        raise _fail("not_utf8", "a string is not UTF-8") from None
    except msgpack.ExtraData:
        raise _fail("extra_data", "bytes after the batch") from None
    except msgpack.OutOfData:
        raise _fail("truncated", "datagram ends inside the batch") from None
    except (msgpack.UnpackException, ValueError, TypeError, OverflowError, RecursionError) as exc:
        # msgpack's C unpacker reports these as a bare ValueError. Its default max_*_len limits derive from
        # len(data), so "exceeds max_array_len" means a count the datagram cannot hold: truncated.
        msg = str(exc)
        lying_count = "exceeds max_" in msg and "max_bin_len" not in msg and "max_ext_len" not in msg
        if "incomplete input" in msg or lying_count:
            raise _fail("truncated", "datagram ends inside the batch") from None
        raise _fail("not_msgpack", f"not msgpack: {type(exc).__name__} {exc}"[:200]) from None


def decode_batch(data: bytes | bytearray | memoryview) -> Batch:
    """Decode one batch datagram. URLs come back as sent; validating them is the caller's job."""
    if len(data) > MAX_DATAGRAM:
        raise _fail("too_large", f"datagram of {len(data)} bytes is over {MAX_DATAGRAM}")
    obj = _unpack(data)
    if type(obj) is not list or len(obj) < 1:
        raise _fail("bad_shape", "a batch is a msgpack array")
    if type(obj[0]) is not int or obj[0] != VERSION:
        raise _fail("bad_version", f"version {obj[0]!r:.20}, expected {VERSION}")
    if len(obj) != 4:
        raise _fail("bad_shape", f"a version-1 batch has 4 items, not {len(obj)}")
    _, sender, seq, urls = obj
    if type(sender) is not str or not 0 < len(sender) <= MAX_SENDER:
        raise _fail("bad_sender", f"sender must be a string of 1 to {MAX_SENDER} characters")
    if type(seq) is not int or not 0 <= seq <= MAX_SEQ:
        raise _fail("bad_seq", "seq must be an unsigned 64-bit integer")
    if type(urls) is not list:
        raise _fail("bad_shape", "the URLs must be an array")
    if len(urls) > MAX_URLS:
        raise _fail("too_many_urls", f"{len(urls)} URLs, the limit is {MAX_URLS}")
    for url in urls:
        if type(url) is not str:
            raise _fail("bad_shape", f"a URL must be a string, not {type(url).__name__}")
        if not url:
            raise _fail("empty_url", "empty URL")
        if len(url) > MAX_URL_BYTES:  # characters <= bytes, so this is cheap and never too strict
            raise _fail("url_too_long", f"URL of {len(url)} characters is over {MAX_URL_BYTES}")
    return Batch(sender, seq, urls)


def encode_batch(urls: Iterable[str], *, sender: str, seq: int) -> bytes:
    """Encode one batch; ``ValueError`` when it breaks a limit that :func:`decode_batch` enforces."""
    urls = list(urls)
    if not 0 < len(sender) <= MAX_SENDER:
        raise ValueError(f"sender must have 1 to {MAX_SENDER} characters")
    if not 0 <= seq <= MAX_SEQ:
        raise ValueError("seq must fit an unsigned 64-bit integer")
    if len(urls) > MAX_URLS:
        raise ValueError(f"{len(urls)} URLs, the limit is {MAX_URLS}")
    for url in urls:
        if not isinstance(url, str) or not url or len(url) > MAX_URL_BYTES:
            raise ValueError(f"URL {url!r:.80} is not a string of 1 to {MAX_URL_BYTES} characters")
    data = msgpack.packb([VERSION, sender, seq, urls], use_bin_type=True)
    if len(data) > MAX_DATAGRAM:
        raise ValueError(f"batch of {len(data)} bytes is over {MAX_DATAGRAM}; use encode_batches")
    return data


def _str_size(n: int) -> int:
    return n + (1 if n < 32 else 2 if n < 256 else 3 if n < 65536 else 5)


def encode_batches(
    urls: Iterable[str], *, sender: str, first_seq: int, max_size: int = 1400
) -> Iterator[bytes]:
    """Pack URLs into as few datagrams of at most ``max_size`` bytes as fit, numbered from ``first_seq``.

    The default keeps each datagram inside one Ethernet frame (no IP fragmentation: a lost fragment loses the
    whole datagram). A URL too long for ``max_size`` on its own still gets a datagram of its own.
    """
    # header: fixarray + version + sender + seq (at most 9 bytes) + array32 header
    overhead = 1 + 1 + _str_size(len(sender.encode("utf-8"))) + 9 + 5
    seq = first_seq
    chunk: list[str] = []
    size = overhead
    for url in urls:
        cost = _str_size(len(url.encode("utf-8")))
        if chunk and (size + cost > max_size or len(chunk) == MAX_URLS):
            yield encode_batch(chunk, sender=sender, seq=seq)
            seq += 1
            chunk, size = [], overhead
        chunk.append(url)
        size += cost
    if chunk:
        yield encode_batch(chunk, sender=sender, seq=seq)
