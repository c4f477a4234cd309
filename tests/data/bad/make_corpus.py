"""Writes the bad-input corpus next to this file (see README.md). Deterministic: rerun after a change and commit
what it writes. Each file is named ``<expected>--<what>.<ext>``: ``expected`` is the JSON ``error`` the API must
answer (HTTP) or the drop reason the multicast listener must count (datagrams)."""

from __future__ import annotations

import json
import random
import struct
from pathlib import Path

import msgpack

from purged.core.batchcodec import encode_batch
from purged.core.htcp import encode_clr

HERE = Path(__file__).resolve().parent
LONG = "http://h.test/" + "a" * 9000  # past limits.max_url_length (8192) and htcp's 8192-byte URI cap
CONTROLS = {
    "crlf-header-injection": "http://h.test/a\r\nX-Injected: 1", "lf-in-path": "http://h.test/a\nb",
    "nul-in-path": "http://h.test/nul\x00", "del-in-path": "http://h.test/del\x7f", "crlf-in-host": "http://h\r\n.test/",
    "nul-in-host": "http://h\x00.test/x", "del-in-host": "http://h\x7f.test/x", "c1-nel-in-path": "http://h.test/\x85",
}
CONTROL = list(CONTROLS.values())


def files() -> dict[str, bytes]:
    rng = random.Random(14)
    out: dict[str, bytes] = {}

    # -- POST /v1/purge bodies: .json application/json, .msgpack application/msgpack, .txt text/plain,
    #    .bin each of those and none -----------------------------------------------------------------------------
    v1 = {
        "bad_json--nan.json": b'{"urls": ["http://h.test/nan", NaN]}',
        "bad_json--infinity.json": b'{"urls": [Infinity, -Infinity]}',
        "bad_json--float-overflow.json": b'{"urls": ["http://h.test/f", 1e999]}',
        "bad_json--int-5000-digits.json": b'{"urls": [' + b"9" * 5000 + b"]}",
        "bad_json--deep-nesting.json": b'{"urls": ' + b"[" * 3000 + b"]" * 3000 + b"}",
        "bad_json--duplicate-urls-key.json": b'{"urls": ["http://h.test/d1"], "urls": ["http://h.test/d2"]}',
        "bad_json--duplicate-nested-key.json": b'{"urls": ["http://h.test/d3", {"a": 1, "a": 2}]}',
        "bad_json--truncated.json": b'{"urls": ["http://h.test/trunc',
        "bad_json--not-utf8.json": b'{"urls": ["http://h.test/\xff\xfe"]}',
        "no_valid_urls--lone-surrogate-utf8.json": b'{"urls": ["http://h.test/\xed\xa0\x80"]}',
        "bad_json--empty.json": b"",
        "bad_body--top-level-array.json": b'["http://h.test/arr"]',
        "bad_body--urls-a-string.json": b'{"urls": "http://h.test/str"}',
        "bad_body--unknown-field.json": b'{"urls": ["http://h.test/u"], "urlz": []}',
        "bad_priority--priority-a-number.json": b'{"urls": ["http://h.test/p"], "priority": 7}',
        "no_valid_urls--wrong-types.json": b'{"urls": [1, null, true, false, 1.5, {}, [], {"url": "http://h.test/o"}]}',
        "no_valid_urls--huge-numbers.json": b'{"urls": [18446744073709551616, -9223372036854775809, 1e308]}',
        "no_valid_urls--control-chars.json": json_urls(CONTROL),
        "no_valid_urls--url-9000-chars.json": json_urls([LONG]),
        "no_valid_urls--lone-surrogate-escape.json": b'{"urls": ["http://h.test/\\ud800"]}',
        "no_valid_urls--not-urls.json": json_urls(["", " ", "h.test/x", "ftp://h.test/x", "http://", "//",
                                                          "http://h.test:99999/", "http://[:::]/", "javascript:x"]),
        "no_valid_urls--empty-list.json": b'{"urls": []}',
        "bad_msgpack--truncated.msgpack": msgpack.packb({"urls": ["http://h.test/t1", "http://h.test/t2"]})[:-5],
        "bad_msgpack--deep-nesting.msgpack": b"\x81\xa4urls" + b"\x91" * 3000 + b"\xc0",
        "bad_msgpack--int-map-key.msgpack": b"\x81\x01\x90",
        "bad_msgpack--bad-timestamp-ext.msgpack": b"\x81\xa4urls\x91\xc7\x05\xff" + b"\xff" * 5,
        "bad_msgpack--surrogate-in-str.msgpack": b"\x81\xa4urls\x91\xa3\xed\xa0\x80",
        "bad_msgpack--count-lies.msgpack": b"\x81\xa4urls\xdd\xff\xff\xff\xff\xa1x",  # array32 of 4G items
        "bad_msgpack--reserved-byte.msgpack": b"\x81\xa4urls\x91\xc1",
        "bad_msgpack--extra-data.msgpack": msgpack.packb({"urls": ["http://h.test/x1"]}) + b"\x00",
        "bad_body--ext-type-top-level.msgpack": msgpack.packb(msgpack.ExtType(42, b"{}")),
        "no_valid_urls--ext-types.msgpack": msgpack.packb({"urls": [msgpack.ExtType(1, b"http://h.test/e"),
                                                                    msgpack.ExtType(127, b"")]}),
        "no_valid_urls--bin-urls.msgpack": msgpack.packb({"urls": [b"http://h.test/bin"]}, use_bin_type=True),
        "no_valid_urls--control-chars.msgpack": msgpack.packb({"urls": CONTROL}),
        "no_valid_urls--url-9000-chars.msgpack": msgpack.packb({"urls": [LONG]}),
        # text/plain splits lines at CR, LF and NEL (U+0085), so only the other control characters apply
        "no_valid_urls--control-chars.txt": b"http://h.test/nul\x00\nhttp://h.test/del\x7f\nhttp://h\x00.test/x\n"
                                            b"http://h.test/esc\x1b\nhttp://h.test/a b\nhttp://h\x7f.test/\n",
        "not_utf8--latin1.txt": b"http://h.test/caf\xe9\n",
        "not_utf8--random-bytes.bin": bytes(rng.randrange(256) for _ in range(4096)),
    }
    out.update({f"http/v1/{k}": v for k, v in v1.items()})

    # -- POST /sys/purge/ (change-propagation's resource_change events) ---------------------------------------------
    sys = {
        "bad_json--nan.json": b'[{"meta": {"uri": "//h.test/a", "dt": NaN}}]',
        "bad_json--duplicate-uri.json": b'[{"meta": {"uri": "//h.test/a", "uri": "//h.test/b"}}]',
        "bad_json--deep-nesting.json": b"[" * 3000 + b"]" * 3000,
        "bad_json--truncated.json": b'[{"meta": {"uri": "//h.test/a"',
        "bad_body--an-object.json": b'{"meta": {"uri": "//h.test/a"}}',
        "no_valid_urls--wrong-types.json": b'[1, null, "//h.test/s", {"meta": 1}, {"meta": {"uri": 7}}, '
                                          b'{"meta": {"uri": ["//h.test/l"]}}, {"meta": {}}]',
        "no_valid_urls--control-chars.json": json.dumps([{"meta": {"uri": u[5:]}} for u in CONTROL]).encode(),
        "no_valid_urls--uri-9000-chars.json": json.dumps([{"meta": {"uri": LONG[5:]}}]).encode(),
        "no_valid_urls--empty.json": b"[]",
    }
    out.update({f"http/sys/{k}": v for k, v in sys.items()})

    # -- raw PURGE requests (sent as is over a socket) ----------------------------------------------------------------
    def purge(target: bytes, host: bytes | None) -> bytes:
        head = b"PURGE " + target + b" HTTP/1.1\r\n"
        if host is not None:
            head += b"Host: " + host + b"\r\n"
        return head + b"Connection: close\r\n\r\n"

    raw = {
        "bad_request--host-bare-cr.http": purge(b"/x", b"h.test\rX-Injected: 1"),
        "bad_request--host-nul.http": purge(b"/x", b"h\x00.test"),
        "control_char--host-del.http": purge(b"/x", b"h\x7f.test"),
        "bad_request--no-host.http": purge(b"/x", None),
        "bad_request--target-nul.http": purge(b"/a\x00b", b"h.test"),
        "bad_request--target-del.http": purge(b"/a\x7fb", b"h.test"),
        "bad_request--target-space.http": purge(b"/a b", b"h.test"),
        "control_char--host-obs-fold.http": b"PURGE /x HTTP/1.1\r\nHost: h.test\r\n x\r\n\r\n",
        "bad_request--garbage-request-line.http": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40,
        "bad_host--empty.http": purge(b"/x", b""),
        "control_char--host-space.http": purge(b"/x", b"bad host"),
        "bad_port--port-too-big.http": purge(b"/x", b"h.test:99999"),
        "userinfo--host-userinfo.http": purge(b"/x", b"user@h.test"),
        "bad_host--latin1-not-utf8.http": purge(b"/x", b"caf\xe9.test"),
        "bad_request--target-c1-utf8.http": purge(b"/a\xc2\x85b", b"h.test"),
        "too_long--target-9000-chars.http": purge(b"/" + b"a" * 9000, b"h.test"),
        "bad_request--two-hosts.http": b"PURGE /x HTTP/1.1\r\nHost: a.test\r\nHost: b.test\r\nConnection: close\r\n\r\n",
        "bad_scheme--absolute-ftp.http": purge(b"ftp://h.test/x", b"h.test"),
    }
    out.update({f"http/purge/{k}": v for k, v in raw.items()})

    # -- HTCP CLR datagrams (htcp listener) ---------------------------------------------------------------------------
    good = encode_clr("http://h.test/htcp", 7)
    n = len(good)
    htcp = {
        "truncated--zero-bytes.bin": b"",
        "truncated--cut-at-13.bin": good[:13],
        "bad_length--cut-at-30.bin": good[:30],
        "bad_length--cut-last-byte.bin": good[:-1],
        "bad_length--total-says-more.bin": struct.pack("!H", n + 100) + good[2:],
        "bad_length--total-says-less.bin": struct.pack("!H", n - 1) + good[2:],
        "bad_length--data-length-says-more.bin": good[:4] + struct.pack("!H", 0xFFFF) + good[6:],
        "bad_length--data-length-says-less.bin": good[:4] + struct.pack("!H", n - 6 - 4) + good[6:],
        "bad_length--auth-length-lies.bin": good[:-2] + b"\xff\xff",
        "bad_length--trailing-garbage.bin": good[:1] + bytes([n + 3]) + good[2:] + b"xyz",
        "truncated--uri-count-huge.bin": good[:20] + b"\xff\xff" + good[22:],
        "truncated--method-count-huge.bin": good[:14] + b"\xff\xff" + good[16:],
        "bad_opcode--nop.bin": good[:6] + b"\x00" + good[7:],
        "bad_opcode--tst.bin": good[:6] + b"\x01" + good[7:],
        "bad_opcode--all-bits.bin": good[:6] + b"\xff" + good[7:],
        "bad_version--1.0.bin": good[:2] + b"\x01\x00" + good[4:],
        "bad_auth--signed.bin": signed(good),
        "empty_uri--zero-length-uri.bin": encode_clr_raw(b""),
        "not_utf8--latin1-uri.bin": encode_clr_raw(b"http://h.test/caf\xe9"),
        "uri_too_long--9000.bin": encode_clr_raw(LONG.encode()),
        "bad_version--random-200-bytes.bin": b"\x00\xc8" + bytes(rng.randrange(256) for _ in range(198)),
        "bad_length--random-bytes.bin": bytes(rng.randrange(256) for _ in range(512)),
    }
    for i, (what, url) in enumerate(CONTROLS.items()):
        htcp[f"invalid_url--{what}.bin"] = encode_clr(url, 100 + i)
    htcp["invalid_url--no-host.bin"] = encode_clr("http:///x", 120)
    htcp["invalid_url--ftp.bin"] = encode_clr("ftp://h.test/x", 121)
    out.update({f"udp/htcp/{k}": v for k, v in htcp.items()})

    # -- purged batch datagrams (msgpack listener) ----------------------------------------------------------------
    ok = encode_batch(["http://h.test/b1", "http://h.test/b2"], sender="corpus", seq=1)
    batch = {
        "truncated--cut-in-half.bin": ok[: len(ok) // 2],
        "truncated--count-lies.bin": b"\x94\x01\xa6corpus\x02\xdd\xff\xff\xff\xff\xa1x",
        "extra_data--trailing-byte.bin": ok + b"\x00",
        "not_msgpack--ext-url.bin": msgpack.packb([1, "corpus", 3, [msgpack.ExtType(5, b"http://h.test/e")]]),
        "not_msgpack--ext-top-level.bin": msgpack.packb(msgpack.ExtType(1, b"x")),
        "not_msgpack--timestamp.bin": b"\x94\x01\xa6corpus\x04\x91\xd6\xff\x00\x00\x00\x01",
        "not_msgpack--bin-url.bin": msgpack.packb([1, "corpus", 5, [b"http://h.test/b"]], use_bin_type=True),
        "not_msgpack--reserved-byte.bin": b"\xc1",
        "not_msgpack--deep-nesting.bin": b"\x91" * 3000 + b"\xc0",
        "not_utf8--sender.bin": b"\x94\x01\xa2\xff\xfe\x06\x90",
        "bad_shape--a-map.bin": msgpack.packb({"urls": ["http://h.test/m"]}),
        "bad_shape--five-items.bin": msgpack.packb([1, "corpus", 7, [], "x"]),
        "bad_shape--urls-a-string.bin": msgpack.packb([1, "corpus", 8, "http://h.test/s"]),
        "bad_shape--url-an-int.bin": msgpack.packb([1, "corpus", 9, [1]]),
        "bad_version--2.bin": msgpack.packb([2, "corpus", 10, []]),
        "bad_version--a-string.bin": msgpack.packb(["1", "corpus", 11, []]),
        "bad_sender--empty.bin": msgpack.packb([1, "", 12, []]),
        "bad_sender--256-chars.bin": msgpack.packb([1, "s" * 256, 13, []]),
        "bad_seq--negative.bin": msgpack.packb([1, "corpus", -1, []]),
        "bad_seq--a-float.bin": msgpack.packb([1, "corpus", 1.5, []]),
        "empty_url--empty-string.bin": msgpack.packb([1, "corpus", 14, [""]]),
        "url_too_long--9000.bin": msgpack.packb([1, "corpus", 15, [LONG]]),
        "too_many_urls--9000-urls.bin": b"\x94\x01\xa6corpus\x10\xdc\x23\x28" + b"\xa1x" * 9000,
        "not_msgpack--random-bytes.bin": b"\xc1" + bytes(rng.randrange(256) for _ in range(300)),
    }
    for i, (what, url) in enumerate(CONTROLS.items()):
        batch[f"invalid_url--{what}.bin"] = msgpack.packb([1, "corpus", 100 + i, [url]])
    out.update({f"udp/batch/{k}": v for k, v in batch.items()})
    return out


def json_urls(urls: list[str]) -> bytes:
    return json.dumps({"urls": urls}).encode()


def encode_clr_raw(uri: bytes) -> bytes:
    """A CLR with ``uri`` as raw bytes (encode_clr takes a str and encodes it as UTF-8)."""
    spec = b"".join(struct.pack("!H", len(x)) + x for x in (b"HEAD", uri, b"HTTP/1.0", b""))
    data_length = 8 + 2 + len(spec)
    return struct.pack("!HBBHBxIxx", 4 + data_length + 2, 0, 0, data_length, 4, 9) + spec + b"\x00\x02"


def signed(datagram: bytes) -> bytes:
    """The same CLR with a 10-byte AUTH section (its length counts itself)."""
    auth = struct.pack("!H", 10) + b"\x00" * 8
    return struct.pack("!H", len(datagram) - 2 + len(auth)) + datagram[2:-2] + auth


def main() -> None:
    for old in HERE.glob("*/*/*.*"):
        old.unlink()
    for name, data in files().items():
        path = HERE / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


if __name__ == "__main__":
    main()
