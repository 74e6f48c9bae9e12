"""Helpers for the hostile suite: a raw client that holds a coordinator websocket and DERP
connections open with a session or agent token, and readers for /metrics and the coordinator
debug view."""

from __future__ import annotations

import os
import uuid
from datetime import UTC, datetime
from typing import Any

import treq
from twisted.internet import reactor

from coderstack.coordinator.client import open_coordination
from coderstack.derp.client import DERPClient, DERPClientHandler
from coderstack.derpmap import DERPMap
from coderstack.sdk import Client
from coderstack.wire import derp as w
from coderstack.wire.coordination import (
    CoordinateRequest,
    CoordinateResponse,
    address_from_uuid,
    node_key_text,
)
from tests.support.waiting import wait_until


class Inbox(DERPClientHandler):
    def __init__(self) -> None:
        self.up = False
        self.downs = 0
        self.packets: list[tuple[bytes, bytes]] = []
        self.restarts: list[tuple[float, float]] = []

    def packet_received(self, src: bytes, data: bytes) -> None:
        self.packets.append((src, data))

    def connected(self, server_key: bytes, node: Any, websocket: bool) -> None:
        self.up = True

    def disconnected(self, reason: str) -> None:
        self.up = False
        self.downs += 1

    def restarting(self, reconnect_in: float, try_for: float) -> None:
        self.restarts.append((reconnect_in, try_for))


def node_json(peer_id: uuid.UUID, public_key: bytes) -> dict[str, Any]:
    addr = f"{address_from_uuid(peer_id)}/128"
    return {"id": 77, "as_of": datetime.now(UTC).isoformat(), "key": node_key_text(public_key),
            "disco": "discokey:" + os.urandom(32).hex(), "preferred_derp": 999,
            "addresses": [addr], "allowed_ips": [addr], "endpoints": []}


class RawPeer:
    """A client peer of one agent, held open by hand: coordinator websocket with a tunnel to
    the agent, and DERP connections (Upgrade: DERP and websocket) with the same node key."""

    def __init__(self, testcase: Any, url: str, token: str, agent_id: str, backoff: float = 30.0) -> None:
        self.backoff = backoff
        self.testcase = testcase
        self.api = Client(reactor, url, token)
        testcase.addCleanup(self.api.close)
        self.agent_id = agent_id
        self.peer_id = uuid.uuid4()
        self.private_key = w.generate_private_key()
        self.public_key = w.public_key(self.private_key)
        self.updates: list[CoordinateResponse] = []
        self.coord: Any = None
        self.derps: list[tuple[DERPClient, Inbox]] = []

    async def open(self) -> None:
        """Coordinator and both DERP connections, logged in, and the agent's node known."""
        await self.open_coordinator()
        self.start_derp(await self.region())
        await wait_until(lambda: all(i.up for _, i in self.derps), "both DERP logins")
        await wait_until(lambda: self.agent_key() is not None, "the agent's node")

    async def open_coordinator(self, node: dict[str, Any] | None = None) -> None:
        """The coordinator websocket, our node (``node`` or one with our key) and the tunnel."""
        self.coord = await open_coordination(
            self.api, f"/api/v2/workspaceagents/{self.agent_id}/coordinate", self.updates.append,
            {"peer_id": str(self.peer_id)})

        def close() -> None:
            if self.coord.proto is not None and not self.coord.closed.called:
                self.coord.proto.sendClose()

        self.testcase.addCleanup(lambda: self.coord.closed)
        self.testcase.addCleanup(close)
        self.coord.proto.send_request(CoordinateRequest.from_json({
            "update_self": {"node": node or node_json(self.peer_id, self.public_key)},
            "add_tunnel": {"id": self.agent_id}}))

    async def region(self) -> Any:
        info = await self.api.connection_info(self.agent_id)
        return DERPMap.from_json(info["derp_map"]).regions[999]

    def start_derp(self, region: Any) -> None:
        """One DERP client over Upgrade: DERP and one over a websocket, with our node key."""
        for websocket in (False, True):
            inbox = Inbox()
            dc = DERPClient(reactor, region, self.private_key, inbox, token=self.api.token,
                            force_websockets=websocket, min_backoff=self.backoff, max_backoff=self.backoff)
            dc.start()
            self.testcase.addCleanup(dc.stop)
            self.derps.append((dc, inbox))

    def agent_key(self) -> bytes | None:
        for response in self.updates:
            for u in response.peer_updates:
                if str(u.id) == self.agent_id and u.node is not None:
                    return u.node.key
        return None

    def send_packets(self, n: int) -> None:
        key = self.agent_key()
        assert key is not None
        for dc, _ in self.derps:
            for i in range(n):
                dc.send(key, b"\x04" + bytes(31) + i.to_bytes(4, "big"))

    def all_closed(self) -> bool:
        return self.coord.closed.called and not any(i.up for _, i in self.derps)


async def metrics(url: str, owner_token: str) -> dict[str, float]:
    """``/metrics`` (owners only) as {name{labels}: value}."""
    resp = await treq.get(f"{url}/metrics", headers={"Coder-Session-Token": owner_token},
                         persistent=False)
    text = (await resp.text()) if resp.code == 200 else ""
    if resp.code != 200:
        raise AssertionError(f"/metrics answered {resp.code}")
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


async def coordinator_peers(owner: Client) -> dict[str, dict[str, Any]]:
    got = await owner.get("/api/v2/debug/coordinator")
    return {p["id"]: p for p in got["peers"]}


async def healthz(url: str) -> int:
    resp = await treq.get(f"{url}/healthz", persistent=False)
    await resp.content()
    return resp.code

