"""The sans-IO WireGuard core: messages, handshake, transport, cookies, rotation and every timer.

Time is an explicit ``now``; jitter comes from seeded ``random.Random`` instances.
"""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from coderstack.wire import wireguard as wg
from coderstack.wire.replay import REJECT_AFTER_MESSAGES
from coderstack.wire.wireguard import (
    AuthenticatedSource,
    Device,
    Dropped,
    HandshakeComplete,
    HandshakeFailed,
    Packet,
    Reply,
    Transmit,
)


def ip6(payload: bytes = b"x" * 10) -> bytes:
    """A minimal IPv6 packet (the core only reads the version and payload length)."""
    return (
        bytes([0x60, 0, 0, 0]) + len(payload).to_bytes(2, "big") + b"\x11\x40" + bytes(32) + payload
    )


def kinds(events) -> list[str]:
    return [type(e).__name__ for e in events]


def of(kind, events) -> list:
    return [e for e in events if isinstance(e, kind)]


def datagrams(events) -> list[bytes]:
    return [e.datagram for e in events if isinstance(e, Transmit)]


class Pair:
    """Two Devices that know each other; A at source "a", B at source "b"."""

    def __init__(self, psk_a: bytes | None = None, psk_b: bytes | None = None, **kw) -> None:
        self.a = Device(wg.generate_private_key(), rng=random.Random(1), **kw)
        self.b = Device(wg.generate_private_key(), rng=random.Random(2), **kw)
        self.pa = self.a.add_peer(self.b.public_key, preshared_key=psk_a)
        self.pb = self.b.add_peer(self.a.public_key, preshared_key=psk_b)

    def to_b(self, events, now: float) -> list:
        out = []
        for d in datagrams(events):
            out += self.b.receive(d, now, "a")
        return out

    def to_a(self, events, now: float) -> list:
        out = []
        for d in datagrams(events):
            out += self.a.receive(d, now, "b")
        return out

    def handshake(self, now: float = 0.0) -> None:
        """A initiates; B confirms on A's keepalive. Both sides report completion."""
        init = self.a.initiate(self.b.public_key, now)
        response = self.to_b(init, now)
        done_a = self.to_a(response, now)
        assert of(HandshakeComplete, done_a), done_a
        done_b = self.to_b(done_a, now)
        assert of(HandshakeComplete, done_b), done_b


class ConstantsAndMessages(unittest.TestCase):
    def test_initial_chaining_key_and_hash(self):
        self.assertTrue(wg.C0.hex().startswith("60e26dae") and wg.C0.hex().endswith("78cd36"))
        self.assertTrue(wg.H0.hex().startswith("2211b361") and wg.H0.hex().endswith("079ef3"))

    def test_kdf_is_hmac_blake2s_chain(self):
        import hashlib
        import hmac

        key, data = b"k" * 32, b"input"
        t0 = hmac.new(key, data, hashlib.blake2s).digest()
        t1 = hmac.new(t0, b"\x01", hashlib.blake2s).digest()
        t2 = hmac.new(t0, t1 + b"\x02", hashlib.blake2s).digest()
        t3 = hmac.new(t0, t2 + b"\x03", hashlib.blake2s).digest()
        self.assertEqual(wg._kdf3(key, data), (t1, t2, t3))
        self.assertEqual(wg._kdf2(key, data), (t1, t2))
        self.assertEqual(wg._kdf1(key, data), t1)

    def test_tai64n(self):
        self.assertEqual(wg.tai64n(0.0), bytes.fromhex("400000000000000a00000000"))
        stamp = wg.tai64n(1_700_000_000.5)
        self.assertEqual(int.from_bytes(stamp[:8], "big"), 0x400000000000000A + 1_700_000_000)
        nanos = int.from_bytes(stamp[8:], "big")
        self.assertEqual(nanos & 0xFFFFFF, 0)  # whitened like wireguard-go
        self.assertLessEqual(500_000_000 - nanos, 0xFFFFFF)

    def test_message_sizes_and_layout(self):
        p = Pair()
        init = datagrams(p.a.initiate(p.b.public_key, 0.0))[0]
        self.assertEqual(len(init), 148)
        self.assertEqual(init[:4], b"\x01\x00\x00\x00")
        self.assertEqual(init[-16:], bytes(16))  # no cookie: mac2 is zero
        response = datagrams(p.to_b([Transmit(b"", init)], 0.0))[0]
        self.assertEqual(len(response), 92)
        self.assertEqual(response[:4], b"\x02\x00\x00\x00")
        self.assertEqual(response[8:12], init[4:8])  # receiver = initiator's sender index
        confirm = datagrams(p.to_a([Transmit(b"", response)], 0.0))
        self.assertEqual([len(d) for d in confirm], [32])  # a keepalive
        self.assertEqual(confirm[0][:4], b"\x04\x00\x00\x00")
        self.assertEqual(confirm[0][4:8], response[4:8])
        self.assertEqual(confirm[0][8:16], bytes(8))  # counter 0

    def test_padding_to_16_capped_at_mtu(self):
        p = Pair(mtu=1290)
        p.handshake()
        for n, wire in (
            (40, 48 + 32),
            (41, 48 + 32),
            (48, 48 + 32),
            (49, 64 + 32),
            (1285, 1290 + 32),
        ):
            packet = ip6(bytes(n - 40))
            (out,) = datagrams(p.a.send(p.b.public_key, packet, 1.0))
            self.assertEqual(len(out), wire, n)
            self.assertEqual(p.b.receive(out, 1.0, "a")[0].data, packet)  # padding removed

    def test_is_wireguard(self):
        p = Pair()
        init = datagrams(p.a.initiate(p.b.public_key, 0.0))[0]
        self.assertTrue(wg.is_wireguard(init))
        self.assertFalse(wg.is_wireguard(b"TS\xf0\x9f\x92\xac" + bytes(40)))  # disco magic
        stun = bytes.fromhex("0001000c2112a442") + bytes(32)  # binding request
        self.assertFalse(wg.is_wireguard(stun))
        self.assertFalse(wg.is_wireguard(b"\x04\x00\x00\x00"))  # too short to be one

    def test_bad_keys_refused(self):
        with self.assertRaises(ValueError):
            Device(b"short")
        d = Device(wg.generate_private_key())
        with self.assertRaises(ValueError):
            d.add_peer(bytes(32))  # a low-order point: the DH result is all zeros
        with self.assertRaises(ValueError):
            d.add_peer(b"\x01" * 31)


class HandshakeTests(unittest.TestCase):
    def test_handshake_and_data_both_ways(self):
        p = Pair()
        init = p.a.initiate(p.b.public_key, 0.0)
        response = p.to_b(init, 0.0)
        self.assertEqual(kinds(response), ["AuthenticatedSource", "Transmit"])
        self.assertEqual(response[0], AuthenticatedSource(p.a.public_key, "a"))
        done_a = p.to_a(response, 0.01)
        self.assertEqual(
            of(HandshakeComplete, done_a), [HandshakeComplete(p.b.public_key, True, "b")]
        )
        # B waits for A's first transport packet before using the new keys.
        self.assertIsNone(p.pb.current)
        done_b = p.to_b(done_a, 0.02)
        self.assertEqual(done_b, [HandshakeComplete(p.a.public_key, False, "a")])
        for sender, receiver, via, rx in ((p.a, p.b, "a", p.to_b), (p.b, p.a, "b", p.to_a)):
            packet = ip6(b"hello " + via.encode())
            got = rx(sender.send(receiver.public_key, packet, 1.0), 1.0)
            self.assertEqual(got, [Packet(sender.public_key, packet, via)])
        self.assertEqual(p.a.drops + p.b.drops, {})
        self.assertEqual(p.pa.last_handshake, 0.01)

    def test_packets_queued_until_handshake_then_flushed_in_order(self):
        p = Pair()
        first = p.a.send(p.b.public_key, ip6(b"1"), 0.0)
        self.assertEqual([len(d) for d in datagrams(first)], [148])
        self.assertEqual(datagrams(p.a.send(p.b.public_key, ip6(b"2"), 0.001)), [])
        done_a = p.to_a(p.to_b(first, 0.0), 0.01)
        self.assertEqual(len(datagrams(done_a)), 2)  # the queue replaces the keepalive
        got = p.to_b(done_a, 0.02)
        self.assertEqual([e.data for e in of(Packet, got)], [ip6(b"1"), ip6(b"2")])

    def test_responder_sends_with_old_keys_until_confirmed(self):
        p = Pair()
        p.handshake(0.0)
        old = p.pb.current
        init = p.a.initiate(p.b.public_key, 10.0)
        response = p.to_b(init, 10.0)
        self.assertIs(p.pb.current, old)
        self.assertIsNotNone(p.pb.next)
        (on_old,) = datagrams(p.b.send(p.a.public_key, ip6(b"old"), 10.0))
        self.assertEqual(int.from_bytes(on_old[4:8], "little"), old.remote_index)
        p.to_a(response, 10.0)
        self.assertEqual(of(Packet, p.a.receive(on_old, 10.0, "b"))[0].data, ip6(b"old"))

    def test_wrong_psk_never_completes(self):
        p = Pair(psk_a=b"\x01" * 32, psk_b=b"\x02" * 32)
        response = p.to_b(p.a.initiate(p.b.public_key, 0.0), 0.0)
        self.assertEqual(len(datagrams(response)), 1)  # the initiation does not involve the PSK
        self.assertEqual(p.to_a(response, 0.0), [Dropped("bad-response", None)])
        self.assertIsNone(p.pa.current)
        self.assertEqual(p.a.drops["bad-response"], 1)

    def test_matching_psk_completes(self):
        psk = b"\x07" * 32
        Pair(psk_a=psk, psk_b=psk).handshake()

    def test_unknown_peer_and_wrong_key(self):
        p = Pair()
        stranger = Device(wg.generate_private_key())
        stranger.add_peer(p.b.public_key)
        got = p.b.receive(datagrams(stranger.initiate(p.b.public_key, 0.0))[0], 0.0, "s")
        self.assertEqual(got, [Dropped("unknown-peer", None)])
        # Initiations built for a different responder key fail mac1.
        other = Device(wg.generate_private_key())
        p.a.add_peer(other.public_key)
        got = p.b.receive(datagrams(p.a.initiate(other.public_key, 0.0))[0], 0.0, "a")
        self.assertEqual(got, [Dropped("bad-mac1", None)])

    def test_initiation_replay_refused(self):
        p = Pair()
        (init,) = datagrams(p.a.initiate(p.b.public_key, 0.0))
        self.assertEqual(len(datagrams(p.b.receive(init, 0.0, "a"))), 1)
        self.assertEqual(p.b.receive(init, 1.0, "a"), [Dropped("initiation-replay", None)])

    def test_initiation_rate_limited_to_one_per_20ms(self):
        p = Pair()
        first = p.a._create_initiation(p.pa, 0.0)
        second = p.a._create_initiation(p.pa, 0.010)
        third = p.a._create_initiation(p.pa, 0.030)
        self.assertEqual(len(datagrams(p.b.receive(first, 0.0, "a"))), 1)
        self.assertEqual(p.b.receive(second, 0.010, "a"), [Dropped("initiation-flood", None)])
        self.assertEqual(len(datagrams(p.b.receive(third, 0.021, "a"))), 1)

    def test_timestamps_strictly_increase_on_a_frozen_clock(self):
        p = Pair()
        stamps = []
        for _ in range(3):
            p.a._create_initiation(p.pa, 5.0)
            stamps.append(p.pa.last_sent_timestamp)
        self.assertEqual(stamps, sorted(set(stamps)))

    def test_simultaneous_initiations_recover_when_retry_is_rate_limited(self):
        p = Pair()
        init_a = p.a.initiate(p.b.public_key, 0.0)
        init_b = p.b.initiate(p.a.public_key, 0.0)
        # The initiations cross slowly: each side answers the other's 1 s later, so its own
        # retransmission at ~5 s falls inside the 5 s limit that answering restarted.
        resp_b = p.to_b(init_a, 1.0)
        resp_a = p.to_a(init_b, 1.0)
        p.to_a(resp_b, 1.0)
        p.to_b(resp_a, 1.0)
        now = 1.0
        for _ in range(10):
            now = min(p.a.next_deadline(), p.b.next_deadline())
            ta, tb = p.a.tick(now), p.b.tick(now)
            for _ in range(3):
                ta, tb = p.to_a(tb, now), p.to_b(ta, now)
            if p.pa.current and p.pb.current:
                break
        self.assertIsNotNone(p.pa.current)
        self.assertIsNotNone(p.pb.current)
        self.assertLess(now, 7.0)

    def test_simultaneous_initiations_recover(self):
        p = Pair()
        init_a = p.a.initiate(p.b.public_key, 0.0)
        init_b = p.b.initiate(p.a.public_key, 0.0)
        resp_b = p.to_b(init_a, 0.0)
        resp_a = p.to_a(init_b, 0.0)
        # Each initiation was superseded by answering the other's: both responses are stale.
        self.assertEqual(kinds(p.to_a(resp_b, 0.02)), ["Dropped"])
        self.assertEqual(kinds(p.to_b(resp_a, 0.02)), ["Dropped"])
        # The retransmit timers sort it out.
        now = 0.02
        for _ in range(20):
            now = min(p.a.next_deadline(), p.b.next_deadline())
            ta, tb = p.a.tick(now), p.b.tick(now)
            for _ in range(3):
                ta, tb = p.to_a(tb, now), p.to_b(ta, now)
            if p.pa.current and p.pb.current:
                break
        self.assertIsNotNone(p.pa.current)
        self.assertIsNotNone(p.pb.current)
        self.assertEqual(
            of(Packet, p.to_b(p.a.send(p.b.public_key, ip6(), now), now))[0].data, ip6()
        )

    def test_simultaneous_senders_with_steady_data_do_not_livelock(self):
        # Two peers that start sending at the same instant and keep sending every 20 ms, 1 ms
        # apart on the wire: their initiations cross, each answers the other's and drops the
        # stale response. The next try must not be timed off the answer exactly (the offset
        # between the two would repeat every round); jitter separates them.
        p = Pair()
        delay, step = 0.001, 0.02
        wire: list[tuple[float, str, bytes]] = []
        now = 0.0
        while now < 60.0 and not (p.pa.current and p.pb.current):
            events = {
                "a": p.a.send(p.b.public_key, ip6(), now) + p.a.tick(now),
                "b": p.b.send(p.a.public_key, ip6(), now) + p.b.tick(now),
            }
            for side, evs in events.items():
                wire += [(now + delay, side, d) for d in datagrams(evs)]
            # Deliver what has arrived by the next step, answering at arrival time.
            while wire and wire[0][0] <= now + step:
                wire.sort()
                at, side, d = wire.pop(0)
                replies = p.b.receive(d, at, "a") if side == "a" else p.a.receive(d, at, "b")
                wire += [(at + delay, "b" if side == "a" else "a", r) for r in datagrams(replies)]
            now = round(now + step, 6)
        self.assertIsNotNone(p.pa.current, f"no session after {now:.2f} s")
        self.assertIsNotNone(p.pb.current, f"no session after {now:.2f} s")
        self.assertLess(now, 12.0)


class TransportTests(unittest.TestCase):
    def setUp(self):
        self.p = Pair()
        self.p.handshake(0.0)

    def test_replayed_and_forged_packets_dropped(self):
        p = self.p
        (d,) = datagrams(p.a.send(p.b.public_key, ip6(), 1.0))
        self.assertEqual(kinds(p.b.receive(d, 1.0, "a")), ["Packet"])
        self.assertEqual(p.b.receive(d, 1.0, "a"), [Dropped("replay", p.a.public_key)])
        forged = d[:-1] + bytes([d[-1] ^ 1])
        self.assertEqual(p.b.receive(forged, 1.0, "a"), [Dropped("bad-tag", p.a.public_key)])
        self.assertEqual(p.b.receive(d[:20], 1.0, "a"), [Dropped("bad-tag", p.a.public_key)])
        unknown = d[:4] + b"\xff\xff\xff\xff" + d[8:]
        self.assertEqual(p.b.receive(unknown, 1.0, "a"), [Dropped("unknown-index", None)])
        self.assertEqual(p.b.drops, {"replay": 1, "bad-tag": 2, "unknown-index": 1})

    def test_out_of_order_delivery_accepted(self):
        p = self.p
        sent = [datagrams(p.a.send(p.b.public_key, ip6(bytes([i])), 1.0))[0] for i in range(50)]
        got = []
        for d in reversed(sent):
            got += p.b.receive(d, 1.0, "a")
        self.assertEqual(len(of(Packet, got)), 50)

    def test_keepalive_carries_no_packet(self):
        p = self.p
        self.assertEqual(p.to_b(p.a.tick(0.0), 0.0), [])

    def test_not_ip_and_truncated_ip_dropped(self):
        p = self.p
        self.assertEqual(
            p.to_b(p.a.send(p.b.public_key, b"\x00" * 40, 1.0), 1.0),
            [Dropped("not-ip", p.a.public_key)],
        )
        lying = bytearray(ip6(b"abc"))
        lying[5] = 200  # payload length beyond the packet
        self.assertEqual(
            p.to_b(p.a.send(p.b.public_key, bytes(lying), 1.0), 1.0),
            [Dropped("truncated-ip", p.a.public_key)],
        )

    def test_send_many_matches_send(self):
        p = self.p
        packets = [ip6(bytes([i]) * i) for i in range(20)]
        out = p.a.send_many(p.b.public_key, packets, 1.0)
        self.assertEqual(
            [len(d) for d in datagrams(out)], [32 + len(x) + (-len(x) % 16) for x in packets]
        )
        counters = [int.from_bytes(d[8:16], "little") for d in datagrams(out)]
        self.assertEqual(counters, list(range(1, 21)))  # 0 was A's handshake keepalive
        got = p.to_b(out, 1.0)
        self.assertEqual([e.data for e in of(Packet, got)], packets)
        self.assertEqual(p.pa.tx_bytes, sum(len(d) for d in datagrams(out)) + 32)

    def test_send_many_without_session_queues_then_flushes(self):
        p = Pair()
        packets = [ip6(b"1"), ip6(b"2"), ip6(b"3")]
        out = p.a.send_many(p.b.public_key, packets, 0.0)
        self.assertEqual([len(d) for d in datagrams(out)], [148])
        done = p.to_a(p.to_b(out, 0.0), 0.0)
        self.assertEqual([e.data for e in of(Packet, p.to_b(done, 0.0))], packets)
        self.assertEqual(kinds(p.a.send_many(b"\x05" * 32, packets, 0.0)), ["Dropped"])

    def test_garbage_counted_by_reason(self):
        b = self.p.b
        self.assertEqual(b.receive(b"", 1.0), [Dropped("short", None)])
        self.assertEqual(b.receive(bytes([9]) + bytes(40), 1.0), [Dropped("unknown-type", None)])
        self.assertEqual(b.receive(bytes([1]) + bytes(100), 1.0), [Dropped("bad-size", None)])
        self.assertEqual(b.receive(bytes([1]) + bytes(147), 1.0), [Dropped("bad-mac1", None)])
        self.assertEqual(b.drops, {"short": 1, "unknown-type": 1, "bad-size": 1, "bad-mac1": 1})

    def test_remove_peer_zeroes_its_sessions(self):
        p = self.p
        kp = p.pa.current
        (d,) = datagrams(p.b.send(p.a.public_key, ip6(), 1.0))
        p.a.remove_peer(p.b.public_key)
        self.assertIsNone(kp.seal)
        self.assertEqual(p.a._keypairs, {})
        self.assertEqual(p.a.receive(d, 1.0, "b"), [Dropped("unknown-index", None)])
        self.assertEqual(kinds(p.a.send(p.b.public_key, ip6(), 1.0)), ["Dropped"])

    def test_send_to_unknown_peer(self):
        self.assertEqual(
            self.p.a.send(b"\x09" * 32, ip6(), 1.0), [Dropped("unknown-peer", b"\x09" * 32)]
        )

    def test_counter_exhaustion(self):
        p = self.p
        # B, the responder, does not rekey on message count, so it runs its counter out.
        kp = p.pb.current
        kp.send_counter = REJECT_AFTER_MESSAGES - 1
        (last,) = datagrams(p.b.send(p.a.public_key, ip6(b"last"), 100.0))
        self.assertEqual(int.from_bytes(last[8:16], "little"), REJECT_AFTER_MESSAGES - 1)
        self.assertEqual(kinds(p.a.receive(last, 100.0, "b")), ["Packet"])
        # The keypair is spent: the next packet is queued and a handshake starts.
        out = p.b.send(p.a.public_key, ip6(b"next"), 100.0)
        self.assertEqual([len(d) for d in datagrams(out)], [148])
        self.assertEqual(list(p.pb.staged), [ip6(b"next")])
        # A receiver refuses counters at the limit even when correctly encrypted.
        kp.send_counter = REJECT_AFTER_MESSAGES
        beyond = p.b._encrypt(kp, ip6())
        self.assertEqual(p.a.receive(beyond, 100.0, "b"), [Dropped("replay", p.b.public_key)])

    def test_rekey_after_messages(self):
        p = self.p
        p.pa.current.send_counter = wg.REKEY_AFTER_MESSAGES
        self.assertEqual(
            [len(d) for d in datagrams(p.a.send(p.b.public_key, ip6(), 6.0))], [32 + 64, 148]
        )


class TimerTests(unittest.TestCase):
    """Each timer rule, driven through next_deadline()/tick() as an adapter would."""

    def run_until(
        self, device: Device, until: float, start: float = 0.0
    ) -> list[tuple[float, object]]:
        """Tick ``device`` at each deadline up to ``until``; returns (time, event) pairs."""
        log = []
        now = start
        while True:
            deadline = device.next_deadline()
            if deadline is None or deadline > until:
                return log
            self.assertGreaterEqual(deadline, now)  # never asks to go back in time
            now = deadline
            log += [(now, e) for e in device.tick(now)]

    def test_retransmit_every_rekey_timeout_with_jitter_then_give_up(self):
        a = Device(wg.generate_private_key(), rng=random.Random(3))
        peer = a.add_peer(Device(wg.generate_private_key()).public_key)
        first = a.send(peer.public_key, ip6(), 0.0)
        self.assertEqual([len(d) for d in datagrams(first)], [148])
        log = self.run_until(a, 1000.0)
        sent = [t for t, e in log if isinstance(e, Transmit)]
        self.assertEqual(len(sent) + 1, 20)  # the first try and 19 retries, as wireguard-go
        gaps = [b - a for a, b in zip([0.0] + sent, sent, strict=False)]
        for gap in gaps:
            self.assertTrue(5.0 <= gap < 5.0 + 0.334 + 1e-9, gap)
        self.assertNotEqual(len(set(gaps)), 1)  # jittered
        failed = [(t, e) for t, e in log if isinstance(e, HandshakeFailed)]
        self.assertEqual(len(failed), 1)
        self.assertGreater(failed[0][0], 90.0)
        self.assertEqual(list(peer.staged), [])
        self.assertEqual(a.drops["handshake-failed"], 1)
        self.assertEqual(peer.hs_state, wg.HS_ZEROED)  # zeroed 540 s after giving up
        self.assertIsNone(a.next_deadline())

    def test_passive_keepalive_after_10s(self):
        p = Pair()
        p.handshake(0.0)
        p.to_a(p.b.send(p.a.public_key, ip6(), 1.0), 1.0)
        log = self.run_until(p.a, 11.5, 1.0)
        self.assertEqual([(t, len(e.datagram)) for t, e in log], [(11.0, 32)])

    def test_no_keepalive_when_we_answered(self):
        p = Pair()
        p.handshake(0.0)
        p.to_a(p.b.send(p.a.public_key, ip6(), 1.0), 1.0)
        p.a.send(p.b.public_key, ip6(), 2.0)
        self.assertEqual(self.run_until(p.a, 12.0, 2.0), [])

    def test_new_handshake_15s_after_unanswered_data(self):
        p = Pair()
        p.handshake(0.0)
        p.a.send(p.b.public_key, ip6(), 1.0)  # B's replies never arrive
        log = self.run_until(p.a, 17.0, 1.0)
        (t, event) = log[0]
        self.assertTrue(16.0 <= t < 16.334, t)
        self.assertEqual(len(event.datagram), 148)

    def test_answered_data_does_not_rehandshake(self):
        p = Pair()
        p.handshake(0.0)
        p.a.send(p.b.public_key, ip6(), 1.0)
        p.to_a(p.b.send(p.a.public_key, ip6(), 2.0), 2.0)
        self.assertEqual([len(e.datagram) for _, e in self.run_until(p.a, 17.0, 2.0)], [32])

    def test_rekey_after_time_on_send_by_initiator_only(self):
        p = Pair()
        p.handshake(0.0)
        self.assertEqual(len(datagrams(p.a.send(p.b.public_key, ip6(), 119.0))), 1)
        self.assertEqual([len(d) for d in datagrams(p.b.send(p.a.public_key, ip6(), 121.0))], [96])
        self.assertEqual(
            [len(d) for d in datagrams(p.a.send(p.b.public_key, ip6(), 121.0))], [96, 148]
        )

    def test_rekey_on_receive_after_165s(self):
        p = Pair()
        p.handshake(0.0)
        self.assertEqual(kinds(p.to_a(p.b.send(p.a.public_key, ip6(), 164.0), 164.0)), ["Packet"])
        got = p.to_a(p.b.send(p.a.public_key, ip6(), 166.0), 166.0)
        self.assertEqual(kinds(got), ["Transmit", "Packet"])
        self.assertEqual(len(got[0].datagram), 148)
        got = p.to_a(p.b.send(p.a.public_key, ip6(), 171.5), 171.5)
        self.assertEqual(kinds(got), ["Packet"])  # only once

    def test_reject_after_time(self):
        p = Pair()
        p.handshake(0.0)
        (late,) = datagrams(p.b.send(p.a.public_key, ip6(), 179.0))
        self.assertEqual(
            p.a.receive(late, 180.0, "b"), [Dropped("expired-keypair", p.b.public_key)]
        )
        out = p.b.send(p.a.public_key, ip6(b"queued"), 180.0)
        self.assertEqual([len(d) for d in datagrams(out)], [148])  # B initiates now
        self.assertEqual(list(p.pb.staged), [ip6(b"queued")])

    def test_expired_keys_are_zeroed(self):
        p = Pair()
        p.handshake(0.0)
        kp = p.pa.current
        self.run_until(p.a, 181.0)
        self.assertIsNone(p.pa.current)
        self.assertIsNone(kp.seal)
        self.assertIsNone(kp.open)
        self.assertEqual(p.a._keypairs, {})

    def test_all_key_material_zeroed_after_540s(self):
        p = Pair()
        p.handshake(0.0)
        p.a.initiate(p.b.public_key, 100.0)  # a handshake left in flight
        self.assertEqual(p.pa.hs_state, wg.HS_INITIATION_CREATED)
        log = self.run_until(p.a, 539.0)
        self.assertEqual(p.pa.hs_state, wg.HS_INITIATION_CREATED)  # retries, then gives up
        self.assertTrue(any(isinstance(e, HandshakeFailed) for _, e in log))
        self.run_until(p.a, 541.0, 539.0)
        self.assertEqual(p.pa.hs_state, wg.HS_ZEROED)
        self.assertEqual(p.pa.hs_ephemeral_private, b"")
        self.assertEqual(p.pa.keypairs(), [])
        self.assertEqual(p.a._handshakes, {})

    def test_persistent_keepalive(self):
        a = Device(wg.generate_private_key(), rng=random.Random(5))
        b = Device(wg.generate_private_key())
        b.add_peer(a.public_key)
        peer = a.add_peer(b.public_key, persistent_keepalive=25.0)
        for d in datagrams(a.initiate(b.public_key, 0.0)):
            for r in datagrams(b.receive(d, 0.0, "a")):
                a.receive(r, 0.0, "b")
        log = self.run_until(a, 80.0)
        times = [t for t, e in log if isinstance(e, Transmit)]
        self.assertEqual(times, [25.0, 50.0, 75.0])
        self.assertIsNotNone(peer.current)

    def test_next_deadline_is_never_late(self):
        p = Pair()
        p.handshake(0.0)
        p.a.send(p.b.public_key, ip6(), 1.0)
        deadline = p.a.next_deadline()
        self.assertLessEqual(deadline, p.pa.deadline())
        self.assertEqual(p.a.tick(deadline - 0.001), [])


class RotationTests(unittest.TestCase):
    def test_rekey_loses_nothing_in_flight(self):
        p = Pair()
        p.handshake(0.0)
        # Both sides have packets in flight on the old keys when A starts a new handshake.
        from_a_old = datagrams(p.a.send(p.b.public_key, ip6(b"a-old"), 121.0))
        self.assertEqual(len(from_a_old), 2)  # data + initiation (REKEY_AFTER_TIME passed)
        init = [from_a_old.pop()]
        from_b_old = datagrams(p.b.send(p.a.public_key, ip6(b"b-old"), 121.0))
        response = datagrams(p.to_b([Transmit(b"", d) for d in init], 121.0))
        from_b_still_old = datagrams(p.b.send(p.a.public_key, ip6(b"b-still-old"), 121.0))
        confirm = datagrams(p.to_a([Transmit(b"", d) for d in response], 121.1))
        self.assertEqual(len(p.pa.keypairs()), 2)  # previous + current
        from_a_new = datagrams(p.a.send(p.b.public_key, ip6(b"a-new"), 121.2))
        got_a = []
        for d in from_b_old + from_b_still_old:
            got_a += p.a.receive(d, 121.3, "b")
        self.assertEqual([e.data for e in of(Packet, got_a)], [ip6(b"b-old"), ip6(b"b-still-old")])
        got_b = []
        for d in confirm + from_a_new + from_a_old:  # the old one arrives last
            got_b += p.b.receive(d, 121.3, "a")
        self.assertEqual(len(of(HandshakeComplete, got_b)), 1)
        self.assertEqual([e.data for e in of(Packet, got_b)], [ip6(b"a-new"), ip6(b"a-old")])
        # B now sends on the new keys too.
        (d,) = datagrams(p.b.send(p.a.public_key, ip6(b"b-new"), 121.4))
        self.assertEqual(int.from_bytes(d[4:8], "little"), p.pb.current.remote_index)
        self.assertIs(p.a._keypairs[int.from_bytes(d[4:8], "little")], p.pa.current)
        self.assertEqual(p.a.drops + p.b.drops, {})

    def test_previous_keypair_retired_on_second_rotation(self):
        p = Pair()
        p.handshake(0.0)
        first = p.pa.current
        p.handshake(10.0)
        self.assertIs(p.pa.previous, first)
        p.handshake(20.0)
        self.assertIsNone(first.seal)
        self.assertNotIn(first.local_index, p.a._keypairs)
        self.assertEqual(len(p.a._keypairs), 2)
        self.assertEqual(len(p.b._keypairs), 2)


class CookieTests(unittest.TestCase):
    def test_under_load_cookie_then_mac2(self):
        p = Pair(handshake_load_threshold=0)  # always "under load"
        init = p.a.send(p.b.public_key, ip6(b"q"), 0.0)
        got = p.to_b(init, 0.0)
        self.assertEqual(kinds(got), ["Dropped", "Reply"])
        self.assertEqual(got[0].reason, "cookie-required")
        reply = got[1]
        self.assertEqual(reply.source, "a")
        self.assertEqual(len(reply.datagram), 64)
        self.assertEqual(reply.datagram[:4], b"\x03\x00\x00\x00")
        self.assertEqual(reply.datagram[4:8], datagrams(init)[0][4:8])
        self.assertEqual(p.a.receive(reply.datagram, 0.1, "b"), [])
        self.assertIsNotNone(p.pa.cookie)
        self.assertEqual(
            p.a.receive(reply.datagram, 0.1, "b"), [Dropped("unexpected-cookie", p.b.public_key)]
        )
        # The retransmission carries mac2 and gets through.
        (retry,) = datagrams(p.a.tick(6.0))
        self.assertNotEqual(retry[-16:], bytes(16))
        response = p.to_b([Transmit(b"", retry)], 6.0)
        self.assertEqual([len(d) for d in datagrams(response)], [92])
        # Under load too, A's mac2 on the response is missing: A answers B with a cookie.
        got = p.to_a(response, 6.0)
        self.assertEqual(kinds(got), ["Dropped", "Reply"])

    def test_mac2_is_bound_to_the_source(self):
        p = Pair(handshake_load_threshold=0)
        init = p.a.initiate(p.b.public_key, 0.0)
        (reply,) = of(Reply, p.to_b(init, 0.0))
        p.a.receive(reply.datagram, 0.0, "b")
        (retry,) = datagrams(p.a.tick(6.0))
        got = p.b.receive(retry, 6.0, "somewhere else")
        self.assertEqual(kinds(got), ["Dropped", "Reply"])

    def test_forged_cookie_reply_dropped(self):
        p = Pair(handshake_load_threshold=0)
        init = datagrams(p.a.initiate(p.b.public_key, 0.0))[0]
        (reply,) = of(Reply, p.to_b([Transmit(b"", init)], 0.0))
        forged = bytearray(reply.datagram)
        forged[40] ^= 1
        self.assertEqual(
            p.a.receive(bytes(forged), 0.0, "b"), [Dropped("bad-cookie", p.b.public_key)]
        )

    def test_load_detected_from_rate(self):
        p = Pair(handshake_load_threshold=3)
        stranger = Device(wg.generate_private_key())
        stranger.add_peer(p.b.public_key)
        kinds_seen = []
        for i in range(6):
            msg = stranger._create_initiation(stranger.peers[p.b.public_key], i * 0.05)
            kinds_seen.append(kinds(p.b.receive(msg, i * 0.05, "s")))
        self.assertEqual(kinds_seen[:3], [["Dropped"]] * 3)  # unknown-peer, not under load
        self.assertEqual(kinds_seen[3:], [["Dropped", "Reply"]] * 3)
        # The latch lasts a second after the last overload.
        msg = stranger._create_initiation(stranger.peers[p.b.public_key], 2.0)
        self.assertEqual(p.b.receive(msg, 2.0, "s"), [Dropped("unknown-peer", None)])


class SourceRateLimitTests(unittest.TestCase):
    def test_under_load_each_source_gets_20_per_second_burst_5(self):
        b = Device(wg.generate_private_key(), handshake_load_threshold=0)
        stranger = Device(wg.generate_private_key())
        peer = stranger.add_peer(b.public_key)
        (reply,) = of(Reply, b.receive(stranger._create_initiation(peer, 0.0), 0.0, "s"))
        stranger.receive(reply.datagram, 0.0, "b")  # now its messages carry a valid mac2
        reasons = []
        for i in range(7):
            msg = stranger._create_initiation(peer, 0.0)
            peer.last_mac1 = None
            reasons += [e.reason for e in b.receive(msg, 0.001 * i, "s")]
        self.assertEqual(reasons, ["unknown-peer"] * 5 + ["rate-limited"] * 2)
        # Tokens come back at 20 per second.
        msg = stranger._create_initiation(peer, 0.0)
        self.assertEqual(b.receive(msg, 0.06, "s"), [Dropped("unknown-peer", None)])
        # Idle buckets are forgotten by tick().
        self.assertLessEqual(b.next_deadline(), 1.01)
        b.tick(1.1)
        self.assertEqual(b._buckets, {})


class TimerInvariantTests(unittest.TestCase):
    """Whatever happens, each peer's entry in the timer heap is no later than its real deadline,
    so next_deadline() is never late."""

    @settings(max_examples=60, deadline=None)
    @given(
        st.lists(
            st.tuples(
                st.sampled_from(["a>b", "b>a", "a>>b", "tick", "init-a", "init-b", "lose"]),
                st.floats(min_value=0.0, max_value=40.0),
            ),
            max_size=40,
        )
    )
    def test_heap_entry_never_later_than_deadline(self, ops):
        p = Pair()
        now = 0.0
        wire_ab: list = []
        wire_ba: list = []
        for op, step in ops:
            now += step
            if op == "a>b":
                wire_ab += p.a.send(p.b.public_key, ip6(), now)
            elif op == "b>a":
                wire_ba += p.b.send(p.a.public_key, ip6(), now)
            elif op == "a>>b":
                wire_ab += p.a.send_many(p.b.public_key, [ip6(), ip6(b"")], now)
            elif op == "init-a":
                wire_ab += p.a.initiate(p.b.public_key, now)
            elif op == "init-b":
                wire_ba += p.b.initiate(p.a.public_key, now)
            elif op == "tick":
                wire_ab += p.a.tick(now)
                wire_ba += p.b.tick(now)
            if op == "lose":
                wire_ab, wire_ba = [], []
            else:
                ab, ba = wire_ab, wire_ba
                wire_ab, wire_ba = p.to_a(ba, now), p.to_b(ab, now)
                wire_ab, wire_ba = (
                    [e for e in wire_ab if isinstance(e, Transmit)],
                    [e for e in wire_ba if isinstance(e, Transmit)],
                )
                # to_a returns A's outputs (A -> B traffic) and to_b B's outputs.
            for device, peer in ((p.a, p.pa), (p.b, p.pb)):
                self.assertLessEqual(peer.scheduled_at, peer.deadline())
                if peer.deadline() != float("inf"):
                    self.assertLessEqual(device.next_deadline(), peer.deadline())


def _message(which: str) -> tuple[Pair, bytes]:
    """A pair and the next message of a handshake, not yet given to its receiver."""
    p = Pair()
    msg = datagrams(p.a.initiate(p.b.public_key, 0.0))[0]
    if which in ("response", "confirm"):
        msg = datagrams(p.to_b([Transmit(b"", msg)], 0.0))[0]
    if which == "confirm":
        msg = datagrams(p.to_a([Transmit(b"", msg)], 0.0))[0]
    return p, msg


class FuzzTests(unittest.TestCase):
    """Random and mutated datagrams never raise and never complete a handshake."""

    @settings(max_examples=300, deadline=None)
    @given(
        st.one_of(
            st.binary(max_size=200),
            st.tuples(
                st.sampled_from([1, 2, 3, 4]), st.sampled_from([148, 92, 64, 32, 48, 100])
            ).flatmap(
                lambda t: st.binary(min_size=t[1] - 4, max_size=t[1] - 4).map(
                    lambda b, t=t: t[0].to_bytes(4, "little") + b
                )
            ),
        )
    )
    def test_random_datagrams(self, datagram):
        for device in (self.p.a, self.p.b):
            events = device.receive(datagram, 1.0, "x")
            self.assertTrue(all(isinstance(e, Dropped) for e in events), events)

    def setUp(self):
        self.p = Pair()
        self.p.handshake(0.0)

    @settings(max_examples=150, deadline=None)
    @given(st.data())
    def test_mutated_messages(self, data):
        which = data.draw(st.sampled_from(["init", "response", "confirm"]))
        p, original = _message(which)
        # Everything except mac2 is authenticated (mac2 is only checked under load).
        covered = len(original) - 16 if which != "confirm" else len(original)
        mutated = bytearray(original)
        for pos in data.draw(st.sets(st.integers(0, covered - 1), min_size=1, max_size=4)):
            mutated[pos] ^= data.draw(st.integers(1, 255))
        cut = data.draw(st.integers(0, len(mutated)))
        candidate = bytes(mutated[:cut]) if data.draw(st.booleans()) else bytes(mutated)
        target = p.a if which == "response" else p.b
        events = target.receive(candidate, 0.0, "x")
        self.assertTrue(all(isinstance(e, Dropped) for e in events), (which, events))
        self.assertIsNone(p.pb.current)
        if which != "confirm":  # A completes on the response; B only on the confirmation
            self.assertIsNone(p.pa.current)
        if which == "init":
            self.assertIsNone(p.pb.next)
