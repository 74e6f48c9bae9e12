"""Per-peer path rules: betterAddr, trust and its expiry, heartbeats, CallMeMaybe, reflexive."""

from __future__ import annotations

import itertools

from twisted.internet import task
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
        # Data going out with nothing heard from B for 0.98 s: the send checks B with a ping.
        self.assertEqual(ep.send_plan(1.0)[:2], (B, False))
        self.assertEqual(list(pings(ep.send_plan(1.0)[2])), [])  # one check per 0.3 s
        # A faster pong from A: switch.
        ep.handle_pong(disco.Pong(sent[A].tx_id, ("203.0.113.9", 1)), A, 0.010)
        self.assertEqual(ep.best.addr, A)
        # A pong from the wrong path, or unknown TxID, is ignored.
        self.assertIsNone(ep.handle_pong(disco.Pong(b"z" * 12, ("1.2.3.4", 1)), A, 0.5))
        # Trust lapses 6.5 s after the last pong: both UDP and DERP, and discovery restarts.
        self.assertTrue(ep.trusted(6.0))
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
        tx, actions = ep.user_ping(0.0)
        self.assertIsNone(actions[0].dest)
        r = ep.handle_pong(disco.Pong(tx, ("127.3.3.40", 999)), None, 0.05)
        self.assertEqual(r.via, None)
        self.assertIsNone(ep.best)

    def test_user_ping_without_trusted_path_starts_discovery(self) -> None:
        ep = make()
        ep.set_node_endpoints([A, B], 0.0)
        tx, actions = ep.user_ping(0.0)
        self.assertIsNone(actions[0].dest)  # the user's ping itself goes via DERP
        self.assertEqual(set(pings(actions[1:])), {A, B})
        # Once a direct path is trusted, a user ping goes there and nothing else is sent.
        sent = pings(actions[1:])
        ep.handle_pong(disco.Pong(sent[A].tx_id, ("203.0.113.9", 1)), A, 0.01)
        tx, actions = ep.user_ping(0.5)
        self.assertEqual([a.dest for a in actions], [A])

    def test_our_new_endpoints_are_told_at_once_while_finding_a_path(self) -> None:
        ep = make()
        ep.set_node_endpoints([A, B], 0.0)
        ep.user_ping(0.0)  # discovery started (pings and a CallMeMaybe with what we knew then)
        self.assertEqual(ep.send_plan(1.0)[2], [])  # within the 5 s ping interval: nothing more
        actions = ep.own_endpoints_changed(1.0)  # STUN found our NAT's mapping
        self.assertEqual(set(pings(actions)), {A, B})
        self.assertIsInstance(actions[-1], e.WantCallMeMaybe)
        # A trusted path, or a peer we are not talking to, needs nothing.
        ep.handle_pong(disco.Pong(pings(actions)[A].tx_id, ("203.0.113.9", 1)), A, 1.01)
        self.assertEqual(ep.own_endpoints_changed(1.5), [])
        idle = make()
        idle.set_node_endpoints([A], 0.0)
        self.assertEqual(idle.own_endpoints_changed(1.0), [])

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


class DirectPath:
    """One peer's direct path A on a task.Clock: data every 20 ms (``send_plan``), the caller's
    housekeeping every 0.1 s (``tick``), pongs after ``rtt`` unless the path is down or the
    ping's pong is in ``lose`` (numbers of the pings sent to A, from 1)."""

    def __init__(self, rtt: float = 0.01, data: bool = True, two_way: bool = False) -> None:
        self.clock = task.Clock()
        self.ep = make()
        self.ep.set_node_endpoints([A], 0.0)
        self.rtt, self.up, self.two_way = rtt, True, two_way
        self.lose: set[int] = set()
        self.sent_to_a = 0
        self.sends: list[tuple[float, e.Addr | None, bool]] = []
        self.changes: list[tuple[float, e.PathChange]] = []
        if data:
            self._loop(0.02, self.send)
        self._loop(0.1, lambda: self.out(self.ep.tick(self.clock.seconds())))

    def _loop(self, interval: float, f) -> None:
        call = task.LoopingCall(f)
        call.clock = self.clock
        call.start(interval)

    def send(self) -> None:
        now = self.clock.seconds()
        udp, derp, actions = self.ep.send_plan(now)
        self.sends.append((now, udp, derp))
        self.out(actions)
        if self.two_way and self.up and udp is not None:
            self.ep.note_udp_rx(udp, now)  # the peer's data came back on the direct path

    def out(self, actions) -> None:
        for a in actions:
            if not (isinstance(a, e.DiscoOut) and isinstance(a.message, disco.Ping)):
                continue
            if a.dest is None:
                continue  # via DERP: answered, but a DERP pong never makes a direct path
            self.sent_to_a += 1
            if self.up and self.sent_to_a not in self.lose:
                pong = disco.Pong(a.message.tx_id, ("203.0.113.9", 1))
                self.clock.callLater(self.rtt, self.pong, pong)
        change = self.ep.path_change(self.clock.seconds())
        if change is not None:
            self.changes.append((self.clock.seconds(), change))

    def pong(self, pong: disco.Pong) -> None:
        if self.up:
            self.ep.handle_pong(pong, A, self.clock.seconds())
            self.out([])

    def run_until(self, t: float) -> None:
        while self.clock.seconds() < t - 1e-9:
            self.clock.advance(0.01)

    def via_derp(self, after: float) -> list[float]:
        return [t for t, _udp, derp in self.sends if derp and t >= after]


class FailoverTests(unittest.TestCase):
    def test_direct_path_that_stops_answering_moves_to_derp(self) -> None:
        path = DirectPath()
        path.run_until(10.0)
        self.assertEqual(path.changes, [(path.changes[0][0], e.PathChange(A))])
        self.assertEqual(path.via_derp(1.0), [])
        path.up = False
        pinged = path.sent_to_a
        path.run_until(13.0)
        moved = path.via_derp(10.0)[0]
        self.assertLess(moved - 10.0, 2.0)  # the deliverable: DERP within 2 s (task.Clock, not wall time)
        self.assertEqual(path.changes[-1], (moved, e.PathChange(None, "direct 192.0.2.1:41641 stopped answering")))
        self.assertEqual(path.ep.path(moved), ("DERP(Coder Embedded Relay)", "direct 192.0.2.1:41641 stopped answering"))
        # Every send from then on goes via DERP (and still to A, in case it answers again).
        self.assertTrue(all(derp and udp == A for t, udp, derp in path.sends if t >= moved))
        self.assertGreaterEqual(path.sent_to_a - pinged, e.FAILOVER_PINGS)

    def test_it_comes_back_when_the_path_answers_again(self) -> None:
        path = DirectPath()
        path.run_until(5.0)
        path.up = False
        path.run_until(10.0)
        pinged = path.sent_to_a
        self.assertFalse(path.ep.trusted(10.0))
        path.up = True
        path.run_until(20.0)
        self.assertGreater(path.sent_to_a, pinged)  # heartbeats and discovery went on
        back, change = path.changes[-1]
        self.assertEqual(change, e.PathChange(A))
        self.assertLess(back, 10.0 + e.HEARTBEAT_INTERVAL + 0.5)
        self.assertEqual(path.via_derp(back + 0.01), [])
        self.assertEqual(path.ep.path(20.0), ("p2p 192.0.2.1:41641", ""))

    def test_lost_pongs_short_of_the_limit_do_not_flip(self) -> None:
        path = DirectPath()
        path.run_until(3.0)
        n = path.sent_to_a
        # One lost pong, then later two in a row (one fewer than the failover needs).
        path.lose = {n + 1, n + 4, n + 5, n + 9, n + 12, n + 13}
        path.run_until(30.0)
        self.assertEqual(path.via_derp(1.0), [])
        self.assertEqual([c for _t, c in path.changes], [e.PathChange(A)])

    def test_a_slow_path_is_given_time_to_answer(self) -> None:
        path = DirectPath(rtt=0.45)
        path.run_until(30.0)
        self.assertEqual(path.via_derp(2.0), [])
        self.assertEqual([c for _t, c in path.changes], [e.PathChange(A)])

    def test_authenticated_packets_from_the_path_stand_in_for_pongs(self) -> None:
        two_way = DirectPath(two_way=True)
        two_way.run_until(30.0)
        one_way = DirectPath()
        one_way.run_until(30.0)
        # Only the heartbeats (every 3 s) when the peer's data comes back; checks without it.
        self.assertLessEqual(two_way.sent_to_a, 30 / e.HEARTBEAT_INTERVAL + 2)
        self.assertGreater(one_way.sent_to_a, 2 * two_way.sent_to_a)
        self.assertEqual(two_way.via_derp(1.0), [])

    def test_idle_path_is_not_checked(self) -> None:
        path = DirectPath(data=False)
        path.out(path.ep.send_plan(0.0)[2])  # one packet, then nothing
        path.run_until(3.5)
        self.assertTrue(path.ep.trusted(3.5))
        before = path.sent_to_a
        path.up = False
        path.run_until(6.4)
        self.assertTrue(path.ep.trusted(6.4))  # nothing sent: no checks, trust runs its 6.5 s
        self.assertEqual(path.sent_to_a, before + 1)  # the 3 s heartbeat only
        self.assertFalse(path.ep.checking(6.4))


class PingResultTests(unittest.TestCase):
    def test_direct_and_relayed(self) -> None:
        direct = e.PingResult.direct(0.003, "192.0.2.1:41641")
        self.assertEqual((direct.kind, direct.p2p, direct.endpoint), ("p2p", True, "192.0.2.1:41641"))
        self.assertEqual(direct.describe(), "p2p 192.0.2.1:41641")
        relayed = e.PingResult.relayed(0.04, 999, "Coder Embedded Relay")
        self.assertEqual((relayed.kind, relayed.p2p, relayed.derp_region), ("derp", False, 999))
        self.assertEqual(relayed.describe(), "DERP(Coder Embedded Relay)")
        # A region the DERP map gives no name is shown by its id.
        self.assertEqual(e.PingResult.relayed(0.04, 7).describe(), "DERP(7)")
