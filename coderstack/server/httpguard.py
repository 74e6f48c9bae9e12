"""HTTP listeners that a slow or greedy client cannot exhaust.

- :class:`GuardedChannel`: a request head (request line and headers) must be complete within
  ``head_timeout`` seconds of its first byte, however slowly the bytes drip (Twisted's idle
  timeout alone restarts on every byte). A late head is answered ``408`` and the connection
  closed. Idle keep-alive connections still end after the site's idle timeout.
- :class:`AdmissionFactory`: wraps the site per listener and asks an
  :class:`~coderstack.server.admission.Admission` about every new connection; a refused one is
  answered ``503`` (JSON, ``Retry-After``) and closed without reaching HTTP (on a TLS
  listener only closed: the check runs before the handshake).

Upgraded connections (coordinator and DERP websockets) stay wrapped, so they count against
their source until they close.
"""

from __future__ import annotations

import json
from typing import Any, Protocol

from twisted.internet import protocol
from twisted.internet.interfaces import IAddress
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel, _GenericHTTPChannelProtocol
from twisted.web.server import Site

from coderstack.server.admission import Admission
from coderstack.twistedtypes import DelayedCall

log = Logger()

#: Seconds from a request head's first byte to its blank line.
HEAD_TIMEOUT = 10.0


def _json_response(status: bytes, message: str, detail: str) -> bytes:
    body = json.dumps({"message": message, "detail": detail}).encode() + b"\n"
    return (
        b"HTTP/1.1 " + status + b"\r\n"
        b"Content-Type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n"
        b"Connection: close\r\n"
        b"Retry-After: 1\r\n\r\n" + body
    )


class _Connection(Protocol):
    """The part of a transport (``ITransport``) an answer before HTTP needs."""

    def write(self, data: bytes) -> None: ...

    def loseConnection(self) -> None: ...


class GuardedChannel(HTTPChannel):
    """An HTTPChannel whose request heads have a deadline (see the module doc). The
    connection's own address and whether it is TLS are looked up once, not per request."""

    head_timeout = HEAD_TIMEOUT
    _head_call: DelayedCall | None = None
    _host: IAddress | None = None
    _secure: bool | None = None

    def dataReceived(self, data: bytes) -> None:
        # Only while a head is being read (line mode): a request body may take as long as it
        # takes, and a streamed one arrives while no request is being handled yet.
        if self._head_call is None and self.line_mode and not self._handlingRequest and data:
            self._head_call = self.callLater(self.head_timeout, self._head_timed_out)
        super().dataReceived(data)

    def allHeadersReceived(self) -> None:
        self._cancel_head_deadline()
        super().allHeadersReceived()

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self._cancel_head_deadline()
        super().connectionLost(reason)

    def getHost(self) -> IAddress:
        if self._host is None:
            self._host = super().getHost()
        return self._host

    def isSecure(self) -> bool:
        if self._secure is None:
            self._secure = bool(super().isSecure())
        return self._secure

    def _cancel_head_deadline(self) -> None:
        if self._head_call is not None:
            if self._head_call.active():
                self._head_call.cancel()
            self._head_call = None

    def _head_timed_out(self) -> None:
        self._head_call = None
        transport: _Connection | None = self.transport
        if self._handlingRequest or transport is None:
            return
        transport.write(_json_response(
            b"408 Request Timeout", "The request head took too long.",
            f"send the request line and headers within {self.head_timeout:g} s",
        ))
        self.timeoutConnection()  # close, and abort if the client does not let go


class GuardedSite(Site):
    protocol = GuardedChannel  # type: ignore[assignment]  # twisted types Site.protocol as its HTTP/2-negotiating wrapper; a Site serves an HTTPChannel subclass as well
    head_timeout = HEAD_TIMEOUT

    def buildProtocol(self, addr: IAddress | None) -> _GenericHTTPChannelProtocol | None:
        channel = super().buildProtocol(addr)
        if isinstance(channel, GuardedChannel):
            channel.head_timeout = self.head_timeout
        return channel


class _Refusal(protocol.Protocol):
    def __init__(self, detail: str | None) -> None:
        self.detail = detail

    def connectionMade(self) -> None:
        transport: _Connection | None = self.transport
        if transport is None:
            return
        if self.detail is not None:
            transport.write(_json_response(b"503 Service Unavailable", "Too many connections.", self.detail))
        transport.loseConnection()


class _Admitted(ProtocolWrapper):
    source = ""


class AdmissionFactory(WrappingFactory[_Admitted]):
    """One listener's factory: the site behind an admission check."""

    protocol = _Admitted

    def __init__(self, wrapped: Factory[Any], admission: Admission, answer_refusals: bool = True) -> None:
        super().__init__(wrapped)
        self.admission = admission
        # False for TLS listeners (the factory wraps TLS): a plain-text answer would only be
        # a garbled handshake there, so a refused TLS connection is just closed.
        self.answer_refusals = answer_refusals

    def buildProtocol(self, addr: IAddress | None) -> _Admitted | _Refusal:  # type: ignore[override]  # a refused connection gets a _Refusal, not a wrapper of the site's protocol
        source = str(getattr(addr, "host", "local"))
        why = self.admission.admit(source)
        if why is not None:
            return _Refusal(why if self.answer_refusals else None)
        try:
            p = super().buildProtocol(addr)
        except BaseException:
            self.admission.release(source)
            raise
        p.source = source
        return p

    def unregisterProtocol(self, p: _Admitted) -> None:
        super().unregisterProtocol(p)
        self.admission.release(p.source)
