"""The app proxy's header and target rules as pure functions, with hypothesis for the small
parsers (cookies, query parameters, Connection options)."""

from __future__ import annotations

from urllib.parse import quote_from_bytes

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial import unittest

from coderstack.server import appheaders as h

_token = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_-0123456789", min_size=1, max_size=12)
_cookie_value = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789=+/%", max_size=12)
_query_piece = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789=%+._-", max_size=12)


class CookieTests(unittest.TestCase):
    @given(st.lists(st.tuples(_token, _cookie_value), max_size=8), st.frozensets(_token, max_size=4))
    def test_only_the_named_cookies_go(self, pairs: list[tuple[str, str]], strip: frozenset[str]) -> None:
        header = "; ".join(f"{n}={v}" for n, v in pairs).encode()
        got = h.filter_cookies([header], strip)
        kept = [f"{n}={v}" for n, v in pairs if n not in strip]
        self.assertEqual(got, "; ".join(kept).encode() if kept else None)

    def test_odd_spacing_and_several_headers(self) -> None:
        got = h.filter_cookies([b"a=1;  b=2 ;", b";c=3;coder_session_token=x"], frozenset({"coder_session_token"}))
        self.assertEqual(got, b"a=1; b=2; c=3")
        self.assertIsNone(h.filter_cookies([b" ; ;"], frozenset()))
        self.assertEqual(h.filter_cookies([b"flag"], frozenset()), b"flag")


class QueryTests(unittest.TestCase):
    @given(st.lists(_query_piece, max_size=6), st.lists(st.integers(0, 6), max_size=3), _cookie_value)
    def test_the_api_key_never_passes_and_the_rest_is_untouched(
            self, pieces: list[str], at: list[int], secret: str) -> None:
        params = [p.encode() for p in pieces]
        for i in at:
            name = h.API_KEY_PARAM if i % 2 else quote_from_bytes(h.API_KEY_PARAM, safe="").encode().replace(b"_", b"%5F")
            params.insert(min(i, len(params)), name + b"=" + secret.encode())
        got = h.drop_query_param(b"&".join(params), h.API_KEY_PARAM)
        self.assertEqual(got, b"&".join(p.encode() for p in pieces))

    @given(st.binary(max_size=40))
    def test_a_target_is_always_printable_and_rooted(self, path: bytes) -> None:
        target = h.request_target("/base", "q=1", path)
        self.assertTrue(all(0x21 <= b <= 0x7E for b in target), target)
        self.assertTrue(target.startswith(b"/base/"))
        self.assertNotIn(h.API_KEY_PARAM + b"=", target.partition(b"?")[2])

    def test_targets(self) -> None:
        self.assertEqual(h.request_target("", "", b"/a?b=c"), b"/a?b=c")
        self.assertEqual(h.request_target("/lab/", "t=1", b"/"), b"/lab/?t=1")
        self.assertEqual(h.request_target("/lab", "?t=1", b"/?"), b"/lab/?t=1")
        self.assertEqual(h.request_target("/lab", "t=1", b"/x"), b"/lab/x")
        self.assertEqual(h.request_target("", "", b"/sp ace/\xc3\xa9"), b"/sp%20ace/%C3%A9")


class HeaderRuleTests(unittest.TestCase):
    @given(st.lists(_token, max_size=5))
    def test_connection_options_are_hop_by_hop(self, names: list[str]) -> None:
        value = ", ".join(n.upper() for n in names).encode()
        named = h.connection_tokens([value])
        for n in names:
            self.assertTrue(h.is_hop_by_hop(n.encode(), named))

    def test_canonical_names(self) -> None:
        self.assertEqual(h.canonical_name(b"sec-websocket-key"), b"Sec-WebSocket-Key")
        self.assertEqual(h.canonical_name(b"SEC-WEBSOCKET-EXTENSIONS"), b"Sec-WebSocket-Extensions")
        self.assertEqual(h.canonical_name(b"x-custom-thing"), b"X-Custom-Thing")

    def test_request_headers(self) -> None:
        got = h.request_headers(
            [(b"Connection", [b"Upgrade, X-Hop"]), (b"Upgrade", [b"websocket"]), (b"X-Hop", [b"1"]),
             (b"Te", [b"trailers"]), (b"Proxy-Connection", [b"keep-alive"]), (b"Host", [b"public"]),
             (b"Coder-Session-Token", [b"t"]), (b"Content-Length", [b"3"]), (b"Accept", [b"a", b"b"])],
            host="app\r\nX-Injected: 1", forwarded_for="1.2.3.4", forwarded_proto="https",
            forwarded_host="h", strip_cookies=frozenset(), websocket=True)
        self.assertEqual(got, [
            (b"Accept", b"a"), (b"Accept", b"b"), (b"Connection", b"Upgrade"), (b"Upgrade", b"websocket"),
            (b"Host", b"appX-Injected: 1"), (b"X-Forwarded-For", b"1.2.3.4"),
            (b"X-Forwarded-Proto", b"https"), (b"X-Forwarded-Host", b"h"),
        ])

    def test_response_headers(self) -> None:
        got = h.response_headers(
            [(b"Set-Cookie", [b"a=1", b"b=2"]), (b"Trailer", [b"X"]), (b"X-Named", [b"1"]),
             (b"Proxy-Authenticate", [b"Basic"]), (b"sec-websocket-accept", [b"k"])],
            connection=[b"x-named"])
        self.assertEqual(got, [(b"Set-Cookie", [b"a=1", b"b=2"]), (b"Sec-WebSocket-Accept", [b"k"])])
