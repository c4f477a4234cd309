"""The multicast receive adapter over real sockets: multicast on 127.0.0.1 (239.255.0.0/16, TTL 0)."""

import ipaddress
import logging
import socket

import pytest
import trio

from purged.core.admission import Refused, URLRules, validate_urls
from purged.core.batchcodec import encode_batch
from purged.core.htcp import encode_clr
from purged.net import multicast
from purged.net.multicast import MulticastListen, MulticastSetupError, MulticastStats, serve_multicast

GROUP = "239.255.77.1"


class Recorder:
    def __init__(self, fail: bool = False):
        self.calls: list[tuple[list[str], str]] = []
        self.fail = fail

    def __call__(self, urls: list[str], label: str) -> list[dict]:
        """Like admission: validate, record what was accepted, return the rejections (or refuse them all)."""
        checked = validate_urls(urls, URLRules(allow_bare_host=True))
        if self.fail:
            raise Refused("full", reason="overload")
        self.calls.append((checked.targets, label))
        return checked.rejected

    def targets(self, label: str | None = None) -> list[str]:
        return [t for targets, lab in self.calls if label in (None, lab) for t in targets]


def sender(source: str = "127.0.0.1") -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((source, 0))
    s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 0)  # never leaves the host
    s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
    s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton("127.0.0.1"))
    return s


async def start(nursery, listen: MulticastListen, ingest, stats=None, **kw):
    stats = stats or MulticastStats()
    addr = await nursery.start(
        lambda task_status: serve_multicast(listen, ingest, stats, task_status=task_status, **kw)
    )
    return stats, addr[1]


async def until(predicate, timeout: float = 5.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.01)


def listen(**kw) -> MulticastListen:
    return MulticastListen(**({"group": GROUP, "port": 0, "interface": "127.0.0.1"} | kw))


async def test_htcp_datagrams_reach_ingest(nursery):
    ingest = Recorder()
    stats, port = await start(nursery, listen(), ingest)
    with sender() as s:
        for i, url in enumerate(
            ["http://en.wikipedia.org/wiki/Foo", "test.com", "//upload.wikimedia.org/a.png"]
        ):
            s.sendto(encode_clr(url, i + 1), (GROUP, port))
        s.sendto(encode_clr("http://en.wikipedia.org/wiki/Foo", 4)[:-1], (GROUP, port))  # truncated
        s.sendto(b"\x00" * 3, (GROUP, port))
        s.sendto(encode_clr("ftp://example.org/x", 6), (GROUP, port))  # decodes, but not a URL we purge
        await until(lambda: sum(stats.packets.values()) == 6)
    assert ingest.targets("127.0.0.1") == [
        "en.wikipedia.org/wiki/Foo",
        "test.com/",
        "upload.wikimedia.org/a.png",
    ]
    st = stats.statistics()
    assert (st["packets_good"], st["packets_bad"], st["packets_filtered"]) == (4, 2, 0)
    assert (st["drops_malformed"], st["drops_invalid_url"], st["drops_source"]) == (2, 1, 0)
    assert st["malformed_bad_length"] == st["malformed_truncated"] == 1
    assert st["urls_accepted"] == 3
    assert st["bytes_read"] > 3 * 44
    assert (
        st["loss_received"] == 4 and st["loss_lost"] == 0
    )  # trans ids 1, 2, 3, 6: 4 and 5 still in the window
    assert st["rcvbuf_bytes"] > 0
    assert stats.loss.statistics()["per_source"]["127.0.0.1"]["last_seq"] == 6


async def test_sources_filter_drops_and_counts(nursery):
    ingest = Recorder()
    allowed = (ipaddress.ip_network("127.0.0.1/32"),)
    stats, port = await start(nursery, listen(sources=allowed), ingest)
    with sender("127.0.0.1") as good, sender("127.0.0.2") as other:
        good.sendto(encode_clr("http://a.example/1", 1), (GROUP, port))
        other.sendto(encode_clr("http://b.example/1", 1), (GROUP, port))
        other.sendto(encode_clr("http://b.example/2", 2), (GROUP, port))
        good.sendto(encode_clr("http://a.example/2", 2), (GROUP, port))
        await until(lambda: sum(stats.packets.values()) == 4)
    assert ingest.targets() == ["a.example/1", "a.example/2"]
    assert {label for _, label in ingest.calls} == {"127.0.0.1"}
    st = stats.statistics()
    assert (st["packets_good"], st["packets_filtered"], st["drops_source"]) == (2, 2, 2)


async def test_ingest_is_grouped_by_sending_host(nursery):
    ingest = Recorder()
    stats, port = await start(nursery, listen(), ingest)
    with sender("127.0.0.1") as a, sender("127.0.0.3") as b:
        for i in range(20):
            (a if i % 2 else b).sendto(encode_clr(f"http://x.example/{i}", i), (GROUP, port))
        await until(lambda: stats.packets["good"] == 20)
    assert ingest.targets("127.0.0.1") == [f"x.example/{i}" for i in range(1, 20, 2)]
    assert ingest.targets("127.0.0.3") == [f"x.example/{i}" for i in range(0, 20, 2)]
    assert stats.ingest_calls == len(ingest.calls) <= 20


async def test_msgpack_batches(nursery):
    ingest = Recorder()
    stats, port = await start(nursery, listen(format="msgpack"), ingest)
    urls = [
        "http://en.wikipedia.org/wiki/A",
        "//en.wikipedia.org/wiki/B",
        "gopher://x/",
        "http://en.wikipedia.org/wiki/C",
    ]
    with sender() as s:
        s.sendto(encode_batch(urls, sender="mw1", seq=10), (GROUP, port))
        s.sendto(encode_batch(urls[:1], sender="mw1", seq=12), (GROUP, port))
        s.sendto(
            encode_clr("http://en.wikipedia.org/wiki/Foo", 1), (GROUP, port)
        )  # HTCP on a msgpack listener
        await until(lambda: sum(stats.packets.values()) == 3)
    assert ingest.targets() == [
        "en.wikipedia.org/wiki/A",
        "en.wikipedia.org/wiki/B",
        "en.wikipedia.org/wiki/C",
        "en.wikipedia.org/wiki/A",
    ]
    st = stats.statistics()
    assert (st["packets_good"], st["packets_bad"], st["drops_invalid_url"], st["urls_accepted"]) == (
        2,
        1,
        1,
        4,
    )
    assert stats.loss.statistics()["per_source"]["mw1@127.0.0.1"]["last_seq"] == 12


async def test_overload_drops_and_counts(nursery):
    ingest = Recorder(fail=True)
    stats, port = await start(nursery, listen(), ingest)
    with sender() as s:
        for i in range(5):
            s.sendto(encode_clr(f"http://x.example/{i}", i), (GROUP, port))
        await until(lambda: stats.packets["good"] == 5)
    await until(lambda: stats.drops["overload"] == 5)
    assert stats.urls_accepted == 0


async def test_kernel_drops_are_counted(nursery):
    ingest = Recorder()
    stats, port = await start(nursery, listen(rcvbuf=4096), ingest)
    datagram = encode_clr("http://en.wikipedia.org/wiki/" + "x" * 200, 1)
    with sender() as s:
        # No checkpoint in this loop: the receiver cannot run, its small buffer overflows.
        for _ in range(500):
            s.sendto(datagram, (GROUP, port))
        await until(lambda: stats.packets["good"] + stats.drops["kernel"] == 500)
    assert stats.drops["kernel"] > 0
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as fresh:
        assert multicast.kernel_drops(fresh) == 0


async def test_rcvbuf_clamp_is_logged(nursery, caplog):
    caplog.set_level(logging.WARNING, "purged.multicast")
    await start(nursery, listen(rcvbuf=1 << 30), Recorder(), key="listen.multicast[2]")
    assert any("listen.multicast[2]: asked for SO_RCVBUF" in r.getMessage() for r in caplog.records)


async def test_bad_datagram_logging_is_rate_limited(nursery, caplog):
    caplog.set_level(logging.WARNING, "purged.multicast")
    stats, port = await start(nursery, listen(), Recorder())
    with sender() as s:
        for _ in range(50):
            s.sendto(b"garbage", (GROUP, port))
        await until(lambda: stats.packets["bad"] == 50)
    lines = [r.getMessage() for r in caplog.records if "dropping a datagram" in r.getMessage()]
    assert lines == ["dropping a datagram from 127.0.0.1: truncated: datagram of 7 bytes is shorter than 24"]


async def test_rate_limited_log_reports_suppressed(mock_clock, caplog):
    caplog.set_level(logging.WARNING, "t")
    limiter = multicast._RateLimitedLog(logging.getLogger("t"), interval=10)
    for _ in range(5):
        limiter.warning("x", "bad %s", "thing")
    limiter.warning("y", "other")
    mock_clock.jump(10.5)
    limiter.warning("x", "bad %s", "thing")
    assert [r.getMessage() for r in caplog.records] == [
        "bad thing",
        "other",
        "bad thing (4 more like this suppressed)",
    ]


def test_a_unicast_group_is_refused_naming_the_key():
    with pytest.raises(MulticastSetupError, match=r"^listen\.multicast\[3\]\.group: 192\.0\.2\.77 is not a multicast"):
        multicast.open_multicast_socket(listen(group="192.0.2.77"), "listen.multicast[3]")


def test_join_failure_names_the_key():
    with pytest.raises(MulticastSetupError, match=r"listen\.multicast\[1\]: cannot join 239\.255\.77\.1"):
        multicast.open_multicast_socket(listen(interface="10.254.254.254"), "listen.multicast[1]")
    with pytest.raises(MulticastSetupError, match=r"listen\.multicast\[1\]\.interface"):
        multicast.open_multicast_socket(listen(interface="nosuchif0"), "listen.multicast[1]")
    with pytest.raises(MulticastSetupError, match=r"listen\.multicast\[1\]\.group"):
        multicast.open_multicast_socket(listen(group="ff02::1"), "listen.multicast[1]")


async def test_bad_format_is_refused():
    with pytest.raises(MulticastSetupError, match=r"listen\.multicast\[0\]\.format"):
        await serve_multicast(listen(format="json"), Recorder(), MulticastStats(), key="listen.multicast[0]")


def test_statistics_keys_are_flat_and_documented():
    st = MulticastStats().statistics()
    assert all(isinstance(v, int) for v in st.values())
    for key in (
        "packets_good",
        "packets_bad",
        "packets_filtered",
        "bytes_read",
        "urls_accepted",
        "ingest_calls",
        "drops_malformed",
        "drops_source",
        "drops_overload",
        "drops_kernel",
        "drops_invalid_url",
        "rcvbuf_bytes",
        "loss_received",
        "loss_lost",
        "loss_duplicates",
        "loss_reordered",
        "loss_resets",
        "loss_sources",
        "loss_evicted",
    ):
        assert key in st
