"""Taking a connection away from twisted.web after an HTTP upgrade.

twisted.web has no public upgrade API. :func:`take_over` detaches a request's connection from its
HTTP channel and binds it to another protocol, the way Autobahn's ``WebSocketResource`` does: the
transport's protocol (or the policies wrapper around it) is pointed at the new protocol, the
channel's raw-data hook forwards to it, and whatever the client sent behind the request head is
handed back so the caller can feed it on. Used by the DERP upgrade and the workspace-app proxy's
websocket splice.
"""

from __future__ import annotations

from typing import Any, cast

from twisted.internet.interfaces import IProtocol
from twisted.internet.protocol import Protocol
from twisted.protocols.policies import ProtocolWrapper
from twisted.web.server import Request


def take_over(request: Request, protocol: Protocol) -> bytes:
    """Detach the request's connection from HTTP and bind it to ``protocol``.

    The caller has written any response head it wants (a ``101``) to the transport already.
    Returns the bytes HTTP had already read past the request.
    """
    channel = request.channel
    # TCP, TLS or a policies wrapper: which of them it is shows in the attributes probed below.
    transport: Any = channel.transport
    channel.transport = None
    # Bytes the client sent right behind the request (a client that does not wait for the
    # 101) are either already parked in HTTP's pipelining buffer, or still inside the HTTP
    # parser's loop when the upgrade happens synchronously; the parser hands those to
    # rawDataReceived after we return, so send them on from there.
    buffered = b"".join(getattr(channel, "_dataBuffer", ()) or ())
    if hasattr(channel, "_dataBuffer"):
        channel._dataBuffer = []
    channel.rawDataReceived = protocol.dataReceived  # type: ignore[method-assign]  # twisted.web has no upgrade API: its raw-data hook is rebound
    if isinstance(transport, ProtocolWrapper):
        # Protocol implements IProtocol through zope.interface, which mypy cannot see.
        transport.wrappedProtocol = cast(IProtocol, protocol)
    elif isinstance(getattr(transport, "protocol", None), ProtocolWrapper):
        transport.protocol.wrappedProtocol = protocol
    else:
        transport.protocol = protocol
    # HTTP registered itself as the transport's producer; our protocol takes that role.
    try:
        transport.unregisterProducer()
    except Exception:  # pragma: no cover - nothing registered
        pass
    protocol.makeConnection(transport)
    producer = getattr(transport, "_networkProducer", None)
    if producer is not None:
        producer.resumeProducing()
    elif hasattr(transport, "resumeProducing"):
        transport.resumeProducing()
    return buffered
