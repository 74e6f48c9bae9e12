"""The closed relay's rules, from the coordinator's view of peers and tunnels.

A DERP client authenticates with the same tokens as the API: a user's session token or an agent
token. A packet from node key S to node key D is relayed only when

- S belongs to a coordinator peer the principal owns (the agent itself; a client peer of that
  user), and
- the coordinator has a tunnel between S's peer and D's peer (in either direction).

LOST peers keep their node, so tunnels survive a coordinator reconnect.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred
from zope.interface import implementer

from coderstack.coordinator.core import ClientAuth
from coderstack.derp.policy import IRelayPolicy


@dataclass(frozen=True)
class Principal:
    kind: str  # "user" | "agent"
    id: uuid.UUID


@implementer(IRelayPolicy)
class CoordinatorRelayPolicy:
    def __init__(self, api: Any, coordinator: Any) -> None:
        self.api = api
        self.coordinator = coordinator

    def authenticate(self, token: str) -> Deferred[Principal | None]:
        return Deferred.fromCoroutine(self._authenticate(token))

    async def _authenticate(self, token: str) -> Principal | None:
        found = await self.api.agent_for_token(token)
        if found is not None:
            return Principal("agent", found[0].id)
        user = await self.api.user_for_token(token)
        if user is not None:
            return Principal("user", user.id)
        return None

    def owns(self, principal: Principal, peer_id: uuid.UUID) -> bool:
        if principal.kind == "agent":
            return peer_id == principal.id
        auth = self.coordinator.auth_of(peer_id)
        return isinstance(auth, ClientAuth) and auth.user_id == principal.id

    def allows(self, principal: Any, src_key: bytes, dst_key: bytes) -> bool:
        if not isinstance(principal, Principal):
            return False
        src = self.coordinator.peer_for_node_key(src_key)
        dst = self.coordinator.peer_for_node_key(dst_key)
        if src is None or dst is None or src == dst:
            return False
        return self.owns(principal, src) and self.coordinator.tunnel_between(src, dst)
