"""JSON over HTTP, as every API route speaks it.

A request body is one JSON object (at most :data:`MAX_BODY` bytes unless the route allows
more; an empty body is ``{}``).  A response is JSON with ``Content-Type: application/json`` and
``Cache-Control: no-store``.  An error is::

    HTTP/1.1 4xx|5xx
    Retry-After: <seconds>            (only when waiting helps)

    {"message": "<what went wrong, for people>", "detail": "<why, or what to do>"}

Its text never quotes a secret.  A caller authenticates with a token in the
``Coder-Session-Token`` header, or else in the ``coder_session_token`` cookie.
"""

from __future__ import annotations

import json
import math
import uuid
from typing import IO, Any, AnyStr, Protocol

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IAddress
from twisted.web.http_headers import Headers

from coderstack.server import auth
from coderstack.server.clientaddr import ClientAddress, TrustedProxies, client_address

MAX_BODY = 64 * 1024


class HTTPRequest(Protocol):
    """The parts of a twisted.web request (an ``IRequest``) that the routes use."""

    method: bytes
    path: bytes
    args: dict[bytes, list[bytes]]
    content: IO[bytes] | None
    requestHeaders: Headers

    def getHeader(self, key: AnyStr) -> AnyStr | None: ...

    def getCookie(self, key: bytes) -> bytes | None: ...

    def getClientAddress(self) -> IAddress: ...

    def setResponseCode(self, code: int, message: bytes | None = None) -> None: ...

    def setHeader(self, name: bytes | str, value: bytes | str) -> None: ...

    def write(self, data: bytes) -> None: ...

    def notifyFinish(self) -> Deferred[None]: ...


class ClientRequest(Protocol):
    """What telling a request's client needs (any twisted.web request has it)."""

    requestHeaders: Headers

    def getClientAddress(self) -> IAddress: ...


class APIError(Exception):
    """Answer the request with this status and error body."""

    def __init__(self, code: int, message: str, detail: str = "",
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.detail = code, message, detail
        self.retry_after = retry_after


def set_headers(request: HTTPRequest, content_type: bytes, code: int = 200) -> None:
    """The status, and the headers of every response (none is cached)."""
    request.setResponseCode(code)
    request.setHeader(b"Content-Type", content_type)
    request.setHeader(b"Cache-Control", b"no-store")


def write_json(request: HTTPRequest, obj: Any, code: int = 200) -> bytes:
    set_headers(request, b"application/json", code)
    return json.dumps(obj).encode() + b"\n"


def write_error(request: HTTPRequest, err: APIError) -> bytes:
    if err.retry_after is not None:
        request.setHeader(b"Retry-After", str(max(1, math.ceil(err.retry_after))).encode())
    return write_json(request, {"message": err.message, "detail": err.detail}, err.code)


def read_body(request: HTTPRequest, limit: int = MAX_BODY) -> bytes:
    body = request.content.read(limit + 1) if request.content else b""
    if len(body) > limit:
        raise APIError(413, "Request body is too large.", f"at most {limit} bytes")
    return body


def read_json(request: HTTPRequest, limit: int = MAX_BODY) -> dict[str, Any]:
    return parse_json_object(read_body(request, limit))


def parse_json_object(body: bytes) -> dict[str, Any]:
    """A request body as a JSON object; APIError 400 for anything else (also deep nesting)."""
    try:
        obj = json.loads(body or b"{}")
    except RecursionError:
        raise APIError(400, "Request body must be valid JSON.", "nested too deeply") from None
    except ValueError as err:
        # json's own messages name a position, never the data; decoding errors say less.
        detail = str(err) if isinstance(err, json.JSONDecodeError) else "not UTF-8 text"
        raise APIError(400, "Request body must be valid JSON.", detail) from None
    if not isinstance(obj, dict):
        raise APIError(400, "Request body must be a JSON object.")
    return obj


def plain_text(value: str) -> bool:
    """Text the store and the logs can hold: encodable as UTF-8 (no lone surrogates), no NUL."""
    if "\x00" in value:
        return False
    try:
        value.encode()
    except UnicodeEncodeError:
        return False
    return True


def field(body: dict[str, Any], name: str, *, required: bool = True, default: str = "") -> str:
    """A string field of a request body: present (unless not ``required``) and plain text."""
    value = body.get(name, None)
    if value is None:
        if required:
            raise APIError(400, f"Missing field {name!r}.", f"{name} is required")
        return default
    if not isinstance(value, str):
        raise APIError(400, f"Field {name!r} must be a string.")
    if not plain_text(value):
        raise APIError(400, f"Field {name!r} must be UTF-8 text without NUL characters.")
    return value


def parse_uuid(value: str, what: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise APIError(400, f"Invalid {what}.", f"{value!r} is not a UUID") from None


def query_value(request: HTTPRequest, name: bytes, default: bytes = b"") -> bytes:
    """The first value of query parameter ``name``."""
    return request.args.get(name, [default])[0]


def query_flag(request: HTTPRequest, name: bytes) -> bool:
    """Whether query parameter ``name`` is on (``1`` or ``true``)."""
    return query_value(request, name) in (b"1", b"true")


def session_token_of(request: HTTPRequest) -> str | None:
    raw = request.getHeader(auth.SESSION_HEADER)
    if raw is None:
        cookie = request.getCookie(b"coder_session_token")
        raw = cookie.decode("ascii", "replace") if cookie else None
    return raw.strip() if raw else None


def client_of(request: ClientRequest, proxies: TrustedProxies, unknown: str = "local") -> ClientAddress:
    """Who sent ``request``: the peer, or behind a trusted proxy the client it names (see
    clientaddr.py); ``unknown`` stands for a peer without an IP address."""
    peer = str(getattr(request.getClientAddress(), "host", unknown))
    if not proxies.enabled:
        return ClientAddress(peer)
    headers = {name.lower(): request.requestHeaders.getRawHeaders(name, []) for name in proxies.headers}
    return client_address(peer, headers, proxies)


def client_host(request: ClientRequest, proxies: TrustedProxies) -> str:
    """The client's IP address (what the login limits count per source)."""
    return client_of(request, proxies).host
