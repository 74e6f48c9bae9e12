"""Padded disco pings (path-MTU probes): sizes on the wire and round trips up to 64 KiB."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from nacl.public import PrivateKey
from twisted.trial import unittest

from coderstack.tailnet import pmtu
from coderstack.wire import disco

A = PrivateKey.generate()
B = PrivateKey.generate()
A_PUB, B_PUB = bytes(A.public_key), bytes(B.public_key)
K_AB = disco.shared_key(bytes(A), B_PUB)
K_BA = disco.shared_key(bytes(B), A_PUB)
MAX_PADDING = pmtu.MAX_UDP_PAYLOAD - pmtu.PING_SIZE


class PaddedPingTests(unittest.TestCase):
    @settings(max_examples=60, deadline=None)
    @given(st.binary(min_size=12, max_size=12), st.binary(min_size=32, max_size=32),
           st.one_of(st.integers(0, 2000), st.integers(0, MAX_PADDING)))
    def test_round_trip_and_size(self, tx: bytes, key: bytes, padding: int) -> None:
        msg = disco.Ping(tx, key, padding)
        pkt = disco.seal(msg, A_PUB, K_AB)
        self.assertEqual(len(pkt), pmtu.PING_SIZE + padding)
        self.assertEqual(disco.open_packet(pkt, K_BA), msg)

    def test_probe_is_exactly_a_full_wireguard_datagram(self) -> None:
        for ipv6 in (False, True):
            for mtu in pmtu.probe_mtus(ipv6):
                ping = disco.Ping(b"t" * 12, A_PUB, pmtu.probe_padding(mtu))
                self.assertEqual(len(disco.seal(ping, A_PUB, K_AB)), mtu + 32)
                self.assertLessEqual(mtu + 32, pmtu.MAX_UDP_PAYLOAD)

    def test_padding_needs_the_node_key(self) -> None:
        self.assertRaises(disco.DiscoError, disco.encode_payload, disco.Ping(b"t" * 12, None, 10))

    @settings(max_examples=100, deadline=None)
    @given(st.binary(min_size=12, max_size=12), st.binary(min_size=32, max_size=32), st.binary(max_size=3000))
    def test_any_trailing_bytes_count_as_padding(self, tx: bytes, key: bytes, tail: bytes) -> None:
        """Tailscale fills padding with zeros but parsers must not care what it holds."""
        payload = b"\x01\x00" + tx + key + tail
        self.assertEqual(disco.decode_payload(payload), disco.Ping(tx, key, len(tail)))

    @settings(max_examples=100, deadline=None)
    @given(st.binary(max_size=4000))
    def test_garbage_after_the_magic_raises_only_disco_error(self, data: bytes) -> None:
        try:
            disco.open_packet(disco.MAGIC + A_PUB + data, K_BA)
        except disco.DiscoError:
            pass


class LadderTests(unittest.TestCase):
    def test_rungs(self) -> None:
        # Ethernet, jumbo and loopback link MTUs, minus IPv4+UDP+WireGuard, floored to 16.
        self.assertEqual(pmtu.probe_mtus(), (1440, 8928, 65472))
        self.assertEqual(pmtu.probe_mtus(ipv6=True), (1408, 8912, 65440))
        for m in pmtu.probe_mtus() + pmtu.probe_mtus(True):
            self.assertEqual(m % 16, 0)
        self.assertEqual(pmtu.inner_mtu(1500), 1440)  # 1500 - 20 - 8 - 32
        self.assertEqual(pmtu.MAX_MTU, 65472)

    def test_env_switch(self) -> None:
        self.assertTrue(pmtu.enabled_from_env({}))
        self.assertTrue(pmtu.enabled_from_env({"CODERSTACK_PMTUD": "1"}))
        for off in ("0", "false", "OFF", "no "):
            self.assertFalse(pmtu.enabled_from_env({"CODERSTACK_PMTUD": off}))
