"""The server's relay side: STUN listener, DERP map, DERP relay and its resources.

Order: STUN first (the embedded region advertises the port it really got), then the map (an
unusable map stops start-up with DERPMapError's message), then the relay with the closed-relay
policy, mounted beside the API on the same HTTP(S) port.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from twisted.internet.interfaces import IListeningPort
from twisted.web.resource import IResource

from coderstack.derp.mapconfig import load_server_map
from coderstack.derp.relay import Relay
from coderstack.derp.server import load_or_create_private_key, make_derp_resources, make_relay
from coderstack.derpmap import DERPMap
from coderstack.stun.server import listen_stun


@dataclass
class RelaySide:
    derp_map: DERPMap
    stun_port: IListeningPort | None
    relay: Relay | None
    resources: dict[str, IResource]


def start_stun(cfg: dict[str, Any], reactor: Any) -> IListeningPort | None:
    listen = cfg.get("stun-listen")
    if listen is None:
        return None
    host, port = listen
    try:
        return listen_stun(reactor, host, port)
    except OSError as err:
        raise RuntimeError(f"--stun-address {host}:{port}: cannot listen ({err})") from None


async def build_derp_map(cfg: dict[str, Any], reactor: Any, stun_port: int | None = None) -> DERPMap:
    return await load_server_map(
        cfg["access-url"],
        derp_server_enable=cfg.get("derp-server-enable", True),
        region_id=cfg["derp-server-region-id"],
        region_code=cfg["derp-server-region-code"],
        region_name=cfg["derp-server-region-name"],
        embedded_stun_port=stun_port,
        stun_addresses=cfg.get("stun-servers") or [],
        config_url=cfg.get("derp-config-url") or "",
        config_path=cfg.get("derp-config-path") or "",
        block_direct=cfg.get("block-direct-connections", False),
    )


def start_relay(
    cfg: dict[str, Any], reactor: Any, policy: Any, admission: Any = None
) -> tuple[Relay | None, dict[str, IResource]]:
    if not cfg.get("derp-server-enable", True):
        return None, {}
    key = load_or_create_private_key(os.path.join(cfg["data-dir"], "derp.key"))
    relay = make_relay(key, policy, reactor)
    return relay, make_derp_resources(relay, policy, admission)
