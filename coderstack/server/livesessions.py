"""Live sessions: every long-lived connection, by the credential that authenticated it.

A token checked once at the start of a websocket or a DERP connection would otherwise stay good
for as long as that connection lives. Each such connection (coordinator websockets, DERP over
Upgrade: DERP or a websocket, the DERP map stream, and any later one such as a web terminal or
an app proxy) opens a :class:`LiveSession` here with its :class:`Credential` and binds a handler
with two methods:

- ``revoked(reason: str)``: the credential is no longer good; close now, as a refusal;
- ``going_away()``: the server is shutting down; close as "going away" (websocket 1001).

and releases the session when the connection ends. The code that revokes a credential calls
:meth:`LiveSessions.revoke_token` (logout), :meth:`revoke_user` (user suspended or deleted) or
:meth:`revoke_agent` (agent token rotated, workspace deleted, agents replaced by a build); a
session token's expiry revokes it by timer. Everything happens on the reactor thread; time comes
from the injected clock.
"""

from __future__ import annotations

import hashlib
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Protocol
from uuid import UUID

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from coderstack.twistedtypes import Clock, DelayedCall

log = Logger()

REASON_LOGGED_OUT = "session logged out"
REASON_EXPIRED = "session expired"
REASON_USER_SUSPENDED = "user suspended"
REASON_USER_DELETED = "user deleted"
REASON_AGENT_REVOKED = "agent token revoked"


def token_hash(token: str) -> bytes:
    """The key a token's connections are filed under (never the token itself)."""
    return hashlib.sha256(token.strip().encode()).digest()


@dataclass(frozen=True)
class Credential:
    """What authenticated a connection, and so what revokes it."""

    token_hash: bytes
    #: The user whose session token this is (None for agent tokens).
    user_id: UUID | None = None
    #: The agent whose token this is (None for session tokens).
    agent_id: UUID | None = None
    #: When the token expires, in the clock's seconds (None: never).
    expires_at: float | None = None


class LiveConnection(Protocol):
    def revoked(self, reason: str) -> None: ...

    def going_away(self) -> None: ...


class LiveSession:
    """One connection's entry; ``bind`` its handler once it exists, ``release`` when it ends."""

    def __init__(self, registry: LiveSessions, credential: Credential) -> None:
        self._registry = registry
        self.credential = credential
        self.handler: LiveConnection | None = None
        #: Why the credential was revoked, once it was.
        self.revoked_because: str | None = None
        self.released = False
        self._expiry: DelayedCall | None = None

    def bind(self, handler: LiveConnection) -> None:
        """Attach the connection; one revoked before it existed is told at once."""
        self.handler = handler
        if self.revoked_because is not None and not self.released:
            handler.revoked(self.revoked_because)

    def release(self) -> None:
        """The connection ended (idempotent)."""
        if not self.released:
            self.released = True
            self._registry._remove(self)

    def _revoke(self, reason: str) -> bool:
        if self.revoked_because is not None or self.released:
            return False
        self.revoked_because = reason
        if self.handler is not None:
            try:
                self.handler.revoked(reason)
            except Exception:
                log.failure("closing a revoked connection failed")
        return True


class LiveSessions:
    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._all: dict[LiveSession, None] = {}
        self._index: dict[Hashable, dict[LiveSession, None]] = {}
        self._drained: list[Deferred[None]] = []
        self.counters = {"opened": 0, "revoked": 0, "expired": 0}

    def __len__(self) -> int:
        return len(self._all)

    def open(self, credential: Credential) -> LiveSession:
        session = LiveSession(self, credential)
        self._all[session] = None
        for key in self._keys(credential):
            self._index.setdefault(key, {})[session] = None
        self.counters["opened"] += 1
        if credential.expires_at is not None:
            delay = max(0.0, credential.expires_at - self._clock.seconds())
            session._expiry = self._clock.callLater(delay, self._expire, session)
        return session

    def attach(self, credential: Credential, handler: LiveConnection) -> LiveSession:
        """``open`` and ``bind`` at once, for a connection that already exists."""
        session = self.open(credential)
        session.bind(handler)
        return session

    def revoke_token(self, hashed: bytes, reason: str = REASON_LOGGED_OUT) -> int:
        return self._revoke(("token", hashed), reason)

    def revoke_user(self, user_id: UUID, reason: str) -> int:
        return self._revoke(("user", user_id), reason)

    def revoke_agent(self, agent_id: UUID, reason: str = REASON_AGENT_REVOKED) -> int:
        return self._revoke(("agent", agent_id), reason)

    def shutdown(self, grace: float) -> Deferred[None]:
        """Tell every connection the server is going away; fires once all have ended, or after
        ``grace`` seconds, whichever is first."""
        for session in list(self._all):
            if session.handler is not None:
                try:
                    session.handler.going_away()
                except Exception:
                    log.failure("closing a connection at shutdown failed")
        d: Deferred[None] = Deferred()
        if not self._all:
            d.callback(None)
            return d
        self._drained.append(d)
        timer = self._clock.callLater(grace, self._fire_drained)

        def stop_timer(result: object) -> object:
            if timer.active():
                timer.cancel()
            return result

        d.addBoth(stop_timer)
        return d

    # --- inside -----------------------------------------------------------------------------

    @staticmethod
    def _keys(credential: Credential) -> list[Hashable]:
        keys: list[Hashable] = [("token", credential.token_hash)]
        if credential.user_id is not None:
            keys.append(("user", credential.user_id))
        if credential.agent_id is not None:
            keys.append(("agent", credential.agent_id))
        return keys

    def _revoke(self, key: Hashable, reason: str) -> int:
        """Revoke every session filed under ``key``; how many were newly revoked."""
        n = 0
        for session in list(self._index.get(key, ())):
            if session._revoke(reason):
                n += 1
        self.counters["revoked"] += n
        return n

    def _expire(self, session: LiveSession) -> None:
        session._expiry = None
        if session._revoke(REASON_EXPIRED):
            self.counters["expired"] += 1

    def _remove(self, session: LiveSession) -> None:
        if session._expiry is not None and session._expiry.active():
            session._expiry.cancel()
        session._expiry = None
        self._all.pop(session, None)
        for key in self._keys(session.credential):
            bucket = self._index.get(key)
            if bucket is not None:
                bucket.pop(session, None)
                if not bucket:
                    del self._index[key]
        if not self._all:
            self._fire_drained()

    def _fire_drained(self) -> None:
        waiting, self._drained = self._drained, []
        for d in waiting:
            if not d.called:
                d.callback(None)
