"""Whether a state-changing request that a browser sent with our session cookie came from one of
our own pages.

A cookie goes along with any request its site makes, and ``SameSite=Lax`` still sends it from
pages on the same site — such as a workspace app on a subdomain of the access URL's domain. So a
POST, PUT, PATCH or DELETE authenticated by the cookie (not by the ``Coder-Session-Token``
header, which no other page can set) must carry an ``Origin`` (or, without one, a ``Referer``)
that is the access URL's origin or the request's own; anything else is refused. Browsers send
``Origin`` on every such request made by ``fetch`` or a form.
"""

from __future__ import annotations

from typing import cast
from urllib.parse import urlsplit

from twisted.web.server import Request

from coderstack.server import auth
from coderstack.server.jsonhttp import HTTPRequest

COOKIE = b"coder_session_token"
SAFE_METHODS = frozenset({b"GET", b"HEAD", b"OPTIONS"})


def same_site(request: HTTPRequest, access_url: str) -> bool:
    """Did this request come from a page of the access URL's origin (or the request's own)?"""
    raw = request.getHeader(b"origin") or request.getHeader(b"referer")
    if not raw:
        return False
    u = urlsplit(raw.decode("latin-1"))
    origin = f"{u.scheme}://{u.netloc}".lower()
    a = urlsplit(access_url)
    own = "https" if cast(Request, request).isSecure() else "http"
    host = (request.getHeader(b"host") or b"").decode("latin-1")
    return origin in {f"{a.scheme}://{a.netloc}".lower(), f"{own}://{host}".lower()}


def by_cookie(request: HTTPRequest) -> bool:
    """The session came in the cookie, not in the header a script on another site cannot set."""
    return request.getHeader(auth.SESSION_HEADER) is None and bool(request.getCookie(COOKIE))


def cross_site_change(request: HTTPRequest, access_url: str) -> bool:
    """A cookie-authenticated state change from a page that is not ours."""
    return (request.method not in SAFE_METHODS and by_cookie(request)
            and not same_site(request, access_url))
