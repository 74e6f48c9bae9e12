"""Waiting for a condition in tests that run on the real reactor: one helper, with a deadline."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import reactor, task


async def wait_until(pred: Callable[[], Any], what: str, timeout: float = 20.0, interval: float = 0.02) -> Any:
    """Poll ``pred`` until it returns something true (returned); fail naming ``what`` after
    ``timeout`` seconds."""
    deadline = reactor.seconds() + timeout
    while True:
        got = pred()
        if got:
            return got
        if reactor.seconds() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
        await task.deferLater(reactor, interval, lambda: None)
