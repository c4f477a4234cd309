"""Tests for the core HTTP/1.1 codec of the PURGE hot path (purged.core.http1).

The golden files in tests/data/varnish_*.bin are the exact bytes a Varnish 7.1 sent; regenerate them with
``.venv/bin/python tests/test_http1.py --capture`` (needs /usr/sbin/varnishd).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from purged.core import http1
from purged.core.errors import InvalidURL, PurgedError
from purged.core.http1 import (
    DEFAULT_MAX_HEADER_SIZE,
    ProtocolError,
    Response,
    ResponseParser,
    encode_purge,
    encode_purges,
)
from purged.core.http1_fast import FastResponseParser

DATA = Path(__file__).parent / "data"
VARNISHD = "/usr/sbin/varnishd"

OK = Response(200, True)
VARNISH_BODY = (
    b"<!DOCTYPE html>\n<html>\n  <head>\n    <title>200 Purged</title>\n  </head>\n  <body>\n"
    b"    <h1>Error 200 Purged</h1>\n    <p>Purged</p>\n    <h3>Guru Meditation:</h3>\n    <p>XID: 2</p>\n"
    b"    <hr>\n    <p>Varnish cache server</p>\n  </body>\n</html>\n"
)


def purged_200(xid: int = 2) -> bytes:
    body = VARNISH_BODY.replace(b"XID: 2", b"XID: %d" % xid)
    return (
        b"HTTP/1.1 200 Purged\r\nDate: Mon, 23 Nov 2026 08:50:30 GMT\r\nServer: Varnish\r\nX-Varnish: %d\r\n"
        b"Content-Type: text/html; charset=utf-8\r\nRetry-After: 5\r\nContent-Length: %d\r\n"
        b"Connection: keep-alive\r\n\r\n" % (xid, len(body))
    ) + body


@pytest.fixture(autouse=True, scope="module", params=[ResponseParser, FastResponseParser], ids=["hand", "llhttp"])
def parser_class(request):
    """Every test here runs against both parsers: the fast one must answer exactly as the hand one does."""
    global ResponseParser
    ResponseParser = request.param
    yield request.param
    ResponseParser = http1.ResponseParser


def parse_all(*chunks: bytes, eof: bool = False, **kwargs) -> list[Response]:
    parser = ResponseParser(**kwargs)
    out: list[Response] = []
    for chunk in chunks:
        out += parser.feed(chunk)
    if eof:
        out += parser.feed_eof()
    return out


def reason_of(*chunks: bytes, eof: bool = False, **kwargs) -> str:
    with pytest.raises(ProtocolError) as info:
        parse_all(*chunks, eof=eof, **kwargs)
    return info.value.reason


# --- encode_purge ------------------------------------------------------------------------------------------


def test_encode_purge_exact_bytes():
    assert encode_purge("en.wikipedia.org", "/wiki/Main_Page?action=raw") == (
        b"PURGE /wiki/Main_Page?action=raw HTTP/1.1\r\nHost: en.wikipedia.org\r\nUser-Agent: purged\r\n\r\n"
    )


@pytest.mark.parametrize(
    ("host", "path"), [("a\r\nX: y", "/"), ("a", "/\nGET / HTTP/1.1"), ("a", "/x\r"), ("a\n", "/")]
)
def test_encode_purge_refuses_cr_lf(host, path):
    with pytest.raises(InvalidURL) as info:
        encode_purge(host, path)
    assert info.value.reason == "control_char"


def test_encode_purge_refuses_non_ascii():
    with pytest.raises(InvalidURL):
        encode_purge("example.org", "/café")


# --- encode_purges: a window's requests in one go, byte for byte encode_purge's ----------------------------

_HOSTS = st.sampled_from(["en.wikipedia.org", "en.m.wikipedia.org", "a", "", "en.wikipedia.org.", "x/"])
_PATHS = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=12).map(lambda p: "/" + p)


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(_HOSTS, _PATHS), max_size=12))
def test_encode_purges_is_encode_purge_joined(pairs):
    # One shared host (the replace path) and mixed hosts (the per-target split) give the same bytes.
    targets = [host + path for host, path in pairs]
    expected = b"".join(encode_purge(*split_target(t)) for t in targets)
    assert encode_purges(targets) == expected
    assert encode_purges(tuple(targets)) == expected


def split_target(target: str) -> tuple[str, str]:
    host, _, path = target.partition("/")
    return host, "/" + path


def test_encode_purges_one_host_and_mixed_hosts():
    same = ["en.wikipedia.org/wiki/A", "en.wikipedia.org/wiki/B?x=1", "en.wikipedia.org/"]
    assert encode_purges(same) == b"".join(encode_purge(*split_target(t)) for t in same)
    # A host that is a prefix of the next one's must not be taken for it.
    mixed = ["en.wikipedia.org/a", "en.wikipedia.org.x/b", "en.m.wikipedia.org/c", "en.wikipedia.org/d"]
    assert encode_purges(mixed) == b"".join(encode_purge(*split_target(t)) for t in mixed)
    assert encode_purges([]) == b""


@pytest.mark.parametrize(
    ("targets", "reason"),
    [
        (["a/x\r\nX: y"], "control_char"),
        (["a/x", "a/y\nGET / HTTP/1.1"], "control_char"),
        (["a/x", "b/y\n"], "control_char"),
        (["a\n/x"], "control_char"),
        (["a/café"], "not_ascii"),
        (["b/x", "a/café"], "not_ascii"),
        (["a/x", "b"], "bad_url"),
        (["a"], "bad_url"),
    ],
)
def test_encode_purges_refuses_what_encode_purge_refuses(targets, reason):
    with pytest.raises(InvalidURL) as info:
        encode_purges(targets)
    assert info.value.reason == reason


# --- golden Varnish 7.1 answers --------------------------------------------------------------------------


def test_varnish_purge_response():
    data = (DATA / "varnish_purge_response.bin").read_bytes()
    assert data.startswith(b"HTTP/1.1 200 Purged\r\n")
    assert parse_all(data) == [OK]
    # One byte short of the body: nothing yet, and closing there is a truncation.
    assert parse_all(data[:-1]) == []
    assert reason_of(data[:-1], eof=True) == "truncated"


@pytest.mark.parametrize(
    ("name", "status"), [("varnish_404_response.bin", 404), ("varnish_405_response.bin", 405)]
)
def test_varnish_error_responses(name, status):
    assert parse_all((DATA / name).read_bytes()) == [Response(status, True)]


def test_varnish_pipelined_stream_at_every_split():
    data = (DATA / "varnish_pipelined.bin").read_bytes()
    expected = [OK, OK, OK, Response(200, False)]  # the 4th request asked for Connection: close
    assert parse_all(data, eof=True) == expected
    for i in range(len(data) + 1):
        assert parse_all(data[:i], data[i:], eof=True) == expected, i
    assert parse_all(*(data[i : i + 1] for i in range(len(data))), eof=True) == expected


# --- framing -----------------------------------------------------------------------------------------------

CHUNKED = (
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5;name=value;flag\r\nhello\r\n"
    b'A ; ext="quoted"\r\n0123456789\r\n'
    b"0\r\nX-Trailer: yes\r\nX-Other: 2\r\n\r\n"
)
MIXED_STREAM = (
    b"HTTP/1.1 100 Continue\r\n\r\n"
    + purged_200(10)
    + b"HTTP/1.1 204 No Content\r\nServer: x\r\n\r\n"
    + CHUNKED
    + b"HTTP/1.1 304 Not Modified\r\nContent-Length: 1234\r\n\r\n"
    + b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"
    + b"HTTP/1.1 503 Service Unavailable\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    + b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
    + b"HTTP/1.1 200\r\nContent-Length:3\r\n\r\nabc"
    + b"HTTP/1.1 200 Purged\r\ncontent-length: 2\r\nConnection: close\r\n\r\nok"
)
MIXED_EXPECTED = [
    OK,
    Response(204, True),
    OK,
    Response(304, True),
    Response(404, True),
    Response(503, True),
    OK,
    Response(200, False),
]


def test_mixed_stream_in_one_read():
    assert parse_all(MIXED_STREAM) == MIXED_EXPECTED


def test_mixed_stream_split_at_every_offset():
    for i in range(len(MIXED_STREAM) + 1):
        assert parse_all(MIXED_STREAM[:i], MIXED_STREAM[i:]) == MIXED_EXPECTED, i


def test_mixed_stream_split_at_every_pair_of_offsets():
    data = MIXED_STREAM
    for i in range(0, len(data) + 1, 3):
        for j in range(i, len(data) + 1, 7):
            assert parse_all(data[:i], data[i:j], data[j:]) == MIXED_EXPECTED, (i, j)


def test_mixed_stream_one_byte_at_a_time():
    parser = ResponseParser()
    out = []
    for i in range(len(MIXED_STREAM)):
        out += parser.feed(MIXED_STREAM[i : i + 1])
    assert out == MIXED_EXPECTED


def test_many_pipelined_responses_in_one_read():
    data = b"".join(purged_200(i) for i in range(2000))
    parser = ResponseParser()
    assert parser.feed(data) == [OK] * 2000
    assert parser.idle


def test_responses_are_returned_as_each_completes():
    parser = ResponseParser()
    one = purged_200()
    assert parser.feed(one + one[:50]) == [OK]
    assert not parser.idle
    assert parser.feed(one[50:] + one) == [OK, OK]
    assert parser.idle


def test_chunked_with_extensions_and_trailers():
    assert parse_all(CHUNKED) == [OK]
    assert parse_all(CHUNKED + CHUNKED) == [OK, OK]
    # Codings before chunked are fine: we frame the body, we never decode it.
    gz = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n2\r\n\x1f\x8b\r\n0\r\n\r\n"
    assert parse_all(gz) == [OK]
    split_te = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    assert parse_all(split_te) == [OK]


def test_content_length_zero_and_duplicates():
    assert parse_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n") == [OK]
    assert parse_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\n\r\nok") == [OK]
    assert parse_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2,\r\n\r\nok") == [OK]  # empty list elements
    assert parse_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-length:  2 \r\n\r\nok") == [OK]


def test_204_and_304_have_no_body_whatever_they_announce():
    data = (
        b"HTTP/1.1 204 No Content\r\nContent-Length: 10\r\n\r\n"
        b"HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
    )
    assert parse_all(data) == [Response(204, True), Response(304, True), OK]


def test_interim_responses_are_skipped():
    data = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 102 Processing\r\n\r\n" + purged_200()
    parser = ResponseParser()
    assert parser.feed(data[:25]) == []
    assert parser.idle  # a skipped 100 leaves nothing pending
    assert parser.feed(data[25:]) == [OK]


def test_101_is_an_error():
    assert reason_of(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n") == "unexpected_upgrade"


def test_connection_close():
    parser = ResponseParser()
    data = b"HTTP/1.1 503 Busy\r\nConnection: Keep-Alive, CLOSE\r\nContent-Length: 4\r\n\r\nbusy"
    assert parser.feed(data[:-1]) == []
    assert parser.feed(data[-1:] + purged_200()) == [Response(503, False)]  # what follows is ignored
    assert parser.feed(purged_200()) == []
    assert parser.feed_eof() == []


def test_connection_close_without_body():
    assert parse_all(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n" + purged_200()) == [
        Response(204, False)
    ]


@pytest.mark.parametrize(
    ("head", "keep_alive"),
    [
        (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n", False),
        (b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\n", True),
        (b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive, x\r\nContent-Length: 2\r\n\r\n", True),
        (b"HTTP/1.0 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\n", False),
        (b"HTTP/1.1 200 OK\r\nConnection: upgrade\r\nContent-Length: 2\r\n\r\n", True),
    ],
)
def test_http10_and_keep_alive(head, keep_alive):
    assert parse_all(head + b"ok") == [Response(200, keep_alive)]


def test_http10_chunked_closes_after_the_response():
    data = b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    assert parse_all(data) == [Response(200, False)]


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\r\nServer: x\r\n\r\n",
        b"HTTP/1.0 200 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",  # RFC 9112 §6.3: chunked not last, so EOF
    ],
)
def test_body_until_close(head):
    parser = ResponseParser()
    assert parser.feed(head + b"some body") == []
    assert parser.feed(b"HTTP/1.1 200 OK\r\n\r\nmore body") == []  # all body
    assert parser.feed_eof() == [Response(200, False)]
    assert parser.feed_eof() == []


def test_eof():
    assert parse_all(eof=True) == []
    assert parse_all(purged_200(), eof=True) == [OK]
    one = purged_200()
    for cut in (1, 10, len(one) - 1):
        assert reason_of(one[:cut], eof=True) == "truncated"
    assert reason_of(CHUNKED[:-2], eof=True) == "truncated"


# --- errors ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b"HTTP/2 200 OK\r\n\r\n",
        b"HTTP/1.1 20 OK\r\n\r\n",
        b"HTTP/1.1 2000 OK\r\n\r\n",
        b"HTTP/1.1 099 Low\r\n\r\n",
        b"HTTP/1.1  200 OK\r\n\r\n",
        b"HTTP/1.1 200 O\x00K\r\n\r\n",
        b"HTTP/1.1 200 OK\n\r\n\r\n",
        b"http/1.1 200 OK\r\n\r\n",
        b"\r\nHTTP/1.1 200 OK\r\n\r\n",
        b"ICY 200 OK\r\n\r\n",
        b"<html>",  # refused before any CRLFCRLF arrives
        b"HTTP/3",
        b"X",
    ],
)
def test_bad_status_lines(data):
    assert reason_of(data) == "bad_status_line"


@pytest.mark.parametrize(
    "line",
    [
        b"Server : x",
        b"Server",
        b": x",
        b" folded",
        b"X-A: 1\r\n\tfolded",
        b"X-A: a\x00b",
        b"X-A: a\x7fb",
        b"X-A: a\nX-B: b",
        b"X-A: a\rb",
        b"Na\xe9me: x",
    ],
)
def test_bad_header_lines(line):
    assert reason_of(b"HTTP/1.1 200 OK\r\n" + line + b"\r\nContent-Length: 0\r\n\r\n") == "bad_header"


def test_newer_minor_versions_read_as_http11():
    assert parse_all(b"HTTP/1.2 200 OK\r\nContent-Length: 0\r\n\r\n") == [OK]


def test_header_values_allow_obs_text_and_tabs():
    assert parse_all(b"HTTP/1.1 200 OK\r\nX-A: caf\xe9\tb\r\nX-B:\r\nContent-Length: 0\r\n\r\n") == [OK]


def test_bad_trailers():
    data = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nBad Trailer\r\n\r\n"
    assert reason_of(data) == "bad_header"


def test_oversize_headers():
    big = (
        b"HTTP/1.1 200 OK\r\n"
        + b"X-Pad: "
        + b"a" * DEFAULT_MAX_HEADER_SIZE
        + b"\r\nContent-Length: 0\r\n\r\n"
    )
    if ResponseParser is FastResponseParser:
        # llhttp streams a head instead of buffering it: one that arrives whole in one read is not limited
        # (memory stays bounded by the read); a head spanning reads is, as below.
        assert parse_all(big) == [OK]
        assert reason_of(big[: DEFAULT_MAX_HEADER_SIZE + 2]) == "headers_too_large"
        return
    assert reason_of(big) == "headers_too_large"
    # Refused before the end of the head arrives, so a peer cannot make us buffer without bound.
    assert reason_of(big[: DEFAULT_MAX_HEADER_SIZE + 2]) == "headers_too_large"
    assert parse_all(big, max_header_size=2 * DEFAULT_MAX_HEADER_SIZE) == [OK]
    small = b"HTTP/1.1 200 OK\r\nX-Pad: " + b"a" * 100 + b"\r\nContent-Length: 0\r\n\r\n"
    assert reason_of(small, max_header_size=100) == "headers_too_large"
    assert parse_all(small, max_header_size=len(small)) == [OK]
    trailers = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX-T: " + b"b" * 200 + b"\r\n\r\n"
    assert reason_of(trailers, max_header_size=150) == "headers_too_large"


@pytest.mark.parametrize(
    "body",
    [
        b"zz\r\n",
        b"-1\r\n",
        b"0x5\r\n",
        b"\r\n",
        b" 5\r\nhello\r\n",
        b"11111111111111111\r\n",  # 17 hex digits
        b"5\r\nhelloXX",  # no CRLF after the data
        b"5\r\nhello\rX",
        b"5\nhello\r\n",
        b"5;" + b"e" * 5000,  # chunk-size line without end
    ],
)
def test_bad_chunks(body):
    if ResponseParser is FastResponseParser and body.startswith(b"5;e"):
        # llhttp streams a chunk-size line: an endless one is refused once it passes max_header_size.
        head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        assert parse_all(head + body) == []
        body += b"e" * DEFAULT_MAX_HEADER_SIZE
    assert reason_of(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + body) == "bad_chunk"


@pytest.mark.parametrize(
    "fields",
    [
        b"Content-Length: 1\r\nContent-Length: 2\r\n",
        b"Content-Length: 1, 2\r\n",
        b"Content-Length: abc\r\n",
        b"Content-Length: -1\r\n",
        b"Content-Length: +1\r\n",
        b"Content-Length: 1 2\r\n",
        b"Content-Length: \r\n",
        b"Content-Length: 0x10\r\n",
        b"Content-Length: " + b"9" * 19 + b"\r\n",
        b"Content-Length: " + b"9" * 5000 + b"\r\n",
        b"Content-Length: \xd9\xa3\r\n",  # an Arabic-Indic digit: not ASCII, not a length
    ],
)
def test_bad_content_length(fields):
    if ResponseParser is FastResponseParser and fields == b"Content-Length: " + b"9" * 19 + b"\r\n":
        # llhttp reads any length below 2**64 exactly; the hand parser's 18-digit cap only guards int().
        parser = ResponseParser()
        assert parser.feed(b"HTTP/1.1 200 OK\r\n" + fields + b"\r\nbody") == [] and not parser.idle
        return
    assert reason_of(b"HTTP/1.1 200 OK\r\n" + fields + b"\r\n") == "bad_content_length"


@pytest.mark.parametrize(
    "fields",
    [
        b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n",
        b"Transfer-Encoding: chunked, gzip\r\n",
        b"Transfer-Encoding: chunked, chunked\r\n",
        b"Transfer-Encoding: ,\r\n",
    ],
)
def test_bad_transfer_encoding(fields):
    if ResponseParser is FastResponseParser and fields == b"Transfer-Encoding: chunked, chunked\r\n":
        # llhttp reads it as chunked; the first chunk hands the stream to the hand parser, which refuses it.
        assert parse_all(b"HTTP/1.1 200 OK\r\n" + fields + b"\r\n") == []
        fields += b"\r\n0"
    assert reason_of(b"HTTP/1.1 200 OK\r\n" + fields + b"\r\n") == "bad_transfer_encoding"


def test_error_after_complete_responses_is_deferred():
    parser = ResponseParser()
    assert parser.feed(purged_200() + purged_200() + b"HTTP/1.1 2xx\r\n\r\n") == [OK, OK]
    with pytest.raises(ProtocolError) as first:
        parser.feed(b"")
    with pytest.raises(ProtocolError) as again:
        parser.feed_eof()
    assert first.value is again.value and first.value.reason == "bad_status_line"


def test_protocol_error_is_a_purged_error():
    error = ProtocolError("x", reason="bad_chunk")
    assert isinstance(error, PurgedError) and error.reason == "bad_chunk" and error.status == 502


def test_core_module_imports_no_io_library():
    code = (
        "import sys, purged.core.http1; "
        "bad = {'trio', 'httpx', 'h11', 'yaml', 'prometheus_client'} & set(sys.modules); "
        "sys.exit(str(bad) if bad else 0)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent.parent)


# --- properties --------------------------------------------------------------------------------------------


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600), st.lists(st.integers(min_value=0, max_value=600), max_size=5), st.booleans())
def test_any_bytes_parse_or_raise_protocol_error(data, cuts, eof):
    parser = ResponseParser(max_header_size=256)
    bounds = [0, *sorted(cuts), len(data)]
    try:
        for a, b in zip(bounds, bounds[1:], strict=False):
            for response in parser.feed(data[a:b]):
                assert isinstance(response, Response) and 100 <= response.status <= 999
        if eof:
            parser.feed_eof()
    except ProtocolError as exc:
        assert exc.reason != ProtocolError.reason


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.binary(max_size=300).map(lambda tail: MIXED_STREAM[: len(MIXED_STREAM) // 2] + tail),
    st.integers(min_value=0, max_value=2000),
)
def test_corrupted_streams_parse_or_raise_protocol_error(data, cut):
    try:
        parse_all(data[:cut], data[cut:], eof=True)
    except ProtocolError:
        pass


def _responses():
    status = st.sampled_from([200, 200, 204, 304, 404, 405, 500, 503])
    body = st.binary(max_size=40)
    chunks = st.lists(st.binary(min_size=1, max_size=20), max_size=3)
    return st.tuples(status, body, chunks, st.booleans(), st.booleans())


def _encode(status: int, body: bytes, chunks: list[bytes], chunked: bool, interim: bool) -> bytes:
    out = b"HTTP/1.1 100 Continue\r\n\r\n" if interim else b""
    out += b"HTTP/1.1 %d Whatever\r\nServer: t\r\n" % status
    if status in (204, 304):
        return out + b"\r\n"
    if chunked:
        encoded = b"".join(b"%x;e=1\r\n%s\r\n" % (len(c), c) for c in chunks)
        return out + b"Transfer-Encoding: chunked\r\n\r\n" + encoded + b"0\r\nT: 1\r\n\r\n"
    return out + b"Content-Length: %d\r\n\r\n%s" % (len(body), body)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_responses(), min_size=1, max_size=8), st.lists(st.integers(min_value=0, max_value=2000)))
def test_valid_streams_parse_the_same_however_split(responses, cuts):
    data = b"".join(_encode(*r) for r in responses)
    bounds = [0, *sorted(c for c in cuts if c <= len(data)), len(data)]
    pieces = [data[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]
    assert parse_all(*pieces, eof=True) == [Response(r[0], True) for r in responses]


# --- real Varnish ------------------------------------------------------------------------------------------

VCL = """vcl 4.1;
backend default none;
sub vcl_recv {
    if (req.method == "PURGE") {
        if (req.http.X-Deny) { return (synth(405, "Method Not Allowed")); }  # stands in for an ACL miss
        return (purge);
    }
    return (synth(404, "Not Found"));
}
"""


@contextlib.contextmanager
def running_varnishd():
    """A throwaway varnishd on 127.0.0.1 with its own work dir; yields its port, stops it by PID."""
    work = tempfile.mkdtemp(prefix="purged-varnish-", dir="/tmp")
    os.chmod(work, 0o755)  # the child drops privileges and must read the work dir
    vcl = Path(work) / "purge.vcl"
    vcl.write_text(VCL)
    os.chmod(vcl, 0o644)
    with socket.socket() as probe:  # a free port; the tiny race with other binders is acceptable in tests
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen(
        [VARNISHD, "-F", "-n", work, "-a", f"127.0.0.1:{port}", "-f", str(vcl), "-s", "malloc,16m"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"varnishd did not start: {proc.stderr.read().decode()[-1000:]}"
                    ) from None
                time.sleep(0.1)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stderr.close()
        shutil.rmtree(work, ignore_errors=True)


def exchange(port: int, request: bytes) -> bytes:
    """Send ``request``, half-close, and return every byte until varnishd closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request)
        sock.shutdown(socket.SHUT_WR)
        received = bytearray()
        while data := sock.recv(65536):
            received += data
    return bytes(received)


def capture_golden_files() -> None:
    purge = encode_purge("example.org", "/wiki/Main_Page")
    close = b"PURGE /x HTTP/1.1\r\nHost: example.org\r\nUser-Agent: purged\r\nConnection: close\r\n\r\n"
    with running_varnishd() as port:
        files = {
            "varnish_purge_response.bin": exchange(port, purge),
            "varnish_404_response.bin": exchange(port, b"GET /x HTTP/1.1\r\nHost: example.org\r\n\r\n"),
            "varnish_405_response.bin": exchange(port, purge[:-2] + b"X-Deny: 1\r\n\r\n"),
            "varnish_pipelined.bin": exchange(port, purge * 3 + close),
        }
    for name, data in files.items():
        (DATA / name).write_bytes(data)
        print(f"{name}: {len(data)} bytes")


@pytest.mark.integration
def test_live_varnish_pipelined_purges():
    n = 500
    with running_varnishd() as port, socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"".join(encode_purge("example.org", f"/page/{i}") for i in range(n)))
        parser = ResponseParser()
        responses: list[Response] = []
        while len(responses) < n:
            data = sock.recv(1000)  # small reads, so responses straddle them
            assert data, "varnishd closed early"
            responses += parser.feed(data)
    assert responses == [OK] * n and parser.idle


if __name__ == "__main__" and sys.argv[1:] == ["--capture"]:
    capture_golden_files()
