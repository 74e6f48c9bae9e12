"""Helpers for driving stacks in tests and benchmarks: in-memory links between stacks.

``Wire`` connects two sans-IO ``Stack`` objects through a simulated link (delay, random loss,
reordering, and optionally a bottleneck: a rate in bytes per second with a drop-tail queue of
``queue`` bytes each way) on a simulated clock, with no reactor at all.  ``NetstackPair`` connects two
``Netstack`` adapters over a ``twisted.internet.task.Clock``.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING

from .stack import Stack

if TYPE_CHECKING:
    from .endpoints import Netstack

__all__ = ["Wire", "NetstackPair"]


class Wire:
    """Two stacks back to back.  ``a`` is built with ``wire.to_b`` as its emit and vice versa."""

    def __init__(self, delay: float = 0.0005, loss: float = 0.0, reorder: float = 0.0, seed: int = 1,
                 reorder_delay: float = 0.002, duplicate: float = 0.0, rate: float = 0.0,
                 queue: int = 64 << 10) -> None:
        self.now = 0.0
        self.rate = rate
        self.queue = queue
        self._busy_until = {"a": 0.0, "b": 0.0}  # when each direction's bottleneck is free
        self.queue_drops = 0
        self.delay = delay
        self.loss = loss
        self.reorder = reorder
        self.reorder_delay = reorder_delay
        self.duplicate = duplicate
        self.rng = random.Random(seed)
        self._queue: list[tuple[float, int, str, bytes]] = []
        self._n = itertools.count()
        self.a: Stack | None = None
        self.b: Stack | None = None
        self.sent = 0
        self.dropped = 0
        self.tap: Callable[[str, bytes], bool] | None = None  # return False to drop

    def _send(self, dest: str, packet: bytes) -> None:
        self.sent += 1
        if self.tap is not None and self.tap(dest, packet) is False:
            self.dropped += 1
            return
        if self.loss and self.rng.random() < self.loss:
            self.dropped += 1
            return
        d = self.delay
        if self.rate:
            # The bottleneck: wait for what is queued ahead, drop if the queue is full.
            busy = max(self._busy_until[dest], self.now)
            if (busy - self.now) * self.rate + len(packet) > self.queue:
                self.dropped += 1
                self.queue_drops += 1
                return
            busy += len(packet) / self.rate
            self._busy_until[dest] = busy
            d += busy - self.now
        if self.reorder and self.rng.random() < self.reorder:
            d += self.reorder_delay
        heapq.heappush(self._queue, (self.now + d, next(self._n), dest, packet))
        if self.duplicate and self.rng.random() < self.duplicate:
            heapq.heappush(self._queue, (self.now + d * 3, next(self._n), dest, packet))

    def to_b(self, packet: bytes) -> None:
        self._send("b", packet)

    def to_a(self, packet: bytes) -> None:
        self._send("a", packet)

    def run(self, until: Callable[[], bool] | None = None, limit: float = 600.0) -> float:
        """Advance simulated time event by event until ``until()`` or nothing is left to do."""
        a, b = self.a, self.b
        if a is None or b is None:
            raise RuntimeError("Wire.run: give the wire both stacks (wire.a, wire.b) first")
        q = self._queue
        while True:
            if until is not None and until():
                return self.now
            cands = [t for t in (a.next_deadline(), b.next_deadline()) if t is not None]
            if q:
                cands.append(q[0][0])
            if not cands:
                return self.now
            t = min(cands)
            if t > limit:
                return self.now
            if t > self.now:
                self.now = t
            while q and q[0][0] <= self.now:
                _t, _n, dest, packet = heapq.heappop(q)
                (a if dest == "a" else b).receive(packet, self.now)
            a.tick(self.now)
            b.tick(self.now)


class NetstackPair:
    """Two ``Netstack`` adapters whose packets are handed over by ``pump`` (no reactor calls
    per packet); ``clock`` is a ``task.Clock`` shared by both."""

    def __init__(self, clock, make: Callable[[str, Callable[[bytes], None]], Netstack],
                 addr_a: str = "fd7a:115c:a1e0::a", addr_b: str = "fd7a:115c:a1e0::b") -> None:
        self.clock = clock
        self.q_to_a: deque[bytes] = deque()
        self.q_to_b: deque[bytes] = deque()
        self.drop: Callable[[str, bytes], bool] | None = None
        self.a = make(addr_a, self._to_b)
        self.b = make(addr_b, self._to_a)

    def _to_a(self, packet: bytes) -> None:
        if self.drop is None or not self.drop("a", packet):
            self.q_to_a.append(packet)

    def _to_b(self, packet: bytes) -> None:
        if self.drop is None or not self.drop("b", packet):
            self.q_to_b.append(packet)

    def pump(self, until: Callable[[], bool] | None = None, step: float = 0.001, max_steps: int = 200000) -> None:
        """Deliver queued packets and advance the clock by ``step`` whenever the link is idle."""
        for _ in range(max_steps):
            if self.q_to_a or self.q_to_b:
                qa, qb = self.q_to_a, self.q_to_b
                self.q_to_a, self.q_to_b = deque(), deque()
                if qa:
                    self.a.packets_received(qa)
                if qb:
                    self.b.packets_received(qb)
                continue
            if until is not None and until():
                return
            self.clock.advance(step)
            if until is None and not self.q_to_a and not self.q_to_b and not self.clock.getDelayedCalls():
                return
        raise AssertionError("pump: condition not reached")
