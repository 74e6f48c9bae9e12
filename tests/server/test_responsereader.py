"""The app proxy's HTTP/1.x response reader: framing, heads, malformed input (and fuzzing)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from coderstack.server.responsereader import (
    MAX_HEAD,
    MalformedResponse,
    ResponseHead,
    ResponseReader,
)


class Events:
    def __init__(self) -> None:
        self.heads: list[ResponseHead] = []
        self.pieces: list[bytes] = []
        self.ended = 0

    def head(self, head: ResponseHead) -> None:
        self.heads.append(head)

    def body(self, data: bytes) -> None:
        assert self.heads and not self.ended
        self.pieces.append(data)

    def end(self) -> None:
        self.ended += 1


def read(wire: bytes, cuts: list[int] | None = None, *, eof: bool = False, head_request: bool = False,
         stop_at_switch: bool = False) -> tuple[Events, ResponseReader]:
    events = Events()
    reader = ResponseReader(events, head_request=head_request, stop_at_switch=stop_at_switch)
    at = 0
    for cut in sorted(cuts or []):
        reader.feed(wire[at:cut])
        at = cut
    reader.feed(wire[at:])
    if eof:
        reader.eof()
    return events, reader


class FramingTests(unittest.TestCase):
    def test_content_length(self) -> None:
        wire = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 5\r\n\r\nhello"
        for cut in range(len(wire) + 1):
            events, reader = read(wire, [cut])
            self.assertEqual(b"".join(events.pieces), b"hello")
            self.assertEqual(events.ended, 1)
            head = events.heads[0]
            self.assertEqual((head.code, head.phrase, head.length, head.keep_alive), (200, b"OK", 5, True))
            self.assertEqual(head.headers, [(b"Content-Type", b"text/plain"), (b"Content-Length", b"5")])
            self.assertEqual(reader.rest, b"")

    def test_a_large_body_piece_is_passed_uncopied(self) -> None:
        events = Events()
        reader = ResponseReader(events)
        reader.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 10000\r\n\r\n")
        piece = b"x" * 4000
        reader.feed(piece)
        self.assertIs(events.pieces[0], piece)

    def test_chunked_with_extensions_and_trailers(self) -> None:
        wire = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
                b"5;name=v\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: t\r\n\r\n")
        for cut in range(len(wire) + 1):
            events, reader = read(wire, [cut])
            self.assertEqual(b"".join(events.pieces), b"hello world")
            self.assertEqual(events.ended, 1)
            self.assertIsNone(events.heads[0].length)
            self.assertTrue(events.heads[0].keep_alive)

    def test_close_delimited(self) -> None:
        events, reader = read(b"HTTP/1.1 200 OK\r\n\r\nuntil the end", eof=False)
        self.assertEqual(events.ended, 0)
        self.assertTrue(reader.to_close)
        reader.eof()
        self.assertEqual((b"".join(events.pieces), events.ended), (b"until the end", 1))
        self.assertFalse(events.heads[0].keep_alive)

    def test_unknown_transfer_coding_runs_to_the_close(self) -> None:
        events, reader = read(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nabc", eof=True)
        self.assertEqual(b"".join(events.pieces), b"abc")
        self.assertFalse(events.heads[0].keep_alive)

    def test_no_body_for_head_204_and_304(self) -> None:
        events, reader = read(b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\nnext", head_request=True)
        self.assertEqual((events.pieces, events.ended, events.heads[0].length), ([], 1, 99))
        self.assertEqual(reader.rest, b"next")
        for code in (b"204", b"304"):
            events, reader = read(b"HTTP/1.1 " + code + b" X\r\nContent-Length: 3\r\n\r\n")
            self.assertEqual((events.pieces, events.ended, events.heads[0].length), ([], 1, None))

    def test_informational_heads_are_skipped(self) -> None:
        events, _ = read(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early\r\nLink: x\r\n\r\n"
                         b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")
        self.assertEqual([h.code for h in events.heads], [201])
        self.assertEqual(events.ended, 1)

    def test_a_101_is_the_answer_when_told(self) -> None:
        wire = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n\x81\x02hi"
        events, reader = read(wire, stop_at_switch=True)
        self.assertEqual(([h.code for h in events.heads], events.ended, reader.rest), ([101], 1, b"\x81\x02hi"))
        events, reader = read(wire)
        self.assertEqual(events.heads, [])

    def test_keep_alive(self) -> None:
        cases = [
            (b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", True),
            (b"HTTP/1.1 200 OK\r\nConnection: Keep-Alive, CLOSE\r\nContent-Length: 0\r\n\r\n", False),
            (b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n", False),
        ]
        for wire, keep in cases:
            events, _ = read(wire)
            self.assertEqual(events.heads[0].keep_alive, keep, wire)
        events, _ = read(cases[1][0])
        self.assertEqual(events.heads[0].connection, frozenset({b"keep-alive", b"close"}))

    def test_bare_lf_folded_headers_and_no_phrase(self) -> None:
        events, _ = read(b"HTTP/1.1 200\nX-A: one\n  two\nContent-Length: 1\n\nz")
        head = events.heads[0]
        self.assertEqual((head.phrase, head.headers[0], events.pieces), (b"", (b"X-A", b"one two"), [b"z"]))

    def test_bytes_after_the_response_are_kept_apart(self) -> None:
        events, reader = read(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200")
        self.assertEqual((events.pieces, reader.rest), ([b"ok"], b"HTTP/1.1 200"))
        reader.feed(b" more")
        self.assertEqual((events.pieces, reader.rest), ([b"ok"], b"HTTP/1.1 200 more"))

    def test_a_stopped_reader_delivers_nothing_more(self) -> None:
        events = Events()
        reader = ResponseReader(events)
        reader.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nab")
        reader.stop()
        reader.feed(b"cd")
        self.assertEqual(events.pieces, [b"ab"])


class MalformedTests(unittest.TestCase):
    def assertMalformed(self, wire: bytes, eof: bool = False) -> None:
        with self.assertRaises(MalformedResponse):
            read(wire, eof=eof)

    def test_malformed_heads(self) -> None:
        for wire in [
            b"HTTP/2 200 OK\r\n\r\n",
            b"HTTP/1.1 20 OK\r\n\r\n",
            b"HTTP/1.1 2000 OK\r\n\r\n",
            b"HTTP/1.1 099 Low\r\n\r\n",
            b"SSH-2.0-OpenSSH\r\n\r\n",
            b"HTTP/1.1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n",
            b"HTTP/1.1 200 OK\r\n: empty name\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nName : space before colon\r\n\r\n",
            b"HTTP/1.1 200 OK\r\n folded first\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 0x10\r\n\r\n",
        ]:
            self.assertMalformed(wire)

    def test_malformed_chunks(self) -> None:
        for wire in [
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nabXX",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + b"1" * 5000,
        ]:
            self.assertMalformed(wire)

    def test_a_head_too_long(self) -> None:
        self.assertMalformed(b"HTTP/1.1 200 OK\r\nX: " + b"a" * MAX_HEAD)

    def test_truncated_responses_are_malformed_at_the_close(self) -> None:
        for wire in [b"", b"HTTP/1.1 200 OK\r\n", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nabc",
                     b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab"]:
            self.assertMalformed(wire, eof=True)
        _, reader = read(b"")
        self.assertFalse(reader.received)


# --- fuzzing ---

_names = st.sampled_from([b"X-A", b"Content-Type", b"Set-Cookie", b"Cache-Control", b"x-lower", b"Vary"])
_values = st.binary(max_size=40).map(lambda b: b.translate(None, b"\r\n\x00").strip(b" \t"))


@st.composite
def responses(draw: st.DrawFn) -> tuple[bytes, bytes, str]:
    """A well-formed response on the wire, its body and its framing."""
    framing = draw(st.sampled_from(["length", "chunked", "close"]))
    body = draw(st.binary(max_size=300))
    headers = draw(st.lists(st.tuples(_names, _values), max_size=6))
    lines = [b"HTTP/1.1 %d %s" % (draw(st.integers(200, 599).filter(lambda c: c not in (204, 304))),
                                   draw(st.sampled_from([b"OK", b"", b"Some Reason"])))]
    lines += [n + b": " + v for n, v in headers]
    if framing == "length":
        lines.append(b"Content-Length: %d" % len(body))
        payload = body
    elif framing == "chunked":
        lines.append(b"Transfer-Encoding: chunked")
        sizes = draw(st.lists(st.integers(1, 50), max_size=10))
        payload, at = b"", 0
        for size in sizes:
            piece = body[at:at + size]
            if not piece:
                break
            payload += b"%x\r\n%s\r\n" % (len(piece), piece)
            at += len(piece)
        body = body[:at]
        payload += b"0\r\n\r\n"
    else:
        payload = body
    if draw(st.booleans()):
        informational = b"HTTP/1.1 100 Continue\r\n\r\n"
    else:
        informational = b""
    return informational + b"\r\n".join(lines) + b"\r\n\r\n" + payload, body, framing


class FuzzTests(unittest.TestCase):
    @settings(max_examples=300, deadline=None)
    @given(responses(), st.lists(st.integers(0, 2000), max_size=8))
    def test_well_formed_responses_read_whole_however_split(self, response: tuple[bytes, bytes, str],
                                                             cuts: list[int]) -> None:
        wire, body, framing = response
        events, reader = read(wire, [c % (len(wire) + 1) for c in cuts], eof=framing == "close")
        self.assertEqual(b"".join(events.pieces), body)
        self.assertEqual(events.ended, 1)
        self.assertEqual(len(events.heads), 1)
        self.assertEqual(events.heads[0].keep_alive, framing != "close")
        self.assertEqual(reader.rest, b"")

    @settings(max_examples=500, deadline=None)
    @given(st.binary(max_size=400), st.lists(st.integers(0, 400), max_size=6), st.booleans(), st.booleans())
    def test_any_bytes_are_a_response_or_malformed(self, wire: bytes, cuts: list[int], head_request: bool,
                                                  switch: bool) -> None:
        try:
            events, _ = read(wire, [c % (len(wire) + 1) for c in cuts], eof=True, head_request=head_request,
                             stop_at_switch=switch)
        except MalformedResponse:
            return
        self.assertLessEqual(events.ended, 1)

    @settings(max_examples=300, deadline=None)
    @given(responses(), st.binary(min_size=1, max_size=60), st.integers(0, 10_000))
    def test_garbled_responses_are_a_response_or_malformed(self, response: tuple[bytes, bytes, str],
                                                          noise: bytes, at: int) -> None:
        wire = response[0]
        at %= len(wire) + 1
        try:
            read(wire[:at] + noise + wire[at:], eof=True)
        except MalformedResponse:
            pass
