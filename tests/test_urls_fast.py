"""``parse_urls_fast`` (a batch's URLs checked at once) answers exactly as ``parse_url`` per URL, or declines."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from purged.core.admission import URLRules, Validated, _one_by_one, validate_urls
from purged.core.errors import InvalidURL
from purged.core.http1 import PURGE_OVERHEAD
from purged.core.urls import parse_url, parse_urls_fast

prefixes = st.sampled_from(["https://", "http://", "//", "HTTP://", "ftp://", "", "https:/"])
hosts = st.text("ab9Z-._:[]@", max_size=8)
paths = st.text("az09/?#%:&= \n\x7f\u00e9@!~\"", max_size=8)
urls = st.builds(lambda p, h, q: p + h + q, prefixes, hosts, paths)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(urls, st.sampled_from(["https://en.wikipedia.org/wiki/A?b=c", "//x.org/"])), min_size=2,
                max_size=5))
def test_the_same_targets_as_one_url_at_a_time(batch):
    fast = parse_urls_fast(batch, 8192, 16000)
    if fast is not None:
        assert fast == [parse_url(u) for u in batch]
    checked = validate_urls(batch)
    expected = []
    for url in batch:
        try:
            expected.append(parse_url(url))
        except InvalidURL:
            pass
    assert checked.targets == expected


def test_common_batches_take_the_fast_path_and_limits_still_apply():
    batch = [f"https://en.wikipedia.org/wiki/P{i}?action=raw" for i in range(100)] + ["//upload.x.org"]
    assert parse_urls_fast(batch, 8192, 16000) == [u.partition("//")[2] for u in batch[:-1]] + ["upload.x.org/"]
    assert parse_urls_fast(batch, 40, 16000) is None  # a URL over max_length: one at a time, to reject it
    assert parse_urls_fast(batch, 8192, 20) is None  # a PURGE over max_request_bytes: likewise
    assert parse_urls_fast(batch + [None], 8192, 16000) is None
    assert parse_urls_fast(batch + ["https://a.org/x\ny"], 8192, 16000) is None


# Batches as they come: mostly one scheme and one host, a few others mixed in; hosts and paths near the edges
# of the fast form (labels ending in "-" or ".", a host over 253, a bare host, a fragment, a space, a newline).
one_host = st.sampled_from(["en.wikipedia.org", "a.b", "x-y.org", "x-.org", "-x.org", "a..b", "a.", ".a", "A.org",
                            "a_b.org", "a.org:80", "[::1]", "", "a" * 63 + ".org", ".".join(["a" * 63] * 4) + "b",
                            "\u00e9.org"])
one_path = st.text("az09/?%=&~!\"$;#@ \t\n\x7f", max_size=6).map(lambda p: "/" + p) | st.just("")
schemes = st.sampled_from(["https://", "http://", "//"])


@settings(max_examples=300, deadline=None)
@given(schemes, one_host, st.lists(one_path, min_size=2, max_size=6), st.lists(urls, max_size=2),
       st.integers(0, 6), st.sampled_from([(8192, 16000), (30, 16000), (8192, 12)]))
def test_one_scheme_one_host_batches_answer_as_parse_url(scheme, host, paths, others, at, limits):
    batch = [scheme + host + path for path in paths]
    batch[at % len(batch) : at % len(batch)] = others
    max_length, max_target = limits
    fast = parse_urls_fast(batch, max_length, max_target)
    if fast is None:
        return
    assert fast == [parse_url(u, max_length=max_length) for u in batch]
    assert max(map(len, fast)) <= max_target


def test_the_common_batch_takes_the_fast_path():
    for scheme in ("https://", "http://", "//"):
        batch = [f"{scheme}en.wikipedia.org/wiki/P{i}?action=raw" for i in range(50)]
        assert parse_urls_fast(batch, 8192, 16000) == [parse_url(u) for u in batch]
    mixed = ["https://a.org/1", "//b.org/2", "http://c.org", "https://a.org/3"]
    assert parse_urls_fast(mixed, 8192, 16000) == ["a.org/1", "b.org/2", "c.org/", "a.org/3"]
    assert parse_urls_fast(["https://a.org/1", "https://a.org/2#f"], 8192, 16000) is None
    assert parse_urls_fast(["https://a.org/1", "https://" + "a" * 254 + "/"], 8192, 16000) is None


def _url_by_url(batch, rules):
    expected = Validated()
    _one_by_one(batch, 0, rules, expected)
    return expected


# Near misses of the batch's own URLs: its hosts without a path, with a port, a dot or a label more.
near = st.builds(lambda s, k, tail: f"{s}h{k}.example.org{tail}", schemes, st.integers(0, 3),
                 st.sampled_from(["", "/", ":80/p", "./p", ".x/p", "x/p", "?q", "#f", "/a b"]))


@settings(max_examples=150, deadline=None)
@given(st.integers(2, 700), st.lists(st.tuples(st.integers(0, 10**6), urls | near | st.none()), max_size=4),
       st.integers(1, 10), schemes, st.sampled_from([URLRules(), URLRules(max_request_bytes=PURGE_OVERHEAD + 40),
                                                      URLRules(allow_bare_host=True)]))
def test_large_batches_with_a_few_odd_urls_validate_as_url_by_url(size, odd, n_hosts, scheme, rules):
    """Hosts alternate (a site's desktop and mobile hosts), some URLs are odd or bad: the batch, its chunks and
    each URL alone must give the same targets and the same rejections (index, reason, detail)."""
    batch = [f"{scheme}h{i % n_hosts}.example.org/wiki/P{i}?action=raw" for i in range(size)]
    for at, url in odd:
        batch[at % size] = url
    got = validate_urls(batch, rules)
    want = _url_by_url(batch, rules)
    assert (got.targets, got.rejected) == (want.targets, want.rejected)


def test_one_bad_url_in_a_large_batch_is_rejected_alone():
    batch = [f"https://h{i % 3}.org/p{i}" for i in range(1000)]
    batch[700] = "https://h1.org/a b"
    checked = validate_urls(batch)
    assert checked.targets == [u[8:] for i, u in enumerate(batch) if i != 700]
    assert [(r["index"], r["reason"]) for r in checked.rejected] == [(700, "control_char")]
    assert parse_urls_fast(batch[:2] + [f"https://h{i}.org/" for i in range(20)], 8192, 16000) is not None
