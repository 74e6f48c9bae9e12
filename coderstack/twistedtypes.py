"""Typed views of the Twisted interfaces this code drives: the clock, its delayed calls, a UDP
transport, a reactor that binds UDP ports.

Twisted declares them as zope interfaces, whose methods have no ``self``; without a zope plugin
mypy reads every ``transport.write(data, addr)`` or ``clock.callLater(1, f)`` as a call with one
argument too many. These Protocols name what the code uses (a reactor and ``task.Clock`` fit
:class:`Clock`), and :func:`datagram_transport` hands a listening protocol's transport back as
one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, cast

from twisted.internet import protocol


class DelayedCall(Protocol):
    def cancel(self) -> None: ...
    def reset(self, seconds_from_now: float, /) -> None: ...
    def active(self) -> bool: ...
    def getTime(self) -> float: ...


class Clock(Protocol):
    """``IReactorTime``: what timers need."""

    def seconds(self) -> float: ...
    def callLater(self, delay: float, fn: Callable[..., object], /, *args: object, **kw: object) -> DelayedCall: ...


class DatagramTransport(Protocol):
    """A bound UDP port as its protocol sees it; ``addr`` may be left out once connected."""

    def write(self, data: bytes, addr: tuple[str, int] | None = None) -> None: ...
    def connect(self, host: str, port: int) -> None: ...
    def getHost(self) -> Any: ...
    def stopListening(self) -> Any: ...


class UDPReactor(Clock, Protocol):
    """A reactor that binds UDP ports (``IReactorUDP``) and keeps time."""

    def listenUDP(self, port: int, protocol: protocol.AbstractDatagramProtocol,
                  interface: str = "", maxPacketSize: int = 8192) -> DatagramTransport: ...


class NotConnected(RuntimeError):
    """A protocol's transport was wanted before ``makeConnection`` or after it was let go."""


def datagram_transport(proto: protocol.AbstractDatagramProtocol) -> DatagramTransport:
    if proto.transport is None:
        raise NotConnected(f"{type(proto).__name__} has no transport")
    return cast(DatagramTransport, proto.transport)
