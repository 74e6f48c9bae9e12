"""Short pauses from Python's cyclic garbage collector in a long-running process.

A full (generation 2) collection scans every container object alive. A server holding a
thousand agents and a thousand clients has over a million of them, and under Coder's 40 KB/s
per connection it ran a full collection every 4-10 s, each stopping the process for 0.2-0.4 s:
every node update and relayed packet waiting on it.

Objects that survived a full collection are the long-lived ones (connections, peers, their
protocol state). :class:`HeapKeeper` freezes them after each full collection (``gc.freeze``:
the collector no longer scans them), so the next one scans only what was promoted since. Frozen
objects are still freed by reference counting; only cyclic garbage among them waits, for the
complete collection the keeper runs every ``complete_every`` seconds (unfreeze, collect, freeze
again): one longer pause that often instead of one every few seconds.
"""

from __future__ import annotations

import gc
from typing import Any

from twisted.application import service

from coderstack.twistedtypes import Clock, DelayedCall

#: Seconds between complete collections (frozen objects included).
COMPLETE_EVERY = 900.0


class HeapKeeper:
    def __init__(self, clock: Clock, complete_every: float = COMPLETE_EVERY, collector: Any = gc) -> None:
        self.clock = clock
        self.complete_every = complete_every
        self.gc = collector
        self._freeze: DelayedCall | None = None
        self._complete: DelayedCall | None = None
        self.freezes = 0
        self.complete_collections = 0

    def start(self) -> None:
        """Freeze what start-up made (modules, configuration), then keep at it."""
        self.gc.collect()
        self.gc.freeze()
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

    def _complete_collection(self) -> None:
        self.gc.unfreeze()
        self.gc.collect()
        self.gc.freeze()
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
