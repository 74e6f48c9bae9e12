"""Congestion controllers in isolation."""

from twisted.trial import unittest

from coderstack.netstack.congestion import Cubic, NewReno, make

MSS = 1000


def run_rtts(cc, rtts, rtt=0.01, start=0.0):
    """Feed one window of ACKs (one per segment) per RTT; return cwnd (segments) per RTT."""
    now = start
    out = []
    for _ in range(rtts):
        for _ in range(cc.cwnd // MSS):
            cc.on_ack(MSS, now, rtt)
        now += rtt
        out.append(cc.cwnd / MSS)
    return out, now


class NewRenoTests(unittest.TestCase):
    def test_slow_start_then_linear(self):
        cc = NewReno(MSS)
        self.assertEqual(cc.cwnd, 10 * MSS)
        cc.ssthresh = 40 * MSS
        sizes, _ = run_rtts(cc, 6)
        self.assertEqual(sizes[:2], [20, 40])  # doubling per RTT in slow start
        self.assertEqual(sizes[2:], [41, 42, 43, 44])  # one segment per RTT after

    def test_recovery_and_timeout(self):
        cc = NewReno(MSS)
        cc.cwnd = 100 * MSS
        cc.enter_recovery(100 * MSS)
        self.assertEqual((cc.cwnd, cc.ssthresh), (50 * MSS, 50 * MSS))
        cc.exit_recovery(10 * MSS)
        self.assertEqual(cc.cwnd, 11 * MSS)
        cc.on_timeout(30 * MSS)
        self.assertEqual((cc.cwnd, cc.ssthresh), (MSS, 15 * MSS))


class StretchAckTests(unittest.TestCase):
    def test_slow_start_after_timeout_doubles_with_32_segment_acks(self):
        """One ACK per 32 segments (our receiver's batches): slow start still doubles per RTT."""
        for cc in (NewReno(MSS), Cubic(MSS)):
            cc.cwnd = 200 * MSS
            cc.on_timeout(200 * MSS)
            self.assertEqual(cc.cwnd, MSS)
            cc.ssthresh = 1 << 40  # far away: pure slow start
            sizes = []
            for rtt in range(9):
                flight = cc.cwnd // MSS
                while flight > 0:
                    n = min(flight, 32)
                    cc.on_ack(n * MSS, rtt * 0.01, 0.01)
                    flight -= n
                sizes.append(cc.cwnd // MSS)
            self.assertEqual(sizes, [2, 4, 8, 16, 32, 64, 128, 256, 512])

    def test_only_newly_delivered_bytes_count_and_ssthresh_stops_it(self):
        cc = NewReno(MSS)
        cc.ssthresh = 30 * MSS
        cc.on_ack(100 * MSS, delivered=MSS)  # one hole filled below 99 segments SACKed earlier
        self.assertEqual(cc.cwnd, 11 * MSS)
        cc.on_ack(64 * MSS)
        self.assertEqual(cc.cwnd, 30 * MSS)


class CubicTests(unittest.TestCase):
    def test_reduction_and_cubic_regrowth(self):
        cc = Cubic(MSS)
        cc.cwnd = 100 * MSS
        cc.ssthresh = 100 * MSS
        cc.enter_recovery(100 * MSS, 0.0)
        self.assertEqual(cc.cwnd, 70 * MSS)  # beta 0.7
        cc.exit_recovery(200 * MSS)
        # 100 ms RTT: the cubic region (at LAN RTTs the Reno-friendly estimate dominates).
        sizes, now = run_rtts(cc, 100, rtt=0.1)
        # K = cbrt((100 - 70) / 0.4) ~ 4.2 s: concave approach to W_max, plateau, then convex.
        at = {round(t * 0.1, 1): s for t, s in enumerate(sizes, 1)}
        self.assertLess(at[1.0], 100)
        self.assertGreater(at[2.0], at[1.0])
        self.assertLess(abs(at[4.2] - 100), 3)
        self.assertLess(at[5.0] - at[4.2], at[4.2] - at[3.4])  # flat around K
        self.assertGreater(at[9.0], 120)
        self.assertGreater(at[9.0] - at[8.0], at[6.0] - at[5.0])  # convex past K

    def test_reno_friendly_at_short_rtt(self):
        cc = Cubic(MSS)
        cc.cwnd = cc.ssthresh = 100 * MSS
        cc.enter_recovery(100 * MSS, 0.0)
        sizes, _ = run_rtts(cc, 100, rtt=0.001)
        # 0.1 s is far from K: the cubic curve is flat, Reno's estimate (~0.53 segment/RTT) wins.
        self.assertLess(abs(sizes[-1] - (70 + 100 * Cubic.ALPHA)), 3)

    def test_fast_convergence(self):
        cc = Cubic(MSS)
        cc.cwnd = 100 * MSS
        cc.enter_recovery(100 * MSS, 0.0)
        self.assertEqual(cc.w_max, 100)
        cc.cwnd = 80 * MSS
        cc.enter_recovery(80 * MSS, 1.0)
        self.assertEqual(cc.w_max, 80 * 1.7 / 2)  # below the last maximum: give some back

    def test_reduces_from_flight_when_app_limited(self):
        cc = Cubic(MSS)
        cc.cwnd = 1000 * MSS
        cc.enter_recovery(20 * MSS, 0.0)
        self.assertEqual(cc.cwnd, 14 * MSS)

    def test_make(self):
        self.assertIsInstance(make("cubic", MSS, 10), Cubic)
        self.assertIsInstance(make("newreno", MSS, 10), NewReno)
        self.assertRaises(ValueError, make, "bbr", MSS, 10)
