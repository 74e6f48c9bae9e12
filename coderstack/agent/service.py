"""The workspace agent: dial out, fetch the manifest, stay coordinated, come back after failures.

One loop, run for as long as the service runs:

    manifest -> open coordination websocket -> update_self(node) -> ... until the socket closes
      ^                                                                                |
      +------------------ wait (exponential backoff with jitter, capped) <-------------+

The backoff resets after a session that got as far as an open websocket, so a server restart is
noticed within ``PING_INTERVAL + PING_TIMEOUT`` seconds and reconnected within about a second of
the server coming back. A rejected token is logged once per attempt without the token itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from twisted.application import service
from twisted.internet import task
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger

from coderstack import netinfo
from coderstack.coordinator.client import CoordinateClientFactory, open_coordination
from coderstack.derpmap import DERPMap
from coderstack.keys import NodeKeys, load_node_keys
from coderstack.sdk import Client, SDKError
from coderstack.wire.coordination import CoordinateRequest, CoordinateResponse, address_from_uuid

log = Logger()

MANIFEST_PATH = "/api/v2/workspaceagents/me/manifest"
COORDINATE_PATH = "/api/v2/workspaceagents/me/coordinate"


class _TunnelSocket(DatagramProtocol):
    """Holds the tunnel's UDP port so the advertised endpoints are real; the tunnel layer reads it."""

    received = 0

    def datagramReceived(self, data: bytes, addr: Any) -> None:  # noqa: N802
        self.received += 1


def home_region(derp_map: DERPMap) -> int:
    """Until netcheck measures latency: the embedded relay, else the lowest region with a relay."""
    regions = [r for r in derp_map.regions.values() if r.derp_nodes]
    for r in regions:
        if r.embedded_relay:
            return r.region_id
    return min((r.region_id for r in regions), default=0)


class AgentService(service.Service):
    def __init__(self, reactor: Any, url: str, token: str, data_dir: str, listen_port: int = 0,
                 reconnect_max: float = 10.0) -> None:
        self.reactor = reactor
        self.url = url
        self.token = token
        self.data_dir = data_dir
        self.listen_port = listen_port
        self.reconnect_max = reconnect_max
        self.keys: NodeKeys | None = None
        self.manifest: dict[str, Any] | None = None
        self.peers: dict[UUID, dict[str, Any]] = {}
        self.coordination: CoordinateClientFactory | None = None
        self.sessions = 0
        self._loop: Deferred[None] | None = None
        self._udp: Any = None
        self._wake: Deferred[None] | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self.keys = load_node_keys(self.data_dir)
        self._udp = self.reactor.listenUDP(self.listen_port, _TunnelSocket())
        self.client = Client(self.reactor, self.url, self.token)
        self._loop = Deferred.fromCoroutine(self._run())
        self._loop.addErrback(lambda f: f.trap(CancelledError))

    def stopService(self) -> Any:
        super().stopService()
        if self._loop is not None:
            self._loop.cancel()
        ds = []
        if self.coordination is not None and self.coordination.proto is not None:
            proto = self.coordination.proto
            proto.send_request(CoordinateRequest.from_json({"disconnect": {}}))
            proto.sendClose()
        if self._udp is not None:
            ds.append(self._udp.stopListening())
        ds.append(self.client.close())
        return Deferred.fromCoroutine(_gather(ds))

    # -- the loop ----------------------------------------------------------------------------

    async def _run(self) -> None:
        failures = 0
        while self.running:
            opened = False
            try:
                opened = await self._session()
            except SDKError as err:
                log.warn("agent cannot talk to {url}: {why}", url=self.url, why=str(err))
            except ConnectionError as err:
                log.warn("coordination closed: {why}", why=str(err))
            except CancelledError:
                raise
            except Exception:
                log.failure("agent session failed")
            failures = 0 if opened else failures + 1
            delay = min(self.reconnect_max, 0.5 * 2 ** min(failures, 10)) * random.uniform(0.7, 1.0)
            if opened:
                delay = random.uniform(0.1, 0.5)
            log.info("reconnecting in {delay:.1f}s", delay=delay)
            await task.deferLater(self.reactor, delay, lambda: None)

    async def _session(self) -> bool:
        manifest = await self.client.get(MANIFEST_PATH)
        self.manifest = manifest
        agent_id = UUID(manifest["agent_id"])
        log.info(
            "agent {id} of {owner}/{ws} connected to {url} (manifest access URL {access})",
            id=agent_id, owner=manifest.get("owner_name"), ws=manifest.get("workspace_name"),
            url=self.url, access=manifest.get("access_url"),
        )
        self._write_state(manifest)
        factory = await open_coordination(self.client, COORDINATE_PATH, self._on_response)
        self.coordination = factory
        self.sessions += 1
        proto = factory.proto
        assert proto is not None
        proto.send_request(CoordinateRequest.from_json({"update_self": {"node": self.node_json(agent_id, manifest)}}))
        log.info("coordinator connected; node sent")
        code, reason = await factory.closed
        log.info("coordinator connection closed ({code}: {reason})", code=code, reason=reason)
        self.coordination = None
        return True

    def node_json(self, agent_id: UUID, manifest: dict[str, Any]) -> dict[str, Any]:
        assert self.keys is not None
        derp_map = DERPMap.from_json(manifest.get("derp_map") or {})
        address = f"{address_from_uuid(agent_id)}/128"
        port = self._udp.getHost().port
        endpoints = []
        if not manifest.get("disable_direct_connections"):
            endpoints = [netinfo.endpoint_text(a, port) for a in netinfo.interface_addresses()]
        return {
            "id": int.from_bytes(hashlib.sha256(self.keys.node_public).digest()[:7], "big"),
            "as_of": datetime.now(UTC).isoformat(),
            "key": "nodekey:" + self.keys.node_public.hex(),
            "disco": "discokey:" + self.keys.disco_public.hex(),
            "preferred_derp": home_region(derp_map),
            "derp_latency": {},
            "derp_forced_websockets": {},
            "addresses": [address],
            "allowed_ips": [address],
            "endpoints": endpoints,
        }

    def _on_response(self, response: CoordinateResponse) -> None:
        data = response.to_json()
        if data.get("error"):
            log.warn("coordinator refused a request: {error}", error=data["error"])
        ready = []
        for update in data.get("peer_updates", []):
            peer_id = UUID(update["id"])
            kind = update["kind"]
            log.info("peer {id}: {kind} ({reason})", id=peer_id, kind=kind, reason=update.get("reason", ""))
            if kind == "NODE":
                new = peer_id not in self.peers
                self.peers[peer_id] = {"status": "node", "node": update.get("node")}
                if new:
                    ready.append({"id": str(peer_id)})
            elif kind == "LOST":
                # Keep the last node: an established tunnel survives the peer's coordinator drop.
                if peer_id in self.peers:
                    self.peers[peer_id]["status"] = "lost"
            elif kind == "DISCONNECTED":
                self.peers.pop(peer_id, None)
        if ready and self.coordination is not None and self.coordination.proto is not None:
            # Tell the clients we have their node, so they may start the handshake.
            self.coordination.proto.send_request(
                CoordinateRequest.from_json({"ready_for_handshake": ready})
            )

    def _write_state(self, manifest: dict[str, Any]) -> None:
        # What the agent last learned, for people debugging a workspace (no secrets in it).
        path = os.path.join(self.data_dir, "manifest.json")
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(manifest, f, indent=2)
        os.replace(tmp, path)


async def _gather(ds: list[Any]) -> None:
    for d in ds:
        if isinstance(d, Deferred):
            await d


def makeService(config: dict[str, Any], reactor: Any = None) -> AgentService:
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    return AgentService(
        reactor,
        config["url"],
        config["token"],
        config["data-dir"],
        listen_port=config["tailnet-listen-port"],
        reconnect_max=float(config["reconnect-max"]),
    )
