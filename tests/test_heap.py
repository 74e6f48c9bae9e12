"""The garbage collector's keeper: frozen after start-up and after each full collection, a
complete collection (unfrozen) on a timer; against a fake collector on a task.Clock, and once
against the real one."""

from __future__ import annotations

import gc

from twisted.internet import defer, task
from twisted.trial import unittest

from coderstack.heap import HeapKeeper, HeapService


class FakeGC:
    def __init__(self) -> None:
        self.callbacks: list = []
        self.calls: list[str] = []
        self.frozen = 1000  # what get_freeze_count answers

    def get_freeze_count(self) -> int:
        return self.frozen

    def collect(self) -> None:
        self.calls.append("collect")
        for cb in list(self.callbacks):
            cb("start", {"generation": 2})
            cb("stop", {"generation": 2})

    def freeze(self) -> None:
        self.calls.append("freeze")

    def unfreeze(self) -> None:
        self.calls.append("unfreeze")

    def generation(self, n: int) -> None:
        for cb in list(self.callbacks):
            cb("stop", {"generation": n})


class KeeperTests(unittest.TestCase):
    def test_start_freezes_and_full_collections_freeze_their_survivors(self) -> None:
        clock, fake = task.Clock(), FakeGC()
        keeper = HeapKeeper(clock, complete_every=100, collector=fake)
        keeper.start()
        self.assertEqual(fake.calls, ["collect", "freeze"])
        fake.generation(0)
        fake.generation(1)
        clock.advance(0)
        self.assertEqual(keeper.freezes, 0)  # young collections change nothing
        fake.generation(2)
        fake.generation(2)
        self.assertEqual(fake.calls[-1], "freeze")  # nothing yet from inside the callback
        clock.advance(0)
        self.assertEqual(keeper.freezes, 1)  # once for both
        self.assertEqual(fake.calls[-1], "freeze")

    def test_a_complete_collection_on_its_timer(self) -> None:
        clock, fake = task.Clock(), FakeGC()
        keeper = HeapKeeper(clock, complete_every=100, collector=fake)
        keeper.start()
        fake.calls.clear()
        clock.advance(99)
        self.assertEqual(fake.calls, [])
        clock.advance(1)
        self.assertEqual(fake.calls[:3], ["unfreeze", "collect", "freeze"])
        self.assertEqual(keeper.complete_collections, 1)
        clock.advance(100)
        self.assertEqual(keeper.complete_collections, 2)

    def test_a_complete_collection_once_the_frozen_doubled(self) -> None:
        clock, fake = task.Clock(), FakeGC()
        keeper = HeapKeeper(clock, complete_every=100, collector=fake)
        keeper.start()
        fake.frozen = 1900  # connections came and went: some of what is frozen may be garbage
        fake.generation(2)
        clock.advance(0)
        self.assertEqual(keeper.complete_collections, 0)
        fake.frozen = 2100
        fake.generation(2)
        clock.advance(0)
        self.assertEqual(keeper.complete_collections, 1)
        last = len(fake.calls) - 1 - fake.calls[::-1].index("unfreeze")
        self.assertEqual(fake.calls[last - 1 : last + 3], ["freeze", "unfreeze", "collect", "freeze"])
        clock.advance(99)  # the timer starts again from the complete collection
        self.assertEqual(keeper.complete_collections, 1)
        fake.generation(2)  # (the baseline is now 2100)
        clock.advance(1)
        self.assertEqual(keeper.complete_collections, 2)
        keeper.stop()
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_stop_unfreezes_and_leaves_no_timer_or_callback(self) -> None:
        clock, fake = task.Clock(), FakeGC()
        keeper = HeapKeeper(clock, complete_every=100, collector=fake)
        keeper.start()
        fake.generation(2)
        keeper.stop()
        self.assertEqual(fake.callbacks, [])
        self.assertEqual(clock.getDelayedCalls(), [])
        self.assertEqual(fake.calls[-1], "unfreeze")

    def test_the_real_collector(self) -> None:
        clock = task.Clock()
        keeper = HeapKeeper(clock)
        self.addCleanup(keeper.stop)
        kept = [[i] for i in range(1000)]  # containers the collector tracks
        keeper.start()
        self.assertGreaterEqual(gc.get_freeze_count(), len(kept))
        keeper.stop()
        self.assertEqual(gc.get_freeze_count(), 0)


class ServiceTests(unittest.TestCase):
    def test_starts_when_ready_and_not_before(self) -> None:
        clock, ready = task.Clock(), defer.Deferred()
        svc = HeapService(clock, ready)
        fake = FakeGC()
        svc.keeper.gc = fake
        svc.startService()
        self.assertEqual(fake.calls, [])
        ready.callback(None)
        self.assertEqual(fake.calls, ["collect", "freeze"])
        svc.stopService()
        self.assertEqual(fake.calls[-1], "unfreeze")
        self.assertEqual(clock.getDelayedCalls(), [])
