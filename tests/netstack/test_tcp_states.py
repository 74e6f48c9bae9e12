"""RFC 9293 state transitions, driven by a scripted peer."""

from twisted.trial import unittest

from coderstack.netstack.stack import Stack
from coderstack.netstack.tcp import TCPConfig
from coderstack.netstack.tcpsegment import ACK, FIN, RST, SYN, Options

from .scripted import THEM, Handler, Peer

PLAIN = Options(mss=1220, sack_permitted=True)  # no timestamps: easier to script


class PassiveOpenTests(unittest.TestCase):
    def test_handshake_and_options(self):
        p = Peer()
        h, conn, synack = p.passive_open()
        self.assertEqual(synack.flags, SYN | ACK)
        self.assertEqual(synack.ack, 1000)
        self.assertEqual(synack.options.mss, 1220)
        self.assertEqual(synack.options.wscale, 7)
        self.assertTrue(synack.options.sack_permitted)
        self.assertIsNotNone(synack.options.ts)
        self.assertTrue(h.made)
        self.assertEqual(conn.state_name, "ESTABLISHED")
        self.assertEqual(conn.snd_wscale, 7)
        self.assertTrue(conn.sack_ok and conn.ts_ok)
        # MSS option 1220, minus 12 bytes of timestamp option per segment.
        self.assertEqual(conn.mss, 1208)

    def test_options_only_if_offered(self):
        p = Peer()
        h, conn, synack = p.passive_open(options=PLAIN)
        self.assertIsNone(synack.options.wscale)
        self.assertIsNone(synack.options.ts)
        self.assertTrue(synack.options.sack_permitted)
        self.assertEqual(conn.mss, 1220)
        self.assertEqual(conn.rcv_wscale, 0)

    def test_syn_ack_retransmitted_then_given_up(self):
        p = Peer(TCPConfig(syn_retries=2))
        p.stack.listen(80, lambda c: Handler())
        p.send(SYN, options=PLAIN)
        self.assertEqual(len(p.take()), 1)
        p.advance(1.0)
        self.assertEqual([s.flags for s in p.take()], [SYN | ACK])
        p.advance(2.0)
        self.assertEqual([s.flags for s in p.take()], [SYN | ACK])
        p.advance(4.0)
        self.assertEqual(p.take(), [])
        self.assertEqual(p.stack.connections, {})
        self.assertEqual(p.stack.listeners[80].pending, 0)

    def test_retransmitted_syn_gets_syn_ack_again(self):
        p = Peer()
        p.stack.listen(80, lambda c: Handler())
        p.send(SYN, options=PLAIN)
        first = p.take()[0]
        p.send(SYN, options=PLAIN)
        again = p.take()
        self.assertEqual(len(again), 1)
        self.assertEqual(again[0].seq, first.seq)
        self.assertEqual(again[0].flags, SYN | ACK)

    def test_rst_in_syn_received_returns_to_listen(self):
        p = Peer()
        p.stack.listen(80, lambda c: Handler())
        p.send(SYN, options=PLAIN)
        p.take()
        p.send(RST, seq=1000)
        self.assertEqual(p.stack.connections, {})
        self.assertEqual(p.stack.listeners[80].pending, 0)

    def test_backlog_limit(self):
        p = Peer()
        p.stack.listen(80, lambda c: Handler(), backlog=2)
        for port in (1, 2, 3):
            p.send(SYN, options=PLAIN, sport=port)
        self.assertEqual(len(p.take()), 2)
        self.assertEqual(p.stack.stats["tcp_backlog_drop"], 1)
        self.assertEqual(len(p.stack.connections), 2)

    def test_no_listener_answers_rst(self):
        p = Peer()
        p.send(SYN, options=PLAIN)
        (rst,) = p.take()
        self.assertEqual(rst.flags, RST | ACK)
        self.assertEqual(rst.ack, 1000)

    def test_segment_for_no_connection_answers_rst(self):
        p = Peer()
        p.send(ACK, ack=5555, data=b"x")
        (rst,) = p.take()
        self.assertEqual(rst.flags, RST)
        self.assertEqual(rst.seq, 5555)

    def test_accept_refusal_resets(self):
        p = Peer()
        p.stack.listen(80, lambda c: None)
        p.send(SYN, options=PLAIN)
        (synack,) = p.take()
        p.seq += 1
        p.send(ACK, ack=synack.seq + 1)
        self.assertEqual([s.flags & RST for s in p.take()], [RST])
        self.assertEqual(p.stack.connections, {})


class ActiveOpenTests(unittest.TestCase):
    def connect(self, config=None):
        p = Peer(config)
        h = Handler()
        conn = p.stack.connect(THEM, 80, h, p.now, local_port=40000)
        p.sport, p.dport = 80, 40000
        (syn,) = p.take()
        return p, h, conn, syn

    def test_syn_and_synack(self):
        p, h, conn, syn = self.connect()
        self.assertEqual(syn.flags, SYN)
        self.assertEqual(syn.options.mss, 1220)
        self.assertEqual(conn.state_name, "SYN_SENT")
        p.send(SYN | ACK, ack=syn.seq + 1, options=PLAIN)
        (ack,) = p.take()
        self.assertEqual(ack.flags, ACK)
        self.assertEqual(ack.ack, 1000)
        self.assertEqual(conn.state_name, "ESTABLISHED")
        self.assertTrue(h.made)

    def test_syn_backoff_and_timeout(self):
        p, h, conn, syn = self.connect(TCPConfig(syn_retries=3))
        times = []
        for _ in range(40):
            p.advance(0.5)
            for s in p.take():
                self.assertEqual(s.flags, SYN)
                times.append(p.now)
        # 1 s initial RTO doubling each time (RFC 6298 5.5): at 1, 3, 7 s; given up at 15 s.
        self.assertEqual(times, [1.0, 3.0, 7.0])
        self.assertEqual(h.lost, ["connection timed out"])
        self.assertFalse(h.made)

    def test_rst_refuses(self):
        p, h, conn, syn = self.connect()
        p.send(RST | ACK, seq=0, ack=syn.seq + 1)
        self.assertEqual(h.lost, ["connection refused"])
        self.assertEqual(conn.state_name, "CLOSED")

    def test_rst_with_bad_ack_ignored(self):
        p, h, conn, syn = self.connect()
        p.send(RST | ACK, seq=0, ack=syn.seq + 7)
        self.assertEqual(h.lost, [])
        self.assertEqual(conn.state_name, "SYN_SENT")

    def test_bad_ack_in_syn_sent_gets_rst(self):
        p, h, conn, syn = self.connect()
        p.send(SYN | ACK, ack=syn.seq + 50, options=PLAIN)
        (rst,) = p.take()
        self.assertEqual(rst.flags, RST)
        self.assertEqual(rst.seq, syn.seq + 50)

    def test_simultaneous_open(self):
        p, h, conn, syn = self.connect()
        p.send(SYN, options=PLAIN)  # the peer's SYN crosses ours
        (synack,) = p.take()
        self.assertEqual(synack.flags, SYN | ACK)
        self.assertEqual(synack.seq, syn.seq)
        self.assertEqual(synack.ack, 1000)
        self.assertEqual(conn.state_name, "SYN_RECEIVED")
        p.send(SYN | ACK, seq=999, ack=syn.seq + 1, options=PLAIN)  # the peer's SYN-ACK
        self.assertEqual(conn.state_name, "ESTABLISHED")
        self.assertTrue(h.made)

    def test_simultaneous_open_two_stacks(self):
        from coderstack.netstack.testing import Wire

        w = Wire()
        w.a = Stack("fd00::1", w.to_b)
        w.b = Stack("fd00::2", w.to_a)
        ha, hb = Handler(), Handler()
        ca = w.a.connect("fd00::2", 5000, ha, 0.0, local_port=6000)
        cb = w.b.connect("fd00::1", 6000, hb, 0.0, local_port=5000)
        w.run(until=lambda: ha.made and hb.made, limit=10)
        self.assertEqual((ca.state_name, cb.state_name), ("ESTABLISHED", "ESTABLISHED"))
        self.assertEqual(w.a.stats["tcp_simultaneous_open"], 1)
        ca.write(b"hello")
        ca.flush(w.now)
        w.run(until=lambda: hb.data == b"hello", limit=10)


class EstablishedTests(unittest.TestCase):
    def setUp(self):
        self.p = Peer()
        self.h, self.conn, self.synack = self.p.passive_open(options=PLAIN)
        self.p.take()
        self.iss = self.synack.seq + 1  # the stack's next sequence number

    def test_in_order_data_delayed_ack(self):
        p = self.p
        p.send(ACK, ack=self.iss, data=b"a" * 100)
        self.assertEqual(bytes(self.h.data), b"a" * 100)
        self.assertEqual(p.take(), [])  # one segment: the ACK is delayed
        p.advance(0.039)
        self.assertEqual(p.take(), [])
        p.advance(0.002)
        (ack,) = p.take()
        self.assertEqual(ack.ack, 1100)

    def test_second_segment_acked_at_once(self):
        p = self.p
        p.send(ACK, ack=self.iss, data=b"a" * 100)
        p.send(ACK, seq=1100, ack=self.iss, data=b"b" * 100)
        (ack,) = p.take()
        self.assertEqual(ack.ack, 1200)

    def test_out_of_order_reassembly_and_sack(self):
        p = self.p
        p.send(ACK, seq=1100, ack=self.iss, data=b"b" * 100)
        (dup,) = p.take()
        self.assertEqual(dup.ack, 1000)
        self.assertEqual(dup.options.sack, [(1100, 1200)])
        p.send(ACK, seq=1300, ack=self.iss, data=b"d" * 100)
        (dup,) = p.take()
        self.assertEqual(dup.options.sack, [(1300, 1400), (1100, 1200)])  # most recent first
        self.assertEqual(bytes(self.h.data), b"")
        p.send(ACK, seq=1000, ack=self.iss, data=b"a" * 100)
        (ack,) = p.take()
        self.assertEqual(ack.ack, 1200)
        self.assertEqual(ack.options.sack, [(1300, 1400)])
        p.send(ACK, seq=1200, ack=self.iss, data=b"c" * 100)
        (ack,) = p.take()
        self.assertEqual(ack.ack, 1400)
        self.assertEqual(bytes(self.h.data), b"a" * 100 + b"b" * 100 + b"c" * 100 + b"d" * 100)

    def test_overlapping_retransmission(self):
        p = self.p
        p.send(ACK, seq=1000, ack=self.iss, data=b"0123456789")
        p.send(ACK, seq=1005, ack=self.iss, data=b"56789abcde")
        self.assertEqual(bytes(self.h.data), b"0123456789abcde")

    def test_old_duplicate_is_acked(self):
        p = self.p
        p.send(ACK, seq=1000, ack=self.iss, data=b"x" * 10)
        p.take()
        p.send(ACK, seq=1000, ack=self.iss, data=b"x" * 10)
        (ack,) = p.take()
        self.assertEqual(ack.ack, 1010)

    def test_send_and_ack(self):
        p, conn = self.p, self.conn
        conn.write(b"y" * 3000)
        conn.flush(p.now)
        segs = p.take()
        self.assertEqual([len(s.data) for s in segs], [1220, 1220, 560])
        self.assertEqual(segs[0].seq, self.iss)
        p.send(ACK, ack=self.iss + 3000)
        self.assertEqual(conn.send_buffered, 0)
        self.assertIsNone(conn.t_rexmit)

    def test_retransmission_backoff_and_karn(self):
        p, conn = self.p, self.conn
        conn.write(b"z" * 100)
        conn.flush(p.now)
        p.take()
        times = [0.0]
        while len(times) < 6:
            t = p.step()
            for s in p.take():
                self.assertEqual(s.seq, self.iss)
                times.append(t)
        # The handshake gave an RTT sample of 0: RTO = min_rto (0.2 s), then doubled each time.
        gaps = [round(b - a, 2) for a, b in zip(times, times[1:], strict=False)]
        self.assertEqual(gaps, [0.2, 0.4, 0.8, 1.6, 3.2])
        self.assertIsNone(conn.rtt.timed_seq)  # Karn: the retransmitted segment is not timed
        rto = conn.rtt.rto
        p.send(ACK, ack=self.iss + 100)
        self.assertEqual(conn.rtt.srtt, 0.0)  # no sample from the ambiguous ACK...
        self.assertEqual(conn.rtt.rto, rto)  # ...so the backed-off RTO stays (RFC 6298 5.7)
        self.assertEqual(conn.retries, 0)

    def test_rto_from_rtt_samples(self):
        p = Peer()
        h = Handler()
        p.stack.listen(80, lambda c: h)
        p.send(SYN, options=PLAIN)
        (synack,) = p.take()
        p.seq += 1
        p.advance(0.1)
        p.send(ACK, ack=synack.seq + 1)
        conn = h.conn
        # First sample (RFC 6298 2.2): SRTT = R, RTTVAR = R/2, RTO = SRTT + 4 RTTVAR.
        self.assertAlmostEqual(conn.rtt.srtt, 0.1)
        self.assertAlmostEqual(conn.rtt.rttvar, 0.05)
        self.assertAlmostEqual(conn.rtt.rto, 0.3)
        conn.write(b"z" * 100)
        conn.flush(p.now)
        p.take()
        p.advance(0.2)
        p.send(ACK, ack=synack.seq + 101)
        # Later samples (2.3): alpha 1/8, beta 1/4.
        self.assertAlmostEqual(conn.rtt.rttvar, 0.0625)
        self.assertAlmostEqual(conn.rtt.srtt, 0.1125)
        self.assertAlmostEqual(conn.rtt.rto, 0.3625)

    def test_gives_up_after_retries(self):
        p = Peer(TCPConfig(retries=2))
        h, conn, synack = p.passive_open(options=PLAIN)
        p.take()
        conn.write(b"z")
        conn.flush(p.now)
        p.advance(100)
        flags = [s.flags for s in p.take()]
        self.assertEqual(flags[-1] & RST, RST)
        self.assertEqual(h.lost, ["connection timed out"])

    def test_fast_retransmit_with_sack(self):
        p, conn = self.p, self.conn
        conn.write(bytes(1220 * 8))
        conn.flush(p.now)
        segs = p.take()
        self.assertEqual(len(segs), 8)
        # segment 0 lost; SACKs for 1..4 arrive
        for i in range(1, 5):
            edge = self.iss + 1220 * (i + 1)
            p.send(ACK, ack=self.iss, options=Options(sack=[(self.iss + 1220, edge)]))
        out = p.take()
        self.assertEqual(p.stack.stats["tcp_fast_retransmit"], 1)
        self.assertIn(self.iss, [s.seq for s in out])
        self.assertTrue(conn.in_recovery)
        p.send(ACK, ack=self.iss + 1220 * 8)
        self.assertFalse(conn.in_recovery)
        self.assertLessEqual(conn.cc.cwnd, conn.cc.ssthresh)
        self.assertGreaterEqual(conn.cc.cwnd, 2 * conn.mss)

    def test_rto_resends_only_what_was_not_sacked(self):
        p, conn = self.p, self.conn
        conn.write(bytes(1220 * 6))
        conn.flush(p.now)
        p.take()
        # segments 1 and 2 SACKed (too few for fast retransmit), then silence
        p.send(ACK, ack=self.iss, options=Options(sack=[(self.iss + 1220, self.iss + 3 * 1220)]))
        p.take()
        seqs = []
        for _ in range(3):
            p.step()
            seqs += [(s.seq - self.iss) // 1220 for s in p.take()]
            p.send(ACK, ack=self.iss, options=Options(sack=[(self.iss + 1220, self.iss + 3 * 1220)]))
            seqs += [(s.seq - self.iss) // 1220 for s in p.take()]
        self.assertIn(0, seqs)
        self.assertNotIn(1, seqs)
        self.assertNotIn(2, seqs)
        self.assertGreater(p.stack.stats["tcp_timeouts"], 0)

    def test_fast_retransmit_newreno_without_sack(self):
        p = Peer()
        h, conn, synack = p.passive_open(options=Options(mss=1220))
        p.take()
        iss = synack.seq + 1
        conn.write(bytes(1220 * 8))
        conn.flush(p.now)
        p.take()
        for _ in range(3):
            p.send(ACK, ack=iss)
        out = p.take()
        self.assertEqual(out[0].seq, iss)
        # Partial ACK: the next hole is retransmitted at once (RFC 6582).
        p.send(ACK, ack=iss + 1220 * 3)
        self.assertIn(iss + 1220 * 3, [s.seq for s in p.take()])
        self.assertTrue(conn.in_recovery)

    def test_zero_window_probe(self):
        p, conn = self.p, self.conn
        p.send(ACK, ack=self.iss, window=0)
        conn.write(b"q" * 500)
        conn.flush(p.now)
        self.assertEqual(p.take(), [])
        probes = []
        for _ in range(30):
            p.advance(0.1)
            for s in p.take():
                probes.append((round(p.now, 1), s.seq, len(s.data)))
                p.send(ACK, ack=self.iss, window=0)  # still closed
        self.assertEqual([x[1:] for x in probes], [(self.iss - 1, 0)] * len(probes))
        self.assertGreaterEqual(len(probes), 2)
        self.assertGreater(probes[1][0] - probes[0][0], probes[0][0] - 0.0)  # backing off
        p.send(ACK, ack=self.iss, window=1000)
        (data,) = p.take()
        self.assertEqual(len(data.data), 500)

    def test_receive_window_closes_when_paused(self):
        p, conn = self.p, self.conn
        conn.pause_reading()
        seq = 1000
        for _ in range(60):
            p.send(ACK, seq=seq, ack=self.iss, data=b"r" * 1220)
            seq += 1220
        acks = p.take()
        self.assertEqual(acks[-1].window, 0)
        self.assertLessEqual(conn.rcv_queued, 65535)
        self.assertEqual(bytes(self.h.data), b"")
        conn.resume_reading(p.now)
        self.assertEqual(len(self.h.data), conn.rcv_nxt - 1000)
        (update,) = p.take()
        self.assertGreater(update.window, 0)

    def test_fin_accepted_at_zero_window(self):
        p, conn = self.p, self.conn
        conn.pause_reading()
        seq = 1000
        while conn.rcv_adv - conn.rcv_nxt >= 1220:
            p.send(ACK, seq=seq, ack=self.iss, data=b"f" * 1220)
            seq += 1220
        p.send(ACK, seq=seq, ack=self.iss, data=b"f" * (conn.rcv_adv - conn.rcv_nxt))
        seq = conn.rcv_nxt
        p.take()
        self.assertEqual(conn.rcv_adv, conn.rcv_nxt)
        p.send(ACK, seq=seq, ack=self.iss, data=b"late")  # beyond the window: not taken
        self.assertEqual(conn.rcv_nxt, seq)
        p.send(ACK | FIN, seq=seq, ack=self.iss)
        self.assertEqual(conn.state_name, "CLOSE_WAIT")
        self.assertFalse(self.h.eof)  # delivered after the queued data, when reading resumes
        conn.resume_reading(p.now)
        self.assertTrue(self.h.eof)
        self.assertEqual(len(self.h.data), seq - 1000)

    def test_rst_exact_resets(self):
        self.p.send(RST, seq=1000)
        self.assertEqual(self.h.lost, ["connection reset"])
        self.assertEqual(self.conn.state_name, "CLOSED")

    def test_rst_in_window_gets_challenge_ack(self):
        self.p.send(RST, seq=1500)
        (ack,) = self.p.take()
        self.assertEqual(ack.flags, ACK)
        self.assertEqual(ack.ack, 1000)
        self.assertEqual(self.conn.state_name, "ESTABLISHED")

    def test_challenge_acks_are_rate_limited(self):
        p = self.p
        for _ in range(5):
            p.send(RST, seq=1500)
        self.assertEqual(len(p.take()), 1)
        self.assertEqual(p.stack.stats["tcp_oow_ack_limited"], 4)
        p.advance(0.5)
        p.send(RST, seq=1500)
        self.assertEqual(len(p.take()), 1)
        self.assertEqual(self.conn.state_name, "ESTABLISHED")

    def test_syn_in_established_gets_challenge_ack(self):
        self.p.send(SYN, seq=5000, options=PLAIN)
        (ack,) = self.p.take()
        self.assertEqual(ack.flags, ACK)
        self.assertEqual(self.conn.state_name, "ESTABLISHED")

    def test_ack_of_unsent_data_is_answered(self):
        self.p.send(ACK, ack=self.iss + 10000)
        (ack,) = self.p.take()
        self.assertEqual(ack.seq, self.iss)

    def test_abort_sends_rst(self):
        self.conn.abort()
        (rst,) = self.p.take()
        self.assertEqual(rst.flags & RST, RST)
        self.assertEqual(self.h.lost, ["connection aborted"])

    def test_keepalive(self):
        p = Peer(TCPConfig(keepalive=True, keepalive_idle=10, keepalive_interval=1, keepalive_count=3))
        h, conn, synack = p.passive_open(options=PLAIN)
        p.take()
        p.advance(10.5)
        (probe,) = p.take()
        self.assertEqual(probe.seq, synack.seq)  # snd_una - 1
        p.send(ACK, ack=synack.seq + 1)  # answered: idle again
        p.advance(5)
        self.assertEqual(p.take(), [])
        p.advance(20)
        self.assertEqual(h.lost, ["keepalive timed out"])


class CloseTests(unittest.TestCase):
    def setUp(self):
        self.p = Peer(TCPConfig(msl=1.0))
        self.h, self.conn, synack = self.p.passive_open(options=PLAIN)
        self.p.take()
        self.iss = synack.seq + 1

    def test_active_close_to_time_wait(self):
        p, conn = self.p, self.conn
        conn.write(b"bye")
        conn.shutdown_write(p.now)
        (seg,) = p.take()
        self.assertEqual(seg.flags & FIN, FIN)
        self.assertEqual(seg.data, b"bye")
        self.assertEqual(conn.state_name, "FIN_WAIT_1")
        p.send(ACK, ack=self.iss + 4)
        self.assertEqual(conn.state_name, "FIN_WAIT_2")
        p.send(ACK | FIN, ack=self.iss + 4, data=b"ok")
        self.assertEqual(bytes(self.h.data), b"ok")
        self.assertEqual(conn.state_name, "TIME_WAIT")
        (ack,) = p.take()
        self.assertEqual(ack.ack, 1003)
        self.assertEqual(self.h.lost, [None])
        p.advance(1.9)
        self.assertIn(conn.key, p.stack.connections)
        p.advance(0.2)
        self.assertNotIn(conn.key, p.stack.connections)

    def test_fin_wait_1_straight_to_time_wait(self):
        p, conn = self.p, self.conn
        conn.shutdown_write(p.now)
        p.take()
        p.send(ACK | FIN, ack=self.iss + 1)  # ACKs our FIN and carries the peer's
        self.assertEqual(conn.state_name, "TIME_WAIT")
        (ack,) = p.take()
        self.assertEqual(ack.ack, 1001)

    def test_half_close_reports_eof_before_lost(self):
        p, conn = self.p, self.conn
        order = []
        self.h.eof_received = lambda: order.append("eof")
        self.h.connection_lost = lambda reason: order.append(("lost", reason))
        conn.shutdown_write(p.now)
        p.take()
        p.send(ACK, ack=self.iss + 1)
        p.send(ACK | FIN, ack=self.iss + 1, data=b"tail")
        self.assertEqual(bytes(self.h.data), b"tail")
        self.assertEqual(order, ["eof", ("lost", None)])

    def test_paused_reader_gets_data_eof_then_lost(self):
        p, conn = self.p, self.conn
        order = []
        self.h.data_received = lambda data: order.append(data)
        self.h.eof_received = lambda: order.append("eof")
        self.h.connection_lost = lambda reason: order.append(("lost", reason))
        conn.pause_reading()
        conn.shutdown_write(p.now)
        p.take()
        p.send(ACK | FIN, ack=self.iss + 1, data=b"queued")
        self.assertEqual(conn.state_name, "TIME_WAIT")
        self.assertEqual(order, [])
        p.advance(10)  # TIME_WAIT ends; the reader still has not resumed
        conn.resume_reading(p.now)
        self.assertEqual(order, [b"queued", "eof", ("lost", None)])

    def test_time_wait_reacks_fin(self):
        p, conn = self.p, self.conn
        conn.shutdown_write(p.now)
        p.take()
        p.send(ACK | FIN, ack=self.iss + 1)
        self.assertEqual(conn.state_name, "TIME_WAIT")
        p.take()
        p.send(ACK | FIN, ack=self.iss + 1)
        (ack,) = p.take()
        self.assertEqual(ack.ack, 1001)

    def test_simultaneous_close(self):
        p, conn = self.p, self.conn
        conn.shutdown_write(p.now)
        (fin,) = p.take()
        p.send(ACK | FIN, ack=self.iss)  # the peer's FIN crosses ours
        self.assertEqual(conn.state_name, "CLOSING")
        p.take()
        p.seq += 1
        p.send(ACK, ack=self.iss + 1)
        self.assertEqual(conn.state_name, "TIME_WAIT")

    def test_passive_close(self):
        p, conn = self.p, self.conn
        p.send(ACK | FIN, ack=self.iss)
        self.assertTrue(self.h.eof)
        self.assertEqual(conn.state_name, "CLOSE_WAIT")
        (ack,) = p.take()
        self.assertEqual(ack.ack, 1001)
        conn.close(p.now)
        (fin,) = p.take()
        self.assertEqual(fin.flags & FIN, FIN)
        self.assertEqual(conn.state_name, "LAST_ACK")
        p.seq += 1
        p.send(ACK, ack=self.iss + 1)
        self.assertEqual(conn.state_name, "CLOSED")
        self.assertEqual(self.h.lost, [None])

    def test_fin_retransmitted(self):
        p, conn = self.p, self.conn
        conn.close(p.now)
        p.take()
        p.advance(0.21)
        (again,) = p.take()
        self.assertEqual(again.flags & FIN, FIN)
        self.assertEqual(again.seq, self.iss)

    def test_full_close_orphan_fin_wait_2_times_out(self):
        p, conn = self.p, self.conn
        conn.close(p.now)
        p.take()
        p.send(ACK, ack=self.iss + 1)
        self.assertEqual(conn.state_name, "FIN_WAIT_2")
        self.assertEqual(self.h.lost, [None])
        p.advance(61)
        self.assertNotIn(conn.key, p.stack.connections)

    def test_data_after_full_close_resets(self):
        p, conn = self.p, self.conn
        conn.close(p.now)
        p.take()
        p.send(ACK, ack=self.iss + 1, data=b"late")
        self.assertEqual(p.take()[-1].flags & RST, RST)
        self.assertEqual(conn.state_name, "CLOSED")

    def test_out_of_order_fin(self):
        p, conn = self.p, self.conn
        p.send(ACK | FIN, seq=1005, ack=self.iss, data=b"world")
        self.assertFalse(self.h.eof)
        p.send(ACK, seq=1000, ack=self.iss, data=b"hello")
        self.assertTrue(self.h.eof)
        self.assertEqual(bytes(self.h.data), b"helloworld")
        self.assertEqual(conn.state_name, "CLOSE_WAIT")

    def test_time_wait_accepts_new_syn(self):
        p, conn = self.p, self.conn
        conn.shutdown_write(p.now)
        p.take()
        p.send(ACK | FIN, ack=self.iss + 1)
        self.assertEqual(conn.state_name, "TIME_WAIT")
        p.take()
        p.send(SYN, seq=90000, options=PLAIN)
        (synack,) = p.take()
        self.assertEqual(synack.flags, SYN | ACK)
        self.assertEqual(synack.ack, 90001)


class BatchTests(unittest.TestCase):
    def test_one_ack_per_batch(self):
        from coderstack.netstack.tcpsegment import Segment

        from .scripted import US

        p = Peer()
        h, conn, synack = p.passive_open(options=PLAIN)
        p.take()
        packets = [
            Segment(40000, 80, 1000 + i * 1000, synack.seq + 1, ACK, 65535, Options(), b"d" * 1000).encode(THEM, US)
            for i in range(10)
        ]
        p.stack.receive_batch(packets, p.now)
        (ack,) = p.take()
        self.assertEqual(ack.ack, 11000)
        self.assertEqual(len(h.data), 10000)

    def test_out_of_order_in_batch_acked_at_once(self):
        from coderstack.netstack.tcpsegment import Segment

        from .scripted import US

        p = Peer()
        h, conn, synack = p.passive_open(options=PLAIN)
        p.take()
        seqs = [1000, 3000, 2000]
        packets = [
            Segment(40000, 80, s, synack.seq + 1, ACK, 65535, Options(), b"d" * 1000).encode(THEM, US) for s in seqs
        ]
        p.stack.receive_batch(packets, p.now)
        acks = [s.ack for s in p.take()]
        self.assertEqual(acks, [4000])  # the gap filled in the same batch: one ACK covers it

    def test_out_of_order_in_batch_acked_once_at_its_end_with_its_blocks(self):
        from coderstack.netstack.tcpsegment import Segment

        from .scripted import US

        for sack in (True, False):
            p = Peer()
            h, conn, synack = p.passive_open(options=PLAIN if sack else Options(mss=1220))
            p.take()
            packets = [Segment(40000, 80, s, synack.seq + 1, ACK, 65535, Options(), b"d" * 1000).encode(THEM, US)
                       for s in (1000, 3000, 5000, 6000)]
            p.stack.receive_batch(packets, p.now)
            got = p.take()
            if sack:
                # One ACK at the batch's end; its blocks name every piece (newest first).
                self.assertEqual([s.ack for s in got], [2000])
                self.assertEqual(list(got[0].options.sack), [(5000, 7000), (3000, 4000)])
            else:
                # Without SACK each out-of-order segment is a duplicate ACK the sender counts.
                self.assertEqual([s.ack for s in got], [2000, 2000, 2000])
