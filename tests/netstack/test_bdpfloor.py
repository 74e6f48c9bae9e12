"""The window floor from the measured bandwidth-delay product: the estimator on its own, the
controllers with it, and whole transfers over a simulated bottleneck with random loss (where
it must fill the link) and with a queue too small for the window (where it must stand down)."""

from __future__ import annotations

import random

from twisted.trial import unittest

from coderstack.netstack import congestion
from coderstack.netstack.bdpfloor import (
    GAIN,
    LOSS_THRESHOLD,
    MIN_DELIVERED,
    MIN_RTT_FLOOR,
    MIN_RTT_WINDOW,
    BDPFloor,
)
from coderstack.netstack.stack import Stack
from coderstack.netstack.tcpconfig import TCPConfig
from coderstack.netstack.testing import Wire

MSS = 1000


def fed(rate: float, rtt: float, seconds: float, loss: float = 0.0, step: float = 0.001) -> BDPFloor:
    """A model fed ``rate`` bytes/s delivered over ``seconds`` with round trips of ``rtt``,
    ``loss`` of it (by bytes) marked lost."""
    m = BDPFloor()
    now = 0.0
    while now < seconds:
        m.on_rtt(rtt, now)
        delivered = int(rate * step)
        m.on_delivered(delivered, now, rtt)
        if loss:
            m.on_lost(int(delivered * loss / (1 - loss)))
        now += step
    return m


class EstimatorTests(unittest.TestCase):
    def test_floor_is_twice_the_measured_product(self) -> None:
        m = fed(rate=10e6, rtt=0.02, seconds=2.0)
        want = GAIN * 10e6 * 0.02
        self.assertLess(abs(m.floor() - want), 0.05 * want)

    def test_no_floor_on_a_sub_millisecond_path(self) -> None:
        self.assertEqual(fed(rate=50e6, rtt=MIN_RTT_FLOOR / 4, seconds=1.0).floor(), 0)
        # ... nor once its queues have grown the round trip past the bound: the path is short.
        m = fed(rate=50e6, rtt=MIN_RTT_FLOOR / 4, seconds=1.0)
        now = 1.0
        while now < 1.0 + 2 * MIN_RTT_WINDOW:
            m.on_rtt(MIN_RTT_FLOOR * 3, now)
            m.on_delivered(int(50e6 * 0.01), now, MIN_RTT_FLOOR * 3)
            now += 0.01
        self.assertGreaterEqual(m.min_rtt, MIN_RTT_FLOOR)
        self.assertEqual(m.floor(), 0)

    def test_nothing_before_enough_is_known(self) -> None:
        m = BDPFloor()
        self.assertEqual(m.floor(), 0)
        m.on_rtt(0.001, 0.0)
        m.on_delivered(MIN_DELIVERED // 2, 0.0, 0.001)
        m.on_delivered(MIN_DELIVERED // 4, 0.01, 0.001)
        self.assertEqual(m.floor(), 0)  # a rate, but too little delivered to trust it

    def test_rare_loss_keeps_the_floor_and_frequent_loss_removes_it(self) -> None:
        self.assertGreater(fed(10e6, 0.02, 2.0, loss=0.005).floor(), 0)
        self.assertGreater(fed(10e6, 0.02, 2.0, loss=LOSS_THRESHOLD * 0.8).floor(), 0)
        self.assertEqual(fed(10e6, 0.02, 2.0, loss=LOSS_THRESHOLD * 1.5).floor(), 0)

    def test_min_rtt_is_forgotten_after_its_window(self) -> None:
        m = BDPFloor()
        m.on_rtt(0.0002, 0.0)
        m.on_rtt(0.001, 1.0)
        self.assertEqual(m.min_rtt, 0.0002)
        m.on_rtt(0.001, MIN_RTT_WINDOW + 0.5)
        self.assertEqual(m.min_rtt, 0.001)

    def test_bandwidth_is_the_maximum_of_recent_intervals(self) -> None:
        m = fed(rate=10e6, rtt=0.02, seconds=1.0)
        high = m.floor()
        now = 1.0
        for _ in range(5):  # a few slower intervals do not lower it at once
            m.on_delivered(int(2e6 * 0.02), now, 0.02)
            now += 0.02
        self.assertEqual(m.floor(), high)


class Model:
    """A stand-in with a fixed floor."""

    def __init__(self, floor: int) -> None:
        self.value = floor

    def floor(self) -> int:
        return self.value


class ControllerTests(unittest.TestCase):
    def test_a_loss_cuts_no_lower_than_the_floor(self) -> None:
        for cls in (congestion.NewReno, congestion.Cubic):
            cc = cls(MSS)
            cc.model = Model(60 * MSS)  # type: ignore[assignment]
            cc.cwnd, cc.ssthresh = 50 * MSS, 10 * MSS
            cc.enter_recovery(50 * MSS)
            self.assertEqual(cc.cwnd, 50 * MSS, cls)  # the floor is above: no cut
            cc.model = Model(40 * MSS)  # type: ignore[assignment]
            cc.enter_recovery(50 * MSS)
            self.assertEqual(cc.cwnd, 40 * MSS, cls)  # cut to the floor, not by beta
            cc.model = Model(0)  # type: ignore[assignment]
            cc.enter_recovery(40 * MSS)
            self.assertLess(cc.cwnd, 40 * MSS, cls)  # no floor: the controller's own cut

    def test_below_the_floor_the_window_grows_as_in_slow_start(self) -> None:
        cc = congestion.Cubic(MSS)
        cc.model = Model(40 * MSS)  # type: ignore[assignment]
        cc.cwnd, cc.ssthresh = 20 * MSS, 20 * MSS
        cc.on_ack(10 * MSS, now=1.0, srtt=0.001)
        self.assertEqual(cc.cwnd, 30 * MSS)
        cc.on_ack(30 * MSS, now=1.001, srtt=0.001)
        self.assertEqual(cc.cwnd, 40 * MSS)  # up to the floor, not past it

    def test_a_timeout_still_starts_from_one_segment(self) -> None:
        cc = congestion.Cubic(MSS)
        cc.model = Model(40 * MSS)  # type: ignore[assignment]
        cc.cwnd = 50 * MSS
        cc.on_timeout(50 * MSS)
        self.assertEqual((cc.cwnd, cc.ssthresh), (MSS, 40 * MSS))  # slow start back to the floor

    def test_undo_restores_the_window_not_the_model(self) -> None:
        cc = congestion.make("cubic", MSS, 10, bdp_floor=True)
        model = cc.model
        state = cc.snapshot()
        cc.enter_recovery(10 * MSS)
        cc.restore(state)
        self.assertIs(cc.model, model)
        self.assertIsNone(congestion.make("cubic", MSS, 10).model)


class Sink:
    def __init__(self) -> None:
        self.count = 0
        self.conn = None

    def connection_made(self, conn) -> None:
        self.conn = conn

    def data_received(self, data: bytes) -> None:
        self.count += len(data)

    def __getattr__(self, name):
        return lambda *a, **k: None


def goodput(floor: bool, *, loss: float, rate: float, queue: int, delay: float, size: int = 4 << 20,
            seed: int = 1) -> tuple[float, Wire]:
    """Mbit/s of one transfer over a bottleneck of ``rate`` bytes/s, simulated time."""
    w = Wire(delay=delay, loss=loss, seed=seed, rate=rate, queue=queue)
    cfg = TCPConfig(mtu=1280, bdp_floor=floor)
    w.a = Stack("fd00::1", w.to_b, config=cfg, rng=random.Random(1))
    w.b = Stack("fd00::2", w.to_a, config=cfg, rng=random.Random(2))
    sink, source = Sink(), Sink()
    w.b.listen(80, lambda c: sink)
    conn = w.a.connect("fd00::2", 80, source, 0.0)
    w.run(until=lambda: source.conn is not None)
    conn.write(random.Random(seed).randbytes(size))
    conn.flush(w.now)
    start = w.now
    w.run(until=lambda: sink.count >= size, limit=600)
    assert sink.count == size
    return size * 8 / (w.now - start) / 1e6, w


class BottleneckTests(unittest.TestCase):
    def test_random_loss_does_not_empty_a_wan_path(self) -> None:
        """100 Mbit/s, a 20 ms round trip, 0.5% random loss both ways: CUBIC alone settles at a
        loss-limited window carrying a tenth of the path; with the floor the path stays full."""
        link = dict(rate=12.5e6, queue=256 << 10, delay=0.01)
        clean, _ = goodput(True, loss=0.0, **link)
        without, w0 = goodput(False, loss=0.005, **link)
        with_floor, w1 = goodput(True, loss=0.005, **link)
        self.assertLess(without, 0.3 * clean)
        self.assertGreater(with_floor, 0.8 * clean)
        # ... and it does not do so by overfilling the queue.
        self.assertLessEqual(w1.queue_drops / w1.sent, w0.queue_drops / w0.sent + 0.005)

    def test_a_queue_too_small_for_the_window_backs_it_off(self) -> None:
        """The same path with a 16 KiB queue: loss from the queue, well over 2% if the window
        ignored it, so the floor stands down and CUBIC's cuts keep drops as low as without it."""
        link = dict(rate=12.5e6, queue=16 << 10, delay=0.01)
        without, w0 = goodput(False, loss=0.0, **link)
        rate, w1 = goodput(True, loss=0.0, **link)
        self.assertGreater(rate, 0.9 * without)
        self.assertLessEqual(w1.queue_drops / w1.sent, w0.queue_drops / w0.sent + 0.005)

    def test_a_sub_millisecond_path_is_left_to_cubic(self) -> None:
        """At 0.4 ms the endpoints' CPU sets the pace: the floor has no say (the same
        transfer, cut for cut)."""
        link = dict(rate=100e6, queue=64 << 10, delay=0.0002, loss=0.005)
        _, w0 = goodput(False, **link)
        _, w1 = goodput(True, **link)
        self.assertEqual((w1.sent, w1.a.stats["tcp_fast_retransmit"]), (w0.sent, w0.a.stats["tcp_fast_retransmit"]))


class SwitchTests(unittest.TestCase):
    def test_on_unless_the_environment_says_off(self) -> None:
        from coderstack.tailnet.stack import bdp_floor_from_env

        self.assertTrue(bdp_floor_from_env({}))
        self.assertTrue(bdp_floor_from_env({"CODERSTACK_TCP_BDP_FLOOR": "1"}))
        for off in ("0", "off", "No", "false"):
            self.assertFalse(bdp_floor_from_env({"CODERSTACK_TCP_BDP_FLOOR": off}), off)
        self.assertTrue(TCPConfig().bdp_floor)
        self.assertIsNotNone(congestion.make("cubic", MSS, 10, bdp_floor=True).model)
