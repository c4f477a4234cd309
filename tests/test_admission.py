"""Admission, the one path into the engine: each rule once, in order, with explicit ``now``."""

import pytest

from purged.core.admission import Admission, Refused, URLRules, validate_urls
from purged.core.engine import Engine
from purged.core.topology import DatacenterSpec, TierSpec, Topology


def engine():
    return Engine(Topology([DatacenterSpec("dc", (), (TierSpec("t", 0.0, ("n1",)),))]), now=0.0)


def test_a_url_whose_purge_request_passes_max_request_bytes_is_rejected_alone():
    """Issue 11 #1: 4000 x "€" is under max_url_length but ~36 KB percent-encoded, past Varnish's 32 KB."""
    poison = "http://x.example/" + "€" * 4000
    checked = validate_urls(["http://x.example/ok", poison], URLRules(max_length=8192, max_request_bytes=16384))
    assert checked.targets == ["x.example/ok"]
    assert [(r["index"], r["reason"]) for r in checked.rejected] == [(1, "request_too_large")]
    assert "16384" in checked.rejected[0]["detail"]
    # The limit is on the PURGE request's bytes, exactly.
    from purged.core.http1 import encode_purge
    from purged.core.urls import split_target

    target = "x.example/" + "a" * 100
    size = len(encode_purge(*split_target(target)))
    assert validate_urls(["http://" + target], URLRules(max_request_bytes=size)).targets == [target]
    assert not validate_urls(["http://" + target], URLRules(max_request_bytes=size - 1)).targets


def test_rejections_are_per_url_and_counted_by_reason():
    e = engine()
    admitted = Admission(e).admit(["http://h/a", "ftp://h/b", None], source="http", now=0.0)
    assert admitted.receipt.accepted == 1
    assert [r["reason"] for r in admitted.rejected] == ["bad_scheme", "missing_url"]
    assert e.sources["http"].rejected == {"bad_scheme": 1, "missing_url": 1}
    nothing = Admission(e).admit(["nope"], source="http", now=0.0)
    assert nothing.receipt is None and nothing.rejected[0]["reason"] == "bad_scheme"


def test_bare_hosts_only_where_asked():
    a = Admission(engine())
    assert a.admit(["test.com"], source="m", now=0.0, bare_host=True).receipt.accepted == 1
    assert a.admit(["test.com"], source="http", now=0.0).receipt is None


def test_journal_error_refuses_with_503_before_any_bucket_is_charged():
    e = engine()
    a = Admission(e, client_rate=10, client_burst=10)
    with pytest.raises(Refused) as refused:
        a.admit(["http://h/a"], source="http", client="10.0.0.1", now=0.0, journal_error="disk_full")
    assert (refused.value.status, refused.value.reason) == (503, "disk_full")
    assert refused.value.retry_after > 0
    assert e.sources["http"].rejected == {"disk_full": 1}
    # The bucket was not charged: a full burst still passes.
    a.admit([f"http://h/{i}" for i in range(10)], source="http", client="10.0.0.1", now=0.0)


def test_client_bucket_slows_big_batches_and_says_when_to_retry():
    a = Admission(engine(), client_rate=100, client_burst=50)
    a.admit([f"http://h/{i}" for i in range(200)], source="http", client="c", now=0.0)  # full bucket: passes, in debt
    with pytest.raises(Refused) as refused:
        a.admit(["http://h/x"], source="http", client="c", now=0.5)
    assert refused.value.reason == "rate_limited" and refused.value.retry_after >= 1
    a.admit(["http://h/x"], source="http", client="other", now=0.5)  # per client
    a.admit(["http://h/x"], source="http", client="c", now=2.0)  # paid back


def test_source_bucket_drops_what_a_multicast_group_sends_over_its_rate():
    e = engine()
    a = Admission(e)
    a.limit_source("multicast:g", 10, 5, 0.0)
    a.admit(["http://h/1", "http://h/2", "http://h/3"], source="multicast:g", now=0.0)
    with pytest.raises(Refused) as refused:
        a.admit(["http://h/4", "http://h/5", "http://h/6"], source="multicast:g", now=0.0)
    assert refused.value.reason == "rate_limited"
    assert e.sources["multicast:g"].rejected == {"rate_limited": 3}
    a.admit(["http://h/4"], source="other", now=0.0)  # other sources are not limited
