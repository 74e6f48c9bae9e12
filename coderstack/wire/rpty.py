"""The reconnecting PTY protocol (Coder's web terminal) on the agent's tunnel port 2.

Wire format (a TCP stream from the server, or any client, to the agent):

1. client -> agent, once: a 2-byte **little-endian** length ``n`` (1..65535), then ``n`` bytes
   of UTF-8 JSON, the init object::

       {"ID": "<uuid>", "Height": 24, "Width": 80, "Command": "htop"}

   ``ID`` names the session: a new ID starts ``Command`` (the user's login shell when it is
   empty or absent) in a fresh PTY; a known ID attaches to the running one. ``Height`` and
   ``Width`` (0..65535; 0 or absent means "keep / default") size the terminal. Other fields
   (``Container``, ``ContainerUser``, ``BackendType``...) are accepted and ignored. As Go's
   decoder does, keys match without regard to case.
2. client -> agent, then: a stream of JSON objects with no delimiter between them (whitespace
   is allowed)::

       {"data": "ls\\r"}{"height": 40, "width": 120}{"data": "x", "height": 40, "width": 120}

   every field optional: ``data`` is typed into the terminal, and ``height`` with ``width``
   (both non-zero) resize it. Unknown fields are ignored; a value of the wrong type, anything
   that is not an object, or bytes that are not JSON make the stream malformed.
3. agent -> client: raw terminal output bytes; on reattach the recent output (scrollback) comes
   first. The agent closes the stream when the process ends.

Everything here is pure: :class:`StreamDecoder` is the agent's side of one stream (bytes in,
:class:`Init` then :class:`Request` events out); :func:`encode_init` and
:func:`encode_request` are the client's side. Limits: the init frame is bounded by its 2-byte
length; one request object by ``max_request`` bytes (1 MiB by default, a large paste) and 32
levels of nesting.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from uuid import UUID

MAX_INIT_SIZE = 0xFFFF  # what the 2-byte length can say
MAX_REQUEST_SIZE = 1 << 20
MAX_DEPTH = 32
MAX_DIMENSION = 0xFFFF  # uint16, as Coder's Go types have it

_LENGTH = struct.Struct("<H")
_OUTSIDE = re.compile(rb'[{}\[\]"]')  # what changes the scan outside a string
_INSIDE = re.compile(rb'["\\]')  # ... and inside one
_WHITESPACE = b" \t\r\n"
_SURROGATE = re.compile("[\ud800-\udfff]")


class RPTYProtocolError(ValueError):
    """Bytes that break the reconnecting PTY protocol."""


class InitError(RPTYProtocolError):
    """The init frame is empty, not JSON, not an object, or has a bad ID, size or command."""


class RequestError(RPTYProtocolError):
    """The request stream is malformed (not JSON objects, or fields of the wrong type)."""


class RequestTooLarge(RequestError):
    """One request object is longer, or nested deeper, than the decoder allows."""


@dataclass(frozen=True)
class Init:
    id: UUID
    height: int = 0
    width: int = 0
    command: str = ""


@dataclass(frozen=True)
class Request:
    data: str | None = None
    height: int | None = None
    width: int | None = None

    @property
    def size(self) -> tuple[int, int] | None:
        """``(height, width)`` to resize to, when both are given and non-zero."""
        if self.height and self.width:
            return self.height, self.width
        return None


# --- encoders (clients) ----------------------------------------------------------------------


def encode_init(id: UUID | str, height: int, width: int, command: str = "") -> bytes:
    """The init frame (length prefix included) a client sends first."""
    payload = json.dumps({"ID": str(UUID(str(id))), "Height": _dimension(height, ValueError),
                          "Width": _dimension(width, ValueError), "Command": command}).encode()
    if len(payload) > MAX_INIT_SIZE:
        raise ValueError(f"init frame of {len(payload)} bytes; at most {MAX_INIT_SIZE}")
    return _LENGTH.pack(len(payload)) + payload


def encode_request(data: str | None = None, height: int | None = None, width: int | None = None) -> bytes:
    """One request object (fields left out when None)."""
    obj: dict[str, Any] = {}
    if data is not None:
        obj["data"] = data
    if height is not None:
        obj["height"] = _dimension(height, ValueError)
    if width is not None:
        obj["width"] = _dimension(width, ValueError)
    return json.dumps(obj, separators=(",", ":")).encode()


# --- decoding (the agent) --------------------------------------------------------------------


def parse_init(payload: bytes) -> Init:
    """The init object (without its length prefix); raises :class:`InitError`."""
    if not payload:
        raise InitError("empty init frame")
    try:
        obj = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise InitError("init frame is not JSON") from None
    if not isinstance(obj, dict):
        raise InitError("init frame is not an object")
    fields = _fold(obj)
    raw_id = fields.get("id")
    if not isinstance(raw_id, str):
        raise InitError("init frame has no ID")
    try:
        session_id = UUID(raw_id)
    except ValueError:
        raise InitError("init frame's ID is not a UUID") from None
    command = fields.get("command")
    if command is None:
        command = ""
    if not isinstance(command, str):
        raise InitError("init frame's Command is not a string")
    if "\x00" in command:
        raise InitError("init frame's Command holds a NUL byte")
    return Init(session_id, _optional_dimension(fields.get("height"), InitError) or 0,
                _optional_dimension(fields.get("width"), InitError) or 0, command)


def parse_request(obj: Any) -> Request:
    """One decoded request object; raises :class:`RequestError`."""
    if not isinstance(obj, dict):
        raise RequestError("request is not an object")
    fields = _fold(obj)
    data = fields.get("data")
    if data is not None:
        if not isinstance(data, str):
            raise RequestError("request data is not a string")
        # A lone surrogate (``"\\ud800"``) cannot be typed as UTF-8; Go's decoder makes it U+FFFD.
        data = _SURROGATE.sub("\ufffd", data)
    return Request(data, _optional_dimension(fields.get("height"), RequestError),
                   _optional_dimension(fields.get("width"), RequestError))


class RequestDecoder:
    """Concatenated JSON objects in, :class:`Request` out, fed in chunks of any size.

    Objects are framed by scanning braces outside strings (a multi-byte UTF-8 sequence never
    holds an ASCII byte, so the scan runs on bytes); each whole object is then parsed. The scan
    resumes where it stopped, so a large object arriving in small chunks costs linear time.
    After an error the decoder is spent: every later :meth:`feed` raises again.
    """

    def __init__(self, max_request: int = MAX_REQUEST_SIZE, max_depth: int = MAX_DEPTH) -> None:
        self.max_request = max_request
        self.max_depth = max_depth
        self._buf = bytearray()
        self._pos = 0  # where the scan resumes, inside ``_buf``
        self._depth = 0  # 0: between objects
        self._in_string = False
        self._error: RequestError | None = None

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list[Request]:
        if self._error is not None:
            raise self._error
        try:
            return self._feed(data)
        except RequestError as err:
            self._error = err
            self._buf.clear()
            raise

    def _feed(self, data: bytes) -> list[Request]:
        buf = self._buf
        buf += data
        out: list[Request] = []
        start = 0  # the current object's first byte
        pos = self._pos
        while True:
            if self._depth == 0:
                # Between objects: skip whitespace; the next thing must open an object.
                while pos < len(buf) and buf[pos] in _WHITESPACE:
                    pos += 1
                start = pos
                if pos == len(buf):
                    break
                if buf[pos] != 0x7B:  # "{"
                    raise RequestError("request stream holds something other than a JSON object")
                self._depth = 1
                pos += 1
            if self._in_string:
                m = _INSIDE.search(buf, pos)
                if m is None:
                    pos = len(buf)
                    break
                pos = m.start()
                if buf[pos] == 0x5C:  # a backslash escapes the next byte
                    if pos + 1 >= len(buf):
                        break  # wait for the escaped byte
                    pos += 2
                    continue
                self._in_string = False
                pos += 1
                continue
            m = _OUTSIDE.search(buf, pos)
            if m is None:
                pos = len(buf)
                break
            pos = m.start()
            byte = buf[pos]
            pos += 1
            if byte == 0x22:  # '"'
                self._in_string = True
            elif byte in (0x7B, 0x5B):  # "{" "["
                self._depth += 1
                if self._depth > self.max_depth:
                    raise RequestTooLarge(f"request nested deeper than {self.max_depth} levels")
            else:  # "}" "]"
                self._depth -= 1
                if self._depth == 0:
                    out.append(self._parse(bytes(buf[start:pos])))
                    start = pos
            if pos - start > self.max_request:
                raise RequestTooLarge(f"request longer than {self.max_request} bytes")
        if pos - start > self.max_request:
            raise RequestTooLarge(f"request longer than {self.max_request} bytes")
        del buf[:start]
        self._pos = pos - start
        return out

    def _parse(self, raw: bytes) -> Request:
        if len(raw) > self.max_request:
            raise RequestTooLarge(f"request longer than {self.max_request} bytes")
        try:
            obj = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            raise RequestError("request is not valid JSON") from None
        return parse_request(obj)


class StreamDecoder:
    """The agent's side of one stream: :meth:`feed` returns the :class:`Init` (once, first),
    then :class:`Request` objects. Raises :class:`InitError` or :class:`RequestError`."""

    def __init__(self, max_request: int = MAX_REQUEST_SIZE) -> None:
        self.init: Init | None = None
        self.requests = RequestDecoder(max_request)
        self._head = bytearray()

    def feed(self, data: bytes) -> list[Init | Request]:
        if self.init is not None:
            return list(self.requests.feed(data))
        self._head += data
        if len(self._head) < _LENGTH.size:
            return []
        (length,) = _LENGTH.unpack_from(self._head)
        if length == 0:
            raise InitError("empty init frame")
        end = _LENGTH.size + length
        if len(self._head) < end:
            return []
        self.init = parse_init(bytes(self._head[_LENGTH.size:end]))
        rest = bytes(self._head[end:])
        self._head = bytearray()
        events: list[Init | Request] = [self.init]
        if rest:
            events.extend(self.requests.feed(rest))
        return events


def _fold(obj: Mapping[str, Any]) -> dict[str, Any]:
    """Keys in lower case; an exact lower-case key wins over other spellings (as in Go)."""
    folded: dict[str, Any] = {}
    for key, value in obj.items():
        low = key.lower()
        if low not in folded or key == low:
            folded[low] = value
    return folded


def _dimension(value: Any, error: type[Exception]) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_DIMENSION:
        raise error(f"terminal size {value!r} is not an integer in 0..{MAX_DIMENSION}")
    return value


def _optional_dimension(value: Any, error: type[Exception]) -> int | None:
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # JSON has one number type: 40.0 is 40
    return _dimension(value, error)
