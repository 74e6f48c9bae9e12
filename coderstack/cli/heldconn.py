"""``port-forward``'s ``AgentConnection`` (:mod:`coderstack.cli.dialing`) over the tunnel daemon.

A port-forward runs for hours and opens a stream now and then: each accepted TCP connection is
one ``STREAM`` on the daemon's socket (:mod:`coderstack.cli.warm` documents the protocol), so it
rides the tunnel the daemon holds (the ``OPEN`` at the start found it) instead of one dialed
here, with no API call per connection. Between connections a ``HOLD`` connection keeps the
daemon from exiting idle under it.

When the daemon goes away anyway (killed; the hold ends without our closing it, or the socket
refuses), the next connection and every one after it use a tunnel of this process's own,
dialed then, once: the same tunnel the command would have dialed without the daemon. A
``STREAM`` the daemon answers ``FAIL`` (the port refused, or the held tunnel failed and the
``DIAL`` it then made found the agent offline or the workspace gone) fails that connection with
the daemon's text, which is the in-process dial's.

UDP (``--udp``) has no stream in the protocol, and is carried on that own tunnel too, dialed on
the first UDP flow: a datagram framing over the unix socket would have to invent drops where
the stream would otherwise buffer without bound, while the own tunnel is what ``--udp`` used
before and costs one dial for the whole run. TCP keeps going through the daemon meanwhile.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from twisted.internet import defer, error, protocol
from twisted.internet.interfaces import IStreamClientEndpoint
from zope.interface import implementer

from coderstack.cli import warm
from coderstack.cli.daemonconn import DaemonConnection
from coderstack.cli.dialing import AgentConnection
from coderstack.cli.sharedcall import SharedCall
from coderstack.sdk import SDKError
from coderstack.tailnet.endpoint import PingResult
from coderstack.twistedtypes import provides, stream_client, stream_transport


class DialFailed(error.ConnectError):
    """A ``STREAM`` the daemon answered ``FAIL``: its text as is, the words the in-process dial
    would have failed with (a refused port's included)."""

    def __init__(self, text: str) -> None:
        super().__init__(string=text)
        self.text = text

    def __str__(self) -> str:
        return self.text


class _Hold(protocol.Protocol):
    """The open ``HOLD`` connection; its end (not ours) means the daemon is gone."""

    def __init__(self, held: HeldConnection) -> None:
        self.held = held

    def connectionLost(self, reason: Any = None) -> None:
        self.held.hold_lost(self)


@implementer(IStreamClientEndpoint)
class _Endpoint:
    def __init__(self, held: HeldConnection, port: int) -> None:
        self.held, self.port = held, port

    def connect(self, factory: protocol.Factory) -> defer.Deferred[Any]:
        return defer.Deferred.fromCoroutine(self.held.connect(self.port, factory))


class HeldConnection:
    """TCP through the daemon while it is there; this process's own tunnel for UDP and after."""

    def __init__(self, daemon: DaemonConnection, dial_here: Callable[[], Awaitable[AgentConnection]],
                 say: Callable[[str], None]) -> None:
        """``dial_here``: this process's own tunnel (its caller closes it at the end); ``say``:
        where to tell that the daemon went away (the debug line, or nowhere)."""
        self.daemon, self.dial_here, self.say = daemon, dial_here, say
        self.disable_direct = daemon.disable_direct
        self.hold: _Hold | None = None
        self.daemon_gone = False
        self.closed = False
        self._dialing = SharedCall(self._dial_here)
        self.here: AgentConnection | None = None

    async def start(self) -> None:
        """Hold the daemon (raises :class:`coderstack.cli.warm.Unavailable` if it cannot)."""
        hold = _Hold(self)
        await self.daemon.request(f"HOLD {self.daemon.fp}", protocol.Factory.forProtocol(lambda: hold))
        self.hold = hold

    def hold_lost(self, hold: _Hold) -> None:
        if hold is self.hold and not self.closed:
            self.hold = None
            self.gone("the daemon's hold ended")

    def gone(self, why: str) -> None:
        if not self.daemon_gone:
            self.daemon_gone = True
            self.say(f"coderstack: the tunnel daemon went away ({why}); dialing here")

    async def own(self) -> AgentConnection:
        """This process's own tunnel, dialed on first need (once, however many wait for it; a
        failed dial is tried again by the next connection)."""
        if self.here is not None:
            return self.here
        return await self._dialing.wait()

    async def _dial_here(self) -> AgentConnection:
        self.here = await self.dial_here()
        return self.here

    async def connect(self, port: int, factory: protocol.Factory) -> Any:
        """One forwarded TCP connection to ``port``: a ``STREAM`` while the daemon is there."""
        if not self.daemon_gone:
            try:
                return await self.daemon.request(f"STREAM {self.daemon.fp} {self.daemon.name} {port}", factory)
            except warm.Failed as err:
                raise DialFailed(str(err)) from None
            except warm.Unavailable as err:
                self.gone(str(err))
        try:
            conn = await self.own()
        except SDKError as err:
            raise DialFailed(str(err)) from None
        return await stream_client(conn.endpoint(port)).connect(factory)

    def endpoint(self, port: int) -> IStreamClientEndpoint:
        return provides(IStreamClientEndpoint, _Endpoint(self, port))

    def udp_dial(self, port: int, on_datagram: Callable[[bytes], None]) -> defer.Deferred[Any]:
        async def dial() -> Any:
            conn = await self.own()
            if conn.udp_dial is None:
                raise error.ConnectError("UDP is not available on this connection")
            return await conn.udp_dial(port, on_datagram)

        return defer.Deferred.fromCoroutine(dial())

    def _current(self) -> AgentConnection:
        return self.here if self.here is not None else self.daemon

    async def ping(self) -> PingResult:
        return await self._current().ping()

    def peer_diagnostics(self) -> dict[str, Any]:
        return self._current().peer_diagnostics()

    def derp_region_names(self) -> dict[int, str]:
        return self._current().derp_region_names()

    def netinfo(self) -> dict[str, Any] | None:
        return self._current().netinfo()

    async def await_netinfo(self, timeout: float) -> None:
        await self._current().await_netinfo(timeout)

    def close(self) -> None:
        """Let go of the daemon (its tunnel stays with it; the own one is the caller's)."""
        self.closed = True
        hold, self.hold = self.hold, None
        if hold is not None and hold.transport is not None:
            stream_transport(hold).loseConnection()


async def hold(daemon: DaemonConnection, dial_here: Callable[[], Awaitable[AgentConnection]],
               say: Callable[[str], None]) -> HeldConnection:
    """A :class:`HeldConnection` holding ``daemon`` (which has opened its tunnel to the workspace)."""
    held = HeldConnection(daemon, dial_here, say)
    await held.start()
    return held
