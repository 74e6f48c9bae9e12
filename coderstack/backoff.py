"""How long to wait before trying again: the one reconnect policy of coderstack.

Every loop that reopens something after a failure (the coordination websocket, a DERP
connection, the agent's control-plane session and its reports) asks a :class:`Backoff` for the
next delay, so they all back off the same way: ``first`` seconds, doubling per consecutive
failure up to ``cap``, each delay scaled by a random factor in ``[1 - jitter, 1]`` so that many
peers cut off by one server restart do not come back in lockstep. A success resets it.

The policy is a value (no timers, no reactor): the loop that owns it sleeps.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Backoff:
    first: float = 0.5
    cap: float = 10.0
    jitter: float = 0.3
    rng: Callable[[], float] = field(default=random.random, repr=False)
    failures: int = 0

    def delay_for(self, failures: int) -> float:
        """The delay after ``failures`` consecutive failures (0: the first retry)."""
        base = min(self.cap, self.first * 2 ** min(max(failures, 0), 30))
        return base * (1.0 - self.jitter * self.rng())

    def next_delay(self) -> float:
        """The delay before the next try; counts one more failure."""
        delay = self.delay_for(self.failures)
        self.failures += 1
        return delay

    def reset(self) -> None:
        """After a success: the next failure waits ``first`` again."""
        self.failures = 0
