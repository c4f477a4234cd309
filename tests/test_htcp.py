"""HTCP CLR codec: golden datagrams, every framing error, and fuzzing."""

import struct
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from purged.core.errors import DecodeError, InvalidURL
from purged.core.htcp import (
    MAX_URI_BYTES,
    REASONS,
    HtcpClr,
    HtcpError,
    decode_clr,
    encode_clr,
    targets_from_htcp,
)

DATA = Path(__file__).parent / "data"
# DESIGN.md §4, byte for byte
TEST_COM = bytes.fromhex(
    "002c0000002604000000000100000004484541440008746573742e636f6d0008485454502f312e3000000002"
)


def golden(name: str) -> bytes:
    return (DATA / name).read_bytes()


def build(
    *,
    length=None,
    version=(0, 0),
    data_length=None,
    opcode=4,
    trans_id=1,
    strs=(b"HEAD", b"test.com", b"HTTP/1.0", b""),
    auth=2,
    tail=b"",
) -> bytes:
    """A CLR assembled field by field, with any field free to lie."""
    spec = b"".join(struct.pack("!H", len(s)) + s for s in strs)
    body_len = 14 + len(spec) + 2 + len(tail)
    if length is None:
        length = body_len
    if data_length is None:
        data_length = 10 + len(spec)
    head = struct.pack("!HBBHBBIH", length, *version, data_length, opcode, 0, trans_id, 0)
    return head + spec + tail + struct.pack("!H", auth)


def reason_of(data: bytes) -> str:
    with pytest.raises(HtcpError) as info:
        decode_clr(data)
    assert info.value.reason in REASONS
    assert isinstance(info.value, DecodeError)
    return info.value.reason


def test_test_vector_from_design():
    assert golden("htcp_test_com.bin") == TEST_COM
    assert encode_clr("test.com", 1) == TEST_COM
    assert len(TEST_COM) == 44
    assert decode_clr(TEST_COM) == HtcpClr(trans_id=1, uri="test.com")
    assert build() == TEST_COM


def test_mediawiki_datagrams():
    data = golden("htcp_enwiki_foo.bin")
    assert decode_clr(data) == HtcpClr(123456, "http://en.wikipedia.org/wiki/Foo")
    assert encode_clr("http://en.wikipedia.org/wiki/Foo", 123456) == data
    # MediaWiki output quoted in htcp-purge's source: URL with a port, transaction id 0
    data = golden("htcp_mediawiki_main_page.bin")
    assert decode_clr(data) == HtcpClr(0, "http://127.0.0.1:8080/wiki/Main_Page")
    assert encode_clr("http://127.0.0.1:8080/wiki/Main_Page", 0) == data


def test_decodes_any_buffer_type():
    buf = bytearray(TEST_COM + b"junk")
    assert decode_clr(memoryview(buf)[:44]) == decode_clr(bytearray(TEST_COM)) == decode_clr(TEST_COM)


def test_targets():
    assert targets_from_htcp(TEST_COM) == "test.com/"
    assert targets_from_htcp(golden("htcp_enwiki_foo.bin")) == "en.wikipedia.org/wiki/Foo"
    with pytest.raises(InvalidURL):
        targets_from_htcp(encode_clr("ftp://example.org/x", 5))
    with pytest.raises(HtcpError) as info:  # the byte count is checked before any decoding
        targets_from_htcp(encode_clr("http://example.org/" + "a" * 100, 5), max_length=50)
    assert info.value.reason == "uri_too_long"
    with pytest.raises(HtcpError):
        targets_from_htcp(TEST_COM[:-1])


@pytest.mark.parametrize("name", ["htcp_test_com.bin", "htcp_enwiki_foo.bin", "htcp_mediawiki_main_page.bin"])
def test_every_truncation_is_rejected(name):
    data = golden(name)
    for cut in range(len(data)):
        reason_of(data[:cut])
    # and so is every datagram with bytes appended
    for extra in (b"\x00", b"\x00\x00", b"garbage"):
        reason_of(data + extra)


def test_lying_total_length():
    assert reason_of(build(length=43)) == "bad_length"
    assert reason_of(build(length=45)) == "bad_length"
    assert reason_of(build(length=0xFFFF)) == "bad_length"


def test_lying_data_length():
    assert reason_of(build(data_length=37)) == "bad_length"
    assert reason_of(build(data_length=39)) == "bad_length"
    assert reason_of(build(data_length=0)) == "bad_length"
    assert reason_of(build(data_length=0xFFFF)) == "bad_length"


def test_lying_countstr_lengths():
    good = bytearray(TEST_COM)
    for offset in (14, 20, 30, 40):  # method, URI, version, headers
        for value in (0xFFFF, 0x0100, 45):
            data = bytearray(good)
            struct.pack_into("!H", data, offset, value)
            reason_of(bytes(data))
    # a URI length that is one short leaves the framing misaligned
    data = bytearray(good)
    struct.pack_into("!H", data, 20, 7)
    reason_of(bytes(data))


def test_stray_bytes_inside_data():
    data = build(tail=b"xx")  # DATA length counts them, but no countstr owns them
    assert reason_of(data) == "bad_length"


def test_auth_section_is_refused():
    plain = build()
    signed = plain[:-2] + struct.pack("!H", 10) + b"\x00" * 8
    signed = struct.pack("!H", len(signed)) + signed[2:]
    assert reason_of(signed) == "bad_auth"
    assert reason_of(build(auth=0)) == "bad_length"
    assert reason_of(build(auth=3)) == "bad_length"


def test_wrong_opcode_and_version():
    assert reason_of(build(opcode=0)) == "bad_opcode"  # NOP
    assert reason_of(build(opcode=1)) == "bad_opcode"  # TST
    assert reason_of(build(opcode=0x40)) == "bad_opcode"  # RFC 2756 bit order, which MediaWiki does not send
    assert reason_of(build(version=(0, 1))) == "bad_version"
    assert reason_of(build(version=(1, 0))) == "bad_version"


def test_empty_oversize_and_non_utf8_uri():
    assert reason_of(build(strs=(b"HEAD", b"", b"HTTP/1.0", b""))) == "empty_uri"
    long_uri = b"http://example.org/" + b"a" * MAX_URI_BYTES
    assert reason_of(build(strs=(b"HEAD", long_uri, b"HTTP/1.0", b""))) == "uri_too_long"
    assert decode_clr(build(strs=(b"HEAD", long_uri[:MAX_URI_BYTES], b"HTTP/1.0", b""))).uri
    with pytest.raises(HtcpError) as info:
        decode_clr(TEST_COM, max_uri=7)
    assert info.value.reason == "uri_too_long"
    assert reason_of(build(strs=(b"HEAD", b"http://x/\xff\xfe", b"HTTP/1.0", b""))) == "not_utf8"
    assert reason_of(build(strs=(b"HEAD", b"http://x/\xc3", b"HTTP/1.0", b""))) == "not_utf8"


def test_utf8_uri_and_other_fields_pass():
    uri = "http://de.wikipedia.org/wiki/Stra\u00dfe?x=%20"
    assert decode_clr(encode_clr(uri, 2**32 - 1)) == HtcpClr(2**32 - 1, uri)
    # method, version and headers are framing only: Squid-style senders fill them differently
    data = build(strs=(b"GET", b"http://x/", b"HTTP/1.1", b"Host: x\r\n"))
    assert decode_clr(data).uri == "http://x/"


def test_encode_limits():
    with pytest.raises(ValueError):
        encode_clr("x", -1)
    with pytest.raises(ValueError):
        encode_clr("x", 2**32)
    with pytest.raises(ValueError):
        encode_clr("x" * 70000, 1)


def test_too_short():
    assert reason_of(b"") == "truncated"
    assert reason_of(b"\x00\x18" + b"\x00" * 20) == "truncated"


@given(st.binary(max_size=200))
def test_any_bytes_decode_or_raise_decode_error(data):
    try:
        clr = decode_clr(data)
    except HtcpError as exc:
        assert exc.reason in REASONS
    else:
        assert isinstance(clr.uri, str) and clr.uri


@given(st.integers(0, 43), st.integers(0, 255))
def test_single_byte_corruption(pos, value):
    data = bytearray(TEST_COM)
    data[pos] = value
    try:
        clr = decode_clr(bytes(data))
    except HtcpError as exc:
        assert exc.reason in REASONS
    else:
        assert clr.uri


@given(st.text(min_size=1, max_size=300), st.integers(0, 2**32 - 1))
def test_roundtrip(uri, trans_id):
    assert decode_clr(encode_clr(uri, trans_id)) == HtcpClr(trans_id, uri)


def test_core_codecs_import_no_io_libraries():
    code = (
        "import sys, purged.core.htcp, purged.core.batchcodec, purged.core.udploss\n"
        "bad = {'trio', 'httpx', 'h11', 'yaml', 'prometheus_client'} & set(sys.modules)\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
