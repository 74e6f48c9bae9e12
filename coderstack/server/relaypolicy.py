"""The closed relay's rules, from the coordinator's view of peers and tunnels.

A DERP client authenticates with the same tokens as the API: a user's session token or an agent
token. A packet from node key S to node key D is relayed only when

- S belongs to a coordinator peer the principal owns (the agent itself; a client peer of that
  user; the server's own tailnet peer, for the server principal), and
- the coordinator has a tunnel between S's peer and D's peer (in either direction).

LOST peers keep their node, so tunnels survive a coordinator reconnect.

The server's own tailnet (``servertailnet.py``) reaches the relay in memory, never through the
upgrade, as :func:`server_principal`: no token, and admitted in browser-only mode too (apps go
through it).

:class:`RelayAdmission` caps the DERP connections each user (or agent) holds open, and files each
connection in the live-session registry under its token, so revoking the token closes it.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred
from zope.interface import implementer

from coderstack.coordinator.core import ClientAuth, ServerAuth
from coderstack.derp.caps import ConnectionCaps
from coderstack.derp.policy import IRelayAdmission, IRelayPolicy, Refusal
from coderstack.server import browseronly
from coderstack.server.limits import UserLimits
from coderstack.server.livesessions import (
    Credential,
    LiveConnection,
    LiveSession,
    LiveSessions,
    token_hash,
)


@dataclass(frozen=True)
class Principal:
    kind: str  # "user" | "agent" | "server"
    id: uuid.UUID
    credential: Credential | None = field(default=None, compare=False)
    is_owner: bool = field(default=False, compare=False)


def server_principal(peer_id: uuid.UUID) -> Principal:
    """The server's own tailnet, whose coordinator peer is ``peer_id``."""
    return Principal("server", peer_id)


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
            agent_id = found[0].id
            return Principal("agent", agent_id, Credential(token_hash(token), agent_id=agent_id))
        session = await self.api.session_for_token(token)
        if session is None:
            return None
        user, credential = session
        return Principal("user", user.id, credential, user.is_owner)

    def owns(self, principal: Principal, peer_id: uuid.UUID) -> bool:
        if principal.kind == "agent":
            return peer_id == principal.id
        if principal.kind == "server":
            return peer_id == principal.id and isinstance(self.coordinator.auth_of(peer_id), ServerAuth)
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


class _Ticket:
    """One admitted DERP connection: its live session, and its slot in the caps."""

    def __init__(self, admission: RelayAdmission, key: Any, session: LiveSession | None) -> None:
        self._admission = admission
        self._key = key
        self._session = session
        self._released = False

    def bind(self, handler: LiveConnection) -> None:
        if self._session is not None:
            self._session.bind(handler)

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        self._admission.caps.release(self._key)
        if self._session is not None:
            self._session.release()


@implementer(IRelayAdmission)
class RelayAdmission:
    def __init__(self, live: LiveSessions, limits: UserLimits, *, browser_only: bool = False) -> None:
        self.live = live
        self.limits = limits
        self.caps = ConnectionCaps()
        #: Users' own DERP connections are CLI tunnels: refused in browser-only mode (agents and
        #: the server's own tailnet, which carries the apps, are not).
        self.browser_only = browser_only

    def admit(self, principal: Any) -> _Ticket | str | Refusal:
        if not isinstance(principal, Principal):
            return "unknown principal"
        if self.browser_only and principal.kind == "user":
            return Refusal(403, browseronly.MESSAGE, browseronly.DETAIL)
        key = (principal.kind, principal.id)
        refusal = self.caps.acquire(key, self.limits.derp_connections_for(principal.is_owner))
        if refusal is not None:
            return refusal
        session = self.live.open(principal.credential) if principal.credential is not None else None
        return _Ticket(self, key, session)
