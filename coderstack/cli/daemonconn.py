"""An ``AgentConnection`` (:mod:`coderstack.cli.dialing`) over the tunnel daemon, for a command
that runs Twisted anyway (``ping``): it skips dialing a tunnel and uses the daemon's.

On top of the ``DIAL`` request (:mod:`coderstack.cli.warm` documents the protocol) each of these
is one request line answered by ``OK <json>`` (or ``FAIL``/``ERR`` as for ``DIAL``):

* ``OPEN <fingerprint> <workspace>`` — find the workspace's agent and hold a tunnel to it;
  the JSON is ``INFO``'s;
* ``PING <fingerprint> <workspace> <timeout>`` — one disco ping over the held tunnel:
  ``{"latency", "kind", "endpoint", "derp_region", "derp_name"}`` (a ``PingResult``) and
  ``"info"``, ``INFO``'s answer as of that pong;
  ``FAIL timeout`` when none came back within ``timeout`` seconds (0: the ping's own limit);
* ``INFO <fingerprint> <workspace> <timeout>`` — after waiting up to ``timeout`` seconds for the
  tunnel's first netcheck report: ``{"peer_diagnostics", "netinfo", "derp_region_names"}``.

The synchronous diagnostics (``peer_diagnostics()``, ``netinfo()``, ``derp_region_names()``) answer
from the last of these answers: the one after the latest ping, dial or ``await_netinfo``.

UDP has no request (``udp_dial`` is None). ``port-forward``, which runs for hours, wraps this in
:mod:`coderstack.cli.heldconn` (a ``HOLD`` keeps the daemon up between its connections).
"""

from __future__ import annotations

import json
import os
from typing import Any, cast

from twisted.internet import defer, error, protocol
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.interfaces import IHalfCloseableProtocol, IStreamClientEndpoint
from zope.interface import implementer

from coderstack.cli import warm
from coderstack.cli.context import Context
from coderstack.sdk import SDKError
from coderstack.tailnet.endpoint import PingResult
from coderstack.twistedtypes import provides, stream_transport


@implementer(IHalfCloseableProtocol)
class _Request(protocol.Protocol):
    """One request on the daemon's socket. With a ``factory``: after ``OK`` the socket is the
    stream, handed to the protocol the factory builds. Without: ``OK <text>`` ends it."""

    def __init__(self, line: str, factory: protocol.Factory | None) -> None:
        self.line, self.stream_factory = line, factory  # (Factory.buildProtocol sets .factory)
        self.buffer = b""
        self.inner: protocol.Protocol | None = None
        self.ready: defer.Deferred[Any] = defer.Deferred()

    def connectionMade(self) -> None:
        transport = stream_transport(self)
        if warm.transport_peer_uid(self.transport) != os.getuid():
            self._fail(warm.Unavailable("the daemon's socket belongs to another user"))
            return
        transport.write(self.line.encode() + b"\n")

    def _fail(self, err: Exception) -> None:
        if not self.ready.called:
            self.ready.errback(err)
        if self.transport is not None:
            stream_transport(self).loseConnection()

    def dataReceived(self, data: bytes) -> None:
        if self.inner is not None:
            self.inner.dataReceived(data)
            return
        if self.ready.called:
            return
        self.buffer += data
        while b"\n" in self.buffer and self.inner is None and not self.ready.called:
            raw, self.buffer = self.buffer.split(b"\n", 1)
            kind, _, text = raw.decode("utf-8", "replace").partition(" ")
            if kind == "OK":
                self._ok(text)
            elif kind == "FAIL":
                self._fail(warm.Failed(text))
            elif kind != "MSG":
                self._fail(warm.Unavailable(f"the daemon said {raw[:80]!r}"))

    def _ok(self, text: str) -> None:
        if self.stream_factory is None:
            self.ready.callback(text)
            stream_transport(self).loseConnection()
            return
        inner = self.stream_factory.buildProtocol(stream_transport(self).getPeer())
        if inner is None:
            self._fail(error.ConnectError("the factory refused the connection"))
            return
        assert self.transport is not None  # a reply came in on it
        self.inner = cast(protocol.Protocol, inner)
        self.inner.makeConnection(self.transport)
        self.ready.callback(inner)
        rest, self.buffer = self.buffer, b""
        if rest:
            inner.dataReceived(rest)

    def readConnectionLost(self) -> None:
        inner = self.inner
        if inner is not None and IHalfCloseableProtocol.providedBy(inner):
            inner.readConnectionLost()  # type: ignore[attr-defined]  # zope's providedBy is no type guard
        elif self.transport is not None:
            stream_transport(self).loseConnection()

    def writeConnectionLost(self) -> None:
        inner = self.inner
        if inner is not None and IHalfCloseableProtocol.providedBy(inner):
            inner.writeConnectionLost()  # type: ignore[attr-defined]  # zope's providedBy is no type guard

    def connectionLost(self, reason: Any = None) -> None:
        if self.inner is not None:
            self.inner.connectionLost(reason)
        elif not self.ready.called:
            self.ready.errback(warm.Unavailable("the daemon closed the connection before replying"))


@implementer(IStreamClientEndpoint)
class _DialEndpoint:
    def __init__(self, conn: DaemonConnection, port: int) -> None:
        self.conn, self.port = conn, port

    def connect(self, factory: protocol.Factory) -> defer.Deferred[Any]:
        async def go() -> Any:
            try:
                stream = await self.conn.request(f"DIAL {self.conn.fp} {self.conn.name} {self.port} no", factory)
                # A stream may have just made the WireGuard handshake (a disco pong needs none):
                # the diagnostics read next should show it, as an in-process Conn's would.
                await self.conn.await_netinfo(0)
            except (warm.Failed, warm.Unavailable) as err:
                raise error.ConnectError(str(err)) from None
            return stream

        return defer.Deferred.fromCoroutine(go())


class DaemonConnection:
    """``AgentConnection`` through the daemon: the daemon keeps the tunnel open after ``close``."""

    udp_dial: Any = None

    def __init__(self, reactor: Any, paths: warm.Paths, name: str, disable_direct: bool) -> None:
        self.reactor, self.paths, self.name = reactor, paths, name
        self.fp = paths.fingerprint
        self.disable_direct = disable_direct
        self.info: dict[str, Any] = {}

    async def request(self, line: str, factory: protocol.Factory | None = None) -> Any:
        proto = _Request(line, factory)
        try:
            await UNIXClientEndpoint(self.reactor, self.paths.socket).connect(
                protocol.Factory.forProtocol(lambda: proto))
        except (error.ConnectError, OSError) as err:
            raise warm.Unavailable(f"the daemon: {err}") from None
        return await proto.ready

    async def ask(self, line: str) -> Any:
        return json.loads(await self.request(line))

    async def open(self) -> None:
        self.info = await self.ask(f"OPEN {self.fp} {self.name}")

    def endpoint(self, port: int) -> IStreamClientEndpoint:
        return provides(IStreamClientEndpoint, _DialEndpoint(self, port))

    async def ping(self) -> PingResult:
        try:
            got = await self.ask(f"PING {self.fp} {self.name} 0")
        except warm.Failed as err:
            if str(err) == "timeout":
                raise TimeoutError("no pong") from None
            raise SDKError(str(err)) from None
        self.info = got.get("info") or self.info  # the diagnostics as they are after this ping
        return PingResult(got["latency"], got["kind"], endpoint=got["endpoint"], derp_region=got["derp_region"],
                          derp_name=got["derp_name"])

    def peer_diagnostics(self) -> dict[str, Any]:
        return dict(self.info.get("peer_diagnostics") or {})

    def derp_region_names(self) -> dict[int, str]:
        return {int(k): v for k, v in (self.info.get("derp_region_names") or {}).items()}

    def netinfo(self) -> dict[str, Any] | None:
        return self.info.get("netinfo")

    async def await_netinfo(self, timeout: float) -> None:
        self.info = await self.ask(f"INFO {self.fp} {self.name} {timeout:g}")

    def close(self) -> None:
        return None  # the tunnel stays with the daemon


async def connect(reactor: Any, ctx: Context, name: str) -> DaemonConnection:
    """The daemon's tunnel to ``name`` (starting the daemon if none runs); raises
    :class:`coderstack.cli.warm.Unavailable` when it cannot be used, ``SDKError`` when the
    workspace cannot be reached (as :func:`coderstack.cli.tunnel.connect_agent` does)."""
    try:
        url, token = ctx.server_url(), ctx.session_token()
    except SDKError:
        raise warm.Unavailable("not logged in") from None
    if not name or any(c.isspace() for c in name):
        raise warm.Unavailable("a workspace name the protocol cannot carry")
    fp = warm.fingerprint(url, token, ctx.disable_direct)
    paths = warm.paths_for(ctx.config.path, fp, ctx.environ)
    environ = dict(ctx.environ)
    # The daemon serves this identity whichever way it was given (flags included).
    environ.update(CODER_URL=url, CODER_SESSION_TOKEN=token)
    try:
        # Blocking, once, before anything else runs: at most the daemon's start.
        warm.open_daemon(paths, environ, ctx.disable_direct).close()
    except OSError as err:
        raise warm.Unavailable(str(err)) from None
    conn = DaemonConnection(reactor, paths, name, ctx.disable_direct)
    try:
        await conn.open()
    except warm.Failed as err:
        raise SDKError(str(err)) from None
    return conn
