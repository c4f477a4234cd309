"""purged's msgpack batch datagram: golden bytes, limits, and fuzzing."""

from pathlib import Path

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from purged.core.batchcodec import (
    MAX_DATAGRAM,
    MAX_SENDER,
    MAX_URL_BYTES,
    MAX_URLS,
    REASONS,
    Batch,
    decode_batch,
    encode_batch,
    encode_batches,
)
from purged.core.errors import DecodeError

URLS = ["http://en.wikipedia.org/wiki/Foo", "//upload.wikimedia.org/wikipedia/commons/a/a9/Example.jpg"]


def reason_of(data: bytes) -> str:
    with pytest.raises(DecodeError) as info:
        decode_batch(data)
    assert info.value.reason in REASONS
    return info.value.reason


def test_golden_batch():
    data = (Path(__file__).parent / "data" / "batch_v1.bin").read_bytes()
    assert data[:3] == b"\x94\x01\xa6"  # fixarray(4), version 1, fixstr(6)
    assert decode_batch(data) == Batch("mw2001", 42, URLS)
    assert encode_batch(URLS, sender="mw2001", seq=42) == data


def test_heartbeat_and_large_seq():
    assert decode_batch(encode_batch([], sender="s", seq=2**64 - 1)) == Batch("s", 2**64 - 1, [])


def test_every_truncation_is_rejected():
    data = encode_batch(URLS, sender="mw2001", seq=42)
    for cut in range(len(data)):
        assert reason_of(data[:cut]) == "truncated"
    assert reason_of(data + b"\xc0") == "extra_data"


def test_shape_errors():
    pack = msgpack.packb
    assert reason_of(pack({"v": 1})) == "bad_shape"
    assert reason_of(pack([])) == "bad_shape"
    assert reason_of(pack("x")) == "bad_shape"
    assert reason_of(pack([2, "s", 1, []])) == "bad_version"
    assert reason_of(pack([True, "s", 1, []])) == "bad_version"
    assert reason_of(pack(["1", "s", 1, []])) == "bad_version"
    assert reason_of(pack([1, "s", 1])) == "bad_shape"
    assert reason_of(pack([1, "s", 1, [], "more"])) == "bad_shape"
    assert reason_of(pack([1, "", 1, []])) == "bad_sender"
    assert reason_of(pack([1, "x" * (MAX_SENDER + 1), 1, []])) == "bad_sender"
    assert reason_of(pack([1, "s", -1, []])) == "bad_seq"
    assert reason_of(pack([1, "s", 1.0, []])) == "bad_seq"
    assert reason_of(pack([1, "s", 1, "http://x/"])) == "bad_shape"
    assert reason_of(pack([1, "s", 1, ["http://x/", 3]])) == "bad_shape"
    assert reason_of(pack([1, "s", 1, ["http://x/", None]])) == "bad_shape"
    assert reason_of(pack([1, "s", 1, [""]])) == "empty_url"
    assert reason_of(pack([1, "s", 1, ["a" * (MAX_URL_BYTES + 1)]])) == "url_too_long"
    assert reason_of(pack([1, "s", 1, ["a/"] * (MAX_URLS + 1)])) == "too_many_urls"


def test_foreign_msgpack_errors_are_translated():
    assert reason_of(b"") == "truncated"
    assert reason_of(b"\xc1") == "not_msgpack"  # reserved byte
    assert reason_of(b"\x94\x01\xa2\xff\xfe") == "not_utf8"
    assert reason_of(b"\x91" * 5000) == "not_msgpack"  # nesting deeper than msgpack's stack
    assert reason_of(b"\x94\x01\xc4\x01s\x01\x90") == "not_msgpack"  # bin type
    assert reason_of(b"\xd6\xff\x00\x00\x00\x01") == "not_msgpack"  # ext (timestamp)
    assert reason_of(b"\x81\x90\x01") == "not_msgpack"  # unhashable map key
    assert reason_of(b"\xdd\xff\xff\xff\xff") == "truncated"  # array32 claiming 4 billion items
    assert reason_of(b"\x00" * (MAX_DATAGRAM + 1)) == "too_large"


def test_encode_limits():
    with pytest.raises(ValueError):
        encode_batch(URLS, sender="", seq=1)
    with pytest.raises(ValueError):
        encode_batch(URLS, sender="s", seq=-1)
    with pytest.raises(ValueError):
        encode_batch([""], sender="s", seq=1)
    with pytest.raises(ValueError):
        encode_batch(["a/"] * (MAX_URLS + 1), sender="s", seq=1)
    with pytest.raises(ValueError):  # under MAX_URLS, but over one datagram
        encode_batch(["http://example.org/" + "a" * 8000] * 9, sender="s", seq=1)


def test_encode_batches_splits_under_the_size():
    urls = [f"http://en.wikipedia.org/wiki/Page_{i}" for i in range(1000)]
    datagrams = list(encode_batches(urls, sender="mw1", first_seq=7, max_size=1400))
    assert all(len(d) <= 1400 for d in datagrams)
    batches = [decode_batch(d) for d in datagrams]
    assert [b.seq for b in batches] == list(range(7, 7 + len(batches)))
    assert [u for b in batches for u in b.urls] == urls
    # a URL bigger than max_size still goes out, alone
    (big,) = encode_batches(["http://x/" + "a" * 2000], sender="s", first_seq=0, max_size=1400)
    assert decode_batch(big).urls == ["http://x/" + "a" * 2000]


@given(st.binary(max_size=300))
def test_any_bytes_decode_or_raise_decode_error(data):
    try:
        batch = decode_batch(data)
    except DecodeError as exc:
        assert exc.reason in REASONS
    else:
        assert isinstance(batch.urls, list)


_msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=10),
    lambda kids: st.lists(kids, max_size=5) | st.dictionaries(st.text(max_size=5), kids, max_size=3),
    max_leaves=20,
)


@given(_msgpack_values)
def test_any_msgpack_value_decodes_or_raises_decode_error(value):
    data = msgpack.packb(value, use_bin_type=True)
    try:
        decode_batch(data)
    except DecodeError as exc:
        assert exc.reason in REASONS


@given(
    st.lists(st.text(min_size=1, max_size=50), max_size=50),
    st.text(min_size=1, max_size=MAX_SENDER),
    st.integers(0, 2**64 - 1),
)
def test_roundtrip(urls, sender, seq):
    assert decode_batch(encode_batch(urls, sender=sender, seq=seq)) == Batch(sender, seq, urls)
