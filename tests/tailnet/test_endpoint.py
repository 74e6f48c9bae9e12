"""Per-peer path rules: betterAddr, trust and its expiry, heartbeats, CallMeMaybe, reflexive."""

from __future__ import annotations

import itertools

from twisted.trial import unittest

from coderstack.tailnet import endpoint as e
from coderstack.wire import disco

A = ("192.0.2.1", 41641)
B = ("198.51.100.7", 5000)
LAN = ("10.0.0.5", 41641)


def counter_urandom():
    c = itertools.count(1)
    return lambda n: next(c).to_bytes(n, "big")


def make(**kw) -> e.Endpoint:
    return e.Endpoint(b"k" * 32, b"d" * 32, derp_region=999, derp_region_name="Coder Embedded Relay",
                      urandom=counter_urandom(), **kw)


def pings(actions) -> dict:
    return {a.dest: a.message for a in actions if isinstance(a, e.DiscoOut) and isinstance(a.message, disco.Ping)}


class BetterAddrTests(unittest.TestCase):
    def test_faster_wins_and_hysteresis(self) -> None:
        self.assertTrue(e.better_addr(e.AddrLatency(A, 0.010), e.AddrLatency(B, 0.020)))
        self.assertFalse(e.better_addr(e.AddrLatency(B, 0.020), e.AddrLatency(A, 0.010)))
        # Less than 1% faster: keep the current one.
        self.assertFalse(e.better_addr(e.AddrLatency(A, 0.0999), e.AddrLatency(B, 0.1)))

    def test_valid_beats_invalid_and_same_address_needs_bigger_mtu(self) -> None:
        self.assertTrue(e.better_addr(e.AddrLatency(A, 1.0), e.AddrLatency(None)))
        self.assertFalse(e.better_addr(e.AddrLatency(None), e.AddrLatency(A, 1.0)))
        self.assertFalse(e.better_addr(e.AddrLatency(A, 0.001), e.AddrLatency(A, 0.5)))
        self.assertTrue(e.better_addr(e.AddrLatency(A, 0.5, 1400), e.AddrLatency(A, 0.5, 1280)))

    def test_private_and_loopback_bonuses(self) -> None:
        # A private address 10% slower still wins (+20 bonus).
        self.assertTrue(e.better_addr(e.AddrLatency(LAN, 0.011), e.AddrLatency(A, 0.010)))
        # ... but not when it is 30% slower.
        self.assertFalse(e.better_addr(e.AddrLatency(LAN, 0.0143), e.AddrLatency(A, 0.010)))
        self.assertTrue(e.better_addr(e.AddrLatency(("127.0.0.1", 1), 0.010), e.AddrLatency(LAN, 0.010)))
        self.assertTrue(e.better_addr(e.AddrLatency(("2001:db8::1", 1), 0.010), e.AddrLatency(A, 0.010)))


class EndpointTests(unittest.TestCase):
    def test_no_endpoints_goes_via_derp(self) -> None:
        ep = make()
        udp, derp, actions = ep.send_plan(0.0)
        self.assertEqual((udp, derp, actions), (None, True, []))
        self.assertEqual(ep.path(0.0), ("DERP(Coder Embedded Relay)", "no endpoints"))

    def test_upgrade_trust_and_expiry(self) -> None:
        ep = make()
        ep.set_node_endpoints([A, B], 0.0)
        udp, derp, actions = ep.send_plan(0.0)
        self.assertEqual((udp, derp), (None, True))
        sent = pings(actions)
        self.assertEqual(set(sent), {A, B})
        self.assertIsInstance(actions[-1], e.WantCallMeMaybe)
        self.assertEqual(ep.path(0.01)[1], "no pong yet")
        # Pings are rate-limited to one per candidate per 5 s.
        self.assertEqual(ep.send_plan(1.0)[2], [])
        # A pong from B at 20 ms: B is best and trusted for 6.5 s.
        r = ep.handle_pong(disco.Pong(sent[B].tx_id, ("203.0.113.9", 1)), B, 0.020)
        self.assertEqual(r.latency, 0.020)
        self.assertEqual(ep.path(0.03), ("p2p 198.51.100.7:5000", ""))
        self.assertEqual(ep.send_plan(1.0), (B, False, []))
        # A faster pong from A: switch.
        ep.handle_pong(disco.Pong(sent[A].tx_id, ("203.0.113.9", 1)), A, 0.010)
        self.assertEqual(ep.best.addr, A)
        # A pong from the wrong path, or unknown TxID, is ignored.
        self.assertIsNone(ep.handle_pong(disco.Pong(b"z" * 12, ("1.2.3.4", 1)), A, 0.5))
        # Trust lapses 6.5 s after the last pong: both UDP and DERP, and discovery restarts.
        self.assertEqual(ep.send_plan(6.0)[:2], (A, False))
        udp, derp, actions = ep.send_plan(6.6)
        self.assertEqual((udp, derp), (A, True))
        self.assertEqual(set(pings(actions)), {A, B})
        self.assertEqual(ep.path(6.6), ("DERP(Coder Embedded Relay)", "trust expired (no pong for 6.5 s)"))

    def test_heartbeat_keeps_trust_while_active(self) -> None:
        ep = make()
        ep.set_node_endpoints([A], 0.0)
        ping = pings(ep.send_plan(0.0)[2])[A]
        ep.handle_pong(disco.Pong(ping.tx_id, ("203.0.113.9", 1)), A, 0.001)
        t = 0.0
        beats = 0
        while t < 30:
            t += 0.5
            for dest, msg in pings(ep.tick(t)).items():
                self.assertEqual(dest, A)
                beats += 1
                ep.handle_pong(disco.Pong(msg.tx_id, ("203.0.113.9", 1)), A, t + 0.001)
            self.assertTrue(ep.trusted(t + 0.01), t)
        self.assertGreaterEqual(beats, 9)
        # Idle for 45 s: no more heartbeats, trust lapses.
        self.assertEqual(ep.tick(46.0), [])
        self.assertFalse(ep.trusted(46.0))

    def test_call_me_maybe_pings_everything_now(self) -> None:
        ep = make()
        ep.set_node_endpoints([A], 0.0)
        ep.send_plan(0.0)  # A pinged at 0
        actions = ep.handle_call_me_maybe([B, ("fe80::1", 5), A], 1.0)
        self.assertEqual(set(pings(actions)), {A, B})  # link-local ignored, A re-pinged at once
        self.assertEqual(ep.candidates[B].source, "call-me-maybe")
        # A later CallMeMaybe that no longer lists B removes it.
        ep.handle_call_me_maybe([A], 2.0)
        self.assertNotIn(B, ep.candidates)

    def test_ping_answered_on_arrival_path_and_reflexive_learned(self) -> None:
        ep = make()
        out = ep.handle_ping(disco.Ping(b"t" * 12), B, 0.0)
        self.assertEqual(out[0], e.DiscoOut(B, disco.Pong(b"t" * 12, B)))
        self.assertEqual(ep.candidates[B].source, "reflexive")
        # Untrusted: we ping back at once (the peer's NAT is open to us now).
        self.assertEqual(list(pings(out)), [B])
        self.assertEqual(pings(ep.handle_ping(disco.Ping(b"v" * 12), B, 0.1)), {})  # rate-limited
        self.assertEqual(ep.handle_ping(disco.Ping(b"t" * 12), B, 0.1), [])  # duplicate
        via_derp = ep.handle_ping(disco.Ping(b"u" * 12), None, 0.2)
        self.assertIsNone(via_derp[0].dest)

    def test_direct_disabled(self) -> None:
        ep = make(direct_disabled=True)
        ep.set_node_endpoints([A], 0.0)
        self.assertEqual(ep.send_plan(0.0), (None, True, []))
        self.assertEqual(ep.handle_call_me_maybe([B], 0.0), [])
        self.assertEqual(ep.path(0.0)[1], "direct connections disabled")

    def test_derp_pong_never_makes_best(self) -> None:
        ep = make()
        tx, out = ep.user_ping(0.0)
        self.assertIsNone(out.dest)
        r = ep.handle_pong(disco.Pong(tx, ("127.3.3.40", 999)), None, 0.05)
        self.assertEqual(r.via, None)
        self.assertIsNone(ep.best)

    def test_network_change_distrusts_and_reprobes(self) -> None:
        ep = make()
        ep.set_node_endpoints([A, B], 0.0)
        sent = pings(ep.send_plan(0.0)[2])
        ep.handle_pong(disco.Pong(sent[A].tx_id, ("203.0.113.9", 1)), A, 0.01)
        self.assertTrue(ep.trusted(1.0))
        ep.network_changed()
        self.assertFalse(ep.trusted(1.0))
        udp, derp, actions = ep.send_plan(1.0)
        self.assertTrue(derp)
        self.assertEqual(set(pings(actions)), {A, B})  # not waiting out the 5 s interval
