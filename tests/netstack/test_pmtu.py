"""Path-MTU changes under a live TCP connection: what we announce, and re-segmenting when the
path shrinks (unsent and retransmitted data both) or grows."""

import hashlib
import random

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from coderstack.netstack import tcpsegment
from coderstack.netstack.stack import Stack
from coderstack.netstack.tcp import TCPConfig
from coderstack.netstack.testing import Wire
from tests.netstack.test_transfer import Sink, Source

A, B = "fd00::1", "fd00::2"
BIG = 65472  # an inner MTU the tunnel probes on loopback


def _syn_mss(packet: bytes) -> int | None:
    seg = packet[40:]
    if not seg[13] & tcpsegment.SYN:
        return None
    return tcpsegment.parse_options(seg, 20, (seg[12] >> 4) * 4).mss


def pair(cfg: TCPConfig, **link) -> Wire:
    w = Wire(**link)
    w.a = Stack(A, w.to_b, config=cfg, rng=random.Random(1))
    w.b = Stack(B, w.to_a, config=cfg, rng=random.Random(2))
    return w


class AnnouncedMSSTests(unittest.TestCase):
    def test_mss_reflects_receive_mtu_not_path_mtu(self):
        """The path we send on is 1280, but we can take 64 KiB packets in: both SYNs say so, and
        each side still sends only what its own path MTU allows."""
        w = pair(TCPConfig(mtu=1280, receive_mtu=BIG))
        syns, sizes = [], []
        w.tap = lambda dest, pkt: (syns.append(_syn_mss(pkt)), sizes.append(len(pkt))) and True
        server = Sink()
        server.now = lambda: w.now
        w.b.listen(80, lambda conn: server)
        payload = random.Random(5).randbytes(300_000)
        w.a.connect(B, 80, Source(payload, w), 0.0)
        w.run(until=lambda: server.lost, limit=60)
        self.assertEqual([m for m in syns if m is not None], [BIG - 60, BIG - 60])
        self.assertLessEqual(max(sizes), 1280)
        self.assertEqual(server.hash.digest(), hashlib.sha256(payload).digest())

    def test_default_receive_mtu_is_the_mtu(self):
        w = pair(TCPConfig(mtu=9000))
        syns = []
        w.tap = lambda dest, pkt: syns.append(_syn_mss(pkt)) or True
        w.b.listen(80, lambda conn: Sink())
        w.a.connect(B, 80, Sink(), 0.0)
        w.run(limit=1)
        self.assertEqual([m for m in syns if m is not None], [8940, 8940])

    def test_path_mtu_raised_after_handshake_grows_segments(self):
        w = pair(TCPConfig(mtu=1280, receive_mtu=BIG))
        sizes = []
        w.tap = lambda dest, pkt: sizes.append(len(pkt)) or True
        server = Sink()
        server.now = lambda: w.now
        w.b.listen(80, lambda conn: server)
        payload = random.Random(6).randbytes(4 << 20)
        client = Source(payload, w)
        conn = w.a.connect(B, 80, client, 0.0)
        w.run(until=lambda: server.count >= 100_000, limit=60)
        self.assertLessEqual(max(sizes), 1280)
        w.a.set_path_mtu(B, BIG, w.now)
        w.run(until=lambda: server.lost and client.lost, limit=600)
        self.assertEqual(max(sizes), BIG)
        self.assertEqual(conn.mss, BIG - 60 - 12)  # timestamps take 12 bytes of each segment
        self.assertEqual(server.hash.digest(), hashlib.sha256(payload).digest())


class ShrinkingPathTests(unittest.TestCase):
    """The path stops carrying large packets (a direct path lost, or DERP at 1280): everything,
    in flight or not yet sent, must be re-sent in segments that fit, and the bytes arrive."""

    def run_shrink(self, seed: int, loss: float, at: int, new_mtu: int) -> None:
        w = pair(TCPConfig(mtu=1280, receive_mtu=BIG), loss=loss, seed=seed)
        w.a.set_path_mtu(B, BIG, 0.0)
        w.b.set_path_mtu(A, BIG, 0.0)
        shrunk = [False]
        big_after = []

        def tap(dest, pkt):
            if shrunk[0] and len(pkt) > new_mtu:
                big_after.append(len(pkt))
                return False  # a black hole for anything larger, as a real shrunk path is
            return True

        w.tap = tap
        server = Sink()
        server.now = lambda: w.now
        w.b.listen(80, lambda conn: server)
        payload = random.Random(seed).randbytes(3 << 20)
        client = Source(payload, w)
        conn = w.a.connect(B, 80, client, 0.0)
        w.run(until=lambda: server.count >= at, limit=600)
        self.assertFalse(server.lost)
        shrunk[0] = True  # the link shrinks first; our side hears of it a moment later
        w.run(until=lambda: False, limit=w.now + 0.001)
        big_after.clear()
        w.a.set_path_mtu(B, new_mtu, w.now)
        w.b.set_path_mtu(A, new_mtu, w.now)
        w.run(until=lambda: server.lost and client.lost, limit=3600)
        self.assertEqual(big_after, [])
        self.assertEqual(conn.mtu, new_mtu)
        self.assertEqual(server.count, len(payload))
        self.assertEqual(server.hash.digest(), hashlib.sha256(payload).digest())
        self.assertEqual((server.lost, client.lost), ([None], [None]))

    def test_shrink_mid_transfer(self):
        self.run_shrink(seed=1, loss=0.0, at=500_000, new_mtu=1280)

    def test_shrink_mid_transfer_with_loss(self):
        self.run_shrink(seed=2, loss=0.01, at=700_000, new_mtu=1280)

    def test_retransmissions_fit_the_new_mss(self):
        """A segment lost before the change is retransmitted (fast retransmit or RTO) at the new
        size: the tap would drop it otherwise and the transfer could never finish."""
        w = pair(TCPConfig(mtu=1280, receive_mtu=BIG))
        w.a.set_path_mtu(B, 9000, 0.0)
        dropped_once = []
        state = {"shrunk": False}

        def tap(dest, pkt):
            if dest == "b" and len(pkt) > 8000 and not dropped_once and w.b.connections:
                dropped_once.append(pkt)
                return False
            if state["shrunk"] and len(pkt) > 1280:
                return False
            return True

        w.tap = tap
        server = Sink()
        server.now = lambda: w.now
        w.b.listen(80, lambda conn: server)
        payload = random.Random(9).randbytes(1 << 20)
        client = Source(payload, w)
        conn = w.a.connect(B, 80, client, 0.0)
        w.run(until=lambda: bool(dropped_once), limit=60)
        state["shrunk"] = True
        # Enter recovery first (SACKs arrive for the data after the hole), then shrink.
        w.run(until=lambda: conn.in_recovery or conn.retries, limit=60)
        w.a.set_path_mtu(B, 1280, w.now)
        w.run(until=lambda: server.lost and client.lost, limit=3600)
        self.assertEqual(server.hash.digest(), hashlib.sha256(payload).digest())
        self.assertGreater(w.a.stats["tcp_retransmits"], 0)

    @given(st.integers(0, 2**32 - 1), st.integers(10_000, 2_000_000), st.sampled_from([1280, 1440, 8928]),
           st.sampled_from([0.0, 0.01, 0.03]))
    @settings(max_examples=15, deadline=None)
    def test_any_shrink_point(self, seed, at, new_mtu, loss):
        self.run_shrink(seed=seed, loss=loss, at=at, new_mtu=new_mtu)
