"""The dashboard's HTML pages: one layout, their security headers, redirects and the 404 page.

Every page is ``text/html; charset=utf-8`` with ``Cache-Control: no-store``,
``X-Content-Type-Options: nosniff``, ``Referrer-Policy: same-origin`` and a
Content-Security-Policy that allows only this origin's files::

    default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:;
    connect-src 'self' ws(s)://<access URL host>; object-src 'none'; base-uri 'none';
    form-action 'self'; frame-ancestors 'none'

No inline script anywhere: a page's script is a module under ``/static/app/`` and its inputs are
``data-`` attributes on ``<body>``. The terminal page alone adds ``'unsafe-inline'`` to
``style-src``: xterm.js measures and themes its cells through ``<style>`` elements it creates.
Text from users (names, metadata, logs) is escaped here or set with ``textContent`` by the
scripts; no page ever carries a token.
"""

from __future__ import annotations

import html
from collections.abc import Mapping
from typing import Protocol
from urllib.parse import quote, urlsplit

from coderstack.server.jsonhttp import HTTPRequest
from coderstack.server.records import User


def content_security_policy(access_url: str, inline_styles: bool = False) -> bytes:
    u = urlsplit(access_url)
    ws = f"{'wss' if u.scheme == 'https' else 'ws'}://{u.netloc}"
    style = "'self' 'unsafe-inline'" if inline_styles else "'self'"
    return (
        f"default-src 'self'; script-src 'self'; style-src {style}; img-src 'self' data:; "
        f"connect-src 'self' {ws}; object-src 'none'; base-uri 'none'; form-action 'self'; "
        "frame-ancestors 'none'"
    ).encode()


def set_page_headers(request: HTTPRequest, access_url: str, code: int = 200,
                     inline_styles: bool = False) -> None:
    request.setResponseCode(code)
    request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
    request.setHeader(b"Cache-Control", b"no-store")
    request.setHeader(b"X-Content-Type-Options", b"nosniff")
    request.setHeader(b"Referrer-Policy", b"same-origin")
    request.setHeader(b"X-Frame-Options", b"DENY")
    request.setHeader(b"Content-Security-Policy", content_security_policy(access_url, inline_styles))


def esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def layout(title: str, main: str, *, user: User | None = None, script: str | None = None,
           styles: tuple[str, ...] = (), data: Mapping[str, str] | None = None) -> bytes:
    """A whole page: ``main`` is trusted HTML (callers escape what they put in it)."""
    attrs = "".join(f' data-{esc(k)}="{esc(v)}"' for k, v in (data or {}).items())
    links = "".join(f'<link rel="stylesheet" href="{esc(href)}">\n'
                    for href in ("/static/app/dashboard.css", *styles))
    head_script = f'<script type="module" src="{esc(script)}"></script>\n' if script else ""
    nav = ""
    if user is not None:
        # Owners also see the deployment's pages (their routes check the role again).
        owner = ('<a href="/templates">Templates</a><a href="/users">Users</a><a href="/health">Health</a>'
                 if user.is_owner else "")
        nav = (
            f'<nav><a href="/workspaces">Workspaces</a>{owner}'
            f'<span class="who">{esc(user.username)}</span>'
            '<form method="post" action="/logout"><button type="submit" id="logout">Log out</button></form>'
            "</nav>"
        )
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{esc(title)} · coderstack</title>\n{links}{head_script}</head>\n"
        f"<body{attrs}>\n<header><a class=\"brand\" href=\"/\">coderstack</a>{nav}</header>\n"
        f"<main>\n{main}\n</main>\n</body>\n</html>\n"
    ).encode()


def render(request: HTTPRequest, access_url: str, body: bytes, code: int = 200,
           inline_styles: bool = False) -> bytes:
    set_page_headers(request, access_url, code, inline_styles)
    return body


def not_found(request: HTTPRequest, access_url: str, user: User | None = None) -> bytes:
    """The same page for a missing thing and someone else's."""
    body = layout("Not found", '<h1>Not found</h1>\n<p>There is nothing here, or it is not yours.</p>\n'
                  '<p><a href="/workspaces">Your workspaces</a></p>', user=user)
    return render(request, access_url, body, 404)


def redirect(request: HTTPRequest, location: str, code: int = 303) -> bytes:
    """A redirect to a path on this site (``location`` is built by the caller, never taken raw)."""
    request.setResponseCode(code)
    request.setHeader(b"Location", location.encode("utf-8"))
    request.setHeader(b"Cache-Control", b"no-store")
    request.setHeader(b"X-Content-Type-Options", b"nosniff")
    return b""


class _Asking(Protocol):
    method: bytes

    def getHeader(self, key: bytes) -> bytes | None: ...


def wants_page(request: _Asking) -> bool:
    """A browser navigating (a GET or HEAD that accepts HTML), not a script or a CLI."""
    accept = (request.getHeader(b"accept") or b"").decode("latin-1").lower()
    return request.method in (b"GET", b"HEAD") and "text/html" in accept


def login_location(next_uri: bytes | str) -> str:
    """The login form, coming back to ``next_uri`` (a path on this site, query included)."""
    here = next_uri.decode("utf-8", "replace") if isinstance(next_uri, bytes) else next_uri
    return "/login?next=" + quote(here, safe="/")


def safe_next(value: str) -> str:
    """A post-login destination: a path on this site only (not ``//host`` or ``/\\host``)."""
    if not value.startswith("/") or value.startswith(("//", "/\\")) or any(c in value for c in "\r\n\\"):
        return "/workspaces"
    return value
