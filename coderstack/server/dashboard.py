"""The dashboard: HTML pages for people, over the same session as the API.

Pages (each behind the ``coder_session_token`` cookie; without it a 303 to ``/login?next=``):

- ``/``: 303 to ``/workspaces`` when logged in, else to ``/login``.
- ``GET /login``, ``POST /login`` (form fields ``email`` — an email or a username — and
  ``password``; ``next``, a path on this site): on success a 303 to ``next`` with the session
  cookie (``HttpOnly; SameSite=Lax; Path=/``, ``Secure`` over TLS, 7 days); on failure the form
  again with the reason (401, 429).
- ``POST /logout``: deletes the session's key, clears the cookie, 303 to ``/login``.
- ``/workspaces``: the user's workspaces; ``/workspaces/{user}/{workspace}``: one workspace and
  its agents; ``/workspaces/{user}/{workspace}/{agent}/terminal``: the web terminal. Another
  user's workspace is the 404 page, as a missing one is. (``/@user/...`` belongs to apps.)
- ``/static/...``: see :mod:`coderstack.server.webassets`.

The pages are server-rendered shells; their scripts (``coderstack/server/static/``) poll the
JSON API every 2 s with the cookie and fill them in. A form POST must come from this site: its
``Origin`` (or, without one, ``Referer``) is the access URL's or the request's own origin, else a
403 page. Headers and escaping: :mod:`coderstack.server.htmlpage`.
"""

from __future__ import annotations

from typing import Any, Protocol, cast
from urllib.parse import quote

from klein import Klein
from twisted.web.server import Request

from coderstack.server import htmlpage, samesite, webassets
from coderstack.server.htmlpage import esc, layout, render
from coderstack.server.jsonhttp import APIError, HTTPRequest, client_host, session_token_of
from coderstack.server.records import User, Workspace
from coderstack.server.samesite import same_site

COOKIE = samesite.COOKIE
COOKIE_MAX_AGE = 7 * 24 * 3600


class DashboardHost(Protocol):
    d: Any

    async def user_for_token(self, token: str | None) -> User | None: ...
    async def authenticate(self, login: str, password: str, source: str) -> str: ...
    async def end_session(self, token: str) -> None: ...


def _arg(request: HTTPRequest, name: bytes) -> str:
    return (request.args.get(name) or [b""])[0].decode("utf-8", "replace")


def set_session_cookie(request: HTTPRequest, value: str, max_age: int) -> None:
    req = cast(Request, request)
    req.addCookie(COOKIE, value.encode(), path=b"/", max_age=str(max_age).encode(), httpOnly=True,
                  sameSite="lax", secure=req.isSecure())


async def current_user(api: DashboardHost, request: HTTPRequest) -> User | None:
    return await api.user_for_token(session_token_of(request))


def to_login(request: HTTPRequest) -> bytes:
    return htmlpage.redirect(request, htmlpage.login_location(request.path))


async def front_door(api: DashboardHost, request: HTTPRequest) -> bytes:
    user = await current_user(api, request)
    return htmlpage.redirect(request, "/workspaces" if user else "/login")


def login_page(request: HTTPRequest, access_url: str, next_path: str, error: str = "",
               login: str = "", code: int = 200) -> bytes:
    problem = f'<p class="error" id="login-error" role="alert">{esc(error)}</p>\n' if error else ""
    main = (
        '<section class="card narrow">\n<h1>Log in</h1>\n' + problem +
        '<form method="post" action="/login" id="login-form">\n'
        f'<input type="hidden" name="next" value="{esc(next_path)}">\n'
        '<label>Email or username <input name="email" id="email" autocomplete="username" required '
        f'value="{esc(login)}"></label>\n'
        '<label>Password <input name="password" id="password" type="password" '
        'autocomplete="current-password" required></label>\n'
        '<button type="submit" id="login-submit">Log in</button>\n</form>\n</section>'
    )
    return render(request, access_url, layout("Log in", main), code)


def forbidden(request: HTTPRequest, access_url: str) -> bytes:
    body = layout("Refused", "<h1>Refused</h1>\n<p>This form was sent from another site.</p>")
    return render(request, access_url, body, 403)


def _workspace_link(ws: Workspace) -> str:
    return f"/workspaces/{quote(ws.owner_name)}/{quote(ws.name)}"


def workspaces_page(user: User) -> bytes:
    main = (
        '<h1>Workspaces</h1>\n<p class="muted" id="refreshed">Loading…</p>\n'
        '<table id="workspaces"><thead><tr><th>Workspace</th><th>Template</th><th>State</th><th>Agent</th>'
        "<th>Status</th><th>Lifecycle</th><th>Last seen</th></tr></thead>\n<tbody></tbody></table>"
    )
    return layout("Workspaces", main, user=user, script="/static/app/workspaces.js")


def build_card(ws: Workspace) -> str:
    """The latest build and the buttons that start the next (filled in by builds.js)."""
    if ws.template_id is None:
        return ('<section class="card build"><p class="muted">This workspace has no template: its agent '
                "was started by hand, so there is nothing to start, stop or build here.</p></section>\n")
    buttons = "".join(
        f'<button type="button" id="{name.lower()}" data-transition="{transition}"{cls} disabled>{name}</button>'
        for name, transition, cls in (("Start", "start", ""), ("Stop", "stop", ""),
                                      ("Delete", "destroy", ' class="danger"')))
    return (
        '<section class="card build" id="build">\n'
        '<h2>Build <span id="build-number"></span> <span id="build-state" class="state">…</span>'
        f'<span class="actions">{buttons}</span></h2>\n'
        '<p class="error" id="build-error" role="alert" hidden></p>\n'
        '<pre class="logs" id="build-log"></pre>\n</section>\n'
    )


def workspace_page(user: User, ws: Workspace) -> bytes:
    cards = []
    for agent in ws.agents:
        terminal = f"{_workspace_link(ws)}/{quote(agent.name)}/terminal"
        cards.append(
            f'<section class="card agent" data-agent-id="{esc(agent.id)}">\n'
            f'<h2>{esc(agent.name)} <a class="button terminal-link" href="{esc(terminal)}">Terminal</a></h2>\n'
            '<dl class="facts">'
            '<dt>Status</dt><dd data-field="status">…</dd>'
            '<dt>Lifecycle</dt><dd data-field="lifecycle">…</dd>'
            '<dt>Last seen</dt><dd data-field="last-seen">…</dd>'
            '<dt>System</dt><dd data-field="system">…</dd>'
            '<dt>Server path</dt><dd data-field="path">…</dd>'
            "</dl>\n"
            '<h3>Metadata</h3><table class="metadata"><tbody></tbody></table>\n'
            '<h3>Apps</h3><ul class="apps"></ul>\n'
            '<h3>Startup logs</h3><pre class="logs"></pre>\n</section>'
        )
    body = "\n".join(cards) or '<p class="muted">This workspace has no agent.</p>'
    main = (f'<h1>{esc(ws.name)}</h1>\n<p class="muted">Template: {esc(ws.template_name or "none")}'
            ' · <span id="refreshed">Loading…</span></p>\n' + build_card(ws) + body)
    return layout(ws.name, main, user=user, script="/static/app/workspace.js",
                  data={"workspace-id": str(ws.id)})


def terminal_page(user: User, ws: Workspace, agent_id: str, agent_name: str,
                  assets: webassets.Assets) -> tuple[bytes, bool]:
    """The page and whether it needs inline styles (xterm.js present)."""
    title = f"{ws.name}.{agent_name}"
    back = f'<a href="{esc(_workspace_link(ws))}">{esc(ws.name)}</a> › {esc(agent_name)}'
    if not assets.terminal_available:
        main = (f"<p>{back}</p>\n<h1>Terminal unavailable</h1>\n<p>xterm.js is not installed on "
                "this server: run <code>npm ci --prefix web</code> and restart it.</p>")
        return layout(title, main, user=user), False
    main = (
        f'<div class="terminal-bar"><span>{back}</span>'
        '<span id="terminal-state" class="state">connecting…</span>'
        '<span id="terminal-path" class="muted"></span></div>\n'
        '<div id="terminal"></div>'
    )
    page = layout(title, main, user=user, script="/static/app/terminal.js",
                  styles=(assets.vendor_urls["xterm.css"],),
                  data={"agent-id": agent_id, "xterm": assets.vendor_urls["xterm.mjs"],
                        "fit": assets.vendor_urls["addon-fit.mjs"]})
    return page, True


def register(app: Klein) -> None:
    """Add the dashboard's pages and its static files to the API's Klein app."""

    @app.route("/login", methods=["GET"])
    async def login_form(self: DashboardHost, request: HTTPRequest) -> bytes:
        next_path = htmlpage.safe_next(_arg(request, b"next"))
        if await current_user(self, request) is not None:
            return htmlpage.redirect(request, next_path)
        return login_page(request, self.d.access_url, next_path)

    @app.route("/login", methods=["POST"])
    async def login_post(self: DashboardHost, request: HTTPRequest) -> bytes:
        if not same_site(request, self.d.access_url):
            return forbidden(request, self.d.access_url)
        next_path = htmlpage.safe_next(_arg(request, b"next"))
        login, password = _arg(request, b"email"), _arg(request, b"password")
        source = client_host(request, self.d.trusted_proxies)
        try:
            token = await self.authenticate(login, password, source)
        except APIError as err:
            reason = f"{err.message} ({err.detail})" if err.detail else err.message
            return login_page(request, self.d.access_url, next_path, reason, login, err.code)
        set_session_cookie(request, token, COOKIE_MAX_AGE)
        return htmlpage.redirect(request, next_path)

    @app.route("/logout", methods=["POST"])
    async def logout_post(self: DashboardHost, request: HTTPRequest) -> bytes:
        if not same_site(request, self.d.access_url):
            return forbidden(request, self.d.access_url)
        token = session_token_of(request)
        if token and await self.user_for_token(token) is not None:
            await self.end_session(token)
        set_session_cookie(request, "", 0)
        return htmlpage.redirect(request, "/login")

    @app.route("/workspaces", methods=["GET"])
    async def workspaces(self: DashboardHost, request: HTTPRequest) -> bytes:
        user = await current_user(self, request)
        if user is None:
            return to_login(request)
        return render(request, self.d.access_url, workspaces_page(user))

    async def own_workspace(self: DashboardHost, user: User, owner: str, name: str) -> Workspace | None:
        if owner != user.username:
            return None
        return cast(Workspace | None, await self.d.store.workspace_by_name(user.id, name))

    @app.route("/workspaces/<string:owner>/<string:name>", methods=["GET"])
    async def workspace(self: DashboardHost, request: HTTPRequest, owner: str, name: str) -> bytes:
        user = await current_user(self, request)
        if user is None:
            return to_login(request)
        ws = await own_workspace(self, user, owner, name)
        if ws is None:
            return htmlpage.not_found(request, self.d.access_url, user)
        return render(request, self.d.access_url, workspace_page(user, ws))

    @app.route("/workspaces/<string:owner>/<string:name>/<string:agent>/terminal", methods=["GET"])
    async def terminal(self: DashboardHost, request: HTTPRequest, owner: str, name: str, agent: str) -> bytes:
        user = await current_user(self, request)
        if user is None:
            return to_login(request)
        ws = await own_workspace(self, user, owner, name)
        found = next((a for a in ws.agents if a.name == agent), None) if ws is not None else None
        if ws is None or found is None:
            return htmlpage.not_found(request, self.d.access_url, user)
        page, inline = terminal_page(user, ws, str(found.id), found.name, webassets.default_assets())
        return render(request, self.d.access_url, page, inline_styles=inline)

    @app.route("/static/<path:rest>", methods=["GET", "HEAD"])
    def static(self: DashboardHost, request: HTTPRequest, rest: str) -> bytes:
        asset = webassets.default_assets().get("/static/" + rest)
        if asset is None:
            request.setResponseCode(404)
            request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
            request.setHeader(b"X-Content-Type-Options", b"nosniff")
            return b"Not found.\n"
        request.setHeader(b"Content-Type", asset.content_type)
        request.setHeader(b"Cache-Control", asset.cache_control)
        request.setHeader(b"X-Content-Type-Options", b"nosniff")
        return asset.body
