"""The health report's relay check: log in to each DERP node as a client would and time a
DERP Ping/Pong over that session.

Coder's check sends packets between two clients through each node. This relay is closed (it only
forwards between peers the coordinator paired), so two throwaway keys could not exchange
packets; a Ping answered by the node proves the same path — the dial, TLS, the HTTP upgrade or
the websocket fallback, the login with the asking owner's token — and gives the round trip.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from twisted.internet import defer

from coderstack.derp.client import DERPClient, DERPClientHandler
from coderstack.derpmap import DERPMap, DERPNode, DERPRegion
from coderstack.keys import NodeKeys
from coderstack.tailnet.netcheck.health import RelayProbe

TIMEOUT = 5.0


class _Login(DERPClientHandler):
    def __init__(self) -> None:
        self.logged_in: defer.Deferred[bool] = defer.Deferred()
        self.last_reason = ""

    def connected(self, server_key: bytes, node: DERPNode, websocket: bool) -> None:
        if not self.logged_in.called:
            self.logged_in.callback(websocket)

    def disconnected(self, reason: str) -> None:
        self.last_reason = reason


async def probe_node(reactor: Any, region: DERPRegion, node: DERPNode, token: str, *,
                     force_websockets: bool = False, timeout: float = TIMEOUT) -> RelayProbe:
    handler = _Login()
    only = dataclasses.replace(region, nodes=(node,))
    client = DERPClient(reactor, only, NodeKeys.generate().node_private, handler, token=token,
                        force_websockets=force_websockets, max_backoff=timeout)
    client.start()
    try:
        websocket = await handler.logged_in.addTimeout(timeout, reactor)
        rtt = await client.ping(timeout=timeout)
        return RelayProbe(rtt, websocket, None)
    except defer.TimeoutError:
        why = handler.last_reason or client.last_error or "no answer"
        return RelayProbe(None, False, f"no login within {timeout:g} s: {why}")
    except Exception as err:  # the failure is the answer
        return RelayProbe(None, False, f"{type(err).__name__}: {err}"[:300])
    finally:
        await client.stop()


async def probe_relays(reactor: Any, derp_map: DERPMap, token: str, *,
                       force_websockets: bool = False) -> dict[str, RelayProbe]:
    """Every relay node of the map at once, by node name."""
    nodes = [(region, node) for _, region in sorted(derp_map.regions.items()) for node in region.derp_nodes]
    found = await defer.gatherResults([
        defer.ensureDeferred(probe_node(reactor, region, node, token, force_websockets=force_websockets))
        for region, node in nodes
    ])
    return {node.name: result for (_, node), result in zip(nodes, found, strict=True)}
