"""The flow table: flows by source, closed when idle, bounded, all closed at the end."""

from __future__ import annotations

from twisted.internet import task
from twisted.trial import unittest

from coderstack.forward.flows import FlowTable


class FakeFlow:
    def __init__(self) -> None:
        self.closed = 0

    def close(self) -> None:
        self.closed += 1


class FlowTableTests(unittest.TestCase):
    def test_reads_as_a_dict(self) -> None:
        table: FlowTable[str, FakeFlow] = FlowTable()
        a = FakeFlow()
        table.add("a", a)
        self.assertEqual(table, {"a": a})
        self.assertIs(table.get("a"), a)
        self.assertIsNone(table.get("b"))
        self.assertFalse(table.full())

    def test_idle_flow_closes_and_traffic_keeps_it(self) -> None:
        clock = task.Clock()
        table: FlowTable[str, FakeFlow] = FlowTable(clock, idle_timeout=10)
        flow = FakeFlow()
        table.add("a", flow)
        clock.advance(8)
        table.touch("a")
        clock.advance(8)
        self.assertEqual((flow.closed, len(table)), (0, 1))
        clock.advance(2)
        self.assertEqual((flow.closed, len(table)), (1, 0))
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_full_at_max_flows(self) -> None:
        table: FlowTable[int, FakeFlow] = FlowTable(max_flows=2)
        table.add(1, FakeFlow())
        self.assertFalse(table.full())
        table.add(2, FakeFlow())
        self.assertTrue(table.full())
        table.close(1)
        self.assertFalse(table.full())

    def test_close_all_closes_each_once_and_cancels_timers(self) -> None:
        clock = task.Clock()
        table: FlowTable[int, FakeFlow] = FlowTable(clock, idle_timeout=5)
        flows = [FakeFlow() for _ in range(3)]
        for i, f in enumerate(flows):
            table.add(i, f)
        table.close_all()
        table.close_all()
        self.assertEqual([f.closed for f in flows], [1, 1, 1])
        self.assertEqual((len(table), clock.getDelayedCalls()), (0, []))

    def test_idle_timeout_needs_a_clock(self) -> None:
        with self.assertRaises(ValueError):
            FlowTable(idle_timeout=1)
