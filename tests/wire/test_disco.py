"""Disco codec: Tailscale's byte layout, round trips, and garbage that only ever raises DiscoError."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.public import PrivateKey
from twisted.trial import unittest

from coderstack.wire import disco

A = PrivateKey.generate()
B = PrivateKey.generate()
A_PUB, B_PUB = bytes(A.public_key), bytes(B.public_key)
K_AB = disco.shared_key(bytes(A), B_PUB)
K_BA = disco.shared_key(bytes(B), A_PUB)

ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).filter(lambda a: a.ipv4_mapped is None).map(str)
endpoint = st.tuples(st.one_of(ipv4, ipv6), st.integers(0, 65535))
messages = st.one_of(
    st.builds(disco.Ping, st.binary(min_size=12, max_size=12)),
    st.builds(disco.Ping, st.binary(min_size=12, max_size=12),
              st.binary(min_size=32, max_size=32), st.integers(0, 64)),
    st.builds(disco.Pong, st.binary(min_size=12, max_size=12), endpoint),
    st.builds(disco.CallMeMaybe, st.lists(endpoint, min_size=1, max_size=8).map(tuple)),
)


class DiscoTests(unittest.TestCase):
    def test_box_key_is_symmetric(self) -> None:
        self.assertEqual(K_AB, K_BA)

    def test_ping_layout_and_size(self) -> None:
        tx = bytes(range(12))
        pkt = disco.seal(disco.Ping(tx, A_PUB), A_PUB, K_AB, urandom=lambda n: b"\x07" * n)
        self.assertEqual(len(pkt), 124)  # 62 header + 16 tag + 2 + 12 + 32
        self.assertEqual(pkt[:6], b"TS\xf0\x9f\x92\xac")
        self.assertEqual(pkt[6:38], A_PUB)
        self.assertEqual(pkt[38:62], b"\x07" * 24)
        self.assertEqual(disco.sender_key(pkt), A_PUB)
        self.assertEqual(disco.open_packet(pkt, K_BA), disco.Ping(tx, A_PUB, 0))

    def test_payload_bytes(self) -> None:
        tx = b"T" * 12
        self.assertEqual(
            disco.encode_payload(disco.Pong(tx, ("192.0.2.1", 41641))),
            b"\x02\x00" + tx + b"\0" * 10 + b"\xff\xff" + bytes([192, 0, 2, 1]) + b"\xa2\xa9",
        )
        cmm = disco.encode_payload(disco.CallMeMaybe((("2001:db8::1", 1), ("10.0.0.1", 2))))
        self.assertEqual(len(cmm), 2 + 36)
        self.assertEqual(cmm[:2], b"\x03\x00")
        pong = disco.seal(disco.Pong(tx, ("192.0.2.1", 1)), A_PUB, K_AB)
        self.assertEqual(len(pong), 110)

    def test_ping_without_node_key_and_with_padding(self) -> None:
        tx = b"x" * 12
        self.assertEqual(disco.decode_payload(b"\x01\x00" + tx), disco.Ping(tx, None, 0))
        self.assertEqual(disco.decode_payload(b"\x01\x00" + tx + A_PUB + b"\0" * 100),
                         disco.Ping(tx, A_PUB, 100))

    def test_call_me_maybe_rules(self) -> None:
        for bad in (b"\x03\x00", b"\x03\x01" + b"\0" * 18, b"\x03\x00" + b"\0" * 17):
            self.assertRaises(disco.DiscoError, disco.decode_payload, bad)

    def test_wrong_key_does_not_open(self) -> None:
        pkt = disco.seal(disco.Ping(b"1" * 12), A_PUB, K_AB)
        other = disco.shared_key(bytes(PrivateKey.generate()), A_PUB)
        self.assertRaises(disco.DiscoError, disco.open_packet, pkt, other)
        self.assertRaises(disco.DiscoError, disco.open_packet, pkt[:-1] + bytes([pkt[-1] ^ 1]), K_BA)

    def test_looks_like_disco(self) -> None:
        self.assertFalse(disco.looks_like_disco(disco.MAGIC + b"\0" * 55))
        self.assertTrue(disco.looks_like_disco(disco.MAGIC + b"\0" * 56))
        self.assertFalse(disco.looks_like_disco(b"\x01\0\0\0" + b"\0" * 144))

    @settings(max_examples=200, deadline=None)
    @given(messages)
    def test_round_trip(self, msg) -> None:
        pkt = disco.seal(msg, A_PUB, K_AB)
        self.assertEqual(disco.open_packet(pkt, K_BA), msg)

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=200))
    def test_garbage_payload_raises_only_disco_error(self, data: bytes) -> None:
        try:
            disco.decode_payload(data)
        except disco.DiscoError:
            pass

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=200))
    def test_garbage_packet_raises_only_disco_error(self, data: bytes) -> None:
        for pkt in (data, disco.MAGIC + data):
            try:
                disco.open_packet(pkt, K_BA)
            except disco.DiscoError:
                pass
