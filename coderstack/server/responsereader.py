"""An app's HTTP/1.x response, read from the bytes of its connection (sans-IO).

The wire format as read here (RFC 9112, as an HTTP/1.1 client that sent one request reads the
answer to it):

- status line ``HTTP/1.x SP 3DIGIT [SP reason]``; then header lines ``name ":" value``, the
  value without surrounding blanks; a line starting with SP or HTAB continues the previous value
  (obs-fold, joined with one SP); an empty line ends the head. Lines end with CRLF or a bare LF.
  A head longer than :data:`MAX_HEAD` bytes is refused;
- a ``1xx`` head is skipped and the next head read, except a ``101`` when the reader is told to
  stop there (a websocket handshake): it is the answer, and what follows it is :attr:`rest`;
- the body, in this order of precedence: none for the answer to a ``HEAD`` and for ``204`` and
  ``304``; chunked when ``Transfer-Encoding``'s last coding is ``chunked`` (``size [";" ext]``
  lines in hex, each chunk followed by CRLF, ended by a ``0`` chunk and trailer lines, which are
  dropped, up to an empty line); up to the connection's close for any other
  ``Transfer-Encoding``; ``Content-Length`` bytes (digits only; repeated values must agree); up
  to the close otherwise;
- the connection may carry another request after the response when it is HTTP/1.1, ``Connection``
  does not name ``close``, and the body did not run to the close (:attr:`ResponseHead.keep_alive`).

Anything else is :class:`MalformedResponse`. The reader tells a :class:`ResponseSink` of the
head, each piece of body as it comes (a Content-Length body's pieces are the received bytes
themselves, uncopied where they can be) and the end; bytes after the end are kept in
:attr:`ResponseReader.rest` and never delivered.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

#: The longest response head (status line, headers and the empty line) accepted.
MAX_HEAD = 64 * 1024
#: The longest chunk-size or trailer line accepted.
MAX_LINE = 4096

_NO_BODY_CODES = frozenset({204, 304})
_HEX = frozenset(b"0123456789abcdefABCDEF")
_BLANKS = b" \t"

Header = tuple[bytes, bytes]


class MalformedResponse(Exception):
    """The bytes are not an HTTP/1.x response (or one this proxy will not pass on)."""


@dataclass
class ResponseHead:
    version: bytes  # b"HTTP/1.1" or b"HTTP/1.0"
    code: int
    phrase: bytes
    headers: list[Header]  # as sent, in order (names as the app spelled them)
    connection: frozenset[bytes]  # the lower-cased options the Connection header names
    length: int | None  # the Content-Length framing the body, or None
    keep_alive: bool  # the connection may carry another request after this response


class ResponseSink(Protocol):
    def head(self, head: ResponseHead) -> None: ...

    def body(self, data: bytes) -> None: ...

    def end(self) -> None: ...


_HEAD, _LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_END, _TRAILER, _TO_CLOSE, _DONE = range(8)


def _tokens(values: list[bytes]) -> frozenset[bytes]:
    return frozenset(t.strip(_BLANKS).lower() for v in values for t in v.split(b",") if t.strip(_BLANKS))


def _content_length(values: list[bytes]) -> int:
    found: int | None = None
    for value in values:
        for piece in value.split(b","):  # a list of the same number is tolerated
            piece = piece.strip(_BLANKS)
            if not piece.isdigit() or len(piece) > 18:
                raise MalformedResponse("bad Content-Length")
            n = int(piece)
            if found is not None and n != found:
                raise MalformedResponse("conflicting Content-Length")
            found = n
    if found is None:
        raise MalformedResponse("empty Content-Length")
    return found


def parse_head(block: bytes, head_request: bool) -> tuple[ResponseHead, int]:
    """The head in ``block`` (without the empty line ending it) and the state its body is read
    in (one of this module's states)."""
    lines = block.split(b"\n")
    status = lines[0].rstrip(b"\r")
    version, sp, rest = status.partition(b" ")
    if version not in (b"HTTP/1.1", b"HTTP/1.0") or not sp:
        raise MalformedResponse("bad status line")
    code_bytes, _, phrase = rest.partition(b" ")
    if len(code_bytes) != 3 or not code_bytes.isdigit():
        raise MalformedResponse("bad status code")
    code = int(code_bytes)
    if code < 100:
        raise MalformedResponse("bad status code")
    headers: list[Header] = []
    length_values: list[bytes] = []
    te_values: list[bytes] = []
    conn_values: list[bytes] = []
    for i in range(1, len(lines)):
        line = lines[i]
        if line[-1:] == b"\r":
            line = line[:-1]
        if line[:1] in (b" ", b"\t"):
            if not headers:
                raise MalformedResponse("continuation before any header")
            name, value = headers[-1]
            folded = line.strip(_BLANKS)
            headers[-1] = (name, value + b" " + folded if value else folded)
            continue
        name, colon, value = line.partition(b":")
        if not colon or not name or name != name.strip(_BLANKS) or b"\r" in line or b"\x00" in line:
            raise MalformedResponse("bad header line")
        headers.append((name, value.strip(_BLANKS)))
    for name, value in headers:
        low = name.lower()
        if low == b"content-length":
            length_values.append(value)
        elif low == b"transfer-encoding":
            te_values.append(value)
        elif low == b"connection":
            conn_values.append(value)
    connection = _tokens(conn_values) if conn_values else frozenset()
    keep_alive = version == b"HTTP/1.1" and b"close" not in connection
    length: int | None = None
    if head_request or code in _NO_BODY_CODES or code < 200:
        state = _DONE
        if length_values and head_request:
            length = _content_length(length_values)
    elif te_values:
        codings = [t.strip(_BLANKS).lower() for v in te_values for t in v.split(b",") if t.strip(_BLANKS)]
        if codings and codings[-1] == b"chunked":
            state = _CHUNK_SIZE
        else:
            state, keep_alive = _TO_CLOSE, False
    elif length_values:
        length = _content_length(length_values)
        state = _LENGTH if length else _DONE
    else:
        state, keep_alive = _TO_CLOSE, False
    return ResponseHead(version, code, phrase, headers, connection, length, keep_alive), state


class ResponseReader:
    """Reads one response for ``sink``; ``head_request``: the request was a ``HEAD``;
    ``stop_at_switch``: a ``101`` is the answer (see the module doc)."""

    def __init__(self, sink: ResponseSink, *, head_request: bool = False, stop_at_switch: bool = False) -> None:
        self._sink = sink
        self._head_request = head_request
        self._stop_at_switch = stop_at_switch
        self._state = _HEAD
        self._buf = b""
        self._left = 0
        self.received = False  # any byte of a response has come
        self.head: ResponseHead | None = None
        self.rest = b""  # what came after the response (or after a 101 it stopped at)

    @property
    def done(self) -> bool:
        return self._state == _DONE

    @property
    def to_close(self) -> bool:
        """The body runs until the connection closes."""
        return self._state == _TO_CLOSE

    def feed(self, data: bytes) -> None:
        """Read ``data`` (the next bytes of the connection). Raises :class:`MalformedResponse`."""
        if not data:
            return
        self.received = True
        state = self._state
        if state == _LENGTH and not self._buf and len(data) < self._left:
            self._left -= len(data)  # the common case: a piece of a long body, passed whole
            self._sink.body(data)
            return
        if state == _TO_CLOSE:
            self._sink.body(data)
            return
        if state == _DONE:
            self.rest += data
            return
        buf = self._buf + data if self._buf else data
        self._buf = b""
        self._read(buf)

    def eof(self) -> None:
        """The connection has closed: ends a body that runs to the close; raises
        :class:`MalformedResponse` when the response is incomplete (or never came)."""
        if self._state == _TO_CLOSE:
            self._state = _DONE
            self._sink.end()
        elif self._state != _DONE:
            raise MalformedResponse("the connection closed before the response was complete")

    def _read(self, buf: bytes) -> None:
        pos = 0
        size = len(buf)
        sink = self._sink
        while pos < size:
            state = self._state
            if state == _HEAD:
                end, skip = _head_end(buf, pos)
                if end < 0:
                    if size - pos > MAX_HEAD:
                        raise MalformedResponse("response head too long")
                    self._buf = buf[pos:]
                    return
                if end - pos > MAX_HEAD:
                    raise MalformedResponse("response head too long")
                if end == pos:  # blank lines before a head: tolerated, as most clients do
                    pos = skip
                    continue
                head, state = parse_head(buf[pos:end], self._head_request)
                pos = skip
                if head.code < 200 and not (head.code == 101 and self._stop_at_switch):
                    continue  # informational: the answer is still to come
                self.head = head
                self._state = state
                if state == _DONE:
                    self.rest = buf[pos:]
                    sink.head(head)
                    sink.end()
                    return
                self._left = head.length or 0
                sink.head(head)
                if self._state == _DONE:  # the sink gave up on the response
                    return
            elif state == _LENGTH or state == _CHUNK_DATA:
                n = min(size - pos, self._left)
                piece = buf if pos == 0 and n == size else buf[pos:pos + n]
                pos += n
                self._left -= n
                if self._left == 0:
                    if state == _LENGTH:
                        self._state = _DONE
                        self.rest = buf[pos:]
                        sink.body(piece)
                        sink.end()
                        return
                    self._state = _CHUNK_END
                sink.body(piece)
            elif state == _CHUNK_SIZE or state == _TRAILER:
                nl = buf.find(b"\n", pos)
                if nl < 0:
                    if size - pos > MAX_LINE:
                        raise MalformedResponse("chunk line too long")
                    self._buf = buf[pos:]
                    return
                line = buf[pos:nl]
                pos = nl + 1
                if line[-1:] == b"\r":
                    line = line[:-1]
                if state == _TRAILER:
                    if not line:
                        self._state = _DONE
                        self.rest = buf[pos:]
                        sink.end()
                        return
                    continue  # a trailer field: dropped
                digits = line.split(b";", 1)[0].strip(_BLANKS)
                if not digits or len(digits) > 15 or not _HEX.issuperset(digits):
                    raise MalformedResponse("bad chunk size")
                chunk = int(digits, 16)
                if chunk == 0:
                    self._state = _TRAILER
                else:
                    self._left = chunk
                    self._state = _CHUNK_DATA
            elif state == _CHUNK_END:
                if buf[pos:pos + 1] == b"\n":
                    pos += 1
                elif size - pos < 2:
                    if buf[pos:pos + 1] != b"\r":
                        raise MalformedResponse("chunk not followed by CRLF")
                    self._buf = buf[pos:]
                    return
                elif buf[pos:pos + 2] == b"\r\n":
                    pos += 2
                else:
                    raise MalformedResponse("chunk not followed by CRLF")
                self._state = _CHUNK_SIZE
            elif state == _TO_CLOSE:
                sink.body(buf[pos:] if pos else buf)
                return
            else:  # _DONE
                self.rest += buf[pos:]
                return

    def stop(self) -> None:
        """Deliver nothing more (the response is no longer wanted)."""
        self._state = _DONE
        self._buf = b""


def _head_end(buf: bytes, pos: int) -> tuple[int, int]:
    """Where the head starting at ``pos`` ends (before its empty line) and where what follows
    it starts; (-1, -1) when its end has not come yet. A blank line at ``pos`` is (pos, after it)."""
    if buf.startswith(b"\r\n", pos):
        return pos, pos + 2
    if buf.startswith(b"\n", pos):
        return pos, pos + 1
    crlf = buf.find(b"\n\r\n", pos)
    lf = buf.find(b"\n\n", pos)
    if crlf < 0 and lf < 0:
        return -1, -1
    if lf < 0 or (0 <= crlf < lf):
        return crlf, crlf + 3
    return lf, lf + 2
