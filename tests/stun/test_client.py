"""STUN client transactions with a fake clock and a fake socket, then over loopback."""

from __future__ import annotations

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from coderstack.stun.client import (
    STUNClient,
    STUNErrorResponse,
    STUNResult,
    STUNTimeout,
    open_stun_client,
)
from coderstack.stun.server import STUNResponder, listen_stun
from coderstack.wire import stun

SERVER = ("198.51.100.1", 3478)
SERVER2 = ("203.0.113.5", 3478)
SERVER6 = ("2001:db8::3", 3478)


class Harness:
    """A client whose sends land in a list; ``answer`` plays the server."""

    def __init__(self, **kw) -> None:
        self.clock = task.Clock()
        self.sent: list[tuple[bytes, tuple]] = []
        self.client = STUNClient(lambda d, a: self.sent.append((d, a)), self.clock, **kw)
        self.responder = STUNResponder()

    def answer(self, index: int, seen_as: tuple[str, int]) -> bool:
        data, _ = self.sent[index]
        reply = self.responder.handle(data, seen_as, self.clock.seconds())
        return self.client.datagram_received(reply, self.sent[index][1])


class TransactionTests(unittest.TestCase):
    def test_rfc_retransmission_schedule_then_timeout(self) -> None:
        h = Harness()
        d = h.client.query(SERVER)
        times = []
        last = 0
        for _ in range(140):  # 35 s
            if len(h.sent) != last:
                times.append(h.clock.seconds())
                last = len(h.sent)
            h.clock.advance(0.25)
        # Sends at 0, .5, 1.5, 3.5, 7.5, 15.5, 31.5 (RTO 500 ms doubling, Rc = 7) ...
        self.assertEqual(times, [0.0, 0.5, 1.5, 3.5, 7.5, 15.5, 31.5])
        # ... all the same transaction,
        self.assertEqual(len({d[8:20] for d, _ in h.sent}), 1)
        # ... and it gives up Rm x RTO = 8 s after the last one.
        self.assertNoResult(d)
        h.clock.advance(39.5 - h.clock.seconds() - 0.01)
        self.assertNoResult(d)
        h.clock.advance(0.02)
        self.failureResultOf(d, STUNTimeout)
        self.assertEqual(h.client.pending, 0)

    def test_answer_after_retransmission(self) -> None:
        h = Harness()
        d = h.client.query(SERVER)
        h.clock.advance(0.6)
        self.assertEqual(len(h.sent), 2)
        h.clock.advance(0.1)
        self.assertTrue(h.answer(1, ("192.0.2.50", 61000)))
        r = self.successResultOf(d)
        self.assertIsInstance(r, STUNResult)
        self.assertEqual(r.mapped, ("192.0.2.50", 61000))
        self.assertEqual(r.server, SERVER)
        self.assertEqual(r.transmissions, 2)
        self.assertAlmostEqual(r.rtt, 0.7)
        # No more timers: nothing else is sent.
        h.clock.advance(100)
        self.assertEqual(len(h.sent), 2)
        self.assertEqual(h.clock.getDelayedCalls(), [])

    def test_overall_timeout_caps_schedule(self) -> None:
        h = Harness()
        d = h.client.query(SERVER, timeout=1.0)
        h.clock.advance(1.0)
        self.failureResultOf(d, STUNTimeout)
        self.assertEqual(len(h.sent), 2)
        self.assertEqual(h.clock.getDelayedCalls(), [])

    def test_single_shot_probe(self) -> None:
        h = Harness()
        d = h.client.query(SERVER, max_transmissions=1, timeout=3.0)
        h.clock.advance(2.9)
        self.assertEqual(len(h.sent), 1)
        self.assertNoResult(d)
        h.clock.advance(0.2)
        self.failureResultOf(d, STUNTimeout)

    def test_parallel_servers_v4_and_v6(self) -> None:
        h = Harness()
        ds = [h.client.query(s) for s in (SERVER, SERVER2, SERVER6)]
        self.assertEqual([a for _, a in h.sent], [SERVER, SERVER2, SERVER6])
        h.clock.advance(0.01)
        h.answer(2, ("2001:db8:ffff::9", 5555))
        h.answer(0, ("192.0.2.50", 1))
        h.answer(1, ("192.0.2.50", 2))
        got = [self.successResultOf(d) for d in ds]
        self.assertEqual([g.mapped for g in got],
                         [("192.0.2.50", 1), ("192.0.2.50", 2), ("2001:db8:ffff::9", 5555)])

    def test_error_response(self) -> None:
        h = Harness()
        d = h.client.query(SERVER)
        req = stun.decode(h.sent[0][0])
        h.client.datagram_received(stun.binding_error(req, 420, unknown=[0x7000]), SERVER)
        f = self.failureResultOf(d, STUNErrorResponse)
        self.assertEqual((f.value.code, f.value.unknown), (420, (0x7000,)))

    def test_send_error_fails_fast(self) -> None:
        clock = task.Clock()

        def send(_d, _a):
            raise OSError(101, "Network is unreachable")

        c = STUNClient(send, clock)
        d = c.query(SERVER6)
        self.failureResultOf(d, OSError)
        self.assertEqual(c.pending, 0)
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_cancel_stops_timers(self) -> None:
        h = Harness()
        d = h.client.query(SERVER)
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.assertEqual(h.clock.getDelayedCalls(), [])

    def test_unmatched_and_malformed_are_counted(self) -> None:
        h = Harness()
        d = h.client.query(SERVER)
        other = stun.decode(stun.binding_request()[1])
        self.assertFalse(h.client.datagram_received(stun.binding_success(other, SERVER), SERVER))
        self.assertFalse(h.client.datagram_received(b"\x00" * 24, SERVER))
        self.assertFalse(h.client.datagram_received(h.sent[0][0], SERVER))  # a request, not ours
        self.assertEqual(h.client.unmatched, 1)
        self.assertEqual(h.client.malformed, 2)
        self.assertNoResult(d)
        d.cancel()
        self.failureResultOf(d)

    def test_sends_tailscale_compatible_request_by_default(self) -> None:
        h = Harness()
        d = h.client.query(SERVER)
        msg = stun.decode(h.sent[0][0])
        self.assertEqual(msg.get(stun.ATTR_SOFTWARE), b"tailnode")
        self.assertTrue(msg.fingerprint)
        self.assertEqual(len(h.sent[0][0]), 40)
        d.cancel()
        self.failureResultOf(d)


class LoopbackTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_standalone_client_against_our_server(self):
        port = listen_stun(reactor, "127.0.0.1", 0)
        self.addCleanup(port.stopListening)
        s = open_stun_client(reactor, v4_interface="127.0.0.1")
        self.addCleanup(s.close)
        r = yield s.query(("127.0.0.1", port.getHost().port), timeout=5)
        self.assertEqual(r.mapped, s.local_address())
        self.assertEqual(r.software, "coderstack")

    @defer.inlineCallbacks
    def test_standalone_client_ipv6_loopback(self):
        try:
            port = listen_stun(reactor, "::1", 0)
        except Exception as e:  # CI has IPv6 loopback; a host without it cannot run this
            raise unittest.SkipTest(f"no IPv6 loopback: {e}") from e
        self.addCleanup(port.stopListening)
        s = open_stun_client(reactor, v6_interface="::1")
        self.addCleanup(s.close)
        r = yield s.query(("::1", port.getHost().port), timeout=5)
        self.assertEqual(r.mapped[0], "::1")
        self.assertEqual(r.mapped[1], s.local_address(10)[1])
