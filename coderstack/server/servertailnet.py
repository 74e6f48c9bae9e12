"""The server's own tailnet: one Conn through which the server reaches workspace agents (the
app proxy dials apps over it).

    tailnet = ServerTailnet(reactor, deployment, idle_timeout=300, dial_timeout=20)
    await tailnet.start()
    endpoint = await tailnet.connect(agent_id, 8080)   # or AgentUnreachable (a 502 page's why)
    tailnet.paths()                                    # per agent: direct or relayed, latency
    await tailnet.close()

It is the CLI's :class:`~coderstack.tailnet.client.TailnetClient` and Conn, with three
differences:

- Coordination is in process (:class:`CoreCoordination`): requests go straight into the
  deployment's coordinator core as a :class:`~coderstack.coordinator.core.ServerAuth` peer,
  which may tunnel to any agent (who may use which app is the HTTP layer's business), and the
  core's responses reach the client on the next reactor turn, as they would over a websocket.
  Agents take it like any client: the coordinator hands them its node, they answer
  READY_FOR_HANDSHAKE. Should the coordinator close it for any reason but its own shutdown, it
  joins again a second later with its node and tunnels.
- DERP to the embedded region goes to the in-process relay in memory
  (:mod:`coderstack.derp.memory`), admitted as the "server" principal (browser-only mode
  admits it: apps go through it); its netcheck latency check is answered in memory too, so
  the embedded region is the home and no TCP goes to our own HTTP port. Other regions of the
  DERP map are dialed as usual. The map follows the deployment's.
- Tunnels are made on demand: the first ``connect`` to an agent adds one, concurrent callers
  share its dial, later ones reuse it. A tunnel neither connected to nor carrying WireGuard
  traffic for ``idle_timeout`` seconds is removed (one timer, at the earliest expiry). Its
  latency comes from a disco ping when it becomes reachable and again on use, at most every
  ``PING_INTERVAL`` seconds.

Direct paths: the UDP socket (``listen_port``/``listen_interface``, default any port on every
interface) and disco find them as the CLI's Conn does; ``Deployment.block_direct``
(``--block-direct-connections``) keeps every tunnel on DERP.
"""

from __future__ import annotations

import math
import uuid
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from uuid import UUID

from twisted.internet import defer
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.logger import Logger

from coderstack.coordinator.core import CLOSE_SHUTDOWN, Coordinator, PeerConnection, ServerAuth
from coderstack.derp.client import DERPClient, DERPClientHandler
from coderstack.derp.memory import relay_connector
from coderstack.derpmap import DERPMap, DERPRegion
from coderstack.keys import NodeKeys
from coderstack.server.relaypolicy import server_principal
from coderstack.tailnet.client import DialError, TailnetClient, Tunnel
from coderstack.tailnet.conn import Conn
from coderstack.tailnet.endpoint import PingResult, format_addr
from coderstack.tailnet.netcheck.httpget import TreqHTTP
from coderstack.tailnet.netcheck.plan import captive_portal_url, latency_check_url
from coderstack.twistedtypes import Clock, DelayedCall, cancel
from coderstack.wire.coordination import CoordinateRequest, CoordinateResponse

_log = Logger()

PING_INTERVAL = 30.0  # at most one latency ping per tunnel this often while it is used
READY_GRACE = 2.0  # an agent that never says READY_FOR_HANDSHAKE is taken as ready this long after its NODE
REJOIN_DELAY = 1.0  # after the coordinator closed us (not for its shutdown)
PEER_NAME = "server tailnet"


class AgentUnreachable(Exception):
    """No tunnel to the agent; the message says why, in words fit for a 502 page."""


# -- coordination in process ----------------------------------------------------------------------


class CoreCoordination:
    """A TailnetClient's :class:`~coderstack.tailnet.client.Coordination` straight into the
    coordinator core, as a :class:`ServerAuth` peer. Responses are delivered in order on a
    later reactor turn (never inside the request that caused them); ``on_closed(reason)``
    hears when the coordinator closes the connection."""

    def __init__(self, clock: Clock, coordinator: Coordinator, peer_id: UUID,
                 deliver: Callable[[CoordinateResponse], None], *, name: str = PEER_NAME,
                 on_closed: Callable[[str], None] | None = None) -> None:
        self.clock = clock
        self.peer_id = peer_id
        self.deliver = deliver
        self.on_closed = on_closed
        self.closed = False
        self._queue: deque[CoordinateResponse] = deque()
        self._call: DelayedCall | None = None
        self.connection: PeerConnection = coordinator.connect(
            peer_id, name, ServerAuth(), self._response, self._closed_by_coordinator)

    def send(self, request: CoordinateRequest) -> None:
        if not self.closed:
            self.connection.handle(request)

    async def close(self) -> None:
        """Leave gracefully (tunnel peers see DISCONNECTED); nothing is delivered after this."""
        if self.closed:
            return
        self.closed = True
        self._drop_queue()
        self.connection.disconnect()

    def _response(self, response: CoordinateResponse) -> None:
        if self.closed:
            return
        self._queue.append(response)
        if self._call is None:
            self._call = self.clock.callLater(0, self._flush)

    def _flush(self) -> None:
        self._call = None
        while self._queue and not self.closed:
            self.deliver(self._queue.popleft())

    def _drop_queue(self) -> None:
        cancel(self._call)
        self._call = None
        self._queue.clear()

    def _closed_by_coordinator(self) -> None:
        if self.closed:
            return
        self.closed = True
        reason = self.connection.close_reason or "closed"
        # What was already said still counts (a graceful DISCONNECTED, say): deliver it first.
        self._flush_now()
        if self.on_closed is not None:
            self.on_closed(reason)

    def _flush_now(self) -> None:
        cancel(self._call)
        self._call = None
        queued, self._queue = list(self._queue), deque()
        for response in queued:
            self.deliver(response)


# -- netcheck's GETs: the embedded region's answered in memory --------------------------------------


class _NetcheckHTTP:
    """netcheck's ``http_get``: the embedded relay's latency check and captive-portal check are
    answered here (the relay is in this process, reached in memory); other URLs go out."""

    def __init__(self, reactor: Any, derp_map: Callable[[], DERPMap | None]) -> None:
        self.reactor = reactor
        self.derp_map = derp_map
        self._out: TreqHTTP | None = None
        self.answered = 0  # GETs answered here
        self.sent = 0  # GETs that went out

    def _embedded(self, url: str) -> str | None:
        m = self.derp_map()
        if m is None:
            return None
        for region in m.regions.values():
            if not region.embedded_relay:
                continue
            for node in region.derp_nodes:
                if url == latency_check_url(node):
                    return "latency"
                if url == captive_portal_url(node):
                    return "captive"
        return None

    def __call__(self, url: str, *, headers: Mapping[str, str], timeout: float,
                 insecure: bool = False,
                 follow_redirects: bool = False) -> defer.Deferred[tuple[int, dict[str, str]]]:
        kind = self._embedded(url.split("?", 1)[0])
        if kind is not None:
            self.answered += 1
        if kind == "latency":
            return defer.succeed((200, {}))
        if kind == "captive":
            challenge = headers.get("X-Tailscale-Challenge", "")
            return defer.succeed((204, {"x-tailscale-response": f"response {challenge}"}))
        if self._out is None:
            self._out = TreqHTTP(self.reactor)
        self.sent += 1
        return self._out(url, headers=headers, timeout=timeout, insecure=insecure,
                         follow_redirects=follow_redirects)

    def close(self) -> defer.Deferred[None]:
        out, self._out = self._out, None
        return out.close() if out is not None else defer.succeed(None)


# -- the tailnet ---------------------------------------------------------------------------------


@dataclass(eq=False)
class _AgentTunnel:
    """Our tunnel to one agent and what we know of its use."""

    tunnel: Tunnel
    last_used: float
    ready: bool = False
    dialing: bool = False
    waiters: list[defer.Deferred[None]] = field(default_factory=list)
    last_ping: PingResult | None = None
    pinged_at: float = -math.inf
    pinging: bool = False
    traffic: tuple[int, int] = (0, 0)  # WireGuard (rx, tx) bytes when last looked at


class ServerTailnet:
    """See the module docstring. ``conn_kw`` goes to the Conn (tests: ``netcheck=False`` ...)."""

    def __init__(self, reactor: Any, deployment: Any, *, idle_timeout: float = 300.0,
                 dial_timeout: float = 20.0, listen_port: int = 0, listen_interface: str = "",
                 conn_kw: dict[str, Any] | None = None) -> None:
        self.reactor = reactor
        self.deployment = deployment
        self.idle_timeout = idle_timeout
        self.dial_timeout = dial_timeout
        self.listen_port = listen_port
        self.listen_interface = listen_interface
        self.conn_kw = dict(conn_kw or {})
        self.peer_id = uuid.uuid4()
        self.keys = NodeKeys.generate()
        self.client: TailnetClient | None = None
        self.netcheck_http: _NetcheckHTTP | None = None
        self.coordination: CoreCoordination | None = None
        self._tunnels: dict[UUID, _AgentTunnel] = {}
        self._idle_call: DelayedCall | None = None
        self._rejoin_call: DelayedCall | None = None
        self._unsubscribe: Callable[[], None] | None = None
        self._closed = False
        self.rejoins = 0

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Make the Conn (its UDP socket, the embedded relay's DERP connection) and join the
        coordinator."""
        if self.client is not None or self._closed:
            return
        d = self.deployment
        self.netcheck_http = _NetcheckHTTP(self.reactor, lambda: conn.derp_map)
        conn = Conn(
            self.reactor,
            keys=self.keys,
            block_endpoints=bool(d.block_direct),
            derp_client_factory=self._derp_client,
            netcheck_http=self.netcheck_http,
            **self.conn_kw,
        )
        # A server's links rarely change, and netcheck re-STUNs every 23 s regardless.
        self.client = TailnetClient(self.reactor, conn, link_monitor=False)
        try:
            conn.start(self.listen_port, self.listen_interface)
        except BaseException:
            await self.client.close()
            self.client = None
            raise
        conn.set_derp_map(d.derp_map)
        self._unsubscribe = d.maps.subscribe(conn.set_derp_map)
        self._join()
        _log.info("server tailnet {address} up (UDP port {port}, direct {direct})",
                  address=conn.address, port=conn.sock.local_port,
                  direct="off" if d.block_direct else "on")

    def _join(self) -> None:
        client = self.client
        assert client is not None
        self.coordination = CoreCoordination(
            self.reactor, self.deployment.coordinator, self.peer_id, client.handle_response,
            on_closed=self._coordination_closed)
        client.coordinate(self.coordination)
        client.register()

    def _coordination_closed(self, reason: str) -> None:
        if self._closed or reason == CLOSE_SHUTDOWN:
            return
        _log.warn("the coordinator closed the server tailnet's connection ({reason}); joining again",
                  reason=reason)
        self._rejoin_call = self.reactor.callLater(REJOIN_DELAY, self._rejoin)

    def _rejoin(self) -> None:
        self._rejoin_call = None
        if self._closed:
            return
        self.rejoins += 1
        try:
            self._join()
        except Exception as err:  # the coordinator is closed, or refuses us
            _log.warn("the server tailnet cannot join the coordinator: {why}", why=str(err))

    async def close(self) -> None:
        """Leave the coordinator (agents see DISCONNECTED), close the Conn; pending dials fail."""
        if self._closed:
            return
        self._closed = True
        for call in (self._idle_call, self._rejoin_call):
            cancel(call)
        self._idle_call = self._rejoin_call = None
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        if self.client is not None:
            await self.client.close()  # cancels the dials' reachable waits
        self._tunnels.clear()

    # -- DERP --------------------------------------------------------------------------------

    def _derp_client(self, region: DERPRegion, handler: DERPClientHandler) -> DERPClient:
        d = self.deployment
        if region.embedded_relay and d.relay is not None:
            connector = relay_connector(self.reactor, d.relay, server_principal(self.peer_id),
                                        d.relay_admission, name=PEER_NAME)
            return DERPClient(self.reactor, region, self.keys.node_private, handler, connector=connector)
        return DERPClient(self.reactor, region, self.keys.node_private, handler,
                          force_websockets=bool(d.derp_force_websockets))

    # -- tunnels -----------------------------------------------------------------------------

    async def connect(self, agent_id: UUID, port: int) -> IStreamClientEndpoint:
        """An endpoint to ``port`` on the agent's tunnel address, once the agent is reachable
        (at most ``dial_timeout`` seconds); AgentUnreachable otherwise."""
        client = self.client
        if client is None or self._closed:
            raise AgentUnreachable("the server's tailnet is not running")
        entry = self._entry(client, agent_id)
        self._used(entry)
        if not entry.ready:
            await self._wait(entry)
            self._used(entry)  # the dial took a while: its end is a use too
        elif self.reactor.seconds() - entry.pinged_at >= PING_INTERVAL:
            self._ping(entry)
        try:
            endpoint = client.endpoint(entry.tunnel, port, timeout=self.dial_timeout)
        except DialError as err:
            raise AgentUnreachable(str(err)) from None
        # The netstack's endpoint provides the interface (zope's adaptation hands it back).
        return IStreamClientEndpoint(endpoint)

    def _entry(self, client: TailnetClient, agent_id: UUID) -> _AgentTunnel:
        entry = self._tunnels.get(agent_id)
        if entry is not None and entry.ready and entry.tunnel.key is None:
            # The agent left (DISCONNECTED): dial afresh, so its next node is waited for.
            self._remove(agent_id)
            entry = None
        if entry is None:
            entry = self._tunnels[agent_id] = _AgentTunnel(client.add_tunnel(agent_id), self.reactor.seconds())
        return entry

    async def _wait(self, entry: _AgentTunnel) -> None:
        waiter: defer.Deferred[None] = defer.Deferred()
        entry.waiters.append(waiter)
        if not entry.dialing:
            entry.dialing = True
            defer.ensureDeferred(self._dial(entry))
        await waiter

    async def _dial(self, entry: _AgentTunnel) -> None:
        assert self.client is not None
        agent_id = entry.tunnel.agent_id
        problem: AgentUnreachable | None = None
        try:
            await self.client.reachable(entry.tunnel, timeout=self.dial_timeout, grace=READY_GRACE)
        except DialError:
            problem = AgentUnreachable(self._why_unreachable(agent_id))
        except defer.CancelledError:
            problem = AgentUnreachable("the server is shutting down")
        except Exception as err:
            _log.failure("dialing agent {agent_id} over the server tailnet", agent_id=agent_id)
            problem = AgentUnreachable(f"the tunnel to the agent failed: {err}")
        entry.dialing = False
        if problem is None:
            entry.ready = True
            _log.info("server tailnet: agent {agent_id} reachable", agent_id=agent_id)
            self._ping(entry)
        elif self._tunnels.get(agent_id) is entry:
            self._remove(agent_id)  # the next request dials afresh
        waiters, entry.waiters = entry.waiters, []
        for waiter in waiters:
            if waiter.called:
                continue  # its request went away meanwhile
            if problem is None:
                waiter.callback(None)
            else:
                waiter.errback(problem)

    def _why_unreachable(self, agent_id: UUID) -> str:
        status = self.deployment.coordinator.status(agent_id)
        if status is None:
            return "The workspace agent is not connected to the server."
        if status == "lost":
            return "The workspace agent lost its connection to the server and has not come back."
        return f"The workspace agent did not answer within {self.dial_timeout:g} seconds."

    def _remove(self, agent_id: UUID) -> None:
        self._tunnels.pop(agent_id, None)
        if self.client is not None:
            self.client.remove_tunnel(agent_id)

    def _used(self, entry: _AgentTunnel) -> None:
        entry.last_used = self.reactor.seconds()
        self._arm_idle()

    # -- latency -----------------------------------------------------------------------------

    def _ping(self, entry: _AgentTunnel) -> None:
        if entry.pinging or self.client is None or entry.tunnel.key is None:
            return
        entry.pinging = True
        entry.pinged_at = self.reactor.seconds()

        def answered(result: PingResult) -> None:
            entry.last_ping = result

        def failed(failure: Any) -> None:
            _log.info("server tailnet: ping of agent {agent_id} failed: {why}",
                      agent_id=entry.tunnel.agent_id, why=failure.getErrorMessage())

        def done(_: Any) -> None:
            entry.pinging = False

        self.client.ping(entry.tunnel).addCallbacks(answered, failed).addBoth(done)

    # -- idle tunnels ------------------------------------------------------------------------

    def _arm_idle(self) -> None:
        if self._idle_call is not None or self._closed or not self._tunnels:
            return
        now = self.reactor.seconds()
        due = min(now if e.dialing else e.last_used for e in self._tunnels.values()) + self.idle_timeout
        self._idle_call = self.reactor.callLater(max(0.0, due - now), self._sweep)

    def _sweep(self) -> None:
        self._idle_call = None
        now = self.reactor.seconds()
        for agent_id, entry in list(self._tunnels.items()):
            if entry.dialing:
                continue
            if self._traffic_moved(entry):
                entry.last_used = now
            elif now - entry.last_used >= self.idle_timeout:
                _log.info("server tailnet: tunnel to agent {agent_id} idle for {s:g} s; removed",
                          agent_id=agent_id, s=self.idle_timeout)
                self._remove(agent_id)
        self._arm_idle()

    def _traffic_moved(self, entry: _AgentTunnel) -> bool:
        """Did WireGuard carry anything to or from the agent since the last look?"""
        key = entry.tunnel.key
        peer = self.client.conn.device.peers.get(key) if self.client is not None and key else None
        if peer is None:
            return False
        now = (peer.rx_bytes, peer.tx_bytes)
        moved, entry.traffic = now != entry.traffic, now
        return moved

    # -- visibility --------------------------------------------------------------------------

    def paths(self) -> dict[UUID, dict[str, Any]]:
        """Per agent with a tunnel: how packets go to it now and the last ping's latency."""
        out: dict[UUID, dict[str, Any]] = {}
        if self.client is None:
            return out
        conn = self.client.conn
        now = self.reactor.seconds()
        for agent_id, entry in self._tunnels.items():
            key = entry.tunnel.key
            ep = conn.sock.peers.get(key) if key is not None else None
            path, region, endpoint = "derp", None, None
            if ep is not None and ep.trusted(now) and ep.best is not None and ep.best.addr is not None:
                path, endpoint = "p2p", format_addr(ep.best.addr)
            elif ep is not None:
                region = ep.derp_region or conn.preferred_derp or None
            ping = entry.last_ping
            out[agent_id] = {
                "agent_id": str(agent_id),
                "path": path,
                "derp_region": region,
                "endpoint": endpoint,
                "latency_ms": ping.latency * 1000.0 if ping is not None else None,
                "last_used": entry.last_used,
                "reachable": entry.ready and key is not None,
            }
        return out

    def metrics_text(self) -> str:
        """Prometheus lines: tunnels held, and each agent's last latency by path."""
        paths = self.paths()
        lines = [
            "# HELP coderstack_server_tailnet_tunnels Tunnels the server's own tailnet holds to agents.",
            "# TYPE coderstack_server_tailnet_tunnels gauge",
            f"coderstack_server_tailnet_tunnels {len(paths)}",
            "# HELP coderstack_server_tailnet_latency_seconds The last disco ping's round trip to the agent.",
            "# TYPE coderstack_server_tailnet_latency_seconds gauge",
        ]
        for agent_id, p in sorted(paths.items(), key=lambda kv: str(kv[0])):
            if p["latency_ms"] is not None:
                lines.append(f'coderstack_server_tailnet_latency_seconds{{agent_id="{agent_id}",'
                             f'path="{p["path"]}"}} {p["latency_ms"] / 1000.0:.6f}')
        return "\n".join(lines) + "\n"
