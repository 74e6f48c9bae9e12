"""Typed views of the Twisted interfaces this code drives: the clock and its delayed calls.

Twisted declares them as zope interfaces, whose methods have no ``self``; without a zope plugin
mypy reads every ``clock.callLater(1, f)`` as a call with one argument too many. These Protocols
name what the code uses (a reactor and ``task.Clock`` fit :class:`Clock`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol


class DelayedCall(Protocol):
    def cancel(self) -> None: ...
    def reset(self, seconds_from_now: float, /) -> None: ...
    def active(self) -> bool: ...
    def getTime(self) -> float: ...


class Clock(Protocol):
    """``IReactorTime``: what timers need."""

    def seconds(self) -> float: ...
    def callLater(self, delay: float, fn: Callable[..., object], /, *args: object, **kw: object) -> DelayedCall: ...
