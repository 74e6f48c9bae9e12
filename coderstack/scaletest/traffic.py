"""``scaletest traffic``: clients that open tunnels to the simulated agents and move bytes.

Each connection is what ``coderstack ssh`` does to reach an agent (the CLI's own
:func:`coderstack.tailnet.dial.dial_agent`: a Conn, a coordinator websocket, DERP, direct paths
unless ``relay``), then one TCP connection through the tunnel to the agent's echo port. Every
``tick_interval`` it writes ``bytes_per_tick``; a tick's round trip ends when its last byte has
come back (ticks are pipelined, so a slow round trip delays no later write). The default is
Coder's scale-test figure: 4 KiB every 100 ms, 40 KB/s per connection.

Node updates for the agent are timed on arrival (the fan-out, see :class:`FanoutClock`).
"""

from __future__ import annotations

import collections
from typing import Any
from uuid import UUID

from twisted.internet import defer, protocol, task

from coderstack.scaletest.simagent import ECHO_PORT, FanoutClock
from coderstack.scaletest.stats import Summary, error_kind
from coderstack.tailnet.dial import AgentTunnel, dial_agent
from coderstack.tailnet.sharedudp import SharedUDP
from coderstack.twistedtypes import stream_transport

DEFAULT_BYTES_PER_TICK = 4096
DEFAULT_TICK_INTERVAL = 0.1
DRAIN_TIMEOUT = 10.0  # after the last tick, how long the echo may take to come back


class _EchoClient(protocol.Protocol):
    """Writes ticks, matches the bytes coming back to them, records each round trip."""

    def __init__(self, clock: Any, summary: Summary) -> None:
        self.clock = clock
        self.summary = summary
        self.sent = 0
        self.received = 0
        self.pending: collections.deque[tuple[int, float]] = collections.deque()  # (end offset, sent at)
        self.opened: defer.Deferred[None] = defer.Deferred()
        self.lost: defer.Deferred[None] = defer.Deferred()
        self._drained: defer.Deferred[None] | None = None
        self._payload = b""

    def connectionMade(self) -> None:
        self.opened.callback(None)

    def tick(self, size: int) -> None:
        if len(self._payload) != size:
            self._payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
        self.sent += size
        self.pending.append((self.sent, self.clock.seconds()))
        self.summary.bytes_sent += size
        stream_transport(self).write(self._payload)

    def dataReceived(self, data: bytes) -> None:
        self.received += len(data)
        self.summary.bytes_received += len(data)
        now = self.clock.seconds()
        while self.pending and self.pending[0][0] <= self.received:
            self.summary.latency.add(now - self.pending.popleft()[1])
        if not self.pending and self._drained is not None and not self._drained.called:
            self._drained.callback(None)

    def drained(self) -> defer.Deferred[None]:
        self._drained = defer.Deferred()
        if not self.pending:
            self._drained.callback(None)
        return self._drained

    def connectionLost(self, reason: Any = None) -> None:
        self.lost.callback(None)
        if self._drained is not None and not self._drained.called:
            self._drained.errback(ConnectionError("the echo connection closed"))


class Connection:
    """One client: dial, echo for ``seconds``, close. Failures are counted in the summary."""

    def __init__(self, reactor: Any, api: Any, agent_id: UUID, summary: Summary, fanout: FanoutClock,
                 *, relay: bool = False, shared_udp: SharedUDP | None = None) -> None:
        self.reactor = reactor
        self.api = api
        self.agent_id = agent_id
        self.summary = summary
        self.fanout = fanout
        self.relay = relay
        self.shared_udp = shared_udp
        self.tunnel: AgentTunnel | None = None
        self.echo: _EchoClient | None = None

    async def open(self, timeout: float = 60.0) -> bool:
        started = self.reactor.seconds()
        try:
            self.tunnel = await dial_agent(self.reactor, self.api, self.agent_id, disable_direct=self.relay,
                                           timeout=timeout, link_monitor=False, observe=self.fanout.observe,
                                           shared_udp=self.shared_udp)
        except Exception as err:
            self.summary.errors.add("dial-" + error_kind(err))
            return False
        echo = self.echo = _EchoClient(self.reactor, self.summary)
        try:
            factory = protocol.Factory.forProtocol(lambda: echo)
            await self.tunnel.endpoint(ECHO_PORT, timeout=timeout).connect(factory)
        except Exception as err:
            self.summary.errors.add("echo-connect-" + error_kind(err))
            return False
        self.summary.connect.add(self.reactor.seconds() - started)
        self.summary.connected += 1
        return True

    async def run(self, seconds: float, bytes_per_tick: int, tick_interval: float) -> None:
        echo = self.echo
        assert echo is not None and self.tunnel is not None
        ticks = task.LoopingCall(echo.tick, bytes_per_tick)
        ticks.clock = self.reactor
        done = ticks.start(tick_interval, now=True)
        stop = self.reactor.callLater(seconds, ticks.stop)
        ended: list[defer.Deferred[Any]] = [done, echo.lost]
        _, which = await defer.DeferredList(ended, fireOnOneCallback=True, consumeErrors=True)
        if which == 1:  # the echo connection closed before the run's end
            stop.cancel()
            if ticks.running:
                ticks.stop()
            self.summary.errors.add("echo-closed")
            return
        try:
            await echo.drained().addTimeout(DRAIN_TIMEOUT, self.reactor)
        except defer.TimeoutError:
            self.summary.errors.add("echo-incomplete")
        except ConnectionError:
            self.summary.errors.add("echo-closed")
        try:
            result = await self.tunnel.ping().addTimeout(5, self.reactor)
            self.summary.paths[result.kind] += 1
        except Exception as err:
            self.summary.errors.add("ping-" + error_kind(err))

    async def close(self) -> None:
        if self.echo is not None and self.echo.transport is not None:
            stream_transport(self.echo).loseConnection()
        if self.tunnel is not None:
            await self.tunnel.close()
