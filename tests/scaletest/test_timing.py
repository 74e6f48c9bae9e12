"""The load generator's clocks: node fan-out timed from a node's making to its arrival, and the
generator's own event-loop lag."""

from __future__ import annotations

import uuid

from twisted.internet import task
from twisted.trial import unittest

from coderstack.scaletest.lag import LagMonitor
from coderstack.scaletest.simagent import FanoutClock
from coderstack.scaletest.stats import Samples
from coderstack.wire.coordination import CoordinateResponse, Node, PeerUpdate, PeerUpdateKind


def node_update(peer: uuid.UUID, as_of: float) -> CoordinateResponse:
    from datetime import UTC, datetime

    node = Node(id=1, as_of=datetime.fromtimestamp(as_of, UTC), key=bytes(32), disco=bytes(32))
    return CoordinateResponse((PeerUpdate(peer, PeerUpdateKind.NODE, node=node),))


class FanoutClockTests(unittest.TestCase):
    def test_times_newer_nodes_only_after_the_first(self) -> None:
        clock = task.Clock()
        clock.advance(1000)
        samples = Samples()
        fan = FanoutClock(clock, samples)
        peer = uuid.uuid4()
        fan.observe(node_update(peer, 900))  # the node the coordinator had: no measure of fan-out
        self.assertEqual(len(samples), 0)
        clock.advance(0.25)
        fan.observe(node_update(peer, 1000.2))
        fan.observe(node_update(peer, 1000.2))  # the same node again (a resend)
        fan.observe(node_update(peer, 999))  # an older one, late
        self.assertEqual(len(samples), 1)
        self.assertAlmostEqual(samples.percentile(50), 0.05, places=3)
        fan.observe(CoordinateResponse((PeerUpdate(peer, PeerUpdateKind.LOST),)))
        self.assertEqual(len(samples), 1)


    def test_only_inside_the_measured_window(self) -> None:
        clock = task.Clock()
        clock.advance(1000)
        samples = Samples()
        fan = FanoutClock(clock, samples)
        fan.since = 1010
        peer = uuid.uuid4()
        fan.observe(node_update(peer, 999))
        fan.observe(node_update(peer, 999.5))  # set-up: not counted
        self.assertEqual(len(samples), 0)
        clock.advance(10)
        fan.observe(node_update(peer, 1009.99))
        self.assertEqual(len(samples), 1)


class LagMonitorTests(unittest.TestCase):
    def test_records_how_late_each_tick_fired(self) -> None:
        clock = task.Clock()
        samples = Samples()
        lag = LagMonitor(clock, samples, interval=0.1)
        lag.start()
        clock.advance(0.1)  # on time
        clock.advance(0.35)  # a busy loop: 0.25 s late
        lag.stop()
        clock.advance(10)
        self.assertEqual(len(samples), 2)
        self.assertAlmostEqual(samples.percentile(100), 0.25)
        self.assertEqual(clock.getDelayedCalls(), [])
