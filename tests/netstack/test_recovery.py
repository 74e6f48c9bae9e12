"""Loss recovery on time we control: RACK-TLP (RFC 8985), PRR (RFC 6937), undo of spurious
retransmissions (RFC 3522), against a scripted peer."""

from twisted.trial import unittest

from coderstack.netstack.tcpsegment import ACK, SYN, Options

from .scripted import Handler, Peer

PLAIN = Options(mss=1220, sack_permitted=True)  # no timestamps: easier to script
MSS = 1220
RTT = 0.01


class RecoveryTestCase(unittest.TestCase):
    def setUp(self):
        # A handshake that takes RTT, so the stack has an RTT sample of that.
        p = self.p = Peer()
        h = self.h = Handler()
        p.stack.listen(80, lambda c: h)
        p.send(SYN, options=PLAIN)
        (synack,) = p.take()
        p.seq += 1
        p.advance(RTT)
        p.send(ACK, ack=synack.seq + 1)
        self.conn = h.conn
        self.iss = synack.seq + 1
        self.assertAlmostEqual(self.conn.rtt.srtt, RTT)

    def seg(self, i: int) -> int:
        return self.iss + MSS * i

    def sack(self, ack_seg: int, *blocks: tuple[int, int]) -> None:
        """ACK up to segment ``ack_seg``, SACK segments [a, b) for each block."""
        sack = [(self.seg(a), self.seg(b)) for a, b in blocks]
        self.p.send(ACK, ack=self.seg(ack_seg), options=Options(sack=sack) if sack else None)

    def sent(self) -> list[int]:
        """Segment numbers the stack sent since the last call."""
        return [(s.seq - self.iss) // MSS for s in self.p.take() if s.data]

    @property
    def stats(self):
        return self.p.stack.stats


class RackTests(RecoveryTestCase):
    def test_lost_segment_retransmitted_after_the_reorder_window_not_the_rto(self):
        conn = self.conn
        conn.write(bytes(MSS * 8))
        conn.flush(self.p.now)
        self.assertEqual(self.sent(), list(range(8)))
        self.p.advance(RTT)
        # Segment 0 is missing, 1 arrived: too little for DupThresh, so RACK waits a quarter
        # RTT of reordering window before calling 0 lost.
        self.sack(0, (1, 2))
        self.assertEqual(self.sent(), [])
        self.assertIsNotNone(conn.t_rack)
        self.assertAlmostEqual(conn.t_rack, self.p.now + RTT / 4)
        self.p.advance(RTT / 4 + 0.0001)
        self.assertEqual(self.sent(), [0])
        self.assertTrue(conn.in_recovery)
        self.assertEqual(self.stats["tcp_rack_marked_lost"], 1)
        self.assertEqual(self.stats["tcp_timeouts"], 0)
        self.sack(8)
        self.assertFalse(conn.in_recovery)

    def test_reordered_segment_is_not_retransmitted(self):
        conn = self.conn
        conn.write(bytes(MSS * 8))
        conn.flush(self.p.now)
        self.sent()
        self.p.advance(RTT)
        self.sack(0, (1, 2))
        self.p.advance(RTT / 8)
        self.sack(2)  # segment 0 was only late
        self.p.advance(RTT)
        self.assertEqual(self.sent(), [])
        self.assertEqual(self.stats["tcp_rack_marked_lost"], 0)
        self.assertTrue(conn.rack.reordering_seen)

    def test_dupthresh_sacks_retransmit_at_once(self):
        conn = self.conn
        conn.write(bytes(MSS * 8))
        conn.flush(self.p.now)
        self.sent()
        self.p.advance(RTT)
        self.sack(0, (1, 4))
        # Three segments SACKed and no reordering seen: no reordering window.
        self.assertEqual(self.sent()[:1], [0])
        self.assertTrue(conn.in_recovery)

    def test_lost_retransmission_recovered_without_rto(self):
        conn = self.conn
        p = self.p
        conn.write(bytes(MSS * 40))
        conn.flush(p.now)
        self.assertEqual(self.sent(), list(range(10)))  # the initial window
        p.advance(RTT)
        for i in range(2, 5):
            self.sack(0, (1, i))
        self.assertIn(0, self.sent())  # fast retransmit of 0 ...
        p.advance(RTT / 2)
        for i in range(5, 11):  # ... which is lost as well; the peer SACKs the rest
            self.sack(0, (1, i))
        after = self.sent()
        self.assertNotIn(0, after)  # not yet: segments sent after it were not delivered
        p.advance(RTT / 2)
        new = [n for n in after if n >= 10]
        self.assertTrue(new)
        self.sack(0, (1, new[0] + 1))  # a segment sent after the retransmission arrives
        self.assertIn(0, self.sent())
        self.assertEqual(self.stats["tcp_timeouts"], 0)
        self.assertEqual(self.stats["tcp_fast_retransmit"], 1)  # one recovery, not two

    def test_tail_loss_probe(self):
        conn = self.conn
        p = self.p
        conn.write(bytes(MSS * 4))
        conn.flush(p.now)
        self.assertEqual(self.sent(), [0, 1, 2, 3])
        self.assertIsNotNone(conn.t_tlp)
        p.advance(RTT)
        self.sack(2)  # segments 2 and 3, the tail, are lost: nothing else would tell us
        t_probe = conn.t_tlp
        self.assertAlmostEqual(t_probe, p.now + 2 * RTT)  # PTO = 2 SRTT
        self.assertLess(t_probe, conn.t_rexmit)
        p.advance(2 * RTT + 0.0001)
        self.assertEqual(self.sent(), [3])  # no new data: the last segment again
        self.assertEqual(self.stats["tcp_tlp_probes"], 1)
        p.advance(RTT)
        self.sack(2, (3, 4))  # the probe arrived: RACK sees that 2 is lost
        self.assertEqual(self.sent(), [2])
        self.sack(4)
        self.assertEqual(self.stats["tcp_tlp_recovered"], 1)
        self.assertEqual(self.stats["tcp_timeouts"], 0)

    def test_tail_loss_probe_sends_new_data_if_it_can(self):
        conn = self.conn
        p = self.p
        conn.write(bytes(MSS * 14))
        conn.flush(p.now)
        self.assertEqual(self.sent(), list(range(10)))
        p.advance(2 * RTT + 0.0001)  # no ACK at all
        self.assertEqual(self.sent(), [10])
        self.assertEqual(self.stats["tcp_tlp_probes"], 1)

    def test_probe_armed_when_recovery_ends_with_data_in_flight(self):
        conn = self.conn
        p = self.p
        conn.write(bytes(MSS * 40))
        conn.flush(p.now)
        self.assertEqual(self.sent(), list(range(10)))
        p.advance(RTT)
        for i in range(2, 11):
            self.sack(0, (1, i))
        self.assertTrue(conn.in_recovery)
        sent = self.sent()
        self.assertIsNone(conn.t_tlp)  # no probes in recovery
        recover = conn.recover
        p.send(ACK, ack=recover)  # all that was out when recovery began: it ends
        self.assertFalse(conn.in_recovery)
        self.assertGreater(conn.snd_max, recover)  # what PRR sent is in flight ...
        self.assertIsNotNone(conn.t_tlp)  # ... and a lost tail of it would be probed
        self.assertTrue([n for n in sent if self.seg(n) >= recover])

    def test_pto_of_a_lone_segment_allows_for_a_delayed_ack(self):
        conn = self.conn
        conn.write(bytes(100))
        conn.flush(self.p.now)
        # 2 SRTT + 200 ms is not before the RTO (200 ms here): only the RTO is armed.
        self.assertIsNone(conn.t_tlp)


class PRRTests(RecoveryTestCase):
    def test_sending_in_proportion_then_up_to_ssthresh(self):
        conn = self.conn
        p = self.p
        conn.cc.cwnd = 20 * MSS
        conn.write(bytes(MSS * 60))
        conn.flush(p.now)
        self.assertEqual(self.sent(), list(range(20)))
        p.advance(RTT)
        before = []
        for i in range(2, 5):  # segment 0 lost; 1..3 SACKed: recovery
            self.sack(0, (1, i))
            before += self.sent()
        self.assertTrue(conn.in_recovery)
        self.assertIn(0, before)
        ssthresh = conn.cc.ssthresh
        fs = conn.recover_fs
        self.assertEqual((conn.prr_out, fs), (MSS, conn.snd_max - conn.snd_una))
        # Each further SACK of one segment lets out about ssthresh / RecoverFS of a segment,
        # not nothing until the pipe has fallen below the new window (as cutting cwnd at once
        # would) and not a segment each (as not cutting would).
        new = []
        for i in range(5, 9):
            self.sack(0, (1, i))
            new += self.sent()
        self.assertTrue(new)
        self.assertLess(len(new), 4)
        self.assertLessEqual(abs(conn.prr_out - 4 * MSS * ssthresh / fs), MSS)
        for i in range(9, 21):
            self.sack(0, (1, i))
            new += self.sent()
        # By the end of the round trip the pipe is ssthresh: the reduction is complete.
        pipe = conn.snd_max - conn.snd_una - conn.sb.sacked - conn.rack.lost_bytes()
        self.assertLessEqual(abs(pipe - ssthresh), MSS)
        first = max(before) + 1
        self.assertEqual(new, list(range(first, first + len(new))))
        self.assertEqual(self.stats["tcp_prr_recoveries"], 1)


class TimestampsTestCase(unittest.TestCase):
    """A connection with timestamps; the peer echoes the ones it chooses."""

    def setUp(self):
        p = self.p = Peer()
        h = self.h = Handler()
        p.stack.listen(80, lambda c: h)
        p.send(SYN, options=Options(mss=1220, sack_permitted=True, ts=(1, 0)))
        (synack,) = p.take()
        p.seq += 1
        p.advance(RTT)
        p.send(ACK, ack=synack.seq + 1, options=Options(ts=(2, synack.options.ts[0])))
        self.conn = h.conn
        self.iss = synack.seq + 1
        self.mss = self.conn.mss
        self.tsvals: dict[int, list[int]] = {}

    def sent(self) -> list[int]:
        out = []
        for s in self.p.take():
            if s.data:
                n = (s.seq - self.iss) // self.mss
                self.tsvals.setdefault(n, []).append(s.options.ts[0])
                out.append(n)
        return out

    def ack(self, upto: int, echo: int, sack: tuple[int, int] | None = None) -> None:
        blocks = [(self.iss + self.mss * sack[0], self.iss + self.mss * sack[1])] if sack else None
        self.p.send(ACK, ack=self.iss + self.mss * upto, options=Options(ts=(3, echo), sack=blocks))


class EifelTests(TimestampsTestCase):
    """Timestamps on: an ACK whose echoed timestamp predates our retransmission answers the
    original, so the retransmission (and the cut) was spurious."""

    def test_spurious_fast_retransmit_is_undone(self):
        conn, p = self.conn, self.p
        conn.write(bytes(self.mss * 8))
        conn.flush(p.now)
        self.assertEqual(self.sent(), list(range(8)))
        cwnd, ssthresh = conn.cc.cwnd, conn.cc.ssthresh
        p.advance(RTT)
        for i in range(2, 5):  # segment 0 is only late
            self.ack(0, self.tsvals[i - 1][0], (1, i))
        self.assertIn(0, self.sent())
        self.assertTrue(conn.in_recovery)
        self.assertLess(conn.cc.cwnd, cwnd)
        self.ack(8, self.tsvals[0][0])  # the original 0 arrived: its timestamp is echoed
        self.assertEqual(self.p.stack.stats["tcp_spurious_undone"], 1)
        self.assertFalse(conn.in_recovery)
        self.assertGreaterEqual(conn.cc.cwnd, cwnd)
        self.assertEqual(conn.cc.ssthresh, ssthresh)

    def test_real_loss_is_not_undone(self):
        conn, p = self.conn, self.p
        conn.write(bytes(self.mss * 8))
        conn.flush(p.now)
        self.sent()
        p.advance(RTT)
        for i in range(2, 5):
            self.ack(0, self.tsvals[i - 1][0], (1, i))
        self.sent()
        p.advance(RTT)
        self.ack(8, self.tsvals[0][-1])  # the retransmission's timestamp: it was lost
        self.assertEqual(self.p.stack.stats["tcp_spurious_undone"], 0)
        self.assertLess(conn.cc.cwnd, 10 * self.mss)

    def test_spurious_timeout_is_undone_without_going_back_n(self):
        conn, p = self.conn, self.p
        conn.write(bytes(self.mss * 4))
        conn.flush(p.now)
        self.assertEqual(self.sent(), [0, 1, 2, 3])
        cwnd = conn.cc.cwnd
        conn.t_tlp = None  # no probe: this is about the timeout
        p.advance(conn.rtt.rto + 0.001)
        self.assertEqual(self.sent(), [0])
        self.assertEqual(conn.cc.cwnd, self.mss)
        self.ack(1, self.tsvals[0][0])  # the ACK was only slow: it echoes the original
        self.assertEqual(self.p.stack.stats["tcp_spurious_undone"], 1)
        self.assertGreaterEqual(conn.cc.cwnd, cwnd)
        self.assertEqual(self.sent(), [])  # 1..3 are not sent again
        self.ack(4, self.tsvals[3][0])
        self.assertEqual(conn.send_buffered, 0)


class SlowStartAfterTimeoutTests(unittest.TestCase):
    def test_32_segment_acks_still_double_the_window_each_round(self):
        p = Peer()
        h = Handler()
        p.stack.listen(80, lambda c: h)
        opts = Options(mss=1220, sack_permitted=True, wscale=7)
        p.send(SYN, options=opts)
        (synack,) = p.take()
        p.seq += 1
        p.advance(RTT)
        p.send(ACK, ack=synack.seq + 1, window=0xFFFF)
        conn, iss = h.conn, synack.seq + 1
        conn.write(bytes(MSS * 400))
        conn.flush(p.now)
        p.take()
        conn.t_tlp = None
        p.advance(conn.rtt.rto + 0.001)  # the whole window is lost: a timeout
        self.assertEqual(p.stack.stats["tcp_timeouts"], 1)
        self.assertEqual(conn.cc.cwnd, MSS)
        conn.cc.ssthresh = 1 << 40  # far off: this is about slow start alone
        rounds = []
        for _ in range(8):
            segs = [s for s in p.take() if s.data]
            rounds.append(len(segs))
            p.advance(RTT)
            end = max(s.seq + len(s.data) for s in segs)
            first = min(s.seq for s in segs)
            # One ACK per 32 segments, as our receiver sends for a batch.
            for edge in range(first + 32 * MSS, end, 32 * MSS):
                p.send(ACK, ack=edge, window=0xFFFF)
            p.send(ACK, ack=end, window=0xFFFF)
        self.assertEqual(rounds, [1, 2, 4, 8, 16, 32, 64, 128])
        self.assertLess(conn.snd_una - iss, MSS * 400)


class TimeoutThenRackTests(TimestampsTestCase):
    def test_rack_marks_after_a_timeout_do_not_cut_again(self):
        """After a timeout RACK finds the rest of the old window lost once a retransmission is
        ACKed (true: the timeout said so); that must not be a second reduction, or slow start
        would end at a window of two segments."""
        conn, p = self.conn, self.p
        conn.write(bytes(self.mss * 40))
        conn.flush(p.now)
        self.assertEqual(self.sent(), list(range(10)))
        conn.t_tlp = None
        p.advance(conn.rtt.rto + 0.001)
        ssthresh = conn.cc.ssthresh
        self.assertEqual(self.sent(), [0])
        # The peer holds 9 (the rest of the window was lost): its ACKs carry that SACK block.
        p.advance(RTT)
        self.ack(1, self.tsvals[0][-1], (9, 10))
        self.assertEqual(self.sent(), [1, 2])
        p.advance(RTT)
        self.ack(2, self.tsvals[1][-1], (9, 10))  # 2 is on its way; 3..8 (sent long ago) are lost
        self.assertGreater(self.p.stack.stats["tcp_rack_marked_lost"], 0)
        self.assertEqual(self.p.stack.stats["tcp_fast_retransmit"], 0)
        self.assertEqual(conn.cc.ssthresh, ssthresh)
        self.assertEqual(self.sent(), [3, 4])  # slow start's pace: ACKed one, send two
