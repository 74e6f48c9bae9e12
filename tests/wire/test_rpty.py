"""The reconnecting PTY codec: the init frame, the concatenated request objects, the encoders."""

from __future__ import annotations

import json
import struct
import uuid

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from coderstack.wire.rpty import (
    MAX_INIT_SIZE,
    Init,
    InitError,
    Request,
    RequestDecoder,
    RequestError,
    RequestTooLarge,
    StreamDecoder,
    encode_init,
    encode_request,
    parse_init,
)

ID = uuid.UUID("8f0c5b1e-6a43-4d1e-9a57-0d1f2a3b4c5d")


def frame(payload: bytes) -> bytes:
    return struct.pack("<H", len(payload)) + payload


def feed_bytewise(decoder: StreamDecoder | RequestDecoder, data: bytes) -> list:
    out: list = []
    for i in range(len(data)):
        out.extend(decoder.feed(data[i:i + 1]))
    return out


class InitTests(unittest.TestCase):
    def test_encode_is_little_endian_length_then_json(self) -> None:
        raw = encode_init(ID, 24, 80, "htop")
        (length,) = struct.unpack("<H", raw[:2])
        self.assertEqual(length, len(raw) - 2)
        self.assertEqual(json.loads(raw[2:]), {"ID": str(ID), "Height": 24, "Width": 80, "Command": "htop"})
        self.assertEqual(parse_init(raw[2:]), Init(ID, 24, 80, "htop"))

    def test_coder_fields_and_extras(self) -> None:
        payload = json.dumps({"ID": str(ID), "Height": 50, "Width": 200, "Command": "",
                              "Container": "", "ContainerUser": "", "BackendType": "buffered"}).encode()
        self.assertEqual(parse_init(payload), Init(ID, 50, 200, ""))

    def test_keys_match_without_case_and_defaults(self) -> None:
        self.assertEqual(parse_init(json.dumps({"id": str(ID), "height": 3}).encode()), Init(ID, 3, 0, ""))
        self.assertEqual(parse_init(json.dumps({"iD": str(ID), "command": None}).encode()), Init(ID))

    def test_rejections(self) -> None:
        bad = [
            b"",
            b"not json",
            b"\xff\xfe",
            b"[1, 2]",
            b'{"Height": 1}',
            b'{"ID": 5}',
            b'{"ID": "not-a-uuid"}',
            json.dumps({"ID": str(ID), "Height": -1}).encode(),
            json.dumps({"ID": str(ID), "Width": 70000}).encode(),
            json.dumps({"ID": str(ID), "Width": True}).encode(),
            json.dumps({"ID": str(ID), "Height": "24"}).encode(),
            json.dumps({"ID": str(ID), "Command": ["ls"]}).encode(),
            json.dumps({"ID": str(ID), "Command": "a\x00b"}).encode(),
        ]
        for payload in bad:
            with self.subTest(payload=payload):
                self.assertRaises(InitError, parse_init, payload)

    def test_stream_decoder_splits_the_frame_anywhere(self) -> None:
        raw = encode_init(ID, 24, 80, "bash") + encode_request("ls\r") + encode_request(height=40, width=100)
        events = feed_bytewise(StreamDecoder(), raw)
        self.assertEqual(events, [Init(ID, 24, 80, "bash"), Request("ls\r"), Request(None, 40, 100)])
        d = StreamDecoder()
        self.assertEqual(d.feed(raw), events)
        self.assertEqual(d.init, Init(ID, 24, 80, "bash"))

    def test_stream_decoder_zero_length(self) -> None:
        self.assertRaises(InitError, StreamDecoder().feed, b"\x00\x00{}")

    def test_stream_decoder_bad_init(self) -> None:
        d = StreamDecoder()
        self.assertEqual(d.feed(b"\x05\x00nul"), [])  # incomplete: waits
        self.assertRaises(InitError, d.feed, b"l!")

    def test_encode_limits(self) -> None:
        self.assertRaises(ValueError, encode_init, ID, 24, 80, "x" * MAX_INIT_SIZE)
        self.assertRaises(ValueError, encode_init, "nope", 24, 80)
        self.assertRaises(ValueError, encode_init, ID, -1, 80)
        self.assertRaises(ValueError, encode_request, height=1 << 16)
        big = encode_init(ID, 24, 80, "x" * (MAX_INIT_SIZE - 100))  # near the limit: fine
        self.assertLessEqual(len(big), MAX_INIT_SIZE + 2)
        self.assertEqual(StreamDecoder().feed(big), [Init(ID, 24, 80, "x" * (MAX_INIT_SIZE - 100))])

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=300))
    def test_init_fuzz_only_init_errors(self, payload: bytes) -> None:
        try:
            parse_init(payload)
        except InitError:
            pass


class RequestTests(unittest.TestCase):
    def test_encode_leaves_out_none(self) -> None:
        self.assertEqual(encode_request(), b"{}")
        self.assertEqual(json.loads(encode_request("a")), {"data": "a"})
        self.assertEqual(json.loads(encode_request(height=2, width=3)), {"height": 2, "width": 3})

    def test_concatenated_with_whitespace(self) -> None:
        raw = b' {"data":"a"}\n\t{"height":5,"width":6}\r\n{}{"data":"b","height":1,"width":2,"x":[1,{"y":"}"}]} '
        expected = [Request("a"), Request(None, 5, 6), Request(), Request("b", 1, 2)]
        self.assertEqual(RequestDecoder().feed(raw), expected)
        self.assertEqual(feed_bytewise(RequestDecoder(), raw), expected)

    def test_braces_and_escapes_inside_strings(self) -> None:
        data = 'echo "{[}]" \\\\ \\" \u00e9\U0001f600\r'
        raw = encode_request(data) + encode_request(json.dumps({"nested": "}"}))
        self.assertEqual(feed_bytewise(RequestDecoder(), raw), [Request(data), Request('{"nested": "}"}')])

    def test_utf8_split_across_chunks(self) -> None:
        raw = json.dumps({"data": "h\u00e9\U0001f600"}, ensure_ascii=False).encode()
        self.assertEqual(feed_bytewise(RequestDecoder(), raw), [Request("h\u00e9\U0001f600")])

    def test_lone_surrogate_becomes_replacement(self) -> None:
        self.assertEqual(RequestDecoder().feed(b'{"data":"a\\ud800b"}'), [Request("a\ufffdb")])

    def test_size_property(self) -> None:
        self.assertEqual(Request(None, 5, 6).size, (5, 6))
        self.assertIsNone(Request(None, 5, None).size)
        self.assertIsNone(Request(None, 0, 6).size)
        self.assertIsNone(Request("x").size)

    def test_malformed(self) -> None:
        bad = [b"[]", b"1", b'"x"', b"null", b"{,}", b'{"data" 1}', b'{"data":5}', b'{"height":-1}',
               b'{"width":"80"}', b'{"height":true}', b"{]", b'{"data":"\xff"}', b"}"]
        for raw in bad:
            with self.subTest(raw=raw):
                self.assertRaises(RequestError, RequestDecoder().feed, raw)

    def test_spent_after_an_error(self) -> None:
        d = RequestDecoder()
        self.assertEqual(d.feed(b'{"data":"ok"}'), [Request("ok")])
        self.assertRaises(RequestError, d.feed, b"x")
        self.assertRaises(RequestError, d.feed, b'{"data":"ok"}')
        self.assertEqual(d.buffered, 0)

    def test_bounded_buffer(self) -> None:
        d = RequestDecoder(max_request=100)
        self.assertEqual(d.feed(b'{"data":"' + b"a" * 80), [])
        self.assertRaises(RequestTooLarge, d.feed, b"a" * 30)
        # A whole object in one chunk is checked too.
        self.assertRaises(RequestTooLarge, RequestDecoder(max_request=100).feed,
                          encode_request("b" * 200))
        # Objects within the limit pass however many come in one chunk.
        many = encode_request("c" * 80) * 50
        self.assertEqual(len(RequestDecoder(max_request=100).feed(many)), 50)

    def test_bounded_depth(self) -> None:
        d = RequestDecoder(max_depth=5)
        self.assertEqual(d.feed(b'{"x":[[[1]]]}'), [Request()])
        self.assertRaises(RequestTooLarge, d.feed, b'{"x":[[[[[1]]]]]}')

    def test_default_allows_a_large_paste(self) -> None:
        paste = "line of text\n" * 60_000  # ~780 KB
        raw = encode_request(paste)
        d = RequestDecoder()
        out = []
        for i in range(0, len(raw), 1400):
            out.extend(d.feed(raw[i:i + 1400]))
        self.assertEqual(out, [Request(paste)])


requests = st.builds(
    Request,
    st.none() | st.text(max_size=40),
    st.none() | st.integers(0, 0xFFFF),
    st.none() | st.integers(0, 0xFFFF),
)
whitespace = st.text(alphabet=" \t\r\n", max_size=3)


class RequestFuzzTests(unittest.TestCase):
    @settings(max_examples=300, deadline=None)
    @given(st.lists(st.tuples(requests, whitespace), max_size=8), st.data())
    def test_round_trip_in_any_chunks(self, items: list[tuple[Request, str]], data: st.DataObject) -> None:
        raw = b"".join(encode_request(r.data, r.height, r.width) + ws.encode() for r, ws in items)
        cuts = sorted(data.draw(st.lists(st.integers(0, len(raw)), max_size=10)))
        d = RequestDecoder()
        out: list[Request] = []
        prev = 0
        for cut in [*cuts, len(raw)]:
            out.extend(d.feed(raw[prev:cut]))
            prev = cut
        self.assertEqual(out, [r for r, _ in items])
        self.assertEqual(d.buffered, 0)

    @settings(max_examples=300, deadline=None)
    @given(st.lists(st.dictionaries(st.text(max_size=5), st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=5),
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner, max_size=3),
        max_leaves=6), max_size=4), max_size=4))
    def test_agrees_with_json_framing(self, objects: list[dict]) -> None:
        # Any objects at all frame the same as json's own decoder frames them; fields that are
        # not requests' raise RequestError, never anything else.
        raw = "".join(json.dumps(o, ensure_ascii=False) for o in objects).encode()
        try:
            got = feed_bytewise(RequestDecoder(), raw)
        except RequestError:
            return
        self.assertEqual(len(got), len(objects))

    @settings(max_examples=500, deadline=None)
    @given(st.binary(max_size=200), st.integers(1, 17))
    def test_garbage_raises_only_request_errors(self, raw: bytes, step: int) -> None:
        d = RequestDecoder(max_request=64)
        try:
            for i in range(0, len(raw), step):
                d.feed(raw[i:i + step])
        except RequestError:
            pass
        self.assertLessEqual(d.buffered, 64 + step)

    @settings(max_examples=200, deadline=None)
    @given(st.binary(max_size=120), st.integers(1, 9))
    def test_stream_garbage_raises_only_protocol_errors(self, raw: bytes, step: int) -> None:
        d = StreamDecoder()
        try:
            for i in range(0, len(raw), step):
                d.feed(raw[i:i + step])
        except (InitError, RequestError):
            pass

    @settings(max_examples=200, deadline=None)
    @given(st.uuids(), st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.text(max_size=30).filter(lambda c: "\x00" not in c),
           st.lists(requests, max_size=5), st.data())
    def test_stream_round_trip_in_any_chunks(self, sid: uuid.UUID, height: int, width: int, command: str,
                                             items: list[Request], data: st.DataObject) -> None:
        raw = encode_init(sid, height, width, command) + b"".join(
            encode_request(r.data, r.height, r.width) for r in items)
        cuts = sorted(data.draw(st.lists(st.integers(0, len(raw)), max_size=8)))
        d = StreamDecoder()
        out: list = []
        prev = 0
        for cut in [*cuts, len(raw)]:
            out.extend(d.feed(raw[prev:cut]))
            prev = cut
        self.assertEqual(out, [Init(sid, height, width, command), *items])
