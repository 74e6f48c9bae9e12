"""What the workspace-app proxy changes in the messages it forwards (pure functions on bytes).

Request, browser to app:

- hop-by-hop headers go: ``Connection`` and every header it names, ``Keep-Alive``, ``TE``,
  ``Trailer``, ``Transfer-Encoding``, ``Upgrade`` and ``Proxy-*``. A websocket handshake keeps
  ``Upgrade: websocket`` and sends ``Connection: Upgrade``;
- ``Host`` is the app's public host; ``X-Forwarded-For``, ``-Proto`` and ``-Host`` are set, not
  appended to: whatever a client sent there is its own claim. ``X-Forwarded-For`` is the client
  the server saw, which behind a trusted load balancer (``--proxy-trusted-origins``) is the
  client that proxy named, followed by the trusted hops (see clientaddr.py);
- the named cookies leave the ``Cookie`` header (the header goes when none is left), and the
  ``Coder-Session-Token`` header always goes;
- ``Content-Length`` and ``Expect`` go too: the client library frames the body itself, and the
  server's HTTP channel has already answered ``100-continue``;
- the request target is the app's base path plus the request's path, and its query without the
  ``coder_application_connect_api_key_35e783`` parameter; the app URL's own query stands in when
  the request has none and asks for ``/``. Bytes outside printable ASCII are percent-encoded.

Response, app to browser: the same hop-by-hop headers go; everything else passes, each
``Set-Cookie`` on its own line. ``Sec-WebSocket-*`` names are written in their registered casing
(``Sec-WebSocket-Accept``), which some apps and clients compare byte for byte.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from urllib.parse import unquote_to_bytes

TOKEN_HEADER = b"coder-session-token"
API_KEY_PARAM = b"coder_application_connect_api_key_35e783"

HOP_BY_HOP = frozenset({
    b"connection", b"keep-alive", b"te", b"trailer", b"trailers", b"transfer-encoding",
    b"upgrade", b"proxy-connection", b"proxy-authenticate", b"proxy-authorization",
})

# Set afresh on every forwarded request.
_REPLACED = frozenset({
    b"host", b"content-length", b"expect", TOKEN_HEADER,
    b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host",
})

_WEBSOCKET_NAMES = {
    n.lower(): n for n in (
        b"Sec-WebSocket-Key", b"Sec-WebSocket-Accept", b"Sec-WebSocket-Version",
        b"Sec-WebSocket-Protocol", b"Sec-WebSocket-Extensions",
    )
}

Header = tuple[bytes, bytes]


_CANONICAL: dict[bytes, bytes] = {}  # names seen: their casing (at most _CANONICAL_MAX of them)
_CANONICAL_MAX = 1024


def canonical_name(name: bytes) -> bytes:
    """``name`` in Header-Case, with the registered casing for the ``Sec-WebSocket-*`` names."""
    cased = _CANONICAL.get(name)
    if cased is None:
        low = name.lower()
        cased = _WEBSOCKET_NAMES.get(low) or b"-".join(w.capitalize() for w in low.split(b"-"))
        if len(_CANONICAL) < _CANONICAL_MAX:
            _CANONICAL[name] = cased
    return cased


def connection_tokens(values: Iterable[bytes]) -> frozenset[bytes]:
    """The lower-cased header names (options) a ``Connection`` header's values list."""
    return frozenset(
        t.strip().lower() for v in values for t in v.split(b",") if t.strip()
    )


_TCHAR = frozenset(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


def is_token(value: bytes) -> bool:
    """Whether ``value`` is an HTTP token (a method, a header name)."""
    return bool(value) and _TCHAR.issuperset(value)


def one_line(value: bytes) -> bytes:
    """``value`` with any CR, LF or NUL in it made a space (a header value sent on)."""
    if b"\r" in value or b"\n" in value or b"\x00" in value:
        return value.replace(b"\r", b" ").replace(b"\n", b" ").replace(b"\x00", b" ")
    return value


def is_hop_by_hop(name: bytes, named: frozenset[bytes]) -> bool:
    low = name.lower()
    return low in HOP_BY_HOP or low.startswith(b"proxy-") or low in named


def clean_value(value: str | bytes) -> bytes:
    """A header value from outside HTTP (the router's strings) with no CR, LF or NUL in it."""
    raw = value.encode("latin-1", "replace") if isinstance(value, str) else value
    return raw.translate(None, b"\r\n\x00")


def filter_cookies(values: Sequence[bytes], strip: frozenset[str]) -> bytes | None:
    """One ``Cookie`` value from ``values`` without the cookies named in ``strip``; None when
    nothing is left. Each kept pair passes unchanged."""
    kept = []
    for value in values:
        for piece in value.split(b";"):
            pair = piece.strip(b" \t")
            if not pair:
                continue
            name = pair.split(b"=", 1)[0].strip(b" \t").decode("latin-1")
            if name in strip:
                continue
            kept.append(pair)
    return b"; ".join(kept) or None


def drop_query_param(query: bytes, name: bytes) -> bytes:
    """``query`` without every ``name=...`` (or bare ``name``) parameter, however its name is
    percent-encoded; every other byte stays as it was."""
    kept = [
        part for part in query.split(b"&")
        if unquote_to_bytes(part.split(b"=", 1)[0].replace(b"+", b" ")) != name
    ]
    return b"&".join(kept)


def _printable(target: bytes) -> bytes:
    if all(0x21 <= b <= 0x7E for b in target):
        return target
    return b"".join(bytes([b]) if 0x21 <= b <= 0x7E else b"%%%02X" % b for b in target)


def request_target(base_path: str, default_query: str, path: bytes) -> bytes:
    """The target to request from the app for ``path`` (path and query after the app prefix)."""
    p, has_query, query = path.partition(b"?")
    if not p.startswith(b"/"):
        p = b"/" + p
    query = drop_query_param(query, API_KEY_PARAM) if has_query else b""
    if not query and p == b"/":
        query = default_query.lstrip("?").encode("utf-8")
    target = base_path.rstrip("/").encode("utf-8") + p
    if query:
        target += b"?" + query
    return _printable(target)


def request_headers(
    headers: Iterable[tuple[bytes, Sequence[bytes]]], *, host: str, forwarded_for: str,
    forwarded_proto: str, forwarded_host: str, strip_cookies: frozenset[str], websocket: bool,
) -> list[Header]:
    """The headers to send the app for a request with ``headers`` (name, values)."""
    pairs = headers if isinstance(headers, list) else list(headers)
    named: frozenset[bytes] = frozenset()
    for n, _vs in pairs:
        if n.lower() == b"connection":
            named = connection_tokens(v for n2, vs2 in pairs if n2.lower() == b"connection" for v in vs2)
            break
    out: list[Header] = []
    cookies: list[bytes] = []
    for name, values in pairs:
        low = name.lower()
        if low in _REPLACED or low in HOP_BY_HOP or low in named or low.startswith(b"proxy-"):
            continue
        if low == b"cookie":
            cookies.extend(values)
            continue
        if not is_token(name):
            continue  # not a name HTTP could carry on
        cased = canonical_name(name)
        for v in values:
            out.append((cased, one_line(v)))
    if cookies:
        cookie = filter_cookies(cookies, strip_cookies)
        if cookie is not None:
            out.append((b"Cookie", one_line(cookie)))
    if websocket:
        out.append((b"Connection", b"Upgrade"))
        out.append((b"Upgrade", b"websocket"))
    out.append((b"Host", clean_value(host)))
    out.append((b"X-Forwarded-For", clean_value(forwarded_for)))
    out.append((b"X-Forwarded-Proto", clean_value(forwarded_proto)))
    out.append((b"X-Forwarded-Host", clean_value(forwarded_host)))
    return out


def response_headers(
    headers: Iterable[tuple[bytes, Sequence[bytes]]], connection: Iterable[bytes] = (),
) -> list[tuple[bytes, list[bytes]]]:
    """The app's response headers to pass to the browser; ``connection`` is the values of the
    response's own ``Connection`` header (the options it names go too)."""
    named = connection_tokens(connection)
    return [
        (canonical_name(name), list(values)) for name, values in headers
        if not is_hop_by_hop(name, named)
    ]


def response_header_pairs(
    headers: Iterable[Header], connection: frozenset[bytes], *, keep_length: bool,
) -> dict[bytes, list[bytes]]:
    """The app's response headers (name, value pairs as received) to pass to the browser, by
    name; ``connection`` is the options the response's ``Connection`` header names (they go
    too). ``Content-Length`` passes only when ``keep_length`` (the answer to a ``HEAD``): the
    proxy sets the framing of a body itself."""
    out: dict[bytes, list[bytes]] = {}
    for name, value in headers:
        low = name.lower()
        if low in HOP_BY_HOP or low.startswith(b"proxy-") or low in connection:
            continue
        if low == b"content-length" and not keep_length:
            continue
        key = canonical_name(low)
        values = out.get(key)
        if values is None:
            out[key] = [value]
        else:
            values.append(value)
    return out

