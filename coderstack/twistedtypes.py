"""Typed views of the Twisted interfaces this code drives: transports, endpoints, the clock, a
reactor that binds UDP ports.

Twisted declares them as zope interfaces, whose methods have no ``self``; without a zope plugin
mypy reads every ``transport.write(data)`` or ``clock.callLater(1, f)`` as a call with one
argument too many, and ``Protocol.transport`` is optional until the connection is made. These
Protocols name what the code uses (a reactor and ``task.Clock`` fit :class:`Clock`); the
accessors hand a connected protocol's transport back as one of them, and :func:`provides`
passes an ``@implementer`` object where an interface type is wanted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Protocol, TypeVar, cast

from twisted.internet import defer, protocol, task
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint


class StreamTransport(Protocol):
    """A connected TCP-like transport (``ITCPTransport`` and the producer/consumer pair)."""

    def write(self, data: bytes) -> None: ...
    def writeSequence(self, data: Iterable[bytes]) -> None: ...
    def loseConnection(self) -> None: ...
    def abortConnection(self) -> None: ...
    def getPeer(self) -> Any: ...
    def getHost(self) -> Any: ...
    def pauseProducing(self) -> None: ...
    def resumeProducing(self) -> None: ...
    def stopProducing(self) -> None: ...
    def registerProducer(self, producer: Any, streaming: bool) -> None: ...
    def unregisterProducer(self) -> None: ...


class DatagramTransport(Protocol):
    """A bound UDP port as its protocol sees it; ``addr`` may be left out once connected."""

    def write(self, data: bytes, addr: tuple[str, int] | None = None) -> None: ...
    def connect(self, host: str, port: int) -> None: ...
    def getHost(self) -> Any: ...
    def stopListening(self) -> Any: ...


class ListeningPort(Protocol):
    """``IListeningPort``: a bound TCP or UDP port its owner may stop."""

    def getHost(self) -> Any: ...
    def stopListening(self) -> Any: ...


class ProcessTransport(Protocol):
    """``IProcessTransport``: the child process as its ``ProcessProtocol`` drives it."""

    @property
    def pid(self) -> int | None: ...
    def write(self, data: bytes) -> None: ...
    def closeStdin(self) -> None: ...
    def closeChildFD(self, fd: int, /) -> None: ...
    def signalProcess(self, signal: str | int, /) -> None: ...
    def loseConnection(self) -> None: ...


class StreamClientEndpoint(Protocol):
    def connect(self, factory: protocol.Factory, /) -> defer.Deferred[Any]: ...


class DelayedCall(Protocol):
    def cancel(self) -> None: ...
    def reset(self, seconds_from_now: float, /) -> None: ...
    def active(self) -> bool: ...
    def getTime(self) -> float: ...


class Clock(Protocol):
    """``IReactorTime``: what timers need."""

    def seconds(self) -> float: ...
    def callLater(self, delay: float, fn: Callable[..., object], /, *args: object, **kw: object) -> DelayedCall: ...


def cancel(call: DelayedCall | None) -> None:
    """Cancel ``call`` if it is still pending."""
    if call is not None and call.active():
        call.cancel()


def reactor_time(clock: Clock) -> IReactorTime:
    """``clock`` for Twisted APIs typed with the interface (``LoopingCall.clock``, ``deferLater``)."""
    return cast(IReactorTime, clock)


def sleep(clock: Clock, seconds: float) -> defer.Deferred[None]:
    """Fires with None after ``seconds`` on ``clock``; cancelling it cancels the timer."""
    return task.deferLater(reactor_time(clock), seconds, lambda: None)


class UDPReactor(Clock, Protocol):
    """A reactor that binds UDP ports (``IReactorUDP``) and keeps time."""

    def listenUDP(self, port: int, protocol: protocol.AbstractDatagramProtocol,
                  interface: str = "", maxPacketSize: int = 8192) -> DatagramTransport: ...


Iface = TypeVar("Iface")


def provides(iface: type[Iface], obj: object) -> Iface:
    """``obj`` as a provider of the zope interface ``iface``: its class says
    ``@implementer(iface)``, which mypy cannot read. Checked, so a wrong claim fails here."""
    if not iface.providedBy(obj):  # type: ignore[attr-defined]  # zope's Interface carries no types
        raise TypeError(f"{type(obj).__name__} does not provide {iface.__name__}")
    return cast(Iface, obj)


class NotConnected(RuntimeError):
    """A protocol's transport was wanted before ``makeConnection`` or after it was let go."""


def stream_transport(proto: protocol.Protocol) -> StreamTransport:
    if proto.transport is None:
        raise NotConnected(f"{type(proto).__name__} has no transport")
    return cast(StreamTransport, proto.transport)


def process_transport(proto: protocol.ProcessProtocol) -> ProcessTransport:
    if proto.transport is None:
        raise NotConnected(f"{type(proto).__name__} has no transport")
    return cast(ProcessTransport, proto.transport)


def datagram_transport(proto: protocol.AbstractDatagramProtocol) -> DatagramTransport:
    if proto.transport is None:
        raise NotConnected(f"{type(proto).__name__} has no transport")
    return cast(DatagramTransport, proto.transport)


def stream_client(endpoint: IStreamClientEndpoint) -> StreamClientEndpoint:
    return cast(StreamClientEndpoint, endpoint)
