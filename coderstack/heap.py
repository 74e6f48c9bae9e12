"""Short pauses from Python's cyclic garbage collector in a long-running process.

A full (generation 2) collection scans every container object alive. A server holding a
thousand agents and a thousand clients has over a million of them, and under Coder's 40 KB/s
per connection it ran a full collection every 4-10 s, each stopping the process for 0.2-0.4 s:
every node update and relayed packet waiting on it.

Objects that survived a full collection are the long-lived ones (connections, peers, their
protocol state). :class:`HeapKeeper` freezes them after each full collection (``gc.freeze``:
the collector no longer scans them), so the next one scans only what was promoted since. Frozen
objects are still freed by reference counting; only cyclic garbage among them waits (a closed
connection's objects, say) for a complete collection: unfreeze, collect, freeze again. The
keeper runs one when the frozen objects have doubled since the last (:data:`GROWTH`: at most as
much garbage waits as there is live heap) and at least every ``complete_every`` seconds. One
longer pause after many connections have come and gone, instead of one every few seconds while
they hold.
"""

from __future__ import annotations

import gc
from typing import Any

from twisted.application import service

from coderstack.twistedtypes import Clock, DelayedCall

#: Seconds between complete collections (frozen objects included), at the most.
COMPLETE_EVERY = 900.0
#: A complete collection once the frozen objects have grown by this share since the last one:
#: at most as much waiting garbage as there was heap (a quarter, CPython's own share, ran one in
#: the middle of every burst of reconnections, 0.3-0.5 s each with 2,000 peers).
GROWTH = 1.0


class HeapKeeper:
    def __init__(self, clock: Clock, complete_every: float = COMPLETE_EVERY, collector: Any = gc) -> None:
        self.clock = clock
        self.complete_every = complete_every
        self.gc = collector
        self._freeze: DelayedCall | None = None
        self._complete: DelayedCall | None = None
        self.freezes = 0
        self.complete_collections = 0
        self._baseline = 0  # frozen objects after the last complete collection

    def start(self) -> None:
        """Freeze what start-up made (modules, configuration), then keep at it."""
        self.gc.collect()
        self.gc.freeze()
        self._baseline = self.gc.get_freeze_count()
        self.gc.callbacks.append(self._collected)
        self._complete = self.clock.callLater(self.complete_every, self._complete_collection)

    def stop(self) -> None:
        if self._collected in self.gc.callbacks:
            self.gc.callbacks.remove(self._collected)
        for call in (self._freeze, self._complete):
            if call is not None and call.active():
                call.cancel()
        self._freeze = self._complete = None
        self.gc.unfreeze()

    def _collected(self, phase: str, info: dict[str, Any]) -> None:
        # Not from inside the collector's callback: on the reactor's next turn.
        if phase == "stop" and info.get("generation") == 2 and self._freeze is None:
            self._freeze = self.clock.callLater(0, self._freeze_survivors)

    def _freeze_survivors(self) -> None:
        self._freeze = None
        self.gc.freeze()
        self.freezes += 1
        if self.gc.get_freeze_count() > self._baseline * (1 + GROWTH):
            self._complete_collection()

    def _complete_collection(self) -> None:
        if self._complete is not None and self._complete.active():
            self._complete.cancel()
        self.gc.unfreeze()
        self.gc.collect()
        self.gc.freeze()
        self._baseline = self.gc.get_freeze_count()
        self.complete_collections += 1
        self._complete = self.clock.callLater(self.complete_every, self._complete_collection)


class HeapService(service.Service):
    """A :class:`HeapKeeper` for a twistd process: started once ``ready`` fires (start-up's
    objects are then all made), stopped with the process."""

    def __init__(self, clock: Clock, ready: Any) -> None:
        self.keeper = HeapKeeper(clock)
        self.ready = ready

    def startService(self) -> None:
        super().startService()
        self.ready.addCallback(self._ready)

    def _ready(self, result: Any) -> Any:
        if self.running:
            self.keeper.start()
        return result

    def stopService(self) -> Any:
        super().stopService()
        self.keeper.stop()
