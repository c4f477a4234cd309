"""Core layer (sans-IO): the fast response parser of the PURGE hot path, llhttp in front of the hand parser.

``FastResponseParser`` has the contract of :class:`purged.core.http1.ResponseParser` (the same responses and
errors, however the reads split) at about a third of its CPU on the common stream: HTTP/1.1 keep-alive answers
framed by ``Content-Length``, as Varnish and ATS send them. llhttp (C, through ``httptools``, the bindings
uvicorn uses) frames those with one Python step per answer (``on_message_complete``, a generator resumed:
status, keep-alive, version) instead of two regexes and a dozen bytes operations; its other callbacks are C
callables (Nones appended to two lists that count the answers begun and the heads complete, a list the reason
phrases go to, checked once per read), and :meth:`FastResponseParser.feed_statuses` hands the sender plain
ints. (That Python step is cheap next to what it calls: ``get_http_version()`` formats a new string per
answer, a quarter of the parse, and httptools has no other way to the version. A chain of C iterators in its
place, ``map``/``zip`` over the getters, costs more, not less: see docs/benchmarks.md, issue 15, parser.)

llhttp is not the authority, the hand parser is. llhttp differs from it on rare inputs (it refuses a repeated
``Content-Length`` even with the same value, ``HTTP/1.2``, chunk extensions that are not tokens; it cannot be
told about EOF, so it cannot end a read-until-close body). So the fast path only ever *accepts* the plain
case, and hands the connection to a :class:`ResponseParser` (which then decides everything, for the rest of
the connection) as soon as anything else shows: an llhttp error, an upgrade, an answer that ends the
connection, HTTP/1.0, chunked framing, a status below 100, a control character in a reason phrase, EOF
inside an answer, an open head longer than ``max_header_size``. For that it keeps the bytes since the last
read that ended between answers (the usual case with large reads: the edge writes whole answers) and how many
answers it returned since; the hand parser replays them and the answers already given are skipped.

Where llhttp accepts what the hand parser would refuse (pinned in tests/test_http1.py and
tests/test_http1_fast.py; none changes how an accepted answer is framed): empty lines before a status line
are skipped; a ``Content-Length`` of 19 or 20 digits below 2**64 is a length; a head or chunk-size line that
arrives whole in one read is not held to ``max_header_size`` (llhttp does not buffer it, so memory stays
bounded by the read; across reads the limit holds); ``Transfer-Encoding: chunked, chunked`` is refused at the
first chunk rather than at the head; a status line that begins ``RTSP/1.1`` or ``ICE/1.1`` is read as HTTP/1.1
(llhttp takes those protocols, and its version getter cannot tell them from HTTP; other versions of them go
to the hand parser, which refuses them; searching each read for them would cost more than the parse).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from functools import partial

from httptools import HttpParserError, HttpParserUpgrade, HttpResponseParser

from .http1 import _RESPONSES, DEFAULT_MAX_HEADER_SIZE, ProtocolError, Response, ResponseParser, _response

__all__ = ["FastResponseParser"]

_BAD_REASON = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]").search
_GOOD_REASONS: set[bytes] = set()  # reason phrases seen clean: a read's are checked with one lookup or issuperset
_GOOD_REASONS_MAX = 256
_RETAIN_MAX = 4 << 20  # bytes kept for a replay; past it, none until a read ends between responses again
_COUNTS_MAX = 4096  # answers counted in the two lists before they are emptied while a response is open


class _Diverted(Exception):
    """Raised inside an llhttp callback: stop fast parsing, the hand parser takes over."""


class FastResponseParser:
    """llhttp on the plain path, :class:`ResponseParser` for everything else (see the module docstring).

    ``needs_hand_parser`` becomes True when llhttp refused a stream it could not replay through the hand
    parser (no read ended between responses for ``_RETAIN_MAX`` bytes): the error raised is then llhttp's,
    and the sender uses the hand parser for that node from then on.

    :meth:`feed_statuses` is :meth:`feed` for the sender's hot path: the status codes as ints.
    """

    __slots__ = ("max_header_size", "needs_hand_parser", "closed", "on_message_begin", "on_status",
                 "on_headers_complete", "on_message_complete", "_heads", "_ll",
                 "_slow", "_kept", "_since", "_statuses", "_add", "_reasons", "_begins", "_base", "_ended",
                 "_mark", "_tail", "_status_code", "_keep_alive", "_version", "_slow_out")

    def __init__(self, *, max_header_size: int = DEFAULT_MAX_HEADER_SIZE) -> None:
        self.max_header_size = max_header_size
        self.needs_hand_parser = False
        self.closed = False  # the last answer returned ends the connection (only after the hand parser took over)
        # Three of the four callbacks llhttp makes per answer are C callables, not Python functions: the answers
        # begun and the heads complete are counted as Nones appended to lists (partial(list.append, None) is
        # cheaper to call than count().__next__, a method-wrapper), and the reason phrases go to a list
        # (checked once per read).
        self._begins: list[None] = []
        self._heads: list[None] = []
        self._base = 0  # answers begun (and heads complete) before the two lists were last emptied
        self.on_message_begin = partial(self._begins.append, None)
        self.on_headers_complete = partial(self._heads.append, None)
        self._reasons: list[bytes] = []
        self.on_status = self._reasons.append
        # The fourth, per completed answer, resumes a generator: cheaper than calling a function (no new frame).
        completions = self._completions()
        next(completions)
        self.on_message_complete = completions.__next__
        self._ll = HttpResponseParser(self)
        # BWS before a chunk extension's ";" (RFC 9112 §7.1.1), which the hand parser accepts too.
        self._ll.set_dangerous_leniencies(lenient_spaces_after_chunk_size=True)
        self._status_code = self._ll.get_status_code
        self._keep_alive = self._ll.should_keep_alive
        self._version = self._ll.get_http_version
        self._statuses: list[int] = []  # of the final answers completed in this read
        self._add = self._statuses.append
        self._slow: ResponseParser | None = None  # once set, it parses everything
        self._kept: bytearray | None = bytearray()  # bytes since the last read that ended between responses
        self._since = 0  # responses returned since then
        self._ended = 0  # responses completed (interim ones too), ever
        self._mark = 0  # _ended when the kept bytes began
        self._tail = 0  # bytes after the last CRLFCRLF, while a response is open: bounds its head's size
        self._slow_out: list[Response] = []  # what the hand parser returned last

    @property
    def idle(self) -> bool:
        if self._slow is not None:
            return self._slow.idle
        return not self._peek_open()

    def _peek_open(self) -> bool:
        try:
            return self._open()
        except _Diverted:
            return True

    def _open(self) -> bool:
        """A response has begun and not completed. (Its head too: then it must be one llhttp may frame.)"""
        base = self._base
        heads = base + len(self._heads)
        if base + len(self._begins) <= self._ended:
            return False
        if heads > self._ended:
            status = self._status_code()
            if status < 100 or status == 101 or not self._keep_alive():
                # The hand parser frames closing responses and odd statuses its own way.
                raise _Diverted
        return True

    def _completions(self) -> Iterator[None]:
        """``on_message_complete``: the only Python code run per response on the fast path (after a _Diverted
        it raised, the generator is done, and so is llhttp for this connection)."""
        yield
        status_code, keep_alive, version = self._status_code, self._keep_alive, self._version
        while True:
            status = status_code()
            if status >= 200 and keep_alive() and version() == "1.1":
                self._add(status)
            else:
                self._interim(status)
            yield

    def _interim(self, status: int) -> None:
        if status < 100 or status == 101 or status >= 200 or not self._keep_alive() or self._version() != "1.1":
            # The hand parser frames closing responses and odd statuses its own way, and HTTP/1.0 (whose
            # keep-alive llhttp reads differently when both tokens are present; it also takes 0.9 and 2.0).
            raise _Diverted
        self._ended += 1  # an interim response (100 Continue, 103 Early Hints): the final one follows

    def on_chunk_header(self) -> None:
        raise _Diverted  # chunked framing (rare on PURGE answers) has rules llhttp applies differently

    def feed(self, data: bytes) -> list[Response]:
        if self._slow is not None:
            return self._slow.feed(data)
        statuses = self.feed_statuses(data)
        if self._slow is None:
            return [_RESPONSES.get(status) or _response(status, True) for status in statuses]
        # Handed over in this read: the answers before the hand-over were plain keep-alive ones.
        fast = len(statuses) - len(self._slow_out)
        return [_response(status, True) for status in statuses[:fast]] + self._slow_out

    def feed_statuses(self, data: bytes) -> list[int]:
        """The status codes of the responses ``data`` completed, in order. After the hand parser took over,
        ``closed`` says whether the last of them ends the connection."""
        if self._slow is not None:
            return self._hand(self._slow.feed(data))
        try:
            self._ll.feed_data(data)
        except (HttpParserError, HttpParserUpgrade) as exc:  # _Diverted comes back as a callback error
            return self._divert(data, exc)
        statuses = self._statuses
        n = len(statuses)
        if n:
            self._statuses = out = []
            self._add = out.append
            self._ended += n
        reasons = self._reasons
        if reasons:
            # llhttp lets control characters through in a reason phrase; the hand parser does not.
            # Mostly one phrase ("Purged") per read: a list.count of equal bytes is cheaper than hashing each.
            if reasons.count(reasons[0]) == len(reasons):
                if reasons[0] not in _GOOD_REASONS and not _learn_reasons(reasons[:1]):
                    return self._divert(data, None)
            elif not _GOOD_REASONS.issuperset(reasons) and not _learn_reasons(reasons):
                return self._divert(data, None)
            reasons.clear()
        kept = self._kept
        if self._base + len(self._begins) <= self._ended:  # _open() inline: the usual read ends between answers
            is_open = False
        else:
            try:
                is_open = self._open()
            except _Diverted:
                return self._divert(data, None)
        if not is_open:
            if kept is None:
                self._kept = bytearray()  # this read ended between responses: nothing before it is replayed
            elif kept:
                kept.clear()
            self._since = 0
            self._mark = self._base = self._ended
            self._begins.clear()
            self._heads.clear()
            return statuses
        heads = self._heads
        if len(heads) > _COUNTS_MAX:  # reads keep ending inside responses: drop what the counts no longer need
            self._base += len(heads)
            del self._begins[: len(heads)]
            heads.clear()
        if kept is not None:
            if len(kept) + len(data) <= _RETAIN_MAX:
                kept += data
                self._since += n
                # The open response began where the kept bytes begin: refuse garbage as early as the hand
                # parser does (before a blank line arrives).
                if self._ended == self._mark and kept[:7] != b"HTTP/1."[: len(kept)]:
                    return statuses + self._divert(b"", None)
            else:
                self._kept = None
        # An open head has no CRLFCRLF yet, so it started after the last one: that bounds its size.
        i = data.rfind(b"\r\n\r\n")
        self._tail = len(data) - i - 4 if i >= 0 else self._tail + len(data)
        if self._tail > self.max_header_size:
            return statuses + self._divert(b"", None)  # the kept bytes hold this read: statuses are skipped
        return statuses

    def feed_eof(self) -> list[Response]:
        if self._slow is None:
            if not self._peek_open():
                self._slow = ResponseParser()  # between responses: a clean end, and it stays ended
                self._slow.feed_eof()
                return []
            self._divert(b"", None)  # a read-until-close body ends here, or the response is truncated
            out = self._slow_out
            return out + self._slow.feed_eof()  # type: ignore[union-attr]
        return self._slow.feed_eof()

    def _hand(self, responses: list[Response]) -> list[int]:
        self._slow_out = responses
        self.closed = bool(responses) and not responses[-1].keep_alive
        return [response.status for response in responses]

    def _divert(self, data: bytes, exc: Exception | None) -> list[int]:
        """Hand over to the hand parser: replay the kept bytes and ``data``, drop the responses already
        returned since the kept bytes began, return the rest."""
        slow = self._slow = ResponseParser(max_header_size=self.max_header_size)
        kept, skip = self._kept, self._since
        self._kept = None
        self._statuses, self._reasons = [], []
        if kept is None:
            self.needs_hand_parser = True
            detail = str(exc.args[0] if exc is not None and exc.args else "response too large to replay")
            error = ProtocolError(f"llhttp: {detail}", reason="bad_header")
            slow._error = error  # the connection is unusable from here on, like the hand parser's own errors
            raise error
        kept += data
        responses = slow.feed(bytes(kept))  # may raise: then nothing was returned since the kept bytes began
        if len(responses) < skip:
            error = ProtocolError("the hand parser refused a response llhttp accepted", reason="bad_header")
            slow._error = error
            raise error
        if len(responses) == skip and slow._error is not None:
            # The hand parser held the error back for the answers before it, but those were returned by
            # earlier reads: alone, it would raise it now.
            raise slow._error
        return self._hand(responses[skip:])


def _learn_reasons(reasons: list[bytes]) -> bool:
    """Whether the reason phrases are clean; the clean ones are remembered (a bounded few)."""
    for reason in reasons:
        if _BAD_REASON(reason) is not None:
            return False
    if len(_GOOD_REASONS) < _GOOD_REASONS_MAX:
        _GOOD_REASONS.update(reasons)
    return True
