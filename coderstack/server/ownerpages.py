"""The dashboard's pages for owners: templates, users and the deployment's health.

- ``/templates``: every template, its active version and how many workspaces use it.
- ``/users``: every account, its roles and status; Suspend / Activate buttons call the API
  (``PUT /api/v2/users/{name}/status/...``) from ``users.js``.
- ``/health``: the health report (:mod:`coderstack.server.health`), run when the page is asked
  for; the same JSON is ``GET /api/v2/debug/health``.

A member asking for one gets the 404 page, as for anything else that is not theirs; anonymous
visitors go to the login form. Pages are rendered whole on the server (no polling): they change
when someone changes them.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Protocol

from klein import Klein

from coderstack.server import dashboard, healthcheck, htmlpage
from coderstack.server.htmlpage import esc, layout, render
from coderstack.server.jsonhttp import HTTPRequest, session_token_of
from coderstack.server.records import SUSPENDED, Template, User, Workspace

_SEVERITY_CLASS = {"ok": "state ok", "warning": "state warn", "error": "state bad"}


class OwnerPagesHost(dashboard.DashboardHost, Protocol):
    pass


def _when(value: Any) -> str:
    return value.strftime("%Y-%m-%d %H:%M UTC") if value else "—"


def templates_page(user: User, templates: list[Template], workspaces: list[Workspace]) -> bytes:
    used = Counter(ws.template_id for ws in workspaces if ws.template_id is not None)
    rows = "".join(
        f'<tr data-template="{esc(t.name)}"><td>{esc(t.name)}</td>'
        f'<td>{esc(t.active_version.number if t.active_version else "—")}</td>'
        f"<td>{used[t.id]}</td><td>{esc(_when(t.updated_at))}</td></tr>\n"
        for t in templates
    ) or '<tr><td colspan="4" class="muted">No templates yet: coderstack templates push DIR</td></tr>'
    main = ('<h1>Templates</h1>\n<table id="templates"><thead><tr><th>Name</th><th>Active version</th>'
            f"<th>Workspaces</th><th>Updated</th></tr></thead>\n<tbody>\n{rows}</tbody></table>")
    return layout("Templates", main, user=user)


def users_page(user: User, users: list[User]) -> bytes:
    rows = []
    for u in users:
        status = "suspended" if u.is_suspended else "active"
        roles = ", ".join(r for r in u.roles if r != SUSPENDED) or "member"
        if u.id == user.id:
            action = '<span class="muted">you</span>'
        else:
            verb = "activate" if u.is_suspended else "suspend"
            action = (f'<button type="button" class="user-status" data-user="{esc(u.username)}" '
                      f'data-action="{verb}">{verb.capitalize()}</button>')
        rows.append(
            f'<tr data-user="{esc(u.username)}"><td>{esc(u.username)}</td><td>{esc(u.email)}</td>'
            f'<td>{esc(roles)}</td><td class="status-{status}">{status}</td>'
            f"<td>{esc(_when(u.created_at))}</td><td>{action}</td></tr>\n"
        )
    main = ('<h1>Users</h1>\n<p class="error" id="users-error" role="alert" hidden></p>\n'
            '<table id="users"><thead><tr><th>Username</th><th>Email</th><th>Roles</th><th>Status</th>'
            f"<th>Created</th><th></th></tr></thead>\n<tbody>\n{''.join(rows)}</tbody></table>")
    return layout("Users", main, user=user, script="/static/app/users.js")


def _badge(severity: str) -> str:
    return f'<span class="{_SEVERITY_CLASS.get(severity, "state")}">{esc(severity)}</span>'


def _warnings(section: dict[str, Any]) -> str:
    items = "".join(f"<li>{esc(w['code'])}: {esc(w['message'])}</li>" for w in section.get("warnings", []))
    return f'<ul class="warnings">{items}</ul>' if items else ""


def health_page(user: User, report: dict[str, Any]) -> bytes:
    access, db, ws, derp = report["access_url"], report["database"], report["websocket"], report["derp"]
    checks = [
        ("access_url", "Access URL", f"{esc(access['access_url'])}/healthz: "
         + (f"HTTP {access['status_code']} {esc(access['healthz_response'])}" if access["reachable"]
            else esc(access["error"] or "unreachable")), access),
        ("database", "Database", f"round trip {esc(db['latency'])} (threshold {db['threshold_ms']} ms)"
         if db["reachable"] else esc(db["error"] or "unreachable"), db),
        ("websocket", "Websocket", "echo through the access URL" + ("" if ws["error"] is None
                                                                    else f": {esc(ws['error'])}"), ws),
    ]
    rows = [
        f'<tr data-check="{key}"><th>{name}</th><td>{_badge(s["severity"])}</td><td>{text}{_warnings(s)}</td></tr>\n'
        for key, name, text, s in checks
    ]
    for region_id, region in sorted(derp.get("regions", {}).items(), key=lambda kv: int(kv[0])):
        nodes = []
        for node in region.get("node_reports", []):
            stun = node.get("stun", {})
            stun_text = ("STUN ok" if stun.get("CanSTUN") else f"STUN: {stun.get('Error') or 'no answer'}"
                         if stun.get("Enabled") else "no STUN")
            if node["node"].get("STUNOnly"):
                relay = "STUN only"
            elif node.get("can_exchange_messages"):
                relay = f"relay ping {node['round_trip_ping']}" + (" (websocket)" if node.get("uses_websocket") else "")
            else:
                relay = f"relay: {node.get('error') or 'not checked'}"
            nodes.append(f"{esc(node['node'].get('Name', '?'))}: {esc(relay)}, {esc(stun_text)}")
        name = region.get("region", {}).get("RegionName") or region_id
        rows.append(
            f'<tr data-check="derp-{esc(region_id)}"><th>DERP region {esc(region_id)} ({esc(name)})</th>'
            f'<td>{_badge(region["severity"])}</td><td>{"<br>".join(nodes)}{_warnings(region)}</td></tr>\n'
        )
    rows.append(f'<tr data-check="derp"><th>DERP and STUN overall</th><td>{_badge(derp["severity"])}</td>'
                f"<td>{_warnings(derp) or 'every region answered'}</td></tr>\n")
    main = (
        f'<h1>Health {_badge(report["severity"])}</h1>\n'
        f'<p class="muted">Checked {esc(report["time"])} by coderstack {esc(report["coder_version"])} · '
        '<a href="/health">Check again</a> · <a href="/api/v2/debug/health">JSON</a></p>\n'
        f'<table id="health"><tbody>\n{"".join(rows)}</tbody></table>'
    )
    return layout("Health", main, user=user)


def register(app: Klein) -> None:
    """Add the owners' pages to the API's Klein app."""

    async def owner(self: OwnerPagesHost, request: HTTPRequest) -> tuple[User | None, bytes | None]:
        user = await dashboard.current_user(self, request)
        if user is None:
            return None, dashboard.to_login(request)
        if not user.is_owner:
            return None, htmlpage.not_found(request, self.d.access_url, user)
        return user, None

    @app.route("/templates", methods=["GET"])
    async def templates(self: OwnerPagesHost, request: HTTPRequest) -> bytes:
        user, refused = await owner(self, request)
        if user is None:
            return refused or b""
        found = await self.d.store.list_templates()
        workspaces = await self.d.store.list_workspaces()
        return render(request, self.d.access_url, templates_page(user, found, workspaces))

    @app.route("/users", methods=["GET"])
    async def users(self: OwnerPagesHost, request: HTTPRequest) -> bytes:
        user, refused = await owner(self, request)
        if user is None:
            return refused or b""
        return render(request, self.d.access_url, users_page(user, await self.d.store.list_users()))

    @app.route("/health", methods=["GET"])
    async def health(self: OwnerPagesHost, request: HTTPRequest) -> bytes:
        user, refused = await owner(self, request)
        if user is None:
            return refused or b""
        report = await healthcheck.run(self.d.reactor, self.d, session_token_of(request) or "")
        return render(request, self.d.access_url, health_page(user, report))
