"""The server's relay side: STUN listener, DERP map, DERP relay and its resources.

Order: STUN first (the embedded region advertises the ports it really got: the first on the relay
node, the others as STUN-only nodes of the same region, so netcheck sees two destinations of one
server and can tell a hard NAT), then the map (an
unusable map stops start-up with DERPMapError's message), then the relay with the closed-relay
policy, mounted beside the API on the same HTTP(S) port.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet.error import CannotListenError
from twisted.web.resource import IResource

from coderstack.derp.mapconfig import load_server_map
from coderstack.derp.relay import Relay
from coderstack.derp.server import load_or_create_private_key, make_derp_resources, make_relay
from coderstack.derpmap import DERPMap
from coderstack.stun.server import STUNResponder, listen_stun
from coderstack.twistedtypes import ListeningPort


def start_stun(cfg: dict[str, Any], reactor: Any) -> list[ListeningPort]:
    """One listener per ``stun-listen`` address, all answering through one responder (one rate
    limit per source across the ports, one set of counters)."""
    responder = STUNResponder()
    ports: list[ListeningPort] = []
    for host, port in cfg.get("stun-listen") or []:
        try:
            ports.append(listen_stun(reactor, host, port, responder=responder))
        except (OSError, CannotListenError) as err:  # Twisted's is not an OSError
            for p in ports:
                p.stopListening()
            raise RuntimeError(f"--stun-address {host}:{port}: cannot listen ({err})") from None
    return ports


async def build_derp_map(cfg: dict[str, Any], reactor: Any, stun_ports: list[int] | int | None = None) -> DERPMap:
    if isinstance(stun_ports, int):
        stun_ports = [stun_ports]
    stun_ports = list(stun_ports or [])
    return await load_server_map(
        cfg["access-url"],
        derp_server_enable=cfg.get("derp-server-enable", True),
        region_id=cfg["derp-server-region-id"],
        region_code=cfg["derp-server-region-code"],
        region_name=cfg["derp-server-region-name"],
        embedded_stun_port=stun_ports[0] if stun_ports else None,
        embedded_stun_alt_ports=tuple(stun_ports[1:]),
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
