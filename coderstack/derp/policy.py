"""Who may use the relay, and between whom it relays.

Our relay is closed, unlike Coder's and Tailscale's: the HTTP upgrade must carry a session or
agent token (header ``Coder-Session-Token``), and each packet is relayed only when the policy
says the sender's principal may reach the destination node key. The server implements
:class:`RelayPolicy` from the coordinator's view of peers and tunnels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from twisted.internet.defer import Deferred, succeed
from zope.interface import Interface, implementer

TOKEN_HEADER = b"Coder-Session-Token"


class RelayPolicy(Protocol):
    def authenticate(self, token: str) -> Deferred[Any]:
        """Fire with the principal (any object) that ``token`` belongs to, or ``None``.

        Called once per upgrade request, before the 101. The token is a secret: do not log it.
        """

    def allows(self, principal: Any, src_key: bytes, dst_key: bytes) -> bool:
        """May ``principal``, connected as DERP node key ``src_key``, send to ``dst_key``?

        Expected rule: the principal owns the peer whose node key is ``src_key`` and the
        coordinator has an authorized tunnel between that peer and the peer of ``dst_key``.
        Called on the packet path (results are cached for about a second per destination;
        call ``Relay.policy_changed()`` to revoke at once), so it must be cheap and synchronous.
        """


class AdmittedConnection(Protocol):
    """What an admitted connection offers its ticket."""

    def revoked(self, reason: str) -> None:
        """The token was revoked: close now."""

    def going_away(self) -> None:
        """The server is shutting down: close as "going away"."""


class AdmissionTicket(Protocol):
    def bind(self, conn: AdmittedConnection) -> None:
        """Called with the connection once it exists."""

    def release(self) -> None:
        """Called once when the connection ends, or if the upgrade never happens."""


@dataclass(frozen=True)
class Refusal:
    """A connection the deployment does not take from this principal at all (not a limit)."""

    status: int
    message: str
    detail: str = ""


class ConnectionAdmission(Protocol):
    """Optional, beside the policy: who may open one more connection, and a handle on it."""

    def admit(self, principal: Any) -> AdmissionTicket | str | Refusal:
        """A ticket for one more connection of ``principal``, or why not: a ``str`` (a limit,
        answered 429 with the text as detail) or a :class:`Refusal` (answered as it says).

        Called after ``authenticate``, before the 101.
        """


# The same two as zope interfaces, for implementations that declare them with @implementer;
# the relay's code is typed against the Protocols above.
class IRelayPolicy(Interface):
    """See :class:`RelayPolicy`."""

    def authenticate(token):
        pass

    def allows(principal, src_key, dst_key):
        pass


class IRelayAdmission(Interface):
    """See :class:`ConnectionAdmission`."""

    def admit(principal):
        pass


@implementer(IRelayPolicy)
class AllowAllPolicy:
    """Any non-empty token, any destination. For tests and benchmarks only."""

    def __init__(self, principal: Any = "test") -> None:
        self.principal = principal

    def authenticate(self, token: str) -> Deferred[Any]:
        return succeed(self.principal if token else None)

    def allows(self, principal: Any, src_key: bytes, dst_key: bytes) -> bool:
        return True
