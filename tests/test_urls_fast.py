"""``parse_urls_fast`` (a batch's URLs checked at once) answers exactly as ``parse_url`` per URL, or declines."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from purged.core.admission import validate_urls
from purged.core.errors import InvalidURL
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
