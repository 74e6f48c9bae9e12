"""The client side of a tunnel to one agent (Coder's ``DialAgent``), for the CLI.

    conn = await dial_agent(reactor, api_client, agent_id, disable_direct=False)
    conn.agent_key, conn.agent_address      # the agent's node key and overlay address
    await conn.ping(conn.agent_key)         # -> (latency seconds, path string)
    await conn.close()                      # also leaves the coordinator gracefully

Steps: ``GET /api/v2/workspaceagents/{id}/connection`` (DERP map, force websockets, disable
direct); a Conn with a random /128 in fd7a:115c:a1e0::/48 and the DERP map's embedded region
pointed at the URL we use; the coordination websocket ``/api/v2/workspaceagents/{id}/coordinate``
with ``update_self`` + ``add_tunnel``; peer updates feed the Conn; returns once the agent said
READY_FOR_HANDSHAKE (it has our node), or its NODE arrived and the agent stayed quiet for
``ready_grace`` seconds (an agent that does not send the ack).
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

from twisted.internet import defer, task
from twisted.logger import Logger

from coderstack.coordinator.client import open_coordination
from coderstack.derpmap import DERPMap, rewrite_embedded
from coderstack.tailnet.conn import Conn
from coderstack.wire.coordination import CoordinateRequest, CoordinateResponse, Node

_log = Logger()


class DialError(Exception):
    pass


async def dial_agent(reactor: Any, api_client: Any, agent_id: str | UUID, *,
                     disable_direct: bool = False, timeout: float = 20.0,
                     ready_grace: float = 2.0, force_websockets: bool = False,
                     conn_kw: dict[str, Any] | None = None) -> Conn:
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
    conn.agent_id = agent_uuid  # type: ignore[attr-defined]
    conn.agent_key = None  # type: ignore[attr-defined]
    conn.agent_address = None  # type: ignore[attr-defined]
    conn.start()
    conn.set_derp_map(derp_map)
    ready: defer.Deferred[None] = defer.Deferred()
    state = {"node": False}
    timers: list[Any] = []

    def on_response(response: CoordinateResponse) -> None:
        if response.error:
            _log.warn("coordinator: {error}", error=response.error)
        for update in response.peer_updates:
            if update.id != agent_uuid:
                continue
            if update.kind == "NODE" and update.node is not None:
                _use_agent_node(conn, update.node)
                if not state["node"]:
                    state["node"] = True
                    timers.append(reactor.callLater(ready_grace, lambda: ready.called or ready.callback(None)))
            elif update.kind == "READY_FOR_HANDSHAKE":
                if not ready.called and state["node"]:
                    ready.callback(None)
            elif update.kind == "DISCONNECTED" and conn.agent_key is not None:  # type: ignore[attr-defined]
                conn.remove_peer(conn.agent_key)  # type: ignore[attr-defined]
                conn.agent_key = None  # type: ignore[attr-defined]

    try:
        factory = await open_coordination(
            api_client, f"/api/v2/workspaceagents/{agent_uuid}/coordinate", on_response)
    except Exception:
        await conn.close()
        raise

    def send_node(node: Node) -> None:
        if factory.proto is not None:
            factory.proto.send_request(CoordinateRequest(update_self=node))

    async def leave() -> None:
        if factory.proto is not None:
            factory.proto.send_request(CoordinateRequest(disconnect=True))
            factory.proto.sendClose()

    conn.add_close_hook(leave)
    conn.coordination = factory  # type: ignore[attr-defined]
    conn.on_node_change(send_node)
    assert factory.proto is not None
    factory.proto.send_request(CoordinateRequest(add_tunnel=agent_uuid))
    timers.append(reactor.callLater(timeout, lambda: ready.called or ready.errback(
        DialError(f"agent {agent_uuid} did not become reachable within {timeout:.0f}s"))))
    try:
        await ready
    except DialError:
        await conn.close()
        raise
    finally:
        for timer in timers:
            if timer.active():
                timer.cancel()
    await task.deferLater(reactor, 0, lambda: None)
    return conn


def _use_agent_node(conn: Conn, node: Node) -> None:
    old = conn.agent_key  # type: ignore[attr-defined]
    if old is not None and old != node.key:
        conn.remove_peer(old)
    conn.update_peer(node)
    conn.agent_key = node.key  # type: ignore[attr-defined]
    addrs = [a.network_address for a in node.addresses]
    conn.agent_address = addrs[0] if addrs else None  # type: ignore[attr-defined]
