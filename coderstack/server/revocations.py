"""Revoking a credential on every replica, not only the one that was asked.

A logout, a suspended or deleted user, or a rotated agent token must close the long-lived
connections that credential opened (:mod:`coderstack.server.livesessions`) — on whichever
replica holds them. :class:`Revocations` closes this process's; :class:`SharedRevocations` (the
server on PostgreSQL) also NOTIFYs the other replicas, which close theirs.

Channel ``coderstack_revoke``, payload ``"<replica>,<kind>,<value>,<reason>"``: kind ``token``
(value: the hex SHA-256 the connections are filed under — the database holds the same hash,
never the token), ``user`` or ``agent`` (value: the UUID); the reason is one of livesessions'
``REASON_*`` texts. A replica ignores its own notifications (it revoked first).
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from coderstack.server.database import Database
from coderstack.server.livesessions import LiveSessions
from coderstack.server.pubsub import Listener, notify

log = Logger()

REVOKE_CHANNEL = "coderstack_revoke"


class Revocations:
    """Close the connections a credential opened, in this process."""

    def __init__(self, live: LiveSessions) -> None:
        self.live = live

    def metrics_lines(self) -> list[str]:
        """Prometheus lines (none for one process)."""
        return []

    def token(self, hashed: bytes, reason: str) -> int:
        return self.live.revoke_token(hashed, reason)

    def user(self, user_id: UUID, reason: str) -> int:
        return self.live.revoke_user(user_id, reason)

    def agent(self, agent_id: UUID, reason: str) -> int:
        return self.live.revoke_agent(agent_id, reason)


class SharedRevocations(Revocations):
    """:class:`Revocations` here, and a notification that makes every other replica do the same."""

    def __init__(self, db: Database, live: LiveSessions, replica_id: UUID, listener: Listener) -> None:
        """``listener``: the replica's LISTEN connection (its owner starts and stops it)."""
        super().__init__(live)
        self.db = db
        self._me = str(replica_id)
        listener.subscribe((REVOKE_CHANNEL,), self)
        self.counters = {"sent": 0, "received": 0, "send_failures": 0, "bad": 0}
        #: True while the other replicas' revocations can reach us.
        self.listening_now = False

    def metrics_lines(self) -> list[str]:
        c = self.counters
        return [
            "# HELP coderstack_revocations_shared_total Revocations told to and by other replicas.",
            "# TYPE coderstack_revocations_shared_total counter",
            f'coderstack_revocations_shared_total{{direction="sent"}} {c["sent"]}',
            f'coderstack_revocations_shared_total{{direction="received"}} {c["received"]}',
            f'coderstack_revocations_shared_total{{direction="send_failed"}} {c["send_failures"]}',
            f'coderstack_revocations_shared_total{{direction="bad"}} {c["bad"]}',
        ]

    def token(self, hashed: bytes, reason: str) -> int:
        self._tell("token", hashed.hex(), reason)
        return super().token(hashed, reason)

    def user(self, user_id: UUID, reason: str) -> int:
        self._tell("user", str(user_id), reason)
        return super().user(user_id, reason)

    def agent(self, agent_id: UUID, reason: str) -> int:
        self._tell("agent", str(agent_id), reason)
        return super().agent(agent_id, reason)

    def _tell(self, kind: str, value: str, reason: str) -> Deferred[None]:
        payload = f"{self._me},{kind},{value},{reason}"
        d = self.db.transact(lambda conn: notify(conn, REVOKE_CHANNEL, payload))

        def sent(_: object) -> None:
            self.counters["sent"] += 1

        def failed(f: Any) -> None:
            # The credential itself is gone from the database, so no replica accepts it again;
            # only connections already open elsewhere live on until they next authenticate.
            self.counters["send_failures"] += 1
            log.warn("could not tell the other replicas of a revoked {kind}: {why}",
                     kind=kind, why=f.getErrorMessage().splitlines()[0])

        d.addCallbacks(sent, failed)
        return d

    # --- pubsub.Subscriber ---------------------------------------------------------------

    def listening(self) -> None:
        self.listening_now = True

    def unlistened(self, error: str) -> None:
        # Missed revocations need no replay: the credential is gone from the database, and
        # every connection checks it again when it next authenticates.
        self.listening_now = False

    def notified(self, channel: str, payload: str) -> None:
        parts = payload.split(",", 3)
        if len(parts) != 4 or parts[0] == self._me:
            if len(parts) != 4:
                self.counters["bad"] += 1
            return
        _, kind, value, reason = parts
        try:
            if kind == "token":
                self.live.revoke_token(bytes.fromhex(value), reason)
            elif kind == "user":
                self.live.revoke_user(UUID(value), reason)
            elif kind == "agent":
                self.live.revoke_agent(UUID(value), reason)
            else:
                raise ValueError(kind)
        except ValueError:
            self.counters["bad"] += 1
            return
        self.counters["received"] += 1
