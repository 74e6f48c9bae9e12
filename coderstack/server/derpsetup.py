"""The server's DERP map from its options.

The embedded relay region is built from the access URL (Coder's rule: one node "<id>b" whose
HostName/DERPPort are the access URL's, ForceHTTP for http).
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from coderstack.derpmap import DERPMap, DERPNode, DERPRegion


async def build_derp_map(cfg: dict[str, Any], reactor: Any) -> DERPMap:
    parts = urlsplit(cfg["access-url"])
    region_id = cfg["derp-server-region-id"]
    http = parts.scheme == "http"
    node = DERPNode(
        name=f"{region_id}b",
        region_id=region_id,
        host_name=parts.hostname or "",
        derp_port=parts.port or (80 if http else 443),
        stun_port=-1,
        force_http=http,
    )
    region = DERPRegion(
        region_id=region_id,
        region_code=cfg["derp-server-region-code"],
        region_name=cfg["derp-server-region-name"],
        nodes=(node,),
        embedded_relay=True,
    )
    return DERPMap(regions={region_id: region})
