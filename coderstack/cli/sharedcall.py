"""One run of an async call however many wait for it at once (a tunnel dial, say): every waiter
gets its result, or its failure. Once it is over, the next :meth:`SharedCall.wait` runs it again.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from twisted.internet import defer
from twisted.python.failure import Failure

T = TypeVar("T")


class SharedCall(Generic[T]):
    def __init__(self, call: Callable[[], Awaitable[T]]) -> None:
        self.call = call
        self.waiters: list[defer.Deferred[T]] | None = None  # None: not running

    @property
    def running(self) -> bool:
        return self.waiters is not None

    def wait(self) -> defer.Deferred[T]:
        """The call's outcome: a Deferred of this waiter's own (so a failure reaches each)."""
        mine: defer.Deferred[T] = defer.Deferred()
        if self.waiters is not None:
            self.waiters.append(mine)
        else:
            self.waiters = [mine]
            defer.Deferred.fromCoroutine(self._run())
        return mine

    async def _run(self) -> None:
        outcome: T | Failure
        try:
            outcome = await self.call()
        except Exception:
            outcome = Failure()
        waiters, self.waiters = self.waiters or [], None
        for waiter in waiters:
            if isinstance(outcome, Failure):
                waiter.errback(outcome)
            else:
                waiter.callback(outcome)
