"""Kept-alive HTTP/1.1 connections to workspace apps, per key.

A connection is an :class:`~coderstack.server.upstreamconn.UpstreamConnection` (which frames
requests and responses and hands itself back when it may carry another); the pool parks it
under its key, most recently used first, for at most ``idle_timeout`` seconds and at most ``max_idle_per_key`` of them, and
forgets one as soon as it closes (an app may close an idle connection at any time). Connections
are opened by the caller (through the tunnel it is handed); the pool only keeps them.

``https`` apps get TLS without certificate verification: an app on a workspace's loopback
serves a self-signed certificate that nothing could verify, and the tunnel to the workspace is
what authenticates and protects the connection.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any, cast

from OpenSSL import SSL
from twisted.internet import defer, protocol, ssl
from twisted.internet.endpoints import wrapClientTLS
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IStreamClientEndpoint
from zope.interface import implementer

from coderstack.server.upstreamconn import UpstreamConnection
from coderstack.twistedtypes import Clock, DelayedCall, StreamClientEndpoint, cancel, provides


class _Factory(protocol.Factory):
    noisy = False  # one per connection: no start/stop line in the log for each

    def __init__(self, build: Callable[[], protocol.Protocol]) -> None:
        self._build = build

    def buildProtocol(self, addr: Any) -> protocol.Protocol:
        return self._build()


@implementer(IOpenSSLClientConnectionCreator)
class _UnverifiedTLS:
    """TLS to an app without checking its certificate (see the module doc). No SNI either:
    the app is reached on a loopback address, as Coder's agent reaches it."""

    def __init__(self) -> None:
        self._context = ssl.CertificateOptions(verify=False).getContext()

    def clientConnectionForTLS(self, tls_protocol: Any) -> SSL.Connection:
        connection = SSL.Connection(self._context, None)
        connection.set_connect_state()
        return connection


_TLS: _UnverifiedTLS | None = None


def app_endpoint(endpoint: IStreamClientEndpoint, scheme: str) -> IStreamClientEndpoint:
    """``endpoint`` as the app's scheme needs it: as it is for http, inside TLS for https."""
    global _TLS
    if scheme != "https":
        return endpoint
    if _TLS is None:
        _TLS = _UnverifiedTLS()
    return wrapClientTLS(provides(IOpenSSLClientConnectionCreator, _TLS), endpoint)


def connect_protocol(endpoint: IStreamClientEndpoint, build: Callable[[], protocol.Protocol]) -> defer.Deferred[Any]:
    """Connect ``endpoint`` to the protocol ``build`` makes."""
    return cast(StreamClientEndpoint, endpoint).connect(_Factory(build))


class UpstreamPool:
    def __init__(self, clock: Clock, idle_timeout: float = 90.0, max_idle_per_key: int = 8) -> None:
        self.clock = clock
        self.idle_timeout = idle_timeout
        self.max_idle_per_key = max_idle_per_key
        self._idle: dict[Hashable, list[UpstreamConnection]] = {}
        self._timers: dict[UpstreamConnection, DelayedCall] = {}
        self._live: set[UpstreamConnection] = set()
        self.opened = 0  # connections ever opened (tests count reuse by it)

    def idle_count(self, key: Hashable) -> int:
        return len(self._idle.get(key, ()))

    def take(self, key: Hashable) -> UpstreamConnection | None:
        """A parked connection for ``key`` (it leaves the pool), or None."""
        conns = self._idle.get(key)
        while conns:
            conn = conns.pop()
            cancel(self._timers.pop(conn, None))
            if not conns:
                del self._idle[key]
            if not conn.busy and not conn.gone:
                return conn
        return None

    def open(self, key: Hashable, endpoint: IStreamClientEndpoint) -> defer.Deferred[UpstreamConnection]:
        """A new connection for ``key`` over ``endpoint`` (already wrapped for its scheme)."""

        def opened(conn: UpstreamConnection) -> UpstreamConnection:
            self.opened += 1
            if not conn.gone:
                self._live.add(conn)
            return conn

        return connect_protocol(endpoint, lambda: UpstreamConnection(self, key)).addCallback(opened)

    def _park(self, conn: UpstreamConnection) -> None:
        if conn.gone or self.max_idle_per_key <= 0:
            conn.close_connection()
            return
        conns = self._idle.setdefault(conn.key, [])
        conns.append(conn)
        while len(conns) > self.max_idle_per_key:
            oldest = conns.pop(0)
            cancel(self._timers.pop(oldest, None))
            oldest.close_connection()
        self._timers[conn] = self.clock.callLater(self.idle_timeout, self._expire, conn)

    def _expire(self, conn: UpstreamConnection) -> None:
        self._timers.pop(conn, None)
        self._unpark(conn)
        conn.close_connection()

    def _unpark(self, conn: UpstreamConnection) -> None:
        conns = self._idle.get(conn.key)
        if conns and conn in conns:
            conns.remove(conn)
            if not conns:
                del self._idle[conn.key]
        cancel(self._timers.pop(conn, None))

    def _forget(self, conn: UpstreamConnection) -> None:
        self._unpark(conn)
        self._live.discard(conn)

    async def close(self) -> None:
        """Close every connection, parked or busy, and wait until they are gone."""
        conns = list(self._live)
        for conn in conns:
            conn.abort_connection()
        for conn in conns:
            if not conn.gone:
                await conn.lost
