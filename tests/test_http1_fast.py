"""Differential test: ``FastResponseParser`` (llhttp in front) against the hand ``ResponseParser``.

The streams are the h11 differential test's (valid pipelines, truncated ones, broken ones) plus arbitrary bytes,
split at random points. Both parsers must return the same responses and end the same way (idle, partial,
closed, EOF, or the same error ``reason``), except for the few documented inputs where llhttp streams what the
hand parser buffers (see ``purged/core/http1_fast.py`` and the pins in ``tests/test_http1.py``); those never
occur here, as the generated heads are small and Content-Length values short.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_http1_h11 import broken_response, cuts, response, split, streams

from purged.core.http1 import ProtocolError, Response, ResponseParser
from purged.core.http1_fast import FastResponseParser

SETTINGS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _feed(parser, chunk: bytes) -> list[Response]:
    return parser.feed(chunk)


def _feed_statuses(parser, chunk: bytes) -> list[Response]:
    """``feed_statuses``, the sender's call, as responses: (status, keep-alive) rebuilt from ``closed``."""
    statuses = parser.feed_statuses(chunk)
    closes = [False] * len(statuses)
    if statuses and parser.closed:
        closes[-1] = True
    return [Response(status, not close) for status, close in zip(statuses, closes, strict=True)]


def outcome(cls, chunks: list[bytes], eof: bool, feed=_feed) -> tuple:
    parser = cls()
    responses = []
    try:
        for chunk in chunks:
            responses += feed(parser, chunk)
        if eof:
            responses += parser.feed_eof()
    except ProtocolError as exc:
        return responses, "error", exc.reason
    return responses, "eof" if eof else "open", parser.idle


def agree(chunks: list[bytes], eof: bool) -> None:
    hand = outcome(ResponseParser, chunks, eof)
    assert outcome(FastResponseParser, chunks, eof) == hand
    assert outcome(FastResponseParser, chunks, eof, _feed_statuses) == hand


@SETTINGS
@given(streams(), cuts, st.booleans(), st.integers(0, 2000))
def test_valid_and_truncated_streams(stream, cut_at, eof, keep):
    data = stream[0]
    agree(split(data, cut_at), eof)
    agree(split(data[:keep], cut_at), eof)


@SETTINGS
@given(st.lists(response(last=False), max_size=3), broken_response(), st.binary(max_size=20), cuts)
def test_broken_streams(prefix, broken, suffix, cut_at):
    chunks = split(b"".join(prefix) + broken + suffix, cut_at)
    agree(chunks, True)
    agree(chunks, False)


@SETTINGS
@given(st.binary(max_size=300), cuts, st.booleans())
def test_any_bytes(data, cut_at, eof):
    agree(split(b"HTTP/1.1 " + data, cut_at), eof)
    if not data.startswith((b"\r", b"\n")):  # llhttp skips empty lines before a status line: pinned below
        agree(split(data, cut_at), eof)


def test_an_error_held_back_in_a_replay_is_raised_when_the_answers_before_it_were_returned_earlier():
    # Found by test_broken_streams: the replay's hand parser holds the bad status line's error back for the
    # answers before it, which an earlier read already returned; the hand parser alone raises it in this read.
    data = (b"HTTP/1.1 100\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length:0\r\n\r\n"
            b"HTTP/1.1 20 OK\r\nContent-Length: 0\r\n\r\n")
    cut = data.index(b" 20 ") + 3
    agree([data[:cut], data[cut:]], False)
    agree([data[:cut], data[cut:]], True)


def test_difference_empty_lines_before_a_status_line_are_skipped():
    one = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
    assert FastResponseParser().feed(b"\r\n" + one) == [ResponseParser().feed(one)[0]]


def test_a_varnish_pipeline_stays_on_the_fast_path():
    one = (b"HTTP/1.1 200 Purged\r\nServer: Varnish\r\nContent-Length: 5\r\nConnection: keep-alive\r\n\r\nhello")
    data = one * 300
    parser = FastResponseParser()
    out = []
    for i in range(0, len(data), 977):  # reads that end inside responses
        out += parser.feed(data[i : i + 977])
    assert len(out) == 300 and parser.idle and parser._slow is None
    parser = FastResponseParser()
    statuses = []
    for i in range(0, len(data), 977):
        statuses += parser.feed_statuses(data[i : i + 977])
    assert statuses == [200] * 300 and parser.idle and parser._slow is None and not parser.closed


def test_feed_statuses_reports_the_closing_answer_after_a_hand_over():
    one = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
    close = b"HTTP/1.1 503 Busy\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    parser = FastResponseParser()
    assert parser.feed_statuses(one * 2) == [200, 200] and not parser.closed
    assert parser.feed_statuses(one + close) == [200, 503] and parser.closed  # the hand parser frames the close
    assert parser.feed_statuses(one) == []  # nothing follows a closing answer


def test_control_characters_in_a_reason_phrase_go_to_the_hand_parser():
    good = b"HTTP/1.1 200 Fine Reason\r\nContent-Length: 0\r\n\r\n"
    bad = b"HTTP/1.1 200 Bad\x01Reason\r\nContent-Length: 0\r\n\r\n"
    parser = FastResponseParser()
    assert parser.feed_statuses(good * 2) == [200, 200]  # learnt as clean: later reads check it in one set op
    assert parser.feed_statuses(good) == [200] and parser._slow is None
    assert parser.feed_statuses(good + bad) == [200]  # the answer before the bad one, then the error
    with pytest.raises(ProtocolError) as info:
        parser.feed_statuses(good)
    assert info.value.reason == "bad_status_line"


def test_past_the_replay_bound_an_llhttp_error_is_final_and_asks_for_the_hand_parser(monkeypatch):
    from purged.core import http1_fast

    monkeypatch.setattr(http1_fast, "_RETAIN_MAX", 100)
    one = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
    parser = FastResponseParser()
    assert len(parser.feed(one * 3 + one[:10])) == 3  # ends inside an answer: the bytes are kept...
    assert len(parser.feed(one[10:] + one * 3 + one[:10])) == 4  # ...until past the bound
    with pytest.raises(ProtocolError) as info:
        parser.feed(one[10:20] + b"\x00garbage\r\n\r\n")
    assert info.value.reason == "bad_header" and parser.needs_hand_parser
    with pytest.raises(ProtocolError):
        parser.feed(one)  # broken for good, like the hand parser after an error


def test_past_the_replay_bound_an_answer_for_the_hand_parser_is_final_too(monkeypatch):
    from purged.core import http1_fast

    monkeypatch.setattr(http1_fast, "_RETAIN_MAX", 100)
    one = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
    close = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    for odd in (close, close.replace(b"1.1", b"1.0"), b"HTTP/1.1 099 X\r\nContent-Length: 0\r\n\r\n"):
        parser = FastResponseParser()
        parser.feed(one * 3 + one[:10])
        parser.feed(one[10:] + one * 3 + one[:10])  # past the bound: nothing kept
        with pytest.raises(ProtocolError) as info:
            parser.feed(one[10:] + one + odd + one)
        assert info.value.reason == "bad_header" and parser.needs_hand_parser


@SETTINGS
@given(streams(), cuts, st.booleans())
def test_the_answer_counts_emptied_inside_responses(stream, cut_at, eof):
    # The lists counting answers begun and heads complete are emptied when a read ends inside a response and
    # they hold more than _COUNTS_MAX: with a bound of 1 that is nearly every read.
    from purged.core import http1_fast

    bound = http1_fast._COUNTS_MAX
    http1_fast._COUNTS_MAX = 1
    try:
        agree(split(stream[0], cut_at), eof)
    finally:
        http1_fast._COUNTS_MAX = bound


def test_answer_counts_stay_bounded_when_no_read_ends_between_answers(monkeypatch):
    from purged.core import http1_fast

    monkeypatch.setattr(http1_fast, "_COUNTS_MAX", 50)
    one = b"HTTP/1.1 200 Purged\r\nContent-Length: 5\r\n\r\nhello"
    data = (b"HTTP/1.1 100 Continue\r\n\r\n" + one) * 300
    parser = FastResponseParser()
    statuses = []
    head = data[:-10]
    for i in range(0, len(head), 97):  # 97 and the 72-byte pair are coprime: most reads end inside answers
        statuses += parser.feed_statuses(head[i : i + 97])
        assert len(parser._begins) <= 52 and len(parser._heads) <= 51
    assert not parser.idle
    statuses += parser.feed_statuses(data[-10:])
    assert statuses == [200] * 300 and parser.idle and parser._slow is None


def test_one_bad_reason_phrase_throughout_a_read_goes_to_the_hand_parser():
    bad = b"HTTP/1.1 200 Bad\x7fReason\r\nContent-Length: 0\r\n\r\n"
    good = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
    for chunks in ([bad * 3], [good * 2, bad * 3], [good * 2 + bad, bad * 2]):
        agree(chunks, False)
        agree(chunks, True)


def test_difference_rtsp_and_ice_status_lines_read_as_http11():
    for protocol in (b"RTSP", b"ICE"):
        answer = protocol + b"/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
        assert FastResponseParser().feed_statuses(answer) == [200]  # llhttp's version getter says "1.1"
        with pytest.raises(ProtocolError):
            ResponseParser().feed(answer)
        other = protocol + b"/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n"
        agree([other], False)  # any other version goes to the hand parser, which refuses it
