"""STUN codec: RFC 5769 test vectors, round trips and garbage."""

from __future__ import annotations

import struct
import zlib

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from coderstack.wire import stun


def unhex(s: str) -> bytes:
    return bytes.fromhex("".join(s.split()))


# RFC 5769 section 2 (test data, reproduced for interoperability testing).
TXID = unhex("b7 e7 a7 01 bc 34 d6 86 fa 87 df ae")
SAMPLE_REQUEST = unhex(
    """00 01 00 58 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae
    80 22 00 10 53 54 55 4e 20 74 65 73 74 20 63 6c 69 65 6e 74
    00 24 00 04 6e 00 01 ff
    80 29 00 08 93 2f f9 b1 51 26 3b 36
    00 06 00 09 65 76 74 6a 3a 68 36 76 59 20 20 20
    00 08 00 14 9a ea a7 0c bf d8 cb 56 78 1e f2 b5 b2 d3 f2 49 c1 b5 71 a2
    80 28 00 04 e5 7a 3b cf"""
)
SAMPLE_V4_RESPONSE = unhex(
    """01 01 00 3c 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae
    80 22 00 0b 74 65 73 74 20 76 65 63 74 6f 72 20
    00 20 00 08 00 01 a1 47 e1 12 a6 43
    00 08 00 14 2b 91 f5 99 fd 9e 90 c3 8c 74 89 f9 2a f9 ba 53 f0 6b e7 d7
    80 28 00 04 c0 7d 4c 96"""
)
SAMPLE_V6_RESPONSE = unhex(
    """01 01 00 48 21 12 a4 42 b7 e7 a7 01 bc 34 d6 86 fa 87 df ae
    80 22 00 0b 74 65 73 74 20 76 65 63 74 6f 72 20
    00 20 00 14 00 02 a1 47 01 13 a9 fa a5 d3 f1 79 bc 25 f4 b5 be d2 b9 d9
    00 08 00 14 a3 82 95 4e 4b e6 7b f1 17 84 c9 7c 82 92 c2 75 bf e3 ed 41
    80 28 00 04 c8 fb 0b 4c"""
)


class RFC5769Tests(unittest.TestCase):
    def test_sample_request(self) -> None:
        msg = stun.decode(SAMPLE_REQUEST)
        self.assertEqual((msg.method, msg.cls), (stun.METHOD_BINDING, stun.CLASS_REQUEST))
        self.assertEqual(msg.transaction_id, TXID)
        self.assertTrue(msg.fingerprint)
        self.assertFalse(msg.classic)
        self.assertEqual(msg.get(stun.ATTR_SOFTWARE), b"STUN test client")
        self.assertEqual(msg.get(stun.ATTR_USERNAME), b"evtj:h6vY")
        self.assertEqual(msg.get(stun.ATTR_PRIORITY), unhex("6e 00 01 ff"))
        # Every comprehension-required attribute in the sample is one we understand.
        self.assertEqual(msg.unknown_required(), [])

    def test_sample_ipv4_response(self) -> None:
        resp = stun.parse_response(SAMPLE_V4_RESPONSE)
        self.assertEqual(resp.transaction_id, TXID)
        self.assertEqual(resp.mapped, ("192.0.2.1", 32853))
        self.assertEqual(resp.software, "test vector")

    def test_sample_ipv6_response(self) -> None:
        resp = stun.parse_response(SAMPLE_V6_RESPONSE)
        self.assertEqual(resp.mapped, ("2001:db8:1234:5678:11:2233:4455:6677", 32853))

    def test_our_xor_encoding_matches_the_vectors(self) -> None:
        self.assertEqual(
            stun.encode_xor_address(("192.0.2.1", 32853), TXID), unhex("00 01 a1 47 e1 12 a6 43")
        )
        self.assertEqual(
            stun.encode_xor_address(("2001:db8:1234:5678:11:2233:4455:6677", 32853), TXID),
            unhex("00 02 a1 47 01 13 a9 fa a5 d3 f1 79 bc 25 f4 b5 be d2 b9 d9"),
        )

    def test_fingerprint_values(self) -> None:
        for sample in (SAMPLE_REQUEST, SAMPLE_V4_RESPONSE, SAMPLE_V6_RESPONSE):
            (want,) = struct.unpack("!I", sample[-4:])
            self.assertEqual(stun.fingerprint_of(sample[:-8]), want)

    def test_bad_fingerprint_rejected(self) -> None:
        broken = SAMPLE_V4_RESPONSE[:-1] + bytes([SAMPLE_V4_RESPONSE[-1] ^ 1])
        self.assertRaises(stun.STUNError, stun.decode, broken)

    def test_flipped_body_bit_rejected_by_fingerprint(self) -> None:
        i = 30  # inside SOFTWARE
        broken = SAMPLE_V4_RESPONSE[:i] + bytes([SAMPLE_V4_RESPONSE[i] ^ 0x40]) + SAMPLE_V4_RESPONSE[i + 1 :]
        self.assertRaises(stun.STUNError, stun.decode, broken)


class TailscaleShapeTests(unittest.TestCase):
    def test_tailscale_style_request_is_40_bytes(self) -> None:
        tid, data = stun.binding_request(b"\x01" * 12, software=b"tailnode")
        self.assertEqual(len(data), 40)
        self.assertEqual(data[:4], unhex("0001 0014"))
        self.assertEqual(data[20:32], unhex("8022 0008") + b"tailnode")
        (fp,) = struct.unpack("!I", data[-4:])
        self.assertEqual(fp, zlib.crc32(data[:-8]) ^ 0x5354554E)

    def test_response_without_fingerprint_and_alt_xor_type(self) -> None:
        tid = b"\x07" * 12
        value = stun.encode_xor_address(("203.0.113.9", 41641), tid)
        body = struct.pack("!HH", 0x8020, len(value)) + value
        data = struct.pack("!HHI", 0x0101, len(body), stun.MAGIC_COOKIE) + tid + body
        self.assertEqual(stun.parse_response(data).mapped, ("203.0.113.9", 41641))

    def test_mapped_address_fallback(self) -> None:
        tid = b"\x09" * 12
        msg = stun.Message(
            stun.METHOD_BINDING, stun.CLASS_SUCCESS, tid,
            ((stun.ATTR_MAPPED_ADDRESS, stun.encode_address(("198.51.100.7", 5000))),),
        )
        self.assertEqual(stun.parse_response(stun.encode(msg)).mapped, ("198.51.100.7", 5000))

    def test_ipv4_mapped_ipv6_is_unmapped(self) -> None:
        tid = b"\x02" * 12
        value = stun.encode_xor_address(("::ffff:192.0.2.44", 80), tid)
        self.assertEqual(value[1], 1)
        self.assertEqual(stun.decode_xor_address(value, tid), ("192.0.2.44", 80))

    def test_is_stun(self) -> None:
        self.assertTrue(stun.is_stun(SAMPLE_REQUEST))
        self.assertTrue(stun.is_stun(SAMPLE_V4_RESPONSE))
        wg_initiation = b"\x01\x00\x00\x00" + b"\x00" * 144
        self.assertFalse(stun.is_stun(wg_initiation))
        self.assertFalse(stun.is_stun(b"TS\xf0\x9f\x92\xac" + b"\x00" * 40))
        self.assertFalse(stun.is_stun(SAMPLE_REQUEST[:19]))

    def test_classic_request(self) -> None:
        data = unhex("0001 0008") + b"\x11" * 16 + unhex("0003 0004 00000000")
        msg = stun.decode(data)
        self.assertTrue(msg.classic)
        self.assertEqual(msg.transaction_id, b"\x11" * 16)
        answer = stun.decode(stun.binding_success(msg, ("127.0.0.1", 999)))
        self.assertTrue(answer.classic)
        self.assertEqual(stun.mapped_address(answer), ("127.0.0.1", 999))
        self.assertIsNone(answer.get(stun.ATTR_XOR_MAPPED_ADDRESS))


class TypeTests(unittest.TestCase):
    def test_type_interleaving(self) -> None:
        for method, cls, want in [(1, 0, 0x0001), (1, 1, 0x0011), (1, 2, 0x0101), (1, 3, 0x0111),
                                  (3, 0, 0x0003), (0xFFF, 3, 0x3FFF)]:
            self.assertEqual(stun.compose_type(method, cls), want)
            self.assertEqual(stun.split_type(want), (method, cls))


class ErrorResponseTests(unittest.TestCase):
    def test_420_round_trip(self) -> None:
        req = stun.Message(stun.METHOD_BINDING, stun.CLASS_REQUEST, b"\x05" * 12,
                           ((0x7777, b"ab"),), fingerprint=True)
        self.assertEqual(stun.decode(stun.encode(req)).unknown_required(), [0x7777])
        resp = stun.parse_response(stun.binding_error(req, 420, unknown=[0x7777]))
        self.assertEqual(resp.error, (420, "Unknown Attribute"))
        self.assertEqual(resp.unknown_attributes, (0x7777,))
        self.assertIsNone(resp.mapped)


addresses = st.one_of(
    st.ip_addresses(v=4).map(str), st.ip_addresses(v=6).filter(lambda a: a.ipv4_mapped is None).map(str)
)


class PropertyTests(unittest.TestCase):
    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=200))
    def test_garbage_raises_only_codec_error(self, data: bytes) -> None:
        for fn in (stun.decode, stun.parse_response):
            try:
                fn(data)
            except stun.STUNError:
                pass

    @settings(max_examples=300, deadline=None)
    @given(st.binary(min_size=0, max_size=120))
    def test_garbage_after_valid_header_raises_only_codec_error(self, body: bytes) -> None:
        body = body + b"\x00" * (-len(body) % 4)
        for t in (0x0001, 0x0101, 0x0111):
            data = struct.pack("!HHI", t, len(body), stun.MAGIC_COOKIE) + b"\x00" * 12 + body
            for fn in (stun.decode, stun.parse_response):
                try:
                    fn(data)
                except stun.STUNError:
                    pass

    @settings(max_examples=200, deadline=None)
    @given(addresses, st.integers(0, 65535), st.binary(min_size=12, max_size=12))
    def test_success_round_trip(self, host: str, port: int, tid: bytes) -> None:
        req = stun.decode(stun.binding_request(tid)[1])
        resp = stun.parse_response(stun.binding_success(req, (host, port)))
        self.assertEqual(resp.transaction_id, tid)
        self.assertEqual(resp.mapped, (host, port))

    @settings(max_examples=200, deadline=None)
    @given(
        st.lists(st.tuples(st.integers(0, 0xFFFF).filter(lambda t: t != stun.ATTR_FINGERPRINT),
                           st.binary(max_size=40)), max_size=6),
        st.binary(min_size=12, max_size=12),
        st.integers(0, 0xFFF),
        st.integers(0, 3),
        st.booleans(),
    )
    def test_message_round_trip(self, attrs, tid, method, cls, fp) -> None:
        msg = stun.Message(method, cls, tid, tuple(attrs), fingerprint=fp)
        back = stun.decode(stun.encode(msg))
        self.assertEqual(back, msg)
        self.assertEqual(back.fingerprint, fp)
