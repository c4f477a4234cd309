"""Decoding purge bodies (issue 11): hostile JSON and msgpack either decode, with each URL then a target or an
InvalidURL, or raise DecodeError; never anything else (which would drop the connection and lose the good URLs)."""

import json

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from purged.core.errors import DecodeError, InvalidURL, PurgedError
from purged.core.ingest import decode_purge_body, decode_resource_changes
from purged.core.urls import parse_url


def outcomes(urls):
    out = []
    for url in urls:
        try:
            out.append(parse_url(url))
        except InvalidURL as exc:
            out.append(("rejected", exc.reason))
    return out


def test_lone_surrogate_rejects_that_url_only():
    body = b'{"urls": ["http://h/ok", "http://h/\\ud800x"]}'
    request = decode_purge_body("application/json", body, 10)
    assert request.urls == ["http://h/ok", "http://h/\ud800x"]
    assert outcomes(request.urls) == ["h/ok", ("rejected", "control_char")]


def test_lone_surrogate_in_resource_change_rejects_that_event_only():
    body = b'[{"meta": {"uri": "//h/a"}}, {"meta": {"uri": "//h/\\udc00"}}, {"meta": {"uri": "//\\ud83d.org/"}}]'
    assert outcomes(decode_resource_changes(body, 10)) == [
        "h/a", ("rejected", "control_char"), ("rejected", "control_char")
    ]


@pytest.mark.parametrize(
    ("content_type", "body", "reason"),
    [
        ("application/json", b'{"urls": [' + b"1" * 5000 + b"]}", "bad_json"),  # past int's 4300 digits
        ("application/json", b'{"urls": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "bad_json"),
        ("application/msgpack", b"\x81\xa4urls" + b"\x91" * 200_000 + b"\xc0", "bad_msgpack"),
        ("application/msgpack", b"\x81\xa4urls\x91\xa3\xed\xa0\x80", "bad_msgpack"),  # an encoded surrogate
        ("application/msgpack", b"\x81\x01\x90", "bad_msgpack"),  # an int map key
        ("application/msgpack", b"\x81\xa4urls\x91\xc7\x05\xff" + b"\xff" * 5, "bad_msgpack"),  # bad timestamp
        ("text/plain", b"http://h/\xed\xa0\x80\n", "not_utf8"),
    ],
    ids=["json-int-5000-digits", "json-deep", "msgpack-deep", "msgpack-surrogate", "msgpack-int-key",
         "msgpack-bad-timestamp", "text-surrogate"],
)
def test_hostile_bodies_are_decode_errors(content_type, body, reason):
    with pytest.raises(DecodeError) as info:
        decode_purge_body(content_type, body, 10**6)
    assert info.value.reason == reason
    assert info.value.detail.startswith("body is not valid") or reason == "not_utf8"
    assert not info.value.detail.endswith(": ")


def test_msgpack_odd_values_are_per_url_rejections():
    urls = ["http://h/ok", b"http://h/bytes", msgpack.ExtType(5, b"x"), 2**64 - 1, -(2**63), None, [1], {"a": 1}]
    body = msgpack.packb({"urls": urls})
    request = decode_purge_body("application/msgpack", body, 10)
    not_a_string = ("rejected", "not_a_string")
    assert outcomes(request.urls) == ["h/ok", *[not_a_string] * 4, ("rejected", "missing_url"), *[not_a_string] * 2]


# -- strict JSON: NaN, Infinity and duplicate keys are not JSON (RFC 8259) -----------------------------------------

@pytest.mark.parametrize(
    ("body", "detail"),
    [
        (b'{"urls": ["https://h/ok", NaN]}', "NaN is not JSON"),
        (b'{"urls": ["https://h/ok", Infinity]}', "Infinity is not JSON"),
        (b'{"urls": ["https://h/ok", -Infinity]}', "-Infinity is not JSON"),
        (b'{"urls": ["https://h/ok"], "priority": NaN}', "NaN is not JSON"),
        (b'{"urls": ["https://h/ok", [{"x": [NaN]}]]}', "NaN is not JSON"),
        (b'{"urls": ["https://h/ok", 1e999]}', "number 1e999 is out of range"),
        (b'{"urls": ["https://h/ok", -1E+400]}', "number -1E+400 is out of range"),
        (b'{"urls": ["https://h/ok"], "urls": ["https://h/other"]}', "duplicate key 'urls'"),
        (b'{"urls": ["https://h/ok"], "priority": "bulk", "priority": "high"}', "duplicate key 'priority'"),
        (b'{"urls": ["https://h/ok", {"a": 1, "b": 2, "a": 3}]}', "duplicate key 'a'"),
    ],
)
def test_purge_body_json_is_strict(body, detail):
    for content_type in ("application/json", None):  # None: sniffed as JSON
        with pytest.raises(DecodeError) as info:
            decode_purge_body(content_type, body, 10)
        assert info.value.reason == "bad_json" and info.value.status == 400
        assert info.value.detail == f"body is not valid JSON: {detail}" + (" (RFC 8259)" if "JSON" in detail else "")


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        (b'[{"meta": {"uri": "//h/a"}}, {"meta": {"uri": "//h/b", "dt": NaN}}]', "NaN is not JSON (RFC 8259)"),
        (b'[{"meta": {"uri": "//h/a"}}, {"meta": {"uri": "//h/b"}, "n": Infinity}]', "Infinity is not JSON (RFC 8259)"),
        (b'[{"meta": {"uri": "//h/a", "uri": "//h/b"}}]', "duplicate key 'uri'"),
        (b'[{"meta": {"uri": "//h/a"}, "meta": {"uri": "//h/b"}}]', "duplicate key 'meta'"),
    ],
)
def test_resource_change_json_is_strict(body, detail):
    with pytest.raises(DecodeError) as info:
        decode_resource_changes(body, 10)
    assert info.value.reason == "bad_json"
    assert info.value.detail == f"body is not valid JSON: {detail}"


def test_strict_json_still_takes_ordinary_numbers_and_distinct_keys():
    request = decode_purge_body("application/json", b'{"urls": ["https://h/ok", 1.5, -0.0, 1e308, 7], "priority": "high"}', 10)
    assert request.urls == ["https://h/ok", 1.5, -0.0, 1e308, 7] and request.priority == "high"
    assert decode_resource_changes(b'[{"meta": {"uri": "//h/a", "dt": 1.5}, "tags": {"a": 1, "b": 2}}]', 10) == ["//h/a"]


# -- property: any JSON-ish or msgpack-ish value -------------------------------------------------------------------

# Hypothesis seldom draws a surrogate by itself, and st.text() drops them from a union: name a few, join lists.
TEXT = st.lists(
    st.characters()
    | st.sampled_from(["\ud800", "\udbff", "\udc00", "\udfff", "\x85", "\x7f", "\x00", "\r", "\n", " "])
    | st.sampled_from(list(":/[]?#%@ab")),
    max_size=12,
).map("".join)
URLISH = st.sampled_from(["http://h/ok", "//h/x", "http://[::1]:80/", "http://[:::::]/", "http://h:99999/"]) | st.builds(
    str.__add__, st.sampled_from(["http://h/", "http://", "//"]), TEXT
)
KEYS = st.sampled_from(["urls", "priority", "meta", "uri"]) | TEXT
SCALAR = st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | TEXT | URLISH
JSON_SCALAR = SCALAR | st.integers() | st.sampled_from(["bulk", "high"])
MSGPACK_SCALAR = SCALAR | st.binary() | st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=8))


def documents(scalar, keys):
    tree = st.recursive(scalar, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4),
                        max_leaves=12)
    purge = st.fixed_dictionaries({"urls": st.lists(URLISH | tree, max_size=6)}, optional={"priority": scalar})
    events = st.lists(st.fixed_dictionaries({"meta": st.fixed_dictionaries({"uri": URLISH | scalar})}) | tree,
                      max_size=4)
    return purge | events | tree


def decoded_urls(decode):
    """Decode, then parse each URL: anything but a target or one of our errors fails the test."""
    try:
        result = decode()
    except PurgedError as exc:
        assert isinstance(exc, DecodeError), exc
        return
    urls = result if isinstance(result, list) else result.urls
    for url in urls:
        try:
            target = parse_url(url)
        except InvalidURL:
            continue
        assert isinstance(target, str) and target.isascii() and target.isprintable()


SETTINGS = settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(documents(JSON_SCALAR, KEYS), st.booleans())
def test_any_json_value_decodes_or_raises_our_errors(value, ascii_only):
    try:
        body = json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")
    except ValueError:
        return  # an int past 4300 digits: json.dumps refuses it too
    for content_type in ("application/json", None):
        decoded_urls(lambda ct=content_type: decode_purge_body(ct, body, 1000))
    decoded_urls(lambda: decode_resource_changes(body, 1000))


@SETTINGS
@given(documents(MSGPACK_SCALAR, KEYS | st.binary(max_size=4)))
def test_any_msgpack_value_decodes_or_raises_our_errors(value):
    body = msgpack.packb(value, unicode_errors="surrogatepass")  # surrogates as the bytes a hostile sender would send
    decoded_urls(lambda: decode_purge_body("application/msgpack", body, 1000))


@SETTINGS
@given(st.binary(max_size=200), st.sampled_from([None, "application/json", "application/msgpack", "text/plain"]))
def test_any_bytes_decode_or_raise_our_errors(body, content_type):
    decoded_urls(lambda: decode_purge_body(content_type, body, 1000))
    decoded_urls(lambda: decode_resource_changes(body, 1000))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(["http://h/a", "//x/y", "", " ", "\t", "\x1f", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e",
                                 "\r", "\x85", "\u2028", "\xa0", "\u3000", "h t", "é"]), max_size=12),
       st.lists(st.sampled_from(["\n", "\r\n", "\r", "\x0b", "\x1e", "\u2029"]), min_size=1, max_size=3))
def test_text_bodies_are_lines_stripped_whatever_the_whitespace(parts, breaks):
    text = "".join(p + breaks[i % len(breaks)] for i, p in enumerate(parts))
    decoded = decode_purge_body("text/plain", text.encode(), 1000)
    assert decoded.urls == [line.strip() for line in text.splitlines() if line.strip()]
