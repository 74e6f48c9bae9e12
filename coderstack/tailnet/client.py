"""A tailnet node kept coordinated: its Conn, the Conn's netstack and link monitor, and the peers
the coordinator told it about. The CLI uses one for its tunnel to an agent, the agent for the
clients that dial it; one client may hold tunnels to many agents.

    client = TailnetClient(reactor, conn, accept_incoming=False)
    tunnel = client.add_tunnel(agent_id)         # a Tunnel: the agent's node, key and address
    client.coordinate(link)                      # where our requests go (a CoordinationLink)
    client.register()                            # on each new websocket: our node, our tunnels
    client.handle_response(response)             # peer updates from the coordinator
    await client.reachable(tunnel, timeout=20, grace=2)
    await client.ping(tunnel) -> PingResult;  client.endpoint(tunnel, 22)
    await client.close()                         # leaves the coordinator, closes the Conn

Peer updates (``coderstack/wire/coordination.py``) applied to the Conn:

- NODE: the peer is configured (a new key replaces the old peer). For a tunnel of ours the
  WireGuard handshake starts at once, so the first packet need not wait for it; a peer that
  dialed us and is new is told READY_FOR_HANDSHAKE (we have its node: it may start).
- LOST: the peer's coordinator connection dropped. It stays configured: an established tunnel
  survives a server restart.
- DISCONNECTED: the peer left; it is removed (a tunnel keeps the agent's last node to show).
- READY_FOR_HANDSHAKE: the agent of a tunnel has our node; the tunnel is reachable.

Updates about any other peer (one we have no tunnel to, while we do not ``accept_incoming``)
are ignored. Our node goes to the coordinator whenever it changes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from ipaddress import IPv6Address
from typing import Protocol
from uuid import UUID

from twisted.internet import defer
from twisted.logger import Logger

from coderstack.netstack.endpoints import Netstack, NetstackClientEndpoint
from coderstack.tailnet import linkmon
from coderstack.tailnet.conn import Conn
from coderstack.tailnet.endpoint import PingResult
from coderstack.tailnet.stack import attach_netstack, client_endpoint
from coderstack.twistedtypes import Clock, DelayedCall
from coderstack.wire.coordination import CoordinateRequest, CoordinateResponse, Node

_log = Logger()


class DialError(Exception):
    """A tunnel that did not come up in time."""


class Coordination(Protocol):
    """Where a client's requests go (a ``CoordinationLink``)."""

    def send(self, request: CoordinateRequest) -> None: ...
    async def close(self) -> None: ...


@dataclass
class Peer:
    """A peer the Conn has, as the coordinator described it."""

    id: UUID
    node: Node
    lost: bool = False  # its coordinator connection dropped; the tunnel may well still work


@dataclass
class Tunnel:
    """A tunnel we added to one agent, and what we were told of the agent."""

    agent_id: UUID
    node: Node | None = None        # the agent's newest Node (kept after it left)
    key: bytes | None = None        # its node key while it is our peer
    node_at: float | None = None    # when its first Node came
    ready_for_handshake: bool = False

    @property
    def address(self) -> IPv6Address | None:
        """The agent's overlay address (its Node's first)."""
        if self.node is None or not self.node.addresses:
            return None
        return self.node.addresses[0].network_address


class TailnetClient:
    """See the module docstring. ``link_monitor``: None follows ``CODERSTACK_LINK_MONITOR``."""

    def __init__(self, reactor: Clock, conn: Conn, *, accept_incoming: bool = False,
                 link_monitor: bool | None = None) -> None:
        self.reactor = reactor
        self.conn = conn
        self.accept_incoming = accept_incoming
        self.peers: dict[UUID, Peer] = {}
        self.tunnels: dict[UUID, Tunnel] = {}
        self.coordination: Coordination | None = None
        self._waits: list[_Reachable] = []
        self._closed = False
        self.netstack: Netstack = attach_netstack(conn, reactor)
        if link_monitor is None or link_monitor:
            env: Mapping[str, str] | None = None if link_monitor is None else {}
            linkmon.monitor_conn(reactor, conn, env=env)
        conn.on_node_change(self._node_changed)

    # -- coordination ------------------------------------------------------------------------

    def coordinate(self, coordination: Coordination) -> None:
        """Send our requests through ``coordination`` from now on; it closes with the client."""
        self.coordination = coordination

    def send(self, request: CoordinateRequest) -> None:
        if self.coordination is not None:
            self.coordination.send(request)

    def register(self) -> None:
        """What a freshly opened coordination must be told: our node and every tunnel (a
        restarted coordinator knows neither, and relays nothing for us until it does)."""
        node = self.conn.node()
        tunnels = list(self.tunnels)
        first = CoordinateRequest(update_self=node, add_tunnel=tunnels[0] if tunnels else None)
        if first != CoordinateRequest():
            self.send(first)
        for agent_id in tunnels[1:]:
            self.send(CoordinateRequest(add_tunnel=agent_id))

    def _node_changed(self, node: Node) -> None:
        self.send(CoordinateRequest(update_self=node))

    def add_tunnel(self, agent_id: UUID) -> Tunnel:
        """A tunnel to ``agent_id`` (the same one if there is one already)."""
        tunnel = self.tunnels.get(agent_id)
        if tunnel is None:
            tunnel = self.tunnels[agent_id] = Tunnel(agent_id)
            self.send(CoordinateRequest(add_tunnel=agent_id))
        return tunnel

    def remove_tunnel(self, agent_id: UUID) -> None:
        if self.tunnels.pop(agent_id, None) is not None:
            self.send(CoordinateRequest(remove_tunnel=agent_id))
            peer = self.peers.pop(agent_id, None)
            if peer is not None:
                self.conn.remove_peer(peer.node.key)

    # -- peer updates ------------------------------------------------------------------------

    def handle_response(self, response: CoordinateResponse) -> None:
        if response.error:
            _log.warn("coordinator refused a request: {error}", error=response.error)
        ready: list[UUID] = []
        for update in response.peer_updates:
            tunnel = self.tunnels.get(update.id)
            if tunnel is None and not self.accept_incoming:
                continue
            _log.info("peer {id}: {kind} ({reason})", id=update.id, kind=str(update.kind), reason=update.reason)
            if update.kind == "NODE" and update.node is not None:
                if self._peer_node(update.id, update.node, tunnel):
                    ready.append(update.id)
            elif update.kind == "LOST":
                peer = self.peers.get(update.id)
                if peer is not None:
                    peer.lost = True
            elif update.kind == "DISCONNECTED":
                gone = self.peers.pop(update.id, None)
                if gone is not None:
                    self.conn.remove_peer(gone.node.key)
                if tunnel is not None:
                    tunnel.key = None
            elif update.kind == "READY_FOR_HANDSHAKE" and tunnel is not None and tunnel.node is not None:
                tunnel.ready_for_handshake = True
                self._tunnel_changed(tunnel)
        if ready:
            self.send(CoordinateRequest(ready_for_handshake=tuple(ready)))

    def _peer_node(self, peer_id: UUID, node: Node, tunnel: Tunnel | None) -> bool:
        """Configure the peer; True if it dialed us and is new (it is owed READY_FOR_HANDSHAKE)."""
        previous = self.peers.get(peer_id)
        if previous is not None and previous.node.key != node.key:
            self.conn.remove_peer(previous.node.key)  # it has new keys
        self.conn.update_peer(node)
        self.peers[peer_id] = Peer(peer_id, node)
        if tunnel is None:
            return previous is None
        new_key = tunnel.key != node.key
        tunnel.node, tunnel.key = node, node.key
        if new_key:
            self.conn.start_handshake(node.key)
        if tunnel.node_at is None:
            tunnel.node_at = self.reactor.seconds()
        self._tunnel_changed(tunnel)
        return False

    # -- using a tunnel ----------------------------------------------------------------------

    async def reachable(self, tunnel: Tunnel, *, timeout: float, grace: float) -> None:
        """Until the agent has our node: it said READY_FOR_HANDSHAKE after its NODE came, or
        (an agent that does not say so) ``grace`` seconds passed since its NODE. DialError after
        ``timeout`` seconds."""
        wait = _Reachable(self.reactor, tunnel, timeout, grace)
        self._waits.append(wait)
        try:
            await wait.done
        finally:
            self._waits.remove(wait)
            wait.cancel_timers()

    def _tunnel_changed(self, tunnel: Tunnel) -> None:
        for wait in list(self._waits):
            if wait.tunnel is tunnel:
                wait.check()

    def ping(self, tunnel: Tunnel) -> defer.Deferred[PingResult]:
        """One disco ping to the tunnel's agent over the path in use."""
        if tunnel.key is None:
            return defer.fail(KeyError(f"agent {tunnel.agent_id} is not a peer"))
        return self.conn.ping(tunnel.key)

    def endpoint(self, tunnel: Tunnel, port: int, timeout: float = 30) -> NetstackClientEndpoint:
        """TCP to ``port`` on the agent's overlay address, through our netstack."""
        if tunnel.address is None:
            raise DialError(f"agent {tunnel.agent_id} has no address yet")
        return client_endpoint(self.netstack, tunnel.address, port, timeout=timeout)

    async def close(self) -> None:
        """Leave the coordinator gracefully, then close the Conn (and its netstack)."""
        if self._closed:
            return
        self._closed = True
        for wait in list(self._waits):
            wait.done.cancel()
        if self.coordination is not None:
            await self.coordination.close()
        await self.conn.close()


class _Reachable:
    """One :meth:`TailnetClient.reachable` wait."""

    def __init__(self, clock: Clock, tunnel: Tunnel, timeout: float, grace: float) -> None:
        self.clock = clock
        self.tunnel = tunnel
        self.grace = grace
        self.done: defer.Deferred[None] = defer.Deferred()
        self._timeout: DelayedCall | None = clock.callLater(timeout, self._timed_out, timeout)
        self._grace: DelayedCall | None = None
        self.check()

    def check(self) -> None:
        tunnel = self.tunnel
        if self.done.called:
            return
        if tunnel.node is not None and tunnel.ready_for_handshake:
            self.done.callback(None)
        elif tunnel.node_at is not None and self._grace is None:
            wait = max(0.0, tunnel.node_at + self.grace - self.clock.seconds())
            self._grace = self.clock.callLater(wait, self._graced)

    def _graced(self) -> None:
        self._grace = None
        if not self.done.called:
            self.done.callback(None)

    def _timed_out(self, timeout: float) -> None:
        self._timeout = None
        if not self.done.called:
            self.done.errback(DialError(
                f"agent {self.tunnel.agent_id} did not become reachable within {timeout:.0f}s"))

    def cancel_timers(self) -> None:
        for call in (self._timeout, self._grace):
            if call is not None and call.active():
                call.cancel()
        self._timeout = self._grace = None
