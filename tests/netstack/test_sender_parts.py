"""The sender's parts on their own: the send buffer and the RTT/RTO estimator."""

from twisted.trial import unittest

from coderstack.netstack.rto import RTOEstimator
from coderstack.netstack.sendbuffer import SendBuffer


class SendBufferTests(unittest.TestCase):
    def test_take_leaves_the_data_until_acknowledged(self):
        buf = SendBuffer(1000)
        buf.append(b"hello ")
        buf.append(b"world")
        self.assertEqual((len(buf), buf.end), (11, 1011))
        self.assertEqual(buf.take(1006, 5), b"world")
        buf.acknowledge(1006)
        self.assertEqual((buf.seq, bytes(buf.data)), (1006, b"world"))
        buf.acknowledge(1003)  # old: nothing changes
        self.assertEqual((buf.seq, len(buf)), (1006, 5))

    def test_fin_follows_the_last_byte_and_its_ack_empties_the_buffer(self):
        buf = SendBuffer(1)
        buf.append(b"abc")
        self.assertIsNone(buf.fin)
        buf.close()
        self.assertEqual(buf.fin, 4)
        buf.acknowledge(5)  # the data and the FIN
        self.assertEqual((buf.seq, len(buf), buf.end), (4, 0, 4))


class RTOEstimatorTests(unittest.TestCase):
    def test_samples_as_rfc_6298_says(self):
        rtt = RTOEstimator(1.0, 0.2, 60.0)
        self.assertEqual((rtt.srtt, rtt.rto), (None, 1.0))
        rtt.sample(0.1)
        self.assertAlmostEqual(rtt.srtt, 0.1)
        self.assertAlmostEqual(rtt.rttvar, 0.05)
        self.assertAlmostEqual(rtt.rto, 0.3)
        rtt.sample(0.2)
        self.assertAlmostEqual(rtt.srtt, 0.1125)
        self.assertAlmostEqual(rtt.rttvar, 0.0625)
        self.assertAlmostEqual(rtt.rto, 0.3625)

    def test_bounds_and_backoff(self):
        rtt = RTOEstimator(1.0, 0.2, 60.0)
        rtt.sample(0.0)
        self.assertEqual(rtt.rto, 0.2)
        for _ in range(10):
            rtt.back_off()
        self.assertEqual(rtt.rto, 60.0)
        rtt.sample(100.0)
        self.assertEqual(rtt.rto, 60.0)

    def test_one_timed_segment_and_karn(self):
        rtt = RTOEstimator(1.0, 0.2, 60.0)
        rtt.time(500, 10.0)
        self.assertIsNone(rtt.timed_sample(499, 10.5))  # the ACK does not cover it yet
        self.assertEqual(rtt.timed_sample(500, 10.25), 0.25)
        self.assertIsNone(rtt.timed_sample(600, 11.0))  # one sample per timed segment
        rtt.time(700, 12.0)
        rtt.cancel()  # retransmitted: its ACK is ambiguous
        self.assertIsNone(rtt.timed_sample(700, 12.5))
