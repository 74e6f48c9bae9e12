"""The API routes of workspace apps: the auth redirect, shared ports and templates' caps on them.

- ``GET /api/v2/applications/auth-redirect?redirect_uri=`` — on the access URL, with the session
  cookie: 307 back to the subdomain app with a sealed app key (``appauth.py``); a 401 page when
  not logged in, a 400 page when ``redirect_uri`` is not an app's address here.
- ``GET /api/v2/workspaces/{id}/port-share`` — ``{"shares": [...]}``;
  ``POST`` ``{"agent_name", "port", "share_level", "protocol"}`` creates or changes one;
  ``DELETE`` ``{"agent_name", "port"}`` removes one. The workspace's owner only; the level may not
  be wider than the template's ``max_port_share_level``.
- ``PATCH /api/v2/templates/{id}/port-share`` ``{"max_port_share_level"}`` — site owners; existing
  shares wider than the new cap are narrowed to it.
"""

from __future__ import annotations

from typing import Any, Protocol, cast

from klein import Klein
from twisted.web.server import Request

from coderstack.server import htmlpage
from coderstack.server.appauth import Refused
from coderstack.server.appshare import SharingLevel, parse_level, within
from coderstack.server.appstore import AppStore, PortShare
from coderstack.server.errorpage import render_error_page
from coderstack.server.jsonhttp import (
    APIError,
    HTTPRequest,
    field,
    parse_uuid,
    read_json,
    write_json,
)
from coderstack.server.records import User, Workspace
from coderstack.wire.ports import MIN_FORWARDED_PORT


class AppsHost(Protocol):
    """What these routes need of the API whose Klein app they join."""

    d: Any
    app_store: AppStore

    async def my_workspace(self, request: HTTPRequest, workspace_id: str) -> Workspace: ...
    async def require_owner(self, request: HTTPRequest) -> User: ...


def _level(body: dict[str, Any], name: str) -> SharingLevel:
    try:
        return parse_level(field(body, name))
    except ValueError as e:
        raise APIError(400, f"Invalid {name}.", str(e)) from None


def _port(body: dict[str, Any]) -> int:
    port = body.get("port")
    if not isinstance(port, int) or isinstance(port, bool) or not MIN_FORWARDED_PORT <= port <= 65535:
        raise APIError(400, "Invalid port.", f"a port number from {MIN_FORWARDED_PORT} to 65535")
    return port


def _forget(host: AppsHost) -> None:
    if host.d.apps is not None:
        host.d.apps.forget_resolved()


def register(app: Klein) -> None:
    """Add the app routes to the API's Klein app."""

    @app.route("/api/v2/applications/auth-redirect", methods=["GET"])
    async def auth_redirect(self: AppsHost, request: HTTPRequest) -> bytes:
        router = self.d.apps
        if router is None or router.wildcard is None:
            raise APIError(404, "Subdomain apps are not enabled.", "the server has no --wildcard-access-url")
        try:
            location = await router.auth.auth_redirect(cast(Request, request))
        except Refused as r:
            if r.status == 401 and htmlpage.wants_page(request):
                # Not logged in here yet: the login form, which comes back to finish this.
                return htmlpage.redirect(request, htmlpage.login_location(cast(Request, request).uri))
            return render_error_page(cast(Request, request), r.status, r.title, r.detail)
        request.setResponseCode(307)
        request.setHeader(b"Location", location.encode())
        request.setHeader(b"Cache-Control", b"no-store")
        request.setHeader(b"Referrer-Policy", b"no-referrer")  # the sealed key is in the Location
        return b""

    @app.route("/api/v2/workspaces/<string:workspace_id>/port-share", methods=["GET"])
    async def list_port_shares(self: AppsHost, request: HTTPRequest, workspace_id: str) -> bytes:
        ws = await self.my_workspace(request, workspace_id)
        shares = await self.app_store.port_shares(ws.id)
        return write_json(request, {"shares": [s.to_json() for s in shares]})

    @app.route("/api/v2/workspaces/<string:workspace_id>/port-share", methods=["POST"])
    async def upsert_port_share(self: AppsHost, request: HTTPRequest, workspace_id: str) -> bytes:
        ws = await self.my_workspace(request, workspace_id)
        body = read_json(request)
        agent_name = field(body, "agent_name")
        if not any(a.name == agent_name for a in ws.agents):
            raise APIError(400, f"Workspace {ws.name!r} has no agent {agent_name!r}.",
                           "agents: " + ", ".join(a.name for a in ws.agents))
        port = _port(body)
        level = _level(body, "share_level")
        protocol = field(body, "protocol", required=False, default="http")
        if protocol not in ("http", "https"):
            raise APIError(400, "Invalid protocol.", "http or https")
        maximum = await self.app_store.max_port_share_level(ws.template_id)
        if not within(level, maximum):
            raise APIError(400, f"The template caps port sharing at {maximum!r}.",
                           f"share at {maximum!r} or narrower")
        share = await self.app_store.upsert_port_share(PortShare(ws.id, agent_name, port, level, protocol))
        _forget(self)
        return write_json(request, share.to_json())

    @app.route("/api/v2/workspaces/<string:workspace_id>/port-share", methods=["DELETE"])
    async def delete_port_share(self: AppsHost, request: HTTPRequest, workspace_id: str) -> bytes:
        ws = await self.my_workspace(request, workspace_id)
        body = read_json(request)
        agent_name, port = field(body, "agent_name"), _port(body)
        if not await self.app_store.delete_port_share(ws.id, agent_name, port):
            raise APIError(404, f"Port {port} of agent {agent_name!r} is not shared.")
        _forget(self)
        return write_json(request, {"message": f"Port {port} is no longer shared."})

    @app.route("/api/v2/templates/<string:template_id>/port-share", methods=["PATCH"])
    async def template_port_share(self: AppsHost, request: HTTPRequest, template_id: str) -> bytes:
        await self.require_owner(request)
        template = await self.d.store.template(parse_uuid(template_id, "template id"))
        if template is None:
            raise APIError(404, "Template not found.", template_id)
        level = _level(read_json(request), "max_port_share_level")
        await self.app_store.set_max_port_share_level(template.id, level)
        _forget(self)
        return write_json(request, {"template_id": str(template.id), "max_port_share_level": level})
