"""The client side of a tunnel to one agent over the server's API (Coder's ``DialAgent``), for
the CLI.

    tunnel = await dial_agent(reactor, api_client, agent_id, disable_direct=False)
    tunnel.key, tunnel.address               # the agent's node key and overlay address
    await tunnel.ping()                      # -> PingResult
    tunnel.endpoint(22)                      # TCP to the agent through our netstack
    await tunnel.close()                     # also leaves the coordinator gracefully

Steps: ``GET /api/v2/workspaceagents/{id}/connection`` (DERP map, force websockets, disable
direct); a Conn with a random /128 in fd7a:115c:a1e0::/48 and the DERP map's embedded region
pointed at the URL we use, in a :class:`coderstack.tailnet.client.TailnetClient`; the
coordination websocket ``/api/v2/workspaceagents/{id}/coordinate`` with ``update_self`` +
``add_tunnel``; returns once the agent said READY_FOR_HANDSHAKE (it has our node), or its NODE
arrived and the agent stayed quiet for ``ready_grace`` seconds (an agent that does not send the
ack). ``observe`` sees every coordinator response first (a load generator times node updates
with it).

While the tunnel lives, a coordination websocket that closes (a server restart) is reopened
(:class:`coderstack.coordinator.client.CoordinationLink`, first after 0.5 s, doubling up to
5 s) and our node and tunnel are sent again: the tunnel itself goes on directly meanwhile, but
the new coordinator must know both before its closed relay forwards our DERP packets, or before
it can pass on a changed node. After each reopen the DERP map is fetched again
(``/connection``, as at the start) and applied if it changed: a restarted server may come back
with other regions or relay nodes.

The Conn runs a link monitor (``coderstack/tailnet/linkmon.py``; ``link_monitor=False`` or
``CODERSTACK_LINK_MONITOR=0`` turns it off) so a laptop that roams or wakes up re-discovers its
paths and reconnects its DERP connections at once.
"""

from __future__ import annotations

from collections.abc import Callable
from ipaddress import IPv6Address
from typing import Any, Protocol
from uuid import UUID

from twisted.internet import defer, task
from twisted.logger import Logger

from coderstack.backoff import Backoff
from coderstack.coordinator.client import (
    CoordinateClientFactory,
    CoordinationLink,
    open_coordination,
)
from coderstack.derpmap import DERPMap, DERPMapError, rewrite_embedded
from coderstack.netstack.endpoints import NetstackClientEndpoint
from coderstack.tailnet.client import TailnetClient, Tunnel
from coderstack.tailnet.conn import Conn
from coderstack.tailnet.endpoint import PingResult
from coderstack.tailnet.sharedudp import SharedUDP
from coderstack.wire.coordination import CoordinateResponse, Node

_log = Logger()

RECONNECT_FIRST = 0.5  # seconds before the first reopen; doubles per failure, with jitter
RECONNECT_MAX = 5.0


class ConnectionAPI(Protocol):
    """What dialing needs of the server's API client (``coderstack.sdk.Client``; its websockets
    are opened by ``open_coordination``)."""

    url: str
    token: str | None

    async def connection_info(self, agent_id: str | None = None) -> dict[str, Any]: ...


class AgentTunnel:
    """A dialed agent: one tunnel of a :class:`TailnetClient` that belongs to it alone."""

    def __init__(self, client: TailnetClient, tunnel: Tunnel) -> None:
        self.client = client
        self.tunnel = tunnel

    @property
    def conn(self) -> Conn:
        return self.client.conn

    @property
    def agent_id(self) -> UUID:
        return self.tunnel.agent_id

    @property
    def key(self) -> bytes | None:
        """The agent's node key (None after it left the coordinator)."""
        return self.tunnel.key

    @property
    def node(self) -> Node | None:
        return self.tunnel.node

    @property
    def address(self) -> IPv6Address | None:
        return self.tunnel.address

    def endpoint(self, port: int, timeout: float = 30) -> NetstackClientEndpoint:
        return self.client.endpoint(self.tunnel, port, timeout=timeout)

    def ping(self) -> defer.Deferred[PingResult]:
        return self.client.ping(self.tunnel)

    async def close(self) -> None:
        await self.client.close()


class _ServerCoordination:
    """The link's handler: the agent's coordination websocket on the server, our node and
    tunnel on every one, the DERP map fetched again after a reopen."""

    def __init__(self, api_client: ConnectionAPI, client: TailnetClient, agent_id: UUID,
                 observe: Callable[[CoordinateResponse], object] | None = None) -> None:
        self.api_client = api_client
        self.client = client
        self.agent_id = agent_id
        self.observe = observe

    async def open_socket(self) -> CoordinateClientFactory:
        return await open_coordination(self.api_client, f"/api/v2/workspaceagents/{self.agent_id}/coordinate",
                                       self._response)

    def _response(self, response: CoordinateResponse) -> None:
        if self.observe is not None:
            self.observe(response)
        self.client.handle_response(response)

    async def socket_opened(self, reopened: bool) -> None:
        self.client.register()
        if not reopened:
            return  # the caller just fetched the map
        _log.info("coordinator reconnected; node and tunnel sent again")
        try:
            await refresh_derp_map(self.client.conn, self.api_client, self.agent_id)
        except defer.CancelledError:
            raise
        except Exception as err:  # keep the link going regardless
            _log.info("after reconnecting: {why}", why=str(err))

    def open_failed(self, err: Exception) -> bool:
        _log.info("coordinator unreachable, retrying: {why}", why=str(err))
        return True


async def dial_agent(reactor: Any, api_client: ConnectionAPI, agent_id: str | UUID, *,
                     disable_direct: bool = False, timeout: float = 20.0,
                     ready_grace: float = 2.0, force_websockets: bool = False,
                     conn_kw: dict[str, Any] | None = None, link_monitor: bool | None = None,
                     backoff: Backoff | None = None,
                     observe: Callable[[CoordinateResponse], object] | None = None,
                     shared_udp: SharedUDP | None = None) -> AgentTunnel:
    """A tunnel to the agent, reachable. ``shared_udp``: a socket many tunnels of one process
    share (a load generator's), instead of one of its own."""
    agent_uuid = UUID(str(agent_id))
    info = await api_client.connection_info(str(agent_uuid))
    derp_map = rewrite_embedded(DERPMap.from_json(info.get("derp_map") or {}), api_client.url)
    conn = Conn(
        reactor,
        derp_token=api_client.token or "",
        block_endpoints=disable_direct or bool(info.get("disable_direct_connections")),
        force_websockets=force_websockets or bool(info.get("derp_force_websockets")),
        trust_root=getattr(api_client, "trust_root", None),
        **(conn_kw or {}),
    )
    client = TailnetClient(reactor, conn, link_monitor=link_monitor)
    conn.start(shared=shared_udp)
    conn.set_derp_map(derp_map)
    tunnel = client.add_tunnel(agent_uuid)
    link = CoordinationLink(reactor, _ServerCoordination(api_client, client, agent_uuid, observe),
                            backoff or Backoff(first=RECONNECT_FIRST, cap=RECONNECT_MAX))
    client.coordinate(link)
    try:
        await link.open()
        await client.reachable(tunnel, timeout=timeout, grace=ready_grace)
    except BaseException:
        await client.close()
        raise
    await task.deferLater(reactor, 0, lambda: None)
    return AgentTunnel(client, tunnel)


async def refresh_derp_map(conn: Conn, api_client: ConnectionAPI, agent_id: UUID) -> bool:
    """Fetch the DERP map again (as :func:`dial_agent` did first) and apply it if it changed;
    True if it did. A map that does not parse leaves the current one in place."""
    info = await api_client.connection_info(str(agent_id))
    try:
        derp_map = rewrite_embedded(DERPMap.from_json(info.get("derp_map") or {}), api_client.url)
    except (DERPMapError, ValueError, TypeError, KeyError) as err:
        _log.warn("the server's new DERP map is unusable: {why}", why=str(err))
        return False
    if derp_map == conn.derp_map or not derp_map.regions:
        return False
    _log.info("the server's DERP map changed; applying it")
    conn.set_derp_map(derp_map)
    return True
