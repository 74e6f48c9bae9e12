"""Who asks for a workspace app, and the auth redirect that lets a browser in on a subdomain.

On the access URL (path apps) the viewer is whoever the session cookie or header names. A
subdomain app's host is another site: the session cookie is not sent there, so the viewer is the
:data:`~coderstack.server.appkeys.SUBDOMAIN_APP_COOKIE` (or the session header, for scripts).
A visitor without one is sent to ``/api/v2/applications/auth-redirect`` on the access URL, which
sees the session, mints one for the app's host and sends the browser back with it sealed in the
query (``appkeys.py``); the app's host swaps it for its cookie.

Once authorized for an app, a viewer gets an app ticket (``appkeys.AppTicket``); while it is
fresh the next requests skip the session lookup. Cookie-authenticated state changes and
websocket upgrades must come from the app's own origin or the access URL's: a browser attaches
cookies to cross-site requests, so another site could otherwise drive the app as the user.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

from twisted.web.server import Request

from coderstack.server.appkeys import (
    APP_KEY_QUERY,
    SUBDOMAIN_APP_COOKIE,
    TICKET_COOKIE,
    TICKET_TTL,
    AppKeys,
    AppTicket,
    session_hash,
)
from coderstack.server.appurl import AppURLError, WildcardHost, parse_subdomain_label
from coderstack.server.records import User

HTTPRequest = Request  # twisted.web's: the app routes use its cookie and TLS methods

SESSION_COOKIE = "coder_session_token"
SESSION_HEADER = b"Coder-Session-Token"
#: Never reach an app: they would hand the user's session to whatever runs in the workspace.
STRIPPED_COOKIES = frozenset((SESSION_COOKIE, SUBDOMAIN_APP_COOKIE, TICKET_COOKIE))
_STATE_CHANGING = frozenset((b"POST", b"PUT", b"PATCH", b"DELETE"))


class Refused(Exception):
    """The request cannot go on: answer with this page."""

    def __init__(self, status: int, title: str, detail: str = "") -> None:
        super().__init__(title)
        self.status, self.title, self.detail = status, title, detail


@dataclass(frozen=True)
class Viewer:
    user: User | None
    token: str | None        # the credential the request carried (None: none, or not valid)
    cookie: bool             # it came in a cookie (so Origin checks apply)

    @property
    def id(self) -> str:
        return "" if self.user is None else str(self.user.id)


class AppAuth:
    """Viewers, tickets, Origin checks and the auth redirect for the app router."""

    def __init__(self, api: Any, keys: AppKeys, wildcard: WildcardHost | None) -> None:
        self.api = api
        self.keys = keys
        self.wildcard = wildcard

    @property
    def _now(self) -> float:
        return float(self.api.d.reactor.seconds())

    # -- who asks ----------------------------------------------------------------------------

    def credential(self, request: HTTPRequest, subdomain: bool) -> tuple[str | None, bool]:
        raw = request.getHeader(SESSION_HEADER)
        if raw is not None:
            return raw.decode("ascii", "replace").strip() or None, False
        cookie = request.getCookie((SUBDOMAIN_APP_COOKIE if subdomain else SESSION_COOKIE).encode())
        value = cookie.decode("ascii", "replace").strip() if cookie else ""
        return value or None, True

    async def viewer(self, request: HTTPRequest, subdomain: bool) -> Viewer:
        token, cookie = self.credential(request, subdomain)
        user: User | None = await self.api.user_for_token(token) if token else None
        return Viewer(user, token if user is not None else None, cookie and user is not None)

    # -- tickets -----------------------------------------------------------------------------

    def ticket(self, request: HTTPRequest, app: str, agent_id: str, subdomain: bool) -> AppTicket | None:
        """A fresh ticket for this app, agent and credential, or None."""
        raw = request.getCookie(TICKET_COOKIE.encode())
        if not raw:
            return None
        ticket = self.keys.verify(raw.decode("ascii", "replace"), self._now)
        if ticket is None or ticket.app != app or ticket.agent != agent_id:
            return None
        token, _cookie = self.credential(request, subdomain)
        return ticket if ticket.session == session_hash(token) else None

    def issue_ticket(self, request: HTTPRequest, app: str, viewer: Viewer, agent_id: str, path: str) -> None:
        ticket = AppTicket(app, viewer.id, session_hash(viewer.token), agent_id, self._now + TICKET_TTL)
        request.addCookie(TICKET_COOKIE.encode(), self.keys.sign(ticket).encode(), path=path.encode(),
                          httpOnly=True, sameSite="lax", secure=request.isSecure(), max_age=str(int(TICKET_TTL)))

    # -- cross-site checks -------------------------------------------------------------------

    def check_origin(self, request: HTTPRequest, subdomain: bool) -> None:
        upgrade = (request.getHeader(b"upgrade") or b"").lower() == b"websocket"
        if request.method not in _STATE_CHANGING and not upgrade:
            return
        origin = request.getHeader(b"origin")
        if origin is None:
            return  # browsers send Origin on cross-site state changes and on every websocket
        allowed = {_origin_of(self.api.d.access_url)}
        if subdomain:
            scheme = "https" if request.isSecure() else "http"
            allowed.add(f"{scheme}://{(request.getHeader(b'host') or b'').decode('latin-1')}".lower())
        if origin.decode("latin-1").lower() not in allowed:
            raise Refused(403, "Cross-site request refused",
                          "This request came from another site; open the app from its own page.")

    # -- the auth redirect -------------------------------------------------------------------

    def login_redirect(self, request: HTTPRequest) -> str:
        """Where an anonymous subdomain visitor goes: the auth redirect, back to this URL."""
        scheme = "https" if request.isSecure() else "http"
        host = (request.getHeader(b"host") or b"").decode("latin-1")
        here = f"{scheme}://{host}{request.uri.decode('latin-1')}"
        return (f"{self.api.d.access_url.rstrip('/')}/api/v2/applications/auth-redirect"
                f"?redirect_uri={quote(here, safe='')}")

    async def auth_redirect(self, request: HTTPRequest) -> str:
        """The app URL to send a logged-in browser back to, carrying its sealed app key."""
        args: dict[bytes, list[bytes]] = request.args or {}
        target = (args.get(b"redirect_uri") or [b""])[0].decode("utf-8", "replace")
        parts = urlsplit(target)
        label = self.wildcard.match(parts.netloc) if self.wildcard is not None and parts.netloc else None
        if parts.scheme not in ("http", "https") or label is None:
            raise Refused(400, "Not an app's address",
                          "redirect_uri must be an app's URL under this deployment's wildcard domain.")
        try:
            parse_subdomain_label(label)
        except AppURLError as e:
            raise Refused(400, "Not an app's address", str(e)) from None
        token, _cookie = self.credential(request, subdomain=False)
        user = await self.api.user_for_token(token) if token else None
        if user is None:
            raise Refused(401, "Log in to open this app",
                          f"Log in to {self.api.d.access_url} in this browser first, then open the app again.")
        app_session = await self.api.issue_session(user)
        sealed = self.keys.seal(app_session, parts.netloc, self._now)
        query = "&".join(p for p in (parts.query, f"{APP_KEY_QUERY}={sealed}") if p)
        return parts._replace(query=query, fragment="").geturl()


def _origin_of(url: str) -> str:
    u = urlsplit(url)
    return f"{u.scheme}://{u.netloc}".lower()
