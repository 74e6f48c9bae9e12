"""How late the load generator's own event loop runs: a timer every ``interval`` records how far
past its due time it fired. Latencies a summary shows are only the server's when this is small;
a saturated generator adds its lag to every round trip it times."""

from __future__ import annotations

from coderstack.scaletest.stats import Samples
from coderstack.twistedtypes import Clock, DelayedCall


class LagMonitor:
    def __init__(self, clock: Clock, samples: Samples, interval: float = 0.1) -> None:
        self.clock = clock
        self.samples = samples
        self.interval = interval
        self._call: DelayedCall | None = None
        self._due = 0.0

    def start(self) -> None:
        self._due = self.clock.seconds() + self.interval
        self._call = self.clock.callLater(self.interval, self._fired)

    def _fired(self) -> None:
        now = self.clock.seconds()
        self.samples.add(now - self._due)
        self._due = now + self.interval
        self._call = self.clock.callLater(self.interval, self._fired)

    def stop(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
