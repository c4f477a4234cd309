"""Property tests over every decoder that bad input reaches (issue 14), beyond what test_htcp.py,
test_batchcodec.py and test_ingest_decode.py already fuzz (any bytes, single-byte flips of one CLR, any
JSON/msgpack value):

- HTCP against a model: a CLR assembled from fields that may each lie decodes exactly when every length agrees,
  and then to its URI; mutations (cuts, flips, inserted bytes) of recorded MediaWiki datagrams; the whole path to
  a purge target raises nothing but our errors.
- batch datagrams: mutations of real batches; encode_batches round trips any URL list in order.
- request bodies: any URL list and priority round trips through JSON, msgpack and text; a refusal is always a
  DecodeError with a 4xx status and a reason; any content type is handled.
- the corpus of tests/data/bad/: each datagram fails in the core with the reason its name promises (the live
  daemon test, tests/reliability/test_rel_input.py, checks the HTTP files end to end).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from purged.core import batchcodec, htcp
from purged.core.errors import DecodeError, InvalidURL, PurgedError
from purged.core.ingest import decode_purge_body, decode_resource_changes
from purged.core.urls import parse_url

DATA = Path(__file__).parent / "data"
SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
RECORDED = [(DATA / n).read_bytes() for n in ("htcp_enwiki_foo.bin", "htcp_mediawiki_main_page.bin",
                                              "htcp_test_com.bin")]


def mutate(data: bytes, ops: list[tuple[int, int, int]]) -> bytes:
    """Apply (kind, position, value) edits: 0 flip a byte, 1 insert one, 2 delete one, 3 cut there."""
    out = bytearray(data)
    for kind, pos, value in ops:
        if not out and kind != 1:
            continue
        i = pos % (len(out) + (kind == 1)) if out or kind == 1 else 0
        if kind == 0:
            out[i] = value
        elif kind == 1:
            out.insert(i, value)
        elif kind == 2:
            del out[i]
        else:
            del out[i:]
    return bytes(out)


EDITS = st.lists(st.tuples(st.integers(0, 3), st.integers(0, 2**16), st.integers(0, 255)), min_size=1, max_size=4)


# -- HTCP ----------------------------------------------------------------------------------------------------------

COUNTSTR = st.binary(max_size=40) | st.text(max_size=30).map(lambda s: s.encode("utf-8", "surrogatepass"))


@st.composite
def clr_fields(draw):
    """The fields of a CLR: all true (half the time), or each either true or a lie."""
    honest = draw(st.booleans())
    strs = [draw(st.sampled_from([b"HEAD", b"GET", b""]) | COUNTSTR),
            draw(st.sampled_from([b"http://h.test/x", b"test.com"]) | COUNTSTR),
            draw(st.sampled_from([b"HTTP/1.0"]) | COUNTSTR),
            draw(st.just(b"") | COUNTSTR)]
    def field(true_value, lie):
        return true_value if honest else draw(st.just(true_value) | lie)

    counts = [field(len(s), st.integers(0, 0xFFFF)) for s in strs]
    spec = b"".join(struct.pack("!H", c) + s for c, s in zip(counts, strs, strict=True))
    tail = field(b"", st.binary(max_size=12))
    size = 14 + len(spec) + len(tail) + 2
    return {
        "strs": strs, "counts": counts, "spec": spec, "tail": tail,
        "length": field(size, st.integers(0, 0xFFFF)),
        "version": field((0, 0), st.tuples(st.integers(0, 255), st.integers(0, 255))),
        "data_length": field(size - 6, st.integers(0, 0xFFFF)),
        "opcode": field(4, st.integers(0, 255)),
        "trans_id": draw(st.integers(0, 2**32 - 1)),
        "auth": field(2, st.integers(0, 0xFFFF)),
        "size": size,
    }


def assemble(f) -> bytes:
    head = struct.pack("!HBBHBxIxx", f["length"], *f["version"], f["data_length"], f["opcode"], f["trans_id"])
    return head + f["spec"] + f["tail"] + struct.pack("!H", f["auth"])


@SETTINGS
@given(clr_fields())
def test_a_clr_decodes_exactly_when_every_length_agrees(f):
    data = assemble(f)
    well_formed = (
        f["length"] == f["size"] and f["version"] == (0, 0) and f["opcode"] == 4
        and f["data_length"] == f["size"] - 6 and f["auth"] == 2 and not f["tail"]
        and f["counts"] == [len(s) for s in f["strs"]]
    )
    try:
        clr = htcp.decode_clr(data)
    except htcp.HtcpError as exc:
        assert exc.reason in htcp.REASONS and exc.detail
        assert not well_formed or exc.reason in ("empty_uri", "not_utf8", "uri_too_long"), (exc.reason, f)
        return
    assert well_formed, f"accepted a lying datagram: {f}"
    assert clr.trans_id == f["trans_id"] and clr.uri.encode("utf-8") == f["strs"][1]


@SETTINGS
@given(st.sampled_from(RECORDED), EDITS)
def test_mutated_mediawiki_datagrams_decode_or_raise_htcp_errors(datagram, edits):
    data = mutate(datagram, edits)
    try:
        target = htcp.targets_from_htcp(data)
    except PurgedError as exc:
        assert isinstance(exc, (htcp.HtcpError, InvalidURL)) and exc.reason and exc.detail, exc
        if isinstance(exc, htcp.HtcpError):
            assert exc.reason in htcp.REASONS
    else:
        assert target.isascii() and target.isprintable() and "/" in target


@SETTINGS
@given(st.binary(max_size=300))
def test_any_bytes_to_a_purge_target_raise_only_our_errors(data):
    try:
        htcp.targets_from_htcp(data)
    except (htcp.HtcpError, InvalidURL) as exc:
        assert exc.reason


@SETTINGS
@given(st.text(min_size=1, max_size=200), st.integers(0, 2**32 - 1))
def test_a_clr_round_trips_to_the_target_of_its_url(path, trans_id):
    url = "http://h.test/" + path
    try:
        want = parse_url(url, allow_bare_host=True)
    except InvalidURL as exc:
        want = exc.reason
    try:
        got = htcp.targets_from_htcp(htcp.encode_clr(url, trans_id))
    except InvalidURL as exc:
        got = exc.reason
    assert got == want


def test_the_model_also_draws_well_formed_datagrams():
    seen = []

    @settings(max_examples=30, deadline=None, database=None)
    @given(clr_fields())
    def probe(f):
        seen.append(f["counts"] == [len(s) for s in f["strs"]] and f["length"] == f["size"])

    probe()
    assert 0 < sum(seen) < len(seen)


# -- batch datagrams -----------------------------------------------------------------------------------------------

BATCHES = [batchcodec.encode_batch(urls, sender=s, seq=q) for urls, s, q in (
    (["http://en.wikipedia.org/wiki/Foo", "//upload.wikimedia.org/x.jpg"], "mw1", 7),
    ([], "heartbeat", 2**64 - 1),
    (["http://h.test/" + "é" * 40] * 3, "s" * 255, 0),
)] + [(DATA / "batch_v1.bin").read_bytes()]


@SETTINGS
@given(st.sampled_from(BATCHES), EDITS)
def test_mutated_batches_decode_or_raise_decode_errors(datagram, edits):
    try:
        batch = batchcodec.decode_batch(mutate(datagram, edits))
    except DecodeError as exc:
        assert exc.reason in batchcodec.REASONS and exc.detail
    else:
        assert all(type(u) is str and u for u in batch.urls) and 0 <= batch.seq < 2**64


@SETTINGS
@given(st.lists(st.text(min_size=1, max_size=200), max_size=30), st.text(min_size=1, max_size=40),
       st.integers(0, 2**63), st.integers(200, 2000))
def test_encode_batches_round_trips_any_urls_in_order(urls, sender, first, max_size):
    datagrams = list(batchcodec.encode_batches(urls, sender=sender, first_seq=first, max_size=max_size))
    batches = [batchcodec.decode_batch(d) for d in datagrams]
    assert [u for b in batches for u in b.urls] == urls
    assert [b.seq for b in batches] == list(range(first, first + len(batches)))
    assert {b.sender for b in batches} <= {sender}
    for d, b in zip(datagrams, batches, strict=True):
        assert len(d) <= max_size or len(b.urls) == 1  # only a URL too big on its own gets a bigger datagram


# -- request bodies ------------------------------------------------------------------------------------------------

URL_TEXT = st.text(max_size=60)
PRIORITY = st.sampled_from(["bulk", "high"])


@SETTINGS
@given(st.lists(URL_TEXT, max_size=20), PRIORITY, st.booleans())
def test_json_and_msgpack_bodies_round_trip(urls, priority, ascii_only):
    body = json.dumps({"urls": urls, "priority": priority}, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")
    for ctype in ("application/json", "application/json; charset=utf-8", None):
        got = decode_purge_body(ctype, body, 100)
        assert (got.urls, got.priority) == (urls, priority)
    packed = msgpack.packb({"urls": urls, "priority": priority}, unicode_errors="surrogatepass")
    try:
        got = decode_purge_body("application/msgpack", packed, 100)
    except DecodeError as exc:  # msgpack refuses an encoded lone surrogate as not UTF-8: our error, whole body
        assert exc.reason == "bad_msgpack" and any(0xD800 <= ord(c) <= 0xDFFF for u in urls for c in u)
    else:
        assert (got.urls, got.priority) == (urls, priority)
    events = json.dumps([{"meta": {"uri": u}} for u in urls]).encode()
    assert decode_resource_changes(events, 100) == urls


@SETTINGS
@given(st.lists(st.text(st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=60), max_size=20))
def test_text_bodies_are_one_url_per_line(lines):
    body = "\n".join(lines).encode("utf-8")
    got = decode_purge_body("text/plain", body, 1000).urls
    assert got == [ln.strip() for ln in "\n".join(lines).splitlines() if ln.strip()]


@SETTINGS
@given(st.binary(max_size=200), st.text(max_size=40) | st.sampled_from(
    ["application/json", "application/msgpack", "text/plain", "application/x-www-form-urlencoded", ""]))
def test_a_refused_body_is_a_4xx_with_a_reason_whatever_the_content_type(body, ctype):
    for decode in (lambda: decode_purge_body(ctype, body, 5), lambda: decode_resource_changes(body, 5)):
        try:
            decode()
        except PurgedError as exc:
            assert isinstance(exc, DecodeError) and 400 <= exc.status < 500 and exc.reason and exc.detail


@pytest.mark.parametrize("count", [5, 6])
def test_too_many_urls_is_a_413_in_every_format(count):
    urls = [f"http://h.test/{i}" for i in range(count)]
    bodies = {"application/json": json.dumps({"urls": urls}).encode(),
              "application/msgpack": msgpack.packb({"urls": urls}), "text/plain": "\n".join(urls).encode()}
    for ctype, body in bodies.items():
        if count <= 5:
            assert decode_purge_body(ctype, body, 5).urls == urls
        else:
            with pytest.raises(DecodeError) as info:
                decode_purge_body(ctype, body, 5)
            assert (info.value.reason, info.value.status) == ("too_many_urls", 413)


# -- the corpus ----------------------------------------------------------------------------------------------------

CORPUS = DATA / "bad"


@pytest.mark.parametrize("path", sorted((CORPUS / "udp").glob("*/*.bin")), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_each_bad_datagram_fails_with_the_reason_its_name_promises(path):
    expected = path.name.split("--", 1)[0]
    data = path.read_bytes()
    try:
        if path.parent.name == "htcp":
            htcp.targets_from_htcp(data)
        else:
            for url in batchcodec.decode_batch(data).urls:
                parse_url(url)
    except PurgedError as exc:
        got = "invalid_url" if isinstance(exc, InvalidURL) else exc.reason
    else:
        got = "accepted"
    assert got == expected


def test_the_corpus_is_what_its_generator_writes():
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_corpus", CORPUS / "make_corpus.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    want = module.files()
    have = {str(p.relative_to(CORPUS)): p.read_bytes() for p in CORPUS.glob("*/*/*") if p.is_file()}
    assert have == want
    readme = (CORPUS / "README.md").read_text()
    missing = [name for name in want if name.rsplit("/", 1)[1] not in readme]
    assert not missing, f"not listed in tests/data/bad/README.md: {missing}"
