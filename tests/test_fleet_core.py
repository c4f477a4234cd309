"""The fleet's sans-IO rules (purged/core/fleet.py): the message codec, splitting, ids, consumer names, status."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from purged.config import ConfigError, parse_config
from purged.core.fleet import (
    MAX_ID_SPAN,
    BadFleetId,
    BadMessage,
    BusMessage,
    ConsumerPosition,
    consumer_name,
    decode_message,
    encode_batch,
    encode_message,
    fleet_progress,
    fleet_table,
    format_fleet_id,
    is_fleet_id,
    parse_fleet_id,
)


def test_round_trip_one_message():
    [data] = encode_batch(["en.wikipedia.org/wiki/Foo", "h.test/a?b"], priority="high", origin="cp3050.eqiad",
                          accepted_at=1.7e9, max_payload=1 << 20)
    msg = decode_message(data)
    assert msg == BusMessage(["//en.wikipedia.org/wiki/Foo", "//h.test/a?b"], "high", "cp3050.eqiad", 1.7e9, 0, 1, 2)


def test_split_above_max_payload_keeps_order_and_fits():
    targets = [f"h.test/{i:05d}/" + "x" * 100 for i in range(5000)]
    parts = encode_batch(targets, priority="bulk", origin="a", accepted_at=1.0, max_payload=64 * 1024)
    assert len(parts) > 1
    assert all(len(p) <= 64 * 1024 for p in parts)
    decoded = [decode_message(p) for p in parts]
    assert [m.part for m in decoded] == list(range(len(parts)))
    assert {m.parts for m in decoded} == {len(parts)} and {m.total for m in decoded} == {5000}
    assert [u for m in decoded for u in m.urls] == ["//" + t for t in targets]


def test_encode_refuses_what_cannot_travel():
    with pytest.raises(ValueError):
        encode_batch(["h.test/" + "x" * 2000], priority="bulk", origin="a", accepted_at=0, max_payload=1024)
    with pytest.raises(ValueError):
        encode_batch(["h.test/"], priority="urgent", origin="a", accepted_at=0, max_payload=1 << 20)
    with pytest.raises(ValueError):
        encode_batch(["h.test/"], priority="bulk", origin="", accepted_at=0, max_payload=1 << 20)


def _msg(**over):
    base = {"v": 1, "origin": "a", "at": 1.0, "priority": "bulk", "part": 0, "parts": 1, "total": 1,
            "urls": ["//h.test/"]}
    base.update(over)
    return msgpack.packb({k: v for k, v in base.items() if v is not _DROP}, use_bin_type=True)


_DROP = object()


@pytest.mark.parametrize(("data", "reason"), [
    (b"", "truncated"),
    (b"\xc1", "not_msgpack"),
    (msgpack.packb([1, "a"]), "bad_shape"),
    (_msg()[:-3], "truncated"),
    (_msg() + b"\x00", "extra_data"),
    (_msg(v=2), "bad_version"),
    (_msg(v=True), "bad_version"),
    (_msg(v=_DROP), "bad_version"),
    (_msg(origin=""), "bad_origin"),
    (_msg(origin=7), "bad_origin"),
    (_msg(at="now"), "bad_time"),
    (_msg(at=float("nan")), "bad_time"),
    (_msg(at=-1), "bad_time"),
    (_msg(priority="urgent"), "bad_priority"),
    (_msg(part=1, parts=1), "bad_part"),
    (_msg(part=-1), "bad_part"),
    (_msg(parts="2"), "bad_part"),
    (_msg(urls="//h.test/"), "bad_shape"),
    (_msg(urls=[b"//h.test/"]), "not_msgpack"),  # bin strings are refused by the unpacker
    (_msg(urls=[7]), "bad_shape"),
    (_msg(urls=[""]), "empty_url"),
    (_msg(urls=["//h/" + "x" * 20000]), "url_too_long"),
    (_msg(total=0, urls=["//a/", "//b/"]), "bad_total"),
    (_msg(total="1"), "bad_total"),
    (b"\xa2\xff\xfe", "not_utf8"),
    (msgpack.packb({1: 2}), "not_msgpack"),
])
def test_decode_rejects_with_a_reason(data, reason):
    with pytest.raises(BadMessage) as exc:
        decode_message(data)
    assert exc.value.reason == reason


def test_decode_ignores_unknown_keys_and_defaults_total():
    msg = decode_message(_msg(extra={"x": 1}, total=_DROP, part=_DROP, parts=_DROP))
    assert msg.total == 1 and msg.part == 0 and msg.parts == 1


def test_too_many_urls():
    with pytest.raises(BadMessage) as exc:
        decode_message(_msg(urls=["//a/"] * 3, total=3), max_urls=2)
    assert exc.value.reason == "too_many_urls"


@given(st.binary(max_size=300))
def test_any_bytes_decode_or_raise_bad_message(data):
    try:
        decode_message(data)
    except BadMessage as exc:
        assert exc.reason


@given(st.lists(st.text(alphabet="abc/.-é", min_size=1, max_size=20).map(lambda s: "h.test/" + s), max_size=50),
       st.sampled_from(["high", "bulk"]))
def test_encode_decode_property(targets, priority):
    parts = encode_batch(targets, priority=priority, origin="o", accepted_at=2.5, max_payload=1024)
    msgs = [decode_message(p) for p in parts]
    assert [u for m in msgs for u in m.urls] == ["//" + t for t in targets]
    assert all(m.priority == priority and m.total == len(targets) for m in msgs)


def test_encode_message_of_an_empty_batch_decodes():
    assert decode_message(encode_message(BusMessage([], "bulk", "a", 0.0, 0, 1, 0))).urls == []


# -- ids ----------------------------------------------------------------------------------------------------------

def test_fleet_ids():
    assert format_fleet_id(1234, 1234) == "s1234"
    assert format_fleet_id(1234, 1236) == "s1234-1236"
    assert parse_fleet_id("s1234") == (1234, 1234)
    assert parse_fleet_id("s1234-1236") == (1234, 1236)
    assert is_fleet_id("s1") and not is_fleet_id("0a1b2c3d-1")


@pytest.mark.parametrize("text", [
    "s", "s0", "s01", "s-1", "s1-1", "s5-3", "s1-", "S1", "s1 ", " s1", "s1x", "s１", "s1-1-2",
    "s99999999999999999999", "s9223372036854775808", f"s1-{2 + MAX_ID_SPAN}", "s" + "9" * 40, "s1\n",
])
def test_bad_fleet_ids(text):
    with pytest.raises(BadFleetId) as exc:
        parse_fleet_id(text)
    assert exc.value.status == 404 and exc.value.reason == "bad_batch_id"


@given(st.text(max_size=50))
def test_any_text_parses_or_raises_bad_fleet_id(text):
    try:
        first, last = parse_fleet_id(text)
    except BadFleetId:
        return
    assert 1 <= first <= last and format_fleet_id(first, last) == text


# -- consumer names -----------------------------------------------------------------------------------------------

def test_consumer_names():
    assert consumer_name("cp3050") == "cp3050"
    assert consumer_name("cp3050.eqiad.wmnet") == "cp3050_eqiad_wmnet"
    assert consumer_name("a*b>c d\te/f\\g") == "a_b_c_d_e_f_g"
    long = consumer_name("x" * 300)
    assert len(long) <= 64 and long != consumer_name("x" * 299)


@given(st.text(min_size=1, max_size=300))
def test_consumer_names_are_always_valid(name):
    out = consumer_name(name)
    assert out and len(out) <= 64
    assert not any(c in out for c in ".*>/\\") and not any(c.isspace() for c in out)


# -- status ---------------------------------------------------------------------------------------------------------

def _pos(daemon, floor, **kw):
    return ConsumerPosition(daemon, daemon.replace(".", "_"), floor, kw.get("delivered", floor),
                            kw.get("pending", 0), kw.get("ack_pending", 0), 0, kw.get("last_active"))


def test_done_only_when_every_ack_floor_passed():
    consumers = [_pos("a", 10), _pos("b.x", 7, delivered=10, ack_pending=3)]
    done, daemons = fleet_progress(7, 10, consumers)
    assert done and daemons["b.x"].lag == 3
    done, daemons = fleet_progress(8, 10, consumers)
    assert not done and daemons["a"].done and not daemons["b.x"].done
    assert fleet_progress(1, 10, [])[0] is False  # nobody delivered it
    assert fleet_progress(7, 10, consumers, missing=1)[0] is False  # a consumer the stream could not describe


def test_fleet_table():
    table = fleet_table(12, [_pos("b", 12, last_active=5.0), _pos("a", 2, pending=10)])
    assert list(table) == ["a", "b"]
    assert table["a"]["lag"] == 10 and table["a"]["pending"] == 10 and table["b"]["last_active"] == 5.0


# -- config ---------------------------------------------------------------------------------------------------------

DCS = {"a": {"tiers": [{"nodes": ["127.0.0.1:1"]}]}}


def test_config_without_bus_is_unchanged():
    config = parse_config({"datacenters": DCS})
    assert config.bus is None and config.name
    assert parse_config({"datacenters": DCS, "bus": None}).bus is None


def test_config_bus_defaults_and_dotted_errors():
    config = parse_config({"datacenters": DCS, "name": "cp1.x", "bus": {"nats": {"servers": ["127.0.0.1:4222"]}}})
    nats = config.bus.nats
    assert config.name == "cp1.x" and nats.servers == ("nats://127.0.0.1:4222",) and nats.stream == "PURGED"
    assert nats.replicas == 1 and nats.randomize is True
    with pytest.raises(ConfigError) as exc:
        parse_config({"datacenters": DCS, "name": "", "bus": {"nats": {
            "servers": ["http://x", 3], "stream": "A.B", "replicas": 0, "ack_wait": 0.1, "max_ack_pending": 0,
            "publish_timeout": "1", "connect_timeout": -1, "randomize": "no", "nope": 1}}})
    errors = "\n".join(exc.value.errors)
    for key in ("name", "bus.nats.servers[0]", "bus.nats.servers[1]", "bus.nats.stream", "bus.nats.replicas",
                "bus.nats.ack_wait", "bus.nats.max_ack_pending", "bus.nats.publish_timeout",
                "bus.nats.connect_timeout", "bus.nats.randomize", "bus.nats.nope"):
        assert f"\n{key}: " in "\n" + errors, (key, errors)
    with pytest.raises(ConfigError) as exc:
        parse_config({"datacenters": DCS, "bus": {"nats": {}}})
    assert exc.value.errors == ["bus.nats.servers: required"]
    with pytest.raises(ConfigError) as exc:
        parse_config({"datacenters": DCS, "bus": {"kafka": {}}})
    assert any(e.startswith("bus.kafka: unknown key") for e in exc.value.errors)
