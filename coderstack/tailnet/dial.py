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

While the Conn lives, a coordination websocket that closes (a server restart) is reopened
(:class:`CoordinationLink`) and our node and tunnel are sent again: the tunnel itself goes on
directly meanwhile, but the new coordinator must know both before its closed relay forwards our
DERP packets, or before it can pass on a changed node. After each reopen the DERP map is fetched
again (``/connection``, as at the start) and applied if it changed: a restarted server may come
back with other regions or relay nodes.

The Conn runs a link monitor (``coderstack/tailnet/linkmon.py``; ``link_monitor=False`` or
``CODERSTACK_LINK_MONITOR=0`` turns it off) so a laptop that roams or wakes up re-discovers its
paths and reconnects its DERP connections at once.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from typing import Any
from uuid import UUID

from twisted.internet import defer, task
from twisted.logger import Logger

from coderstack.coordinator.client import open_coordination
from coderstack.derpmap import DERPMap, DERPMapError, rewrite_embedded
from coderstack.tailnet import linkmon
from coderstack.tailnet.conn import Conn
from coderstack.tailnet.stack import attach_netstack, client_endpoint
from coderstack.wire.coordination import CoordinateRequest, CoordinateResponse, Node

_log = Logger()


class DialError(Exception):
    pass


RECONNECT_FIRST = 0.5  # seconds before the first reopen; doubles per failure, with jitter
RECONNECT_MAX = 5.0


class CoordinationLink:
    """One tunnel's coordination websocket, reopened whenever it closes until :meth:`close`.

    ``open_`` makes a new open factory (``open_coordination`` with our response handler);
    ``register()`` is what a fresh websocket needs to be told (our node and the tunnel);
    ``on_reopen()`` (may return an awaitable; errors are logged) runs after each reopen.
    """

    def __init__(self, reactor: Any, open_: Callable[[], Awaitable[Any]],
                 register: Callable[[], CoordinateRequest], rng: Callable[[], float] = random.random,
                 on_reopen: Callable[[], Any] | None = None) -> None:
        self.reactor = reactor
        self._open = open_
        self._register = register
        self._rng = rng
        self._on_reopen = on_reopen
        self.factory: Any = None
        self.closing = False
        self.reopened = 0
        self._sleep: defer.Deferred[Any] | None = None
        self._loop: defer.Deferred[None] | None = None

    async def open(self) -> None:
        """The first websocket (errors go to the caller); then keep it open in the background."""
        self.factory = await self._open()
        self._loop = defer.ensureDeferred(self._keep())

    def send(self, request: CoordinateRequest) -> None:
        factory = self.factory
        if factory is not None and factory.proto is not None:
            factory.proto.send_request(request)

    async def _keep(self) -> None:
        failures = 0
        while not self.closing:
            try:
                await self.factory.closed
                while not self.closing:
                    delay = min(RECONNECT_MAX, RECONNECT_FIRST * 2 ** min(failures, 10))
                    self._sleep = task.deferLater(self.reactor, delay * (0.7 + 0.3 * self._rng()), lambda: None)
                    await self._sleep
                    try:
                        factory = await self._open()
                    except Exception as err:  # server still down: try again later
                        failures += 1
                        _log.info("coordinator unreachable, retrying: {why}", why=str(err))
                        continue
                    self.factory = factory
                    if self.closing:  # closed while the websocket was opening
                        self._leave(factory)
                        return
                    failures = 0
                    self.reopened += 1
                    self.send(self._register())
                    _log.info("coordinator reconnected; node and tunnel sent again")
                    if self._on_reopen is not None:
                        try:
                            result = self._on_reopen()
                            if hasattr(result, "__await__"):
                                await result
                        except defer.CancelledError:
                            raise
                        except Exception as err:  # keep the link going regardless
                            _log.info("after reconnecting: {why}", why=str(err))
                    break
            except defer.CancelledError:
                return

    def _leave(self, factory: Any) -> None:
        if factory is not None and factory.proto is not None:
            factory.proto.send_request(CoordinateRequest(disconnect=True))
            factory.proto.sendClose()

    async def close(self) -> None:
        """Leave gracefully (``disconnect``) and stop reopening."""
        self.closing = True
        if self._sleep is not None and not self._sleep.called:
            self._sleep.cancel()
        self._leave(self.factory)


def agent_endpoint(conn: Conn, port: int, timeout: float = 30) -> Any:
    """A Twisted client endpoint for ``port`` on the dialed agent's tunnel address."""
    return client_endpoint(conn.netstack, conn.agent_address, port, timeout=timeout)  # type: ignore[attr-defined]


async def dial_agent(reactor: Any, api_client: Any, agent_id: str | UUID, *,
                     disable_direct: bool = False, timeout: float = 20.0,
                     ready_grace: float = 2.0, force_websockets: bool = False,
                     conn_kw: dict[str, Any] | None = None, link_monitor: bool | None = None) -> Conn:
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
    conn.agent_node = None  # type: ignore[attr-defined]
    conn.netstack = attach_netstack(conn, reactor)  # type: ignore[attr-defined]
    conn.start()
    conn.set_derp_map(derp_map)
    if link_monitor is None or link_monitor:
        linkmon.monitor_conn(reactor, conn, env=None if link_monitor is None else {})
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

    link = CoordinationLink(
        reactor,
        lambda: open_coordination(api_client, f"/api/v2/workspaceagents/{agent_uuid}/coordinate", on_response),
        lambda: CoordinateRequest(update_self=conn.node(), add_tunnel=agent_uuid),
        on_reopen=lambda: refresh_derp_map(conn, api_client, agent_uuid))
    try:
        await link.open()
    except Exception:
        await conn.close()
        raise

    conn.add_close_hook(link.close)
    conn.coordination = link  # type: ignore[attr-defined]
    conn.on_node_change(lambda node: link.send(CoordinateRequest(update_self=node)))
    link.send(CoordinateRequest(add_tunnel=agent_uuid))
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


async def refresh_derp_map(conn: Conn, api_client: Any, agent_id: UUID) -> bool:
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


def _use_agent_node(conn: Conn, node: Node) -> None:
    old = conn.agent_key  # type: ignore[attr-defined]
    if old is not None and old != node.key:
        conn.remove_peer(old)
    conn.update_peer(node)
    conn.agent_key = node.key  # type: ignore[attr-defined]
    conn.agent_node = node  # type: ignore[attr-defined]
    if old != node.key:
        # The handshake runs while the caller gets ready, so the first packet goes right away.
        conn.start_handshake(node.key)
    addrs = [a.network_address for a in node.addresses]
    conn.agent_address = addrs[0] if addrs else None  # type: ignore[attr-defined]
