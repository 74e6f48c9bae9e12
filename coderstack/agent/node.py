"""An agent's tailnet node, as its manifest describes it: the server's routes an agent token
reaches, and the Conn made from a manifest (the agent's address from its id, in both of Coder's
prefixes; direct paths and websocket-only DERP as the deployment says). The workspace agent and
the scale test's simulated agents are made the same way."""

from __future__ import annotations

from typing import Any
from uuid import UUID

from coderstack.keys import NodeKeys
from coderstack.tailnet.conn import Conn
from coderstack.wire.coordination import CODER_SERVICE_PREFIX, address_from_uuid

MANIFEST_PATH = "/api/v2/workspaceagents/me/manifest"
COORDINATE_PATH = "/api/v2/workspaceagents/me/coordinate"


def manifest_conn(reactor: Any, agent_id: UUID, manifest: dict[str, Any], *, keys: NodeKeys,
                  token: str, trust_root: Any = None) -> Conn:
    """The agent's Conn (not started; the DERP map is applied by the caller, on every manifest)."""
    return Conn(
        reactor,
        keys=keys,
        address=address_from_uuid(agent_id),
        extra_addresses=(address_from_uuid(agent_id, CODER_SERVICE_PREFIX),),
        derp_token=token,
        block_endpoints=bool(manifest.get("disable_direct_connections")),
        force_websockets=bool(manifest.get("derp_force_websockets")),
        trust_root=trust_root,
    )
