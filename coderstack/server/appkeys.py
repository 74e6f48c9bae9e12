"""App keys and app tickets: how a session on the access URL becomes a subdomain app's cookie,
and how an authorized app request skips the database on the next request.

Both are sealed with one deployment secret (``appstore.APP_KEY_NAME``), from which two keys are
derived with HKDF-SHA256:

- **App key** (the auth redirect's hand-over). The access URL cannot set a cookie for an app's
  host, so ``/api/v2/applications/auth-redirect`` mints a session for the user and sends the
  browser to the app with it *encrypted* in the query parameter :data:`APP_KEY_QUERY`::

      base64url( nonce(12) || AES-256-GCM(key_enc, nonce, {"t": token, "exp": unix}, aad=host) )

  The host is the additional data, so a key minted for one app's host does not open on another;
  it expires after :data:`APP_KEY_TTL` seconds. The app's host turns it into the
  :data:`SUBDOMAIN_APP_COOKIE` (HttpOnly) and redirects (303) to the same URL without it, so the
  key never stays in the address bar or reaches the app. It is never logged.

- **App ticket** (Coder's signed app token). After the router authorized a viewer for an app it
  sets the :data:`TICKET_COOKIE`::

      base64url(json {"a": app, "v": viewer|"", "s": session hash, "g": agent, "e": unix}) "." base64url(HMAC-SHA256)

  Later requests carrying a valid ticket for the same app, session and agent skip the session and
  sharing lookups for :data:`TICKET_TTL` seconds — the price is that revoking a session or a share
  takes up to that long to reach an open app.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

APP_KEY_QUERY = "coder_application_connect_api_key_35e783"
SUBDOMAIN_APP_COOKIE = "coder_subdomain_app_session_token"
TICKET_COOKIE = "coder_signed_app_token"
APP_KEY_TTL = 60.0
TICKET_TTL = 60.0


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


_SESSION_HASHES: dict[str, str] = {}  # token: its session_hash, for the sessions now in use
_SESSION_HASHES_MAX = 4096


def session_hash(token: str | None) -> str:
    """A short, non-reversible name for the session a ticket was issued to (remembered for
    the tokens seen lately: every app request names its session)."""
    if not token:
        return ""
    found = _SESSION_HASHES.get(token)
    if found is None:
        found = hashlib.sha256(token.encode()).hexdigest()[:32]
        if len(_SESSION_HASHES) >= _SESSION_HASHES_MAX:
            _SESSION_HASHES.clear()
        _SESSION_HASHES[token] = found
    return found


@dataclass(frozen=True)
class AppTicket:
    app: str            # the app's identity (its host's label, or its path prefix)
    viewer: str         # the viewer's user id ("" for an anonymous visitor of a public app)
    session: str        # session_hash of the credential it was issued for
    agent: str          # the agent id the app was found on
    expires: float


#: Verified tickets remembered at most (see :meth:`AppKeys.verify`).
VERIFIED_TICKETS = 4096


class AppKeys:
    """Seals app keys and signs app tickets with keys derived from the deployment secret."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) < 32:
            raise ValueError("the app secret must be at least 32 bytes")

        def derive(purpose: bytes) -> bytes:
            return HKDF(hashes.SHA256(), 32, salt=None, info=b"coderstack " + purpose).derive(secret)

        self._aead = AESGCM(derive(b"app key"))
        self._mac = derive(b"app ticket")
        # Tickets already verified, by their exact text: a browser sends the same one with every
        # request for a minute, and its HMAC, base64 and JSON were a twentieth of the proxy's
        # time per request. Bounded (cleared when full); the expiry is still checked each time.
        self._verified: dict[str, AppTicket] = {}

    # -- app keys ----------------------------------------------------------------------------

    def seal(self, token: str, host: str, now: float) -> str:
        nonce = os.urandom(12)
        plain = json.dumps({"t": token, "exp": now + APP_KEY_TTL}).encode()
        return _b64(nonce + self._aead.encrypt(nonce, plain, _host_aad(host)))

    def open(self, sealed: str, host: str, now: float) -> str | None:
        """The session token inside, or None (tampered, for another host, expired, garbage)."""
        try:
            raw = _unb64(sealed)
            if len(raw) < 12 + 16:
                return None
            payload = json.loads(self._aead.decrypt(raw[:12], raw[12:], _host_aad(host)))
            token, expires = payload["t"], float(payload["exp"])
        except (InvalidTag, ValueError, KeyError, TypeError):
            return None
        if not isinstance(token, str) or expires < now:
            return None
        return token

    def exchange(self, query: str, host: str, now: float) -> tuple[str | None, str | None]:
        """``(token, query without the key)``; ``(None, None)`` when the query carries no key,
        ``(None, clean)`` when it carries a bad one."""
        kept: list[str] = []
        sealed: str | None = None
        for part in query.split("&") if query else ():
            name, _, value = part.partition("=")
            if name == APP_KEY_QUERY:
                sealed = value
            else:
                kept.append(part)
        if sealed is None:
            return None, None
        return self.open(sealed, host, now), "&".join(kept)

    # -- app tickets -------------------------------------------------------------------------

    def sign(self, ticket: AppTicket) -> str:
        body = _b64(json.dumps({"a": ticket.app, "v": ticket.viewer, "s": ticket.session,
                                "g": ticket.agent, "e": ticket.expires}, separators=(",", ":")).encode())
        return body + "." + _b64(hmac.new(self._mac, body.encode(), hashlib.sha256).digest())

    def verify(self, raw: str, now: float) -> AppTicket | None:
        known = self._verified.get(raw)
        if known is not None:
            return known if known.expires >= now else None
        body, _, mac = raw.partition(".")
        try:
            if not hmac.compare_digest(_unb64(mac), hmac.new(self._mac, body.encode(), hashlib.sha256).digest()):
                return None
            d = json.loads(_unb64(body))
            ticket = AppTicket(str(d["a"]), str(d["v"]), str(d["s"]), str(d["g"]), float(d["e"]))
        except (ValueError, KeyError, TypeError):
            return None
        if ticket.expires < now:
            return None
        if len(self._verified) >= VERIFIED_TICKETS:
            self._verified.clear()
        self._verified[raw] = ticket
        return ticket


def _host_aad(host: str) -> bytes:
    return b"app host " + host.strip().lower().encode("utf-8", "replace")
