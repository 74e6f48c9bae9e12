"""Who a coordinator peer is, and so what it may do: an agent, a user's client, or the server.

The HTTP layer decides which auth a connection gets; the coordinator enforces what each may
ask for (see :mod:`coderstack.coordinator.core`). Replicas of one server exchange peers with
their auth (:mod:`coderstack.coordinator.replication`), so the kinds are named here once.
"""

from __future__ import annotations

from dataclasses import dataclass
from uuid import UUID


@dataclass(frozen=True)
class AgentAuth:
    """A workspace agent; its peer id is its agent id."""

    agent_id: UUID


@dataclass(frozen=True)
class ClientAuth:
    """A user's client allowed to reach one agent (the HTTP layer checked the user owns it)."""

    agent_id: UUID
    user_id: UUID


@dataclass(frozen=True)
class ServerAuth:
    """The server's own tailnet peer: it may tunnel to any agent (Coder's single-tailnet auth)."""


Auth = AgentAuth | ClientAuth | ServerAuth

#: What :func:`kind_of` answers, in the order ``/metrics`` lists them.
KINDS = ("agent", "client", "server")


def kind_of(auth: Auth) -> str:
    if isinstance(auth, AgentAuth):
        return "agent"
    return "server" if isinstance(auth, ServerAuth) else "client"
