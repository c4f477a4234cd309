"""Core layer (sans-IO): the HTTP/1.1 wire format of the pipelined PURGE hot path.

``encode_purge`` builds one request; ``ResponseParser`` turns the bytes of one connection into the responses it
carries, in order, however the reads split them. No sockets, no clock: the sender (``purged.net``) owns the I/O
and matches the n-th response to the n-th request it wrote. h11 would do, at a tenth of the rate: on this machine
class it frames ~10k Varnish purge answers/s, this parser ~100-200k/s (DESIGN §2).

Every request on such a connection is a PURGE, never HEAD, so every final response other than 204/304 has the
body its framing headers announce.
"""

from __future__ import annotations

import re
from itertools import repeat
from operator import itemgetter
from typing import NamedTuple

from .errors import InvalidURL, PurgedError

__all__ = [
    "DEFAULT_MAX_HEADER_SIZE", "ProtocolError", "Response", "ResponseParser", "encode_purge", "encode_purges",
]

DEFAULT_MAX_HEADER_SIZE = 64 * 1024
_MAX_CHUNK_LINE = 4096  # size + extensions; ours never carry any, but a peer may


class ProtocolError(PurgedError):
    """The peer sent bytes that are not a valid HTTP/1.1 response stream; the connection is unusable.

    ``reason`` is one of ``bad_status_line``, ``bad_header``, ``headers_too_large``, ``bad_content_length``,
    ``bad_transfer_encoding``, ``bad_chunk``, ``unexpected_upgrade``, ``truncated``.
    """

    reason = "protocol_error"
    status = 502


class Response(NamedTuple):
    status: int
    keep_alive: bool  # False: no further response will follow on this connection


_RESPONSES: dict[int, Response] = {}


def _response(status: int, keep_alive: bool) -> Response:
    # Responses are immutable and few distinct ones exist; sharing them saves a NamedTuple construction each.
    key = status if keep_alive else -status
    response = _RESPONSES.get(key)
    if response is None:
        response = _RESPONSES[key] = Response(status, keep_alive)
    return response


def encode_purge(host: str, path: str) -> bytes:
    """The bytes of ``PURGE path`` for ``host``. Both were validated upstream; CR/LF still never pass."""
    # A CR or LF here would let one URL smuggle a second request into the pipeline, so check even so.
    if "\r" in host or "\n" in host or "\r" in path or "\n" in path:
        raise InvalidURL("CR or LF in a PURGE target", reason="control_char")
    try:
        return f"PURGE {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: purged\r\n\r\n".encode("ascii")
    except UnicodeEncodeError:
        raise InvalidURL("non-ASCII PURGE target", reason="not_ascii") from None


# encode_purges' pieces: a request is "PURGE " path _AFTER_PATH host _AFTER_HOST.
_AFTER_PATH = " HTTP/1.1\r\nHost: "
_AFTER_HOST = "\r\nUser-Agent: purged\r\n\r\n"
_BETWEEN = _AFTER_HOST + "PURGE /"  # from one request's Host value to the next one's path


def encode_purges(targets: list[str] | tuple[str, ...]) -> bytes:
    """The bytes of one PURGE per ``host + path`` target, back to back (a pipelined batch): the same bytes as
    :func:`encode_purge` for each, joined.

    C-level string operations over the whole batch, no Python code per target: when the targets share the
    first one's host (as a window usually does), one ``replace`` over the joined targets; otherwise a ``map``
    of ``str.partition`` and the parts interleaved by slice assignment.
    """
    n = len(targets)
    if not n:
        return b""
    joined = "\n".join(targets)
    if "\r" in joined or joined.count("\n") != n - 1:
        raise InvalidURL("CR or LF in a PURGE target", reason="control_char")
    host, slash, _ = targets[0].partition("/")
    if slash and joined.count("\n" + host + "/") == n - 1:
        # Each "\n" is a separator (no target holds one), so every target after the first starts with host/.
        text = joined.replace("\n" + host + "/", _AFTER_PATH + host + _BETWEEN)
        text = f"PURGE {text[len(host):]}{_AFTER_PATH}{host}{_AFTER_HOST}"
    else:
        split = list(map(str.partition, targets, repeat("/", n)))
        if not all(map(itemgetter(1), split)):
            raise InvalidURL("a PURGE target without a path", reason="bad_url")
        parts = [_BETWEEN] * (4 * n)
        parts[0::4] = map(itemgetter(2), split)
        parts[1::4] = repeat(_AFTER_PATH, n)
        parts[2::4] = map(itemgetter(0), split)
        parts[-1] = _AFTER_HOST
        text = "PURGE /" + "".join(parts)
    try:
        return text.encode("ascii")
    except UnicodeEncodeError:
        raise InvalidURL("non-ASCII PURGE target", reason="not_ascii") from None


PURGE_OVERHEAD = len(encode_purge("", ""))  # bytes of a PURGE request beyond its target's host and path

_TOKEN = rb"[-!#$%&'*+.^_`|~0-9A-Za-z]+"
_FIELD_VALUE = rb"[\t\x20-\x7e\x80-\xff]*"  # obs-text allowed, controls (and obs-fold) not
_HEADER_LINES = rb"(?:" + _TOKEN + rb":" + _FIELD_VALUE + rb"\r\n)*"
# One match validates the whole head. Then, as no field value or reason phrase can hold a LF, every b"\n" in a
# valid head starts a field line, which lets _FRAMING_RE pick the few fields we read without walking the lines.
_HEAD_RE = re.compile(
    rb"HTTP/1\.([0-9]) ([1-9][0-9][0-9])(?: " + _FIELD_VALUE + rb")?\r\n" + _HEADER_LINES + rb"\r\n"
)
_STATUS_LINE_RE = re.compile(rb"HTTP/1\.[0-9] [1-9][0-9][0-9](?: " + _FIELD_VALUE + rb")?\r\n")
_TRAILER_RE = re.compile(_HEADER_LINES + rb"\r\n")
_FRAMING_RE = re.compile(rb"\n(connection|content-length|transfer-encoding):[ \t]*([^\r]*)", re.IGNORECASE)
_CHUNK_LINE_RE = re.compile(rb"([0-9A-Fa-f]{1,16})[ \t]*(?:;[\t\x20-\x7e\x80-\xff]*)?\r\n")

# Parser states; ints compare fastest.
_HEAD, _BODY, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_END, _TRAILERS, _UNTIL_CLOSE, _DONE = range(8)


def _elements(value: bytes) -> list[bytes]:
    """The lower-cased, non-empty elements of a comma-separated field value (RFC 9110 §5.6.1)."""
    elements = [element.strip(b" \t") for element in value.lower().split(b",")]
    return [element for element in elements if element]


class ResponseParser:
    """Incremental parser for the responses on one client connection.

    ``feed(data)`` returns every response that ``data`` completed, oldest first. If the stream turns out to be
    broken after some responses of a read were complete, those are returned first and the error is raised by the
    next ``feed``/``feed_eof`` call, so a sender never loses an answer it did receive. After an error the parser
    stays broken. ``feed_eof()`` ends a read-until-close body.
    """

    __slots__ = ("_buf", "_pos", "_scan", "_state", "_remaining", "_pending", "_error", "max_header_size", "closed")

    def __init__(self, *, max_header_size: int = DEFAULT_MAX_HEADER_SIZE) -> None:
        self.max_header_size = max_header_size
        self._buf = bytearray()
        self._pos = 0  # start of unparsed data in _buf; compacted at the end of every feed
        self._scan = 0  # where the search for the end of the head resumes (no rescans on trickling reads)
        self._state = _HEAD
        self._remaining = 0  # body or chunk bytes still to skip
        self._pending: Response | None = None  # the response whose body is being read
        self._error: ProtocolError | None = None
        self.closed = False  # set by feed_statuses: the last answer it returned ends the connection

    @property
    def idle(self) -> bool:
        """True between responses, with no partial response buffered."""
        return self._state == _HEAD and self._pos == len(self._buf) and self._error is None

    def feed(self, data: bytes) -> list[Response]:
        if self._error is not None:
            raise self._error
        out: list[Response] = []
        state = self._state
        if state >= _UNTIL_CLOSE:
            return out  # the body runs to EOF, or the peer promised to close: nothing more to frame
        buf = self._buf
        buf += data
        try:
            self._parse(buf, out)
        except ProtocolError as exc:
            self._error = exc
            self._buf = bytearray()
            if not out:
                raise
        else:
            # del of a bytearray prefix only moves its start pointer; cheaper than copying the tail per response.
            del buf[: self._pos]
            self._scan -= self._pos
            self._pos = 0
        return out

    def feed_statuses(self, data: bytes) -> list[int]:
        """:meth:`feed`, as the status codes; ``closed`` says whether the last of them ends the connection."""
        responses = self.feed(data)
        self.closed = bool(responses) and not responses[-1].keep_alive
        return [response.status for response in responses]

    def feed_eof(self) -> list[Response]:
        """The peer closed its side. Returns the response a read-until-close body completes, if any."""
        if self._error is not None:
            raise self._error
        state, pending = self._state, self._pending
        between_responses = state == _HEAD and self._pos == len(self._buf)
        self._state = _DONE
        self._pending = None
        self._buf = bytearray()
        self._pos = self._scan = 0
        if state == _UNTIL_CLOSE:
            return [pending]  # type: ignore[list-item]
        if state == _DONE or between_responses:
            return []
        self._error = ProtocolError("connection closed in the middle of a response", reason="truncated")
        raise self._error

    def _parse(self, buf: bytearray, out: list[Response]) -> None:
        pos = self._pos
        end = len(buf)
        state = self._state
        try:
            while pos < end:
                if state == _HEAD:
                    head_end = buf.find(b"\r\n\r\n", self._scan if self._scan > pos else pos) + 4
                    if head_end < 4 or head_end - pos > self.max_header_size:
                        head_end = self._find_blank_line(buf, pos, end)  # raises, or says "not yet"
                        if head_end < 0:
                            # Fail garbage now rather than when the size cap or a timeout is reached.
                            n = min(end - pos, 7)
                            if buf[pos : pos + n] != b"HTTP/1."[:n]:
                                raise ProtocolError("bad status line", reason="bad_status_line")
                            break
                    state = self._start_response(buf, pos, head_end)
                    pos = head_end
                    if state == _BODY and end - pos >= self._remaining:
                        pos += self._remaining  # the usual small body, already here: skip a loop turn
                        state = _HEAD
                    if state == _HEAD and self._pending is not None:
                        response = self._pending
                        self._pending = None
                        out.append(response)
                        if not response.keep_alive:
                            state = _DONE
                elif state == _BODY or state == _CHUNK_DATA:
                    n = end - pos
                    if n < self._remaining:
                        self._remaining -= n
                        pos = end
                        break
                    pos += self._remaining
                    state = self._finish(out) if state == _BODY else _CHUNK_END
                elif state == _CHUNK_SIZE:
                    m = _CHUNK_LINE_RE.match(buf, pos)
                    if m is None:
                        # Incomplete lines wait; a complete (or overlong) line that does not match is bad.
                        if buf.find(b"\n", pos, pos + _MAX_CHUNK_LINE) >= 0 or end - pos >= _MAX_CHUNK_LINE:
                            raise ProtocolError("bad chunk-size line", reason="bad_chunk")
                        break
                    pos = m.end()
                    self._remaining = int(m.group(1), 16)
                    state = _CHUNK_DATA if self._remaining else _TRAILERS
                elif state == _CHUNK_END:
                    if buf[pos] != 13 or (end - pos >= 2 and buf[pos + 1] != 10):
                        raise ProtocolError("chunk data not followed by CRLF", reason="bad_chunk")
                    if end - pos < 2:
                        break
                    pos += 2
                    state = _CHUNK_SIZE
                elif state == _TRAILERS:
                    if buf.startswith(b"\r\n", pos):
                        pos += 2
                        state = self._finish(out)
                        continue
                    trailer_end = self._find_blank_line(buf, pos, end)
                    if trailer_end < 0:
                        break
                    if _TRAILER_RE.fullmatch(buf, pos, trailer_end) is None:
                        raise ProtocolError("bad trailer field", reason="bad_header")
                    pos = trailer_end
                    state = self._finish(out)
                else:  # _UNTIL_CLOSE or _DONE: the rest is body, or data after the peer said it would close
                    pos = end
        finally:
            self._pos = pos
            self._state = state

    def _find_blank_line(self, buf: bytearray, pos: int, end: int) -> int:
        """Index just past the CRLFCRLF ending the block at ``pos``, or -1 if it has not arrived yet."""
        i = buf.find(b"\r\n\r\n", self._scan if self._scan > pos else pos)
        if i < 0:
            if end - pos > self.max_header_size:
                raise ProtocolError("header block exceeds the size limit", reason="headers_too_large")
            self._scan = end - 3
            return -1
        i += 4
        if i - pos > self.max_header_size:
            raise ProtocolError("header block exceeds the size limit", reason="headers_too_large")
        return i

    def _finish(self, out: list[Response]) -> int:
        response = self._pending
        self._pending = None
        out.append(response)  # type: ignore[arg-type]
        return _HEAD if response.keep_alive else _DONE  # type: ignore[union-attr]

    def _start_response(self, buf: bytearray, start: int, end: int) -> int:
        """Parse the head in ``buf[start:end]``, set ``_pending`` (None for 1xx), return the next state."""
        m = _HEAD_RE.fullmatch(buf, start, end)
        if m is None:
            if _STATUS_LINE_RE.match(buf, start) is None:
                raise ProtocolError("bad status line", reason="bad_status_line")
            raise ProtocolError("bad header field", reason="bad_header")
        status = int(m.group(2))
        http10 = m.group(1) == b"0"
        connection = content_length = transfer_encoding = None
        # The head is valid, so each hit is a whole field; the names differ in length, which is cheaper to
        # dispatch on than a lower-cased copy. Repeated fields combine as one list (RFC 9110 §5.3).
        for name, value in _FRAMING_RE.findall(buf, start, end):
            if len(name) == 10:
                connection = value if connection is None else connection + b"," + value
            elif len(name) == 14:
                content_length = value if content_length is None else content_length + b"," + value
            else:
                transfer_encoding = value if transfer_encoding is None else transfer_encoding + b"," + value

        if connection is None:
            keep_alive = not http10
        elif connection.lower() == b"keep-alive":  # what Varnish sends on every response
            keep_alive = True
        else:
            tokens = _elements(connection)
            keep_alive = b"close" not in tokens and (not http10 or b"keep-alive" in tokens)

        if status < 200:
            if status == 101:
                raise ProtocolError("101 Switching Protocols to a PURGE", reason="unexpected_upgrade")
            self._pending = None  # interim (100 Continue, 103 Early Hints): the final response follows
            return _HEAD
        if status == 204 or status == 304:
            self._pending = _response(status, keep_alive)
            return _HEAD

        if transfer_encoding is not None:
            if content_length is not None:
                # RFC 9112 §6.3: both together mean a smuggling attempt or a broken server; trust neither.
                raise ProtocolError("Transfer-Encoding with Content-Length", reason="bad_transfer_encoding")
            codings = _elements(transfer_encoding)
            if (
                not codings
                or codings.count(b"chunked") > 1
                or (b"chunked" in codings and codings[-1] != b"chunked")
            ):
                raise ProtocolError("bad Transfer-Encoding", reason="bad_transfer_encoding")
            if codings[-1] != b"chunked":
                return self._until_close(status)  # RFC 9112 §6.3: the body runs to EOF
            # RFC 9112 §6.1: Transfer-Encoding in HTTP/1.0 means faulty framing; close after this response.
            self._pending = _response(status, keep_alive and not http10)
            return _CHUNK_SIZE

        if content_length is None:
            return self._until_close(status)
        content_length = content_length.strip(b" \t")
        if b"," in content_length:
            values = set(_elements(content_length))
            if len(values) != 1:
                raise ProtocolError("conflicting Content-Length values", reason="bad_content_length")
            content_length = values.pop()
        # isdigit() on bytes is ASCII-only; the length cap keeps int() far from its digit limit.
        if not content_length.isdigit() or len(content_length) > 18:
            raise ProtocolError("bad Content-Length", reason="bad_content_length")
        self._pending = _response(status, keep_alive)
        self._remaining = int(content_length)
        return _BODY if self._remaining else _HEAD

    def _until_close(self, status: int) -> int:
        self._pending = _response(status, False)
        return _UNTIL_CLOSE
