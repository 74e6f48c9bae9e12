"""The parts of Twisted's reactor and transport interfaces the DERP code calls, as Protocols.

Twisted declares ``IReactorTime``, ``IDelayedCall`` and ``ITransport`` as zope interfaces, which
mypy cannot check calls against. Reactors, ``twisted.internet.task.Clock`` and TCP/TLS
transports fit these structurally, so the sans-IO cores take a :class:`Clock` (tests hand them a
``task.Clock``) and the adapters read their transport through :func:`stream_transport`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, cast


class Timer(Protocol):
    """A pending ``callLater`` call."""

    def active(self) -> bool: ...

    def cancel(self) -> None: ...

    def reset(self, seconds: float, /) -> None: ...


class Clock(Protocol):
    def seconds(self) -> float: ...

    def callLater(self, delay: float, f: Callable[..., object], /, *args: Any, **kw: Any) -> Timer: ...


def cancel(timer: Timer | None) -> None:
    """Cancel ``timer`` if it is still pending."""
    if timer is not None and timer.active():
        timer.cancel()


class StreamTransport(Protocol):
    """A connected TCP or TLS transport."""

    def write(self, data: bytes, /) -> None: ...

    def writeSequence(self, data: Sequence[bytes], /) -> None: ...

    def loseConnection(self) -> None: ...

    def abortConnection(self) -> None: ...

    def registerProducer(self, producer: Any, streaming: bool, /) -> None: ...

    def unregisterProducer(self) -> None: ...

    def getPeer(self) -> Any: ...

    def getHost(self) -> Any: ...


def stream_transport(protocol: Any) -> StreamTransport:
    """``protocol.transport``, which a connected Twisted protocol always has."""
    transport = protocol.transport
    if transport is None:
        raise RuntimeError(f"{type(protocol).__name__} has no transport (not connected)")
    return cast(StreamTransport, transport)
