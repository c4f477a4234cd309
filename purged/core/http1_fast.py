"""Core layer (sans-IO): the fast response parser of the PURGE hot path, llhttp in front of the hand parser.

``FastResponseParser`` has the contract of :class:`purged.core.http1.ResponseParser` (the same responses and
errors, however the reads split) at about a third of its CPU on the common stream: HTTP/1.1 keep-alive answers
framed by ``Content-Length``, as Varnish and ATS send them. llhttp (C, through ``httptools``, the bindings
uvicorn uses) frames those with four small Python callbacks per answer instead of two regexes and a dozen
bytes operations.

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
first chunk rather than at the head.
"""

from __future__ import annotations

import re

from httptools import HttpParserError, HttpParserUpgrade, HttpResponseParser

from .http1 import _RESPONSES, DEFAULT_MAX_HEADER_SIZE, ProtocolError, Response, ResponseParser, _response

__all__ = ["FastResponseParser"]

_BAD_REASON = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]").search
_RETAIN_MAX = 4 << 20  # bytes kept for a replay; past it, none until a read ends between responses again


class _Diverted(Exception):
    """Raised inside an llhttp callback: stop fast parsing, the hand parser takes over."""


class FastResponseParser:
    """llhttp on the plain path, :class:`ResponseParser` for everything else (see the module docstring).

    ``needs_hand_parser`` becomes True when llhttp refused a stream it could not replay through the hand
    parser (no read ended between responses for ``_RETAIN_MAX`` bytes): the error raised is then llhttp's,
    and the sender uses the hand parser for that node from then on.
    """

    __slots__ = ("max_header_size", "needs_hand_parser", "_ll", "_slow", "_kept", "_since", "_out", "_open",
                 "_tail", "_completed", "_status")

    def __init__(self, *, max_header_size: int = DEFAULT_MAX_HEADER_SIZE) -> None:
        self.max_header_size = max_header_size
        self.needs_hand_parser = False
        self._ll = HttpResponseParser(self)
        # BWS before a chunk extension's ";" (RFC 9112 §7.1.1), which the hand parser accepts too.
        self._ll.set_dangerous_leniencies(lenient_spaces_after_chunk_size=True)
        self._slow: ResponseParser | None = None  # once set, it parses everything
        self._kept: bytearray | None = bytearray()  # bytes since the last read that ended between responses
        self._since = 0  # responses returned since then
        self._out: list[Response] = []
        self._open = False  # a response has begun and not completed
        self._completed = 0  # responses (interim ones too) completed since the kept bytes began
        self._status = 0  # of the open response
        self._tail = 0  # bytes after the last CRLFCRLF, while a response is open: bounds its head's size

    @property
    def idle(self) -> bool:
        if self._slow is not None:
            return self._slow.idle
        return not self._open

    # llhttp callbacks: the only Python code run per response on the fast path.

    def on_message_begin(self) -> None:
        self._open = True

    def on_status(self, reason: bytes) -> None:
        # llhttp lets control characters through in a reason phrase; the hand parser does not.
        if _BAD_REASON(reason) is not None:
            raise _Diverted

    def on_headers_complete(self) -> None:
        ll = self._ll
        status = self._status = ll.get_status_code()
        if status < 100 or status == 101 or not ll.should_keep_alive() or ll.get_http_version() != "1.1":
            # The hand parser frames closing responses, odd statuses and HTTP/1.0 (whose keep-alive llhttp
            # reads differently when both tokens are present) its own way.
            raise _Diverted

    def on_chunk_header(self) -> None:
        raise _Diverted  # chunked framing (rare on PURGE answers) has rules llhttp applies differently

    def on_message_complete(self) -> None:
        self._open = False
        self._completed += 1
        status = self._status
        if status >= 200:  # not an interim response (100 Continue, 103 Early Hints)
            response = _RESPONSES.get(status)
            self._out.append(response if response is not None else _response(status, True))

    def feed(self, data: bytes) -> list[Response]:
        if self._slow is not None:
            return self._slow.feed(data)
        out = self._out = []
        try:
            self._ll.feed_data(data)
        except (HttpParserError, HttpParserUpgrade) as exc:  # _Diverted comes back as a callback error
            return self._divert(data, exc)
        kept = self._kept
        if not self._open:
            if kept is None:
                self._kept = bytearray()  # this read ended between responses: nothing before it is replayed
            elif kept:
                kept.clear()
            self._since = self._completed = 0
            return out
        if kept is not None:
            if len(kept) + len(data) <= _RETAIN_MAX:
                kept += data
                self._since += len(out)
                # The open response began where the kept bytes begin: refuse garbage as early as the hand
                # parser does (before a blank line arrives).
                if not self._completed and kept[:7] != b"HTTP/1."[: len(kept)]:
                    return out + self._divert(b"", None)
            else:
                self._kept = None
        # An open head has no CRLFCRLF yet, so it started after the last one: that bounds its size.
        i = data.rfind(b"\r\n\r\n")
        self._tail = len(data) - i - 4 if i >= 0 else self._tail + len(data)
        if self._tail > self.max_header_size:
            return out + self._divert(b"", None)  # the kept bytes hold this read: out is skipped
        return out

    def feed_eof(self) -> list[Response]:
        if self._slow is None:
            if not self._open:
                self._slow = ResponseParser()  # between responses: a clean end, and it stays ended
                self._slow.feed_eof()
                return []
            out = self._divert(b"", None)  # a read-until-close body ends here, or the response is truncated
            return out + self._slow.feed_eof()  # type: ignore[union-attr]
        return self._slow.feed_eof()

    def _divert(self, data: bytes, exc: Exception | None) -> list[Response]:
        """Hand over to the hand parser: replay the kept bytes and ``data``, drop the responses already
        returned since the kept bytes began, return the rest."""
        slow = self._slow = ResponseParser(max_header_size=self.max_header_size)
        kept, skip = self._kept, self._since
        self._kept, self._out = None, []
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
        return responses[skip:]
