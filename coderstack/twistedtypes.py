"""Typed views of the Twisted interfaces this code drives: the clock, its delayed calls, a UDP
transport.

Twisted declares them as zope interfaces, whose methods have no ``self``; without a zope plugin
mypy reads every ``transport.write(data, addr)`` or ``clock.callLater(1, f)`` as a call with one
argument too many. These Protocols name what the code uses (a reactor and ``task.Clock`` fit
:class:`Clock`; :func:`reactor_time` hands one back to the Twisted APIs typed with the
interface).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, cast

from twisted.internet import task
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime


class DelayedCall(Protocol):
    def cancel(self) -> None: ...
    def reset(self, seconds_from_now: float, /) -> None: ...
    def active(self) -> bool: ...
    def getTime(self) -> float: ...


class Clock(Protocol):
    """``IReactorTime``: what timers need."""

    def seconds(self) -> float: ...
    def callLater(self, delay: float, fn: Callable[..., object], /, *args: object, **kw: object) -> DelayedCall: ...


def reactor_time(clock: Clock) -> IReactorTime:
    """``clock`` for Twisted APIs typed with the interface (``LoopingCall.clock``, ``deferLater``)."""
    return cast(IReactorTime, clock)


def sleep(clock: Clock, seconds: float) -> Deferred[None]:
    """Fires with None after ``seconds`` on ``clock``; cancelling it cancels the timer."""
    return task.deferLater(reactor_time(clock), seconds, lambda: None)


class DatagramTransport(Protocol):
    """A bound UDP port as its protocol sees it; ``addr`` may be left out once connected."""

    def write(self, data: bytes, addr: tuple[str, int] | None = None) -> None: ...
    def connect(self, host: str, port: int) -> None: ...
    def getHost(self) -> Any: ...
    def stopListening(self) -> Any: ...
