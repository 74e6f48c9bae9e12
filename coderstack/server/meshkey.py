"""The DERP mesh key: one random 32-character string per deployment, shared by every replica.

Replicas present it when they dial each other's relay for the mesh (``derp/mesh.py``). It is made
once, in the database, by the first replica to ask (``AppStore.deployment_secret``, under an
advisory lock on PostgreSQL, so replicas starting together agree on one).
"""

from __future__ import annotations

from coderstack.server.appstore import AppStore

MESH_KEY_NAME = "derp_mesh_key"


async def derp_mesh_key(store: AppStore) -> str:
    """This deployment's mesh key (16 random bytes as 32 hex characters)."""
    return (await store.deployment_secret(MESH_KEY_NAME, size=16)).hex()
