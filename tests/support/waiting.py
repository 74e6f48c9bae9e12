"""Waiting for a condition in tests: one helper, with a deadline and a message.

``wait_until`` polls on the real reactor (the predicate may be async); ``wait_until_blocking`` is
for plain synchronous code (a test method that never runs the reactor, or a thread). Both fail the
same way: ``timed out after Ns waiting for <what>``. ``what`` may be a function, called only on
failure, when the message should show the latest state (a screen, a log).
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from typing import Any

from twisted.internet import reactor, task

Message = str | Callable[[], str]


class _Deadline:
    """``timeout`` seconds from now on the monotonic clock, and the failure that ends a wait."""

    def __init__(self, what: Message, timeout: float) -> None:
        self.what = what
        self.timeout = timeout
        self.start = time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def check(self) -> None:
        if self.elapsed() > self.timeout:
            what = self.what() if callable(self.what) else self.what
            raise AssertionError(f"timed out after {self.timeout:g}s waiting for {what}")


async def wait_until(pred: Callable[[], Any], what: Message, timeout: float = 20.0, interval: float = 0.02) -> Any:
    """Poll ``pred`` until it returns something true (returned); fail naming ``what`` after
    ``timeout`` seconds. ``pred`` may return an awaitable (an async function), which is awaited."""
    deadline = _Deadline(what, timeout)
    while True:
        got = pred()
        if inspect.isawaitable(got):
            got = await got
        if got:
            return got
        deadline.check()
        await task.deferLater(reactor, interval, lambda: None)


async def seconds_until(pred: Callable[[], Any], what: Message, timeout: float = 20.0,
                        interval: float = 0.01) -> float:
    """``wait_until``, answering how many seconds it took instead (for tests that report it)."""
    start = time.monotonic()
    await wait_until(pred, what, timeout, interval)
    return time.monotonic() - start


def wait_until_blocking(pred: Callable[[], Any], what: Message, timeout: float = 60.0,
                        interval: float = 0.2) -> Any:
    """``wait_until`` for a synchronous test: sleeps between polls instead of yielding to the
    reactor, so use it only where nothing needs the reactor meanwhile."""
    deadline = _Deadline(what, timeout)
    while True:
        got = pred()
        if got:
            return got
        deadline.check()
        time.sleep(interval)
