"""Workspace apps through the server: which app a browser request names, whether the requester
may open it, and handing it to the proxy over the server's own tailnet.

Two ways to name an app (``appurl.py`` parses both):

- path-based, on the access URL: ``/@{user}/{workspace}[.{agent}]/apps/{slug}/...`` (off with
  ``--disable-path-apps``: such an app shares the dashboard's origin and cookie);
- subdomain, under ``--wildcard-access-url``:
  ``{slug | port[s]}--{agent}--{workspace}--{user}.{base}``, also for any listening port from 9 up
  (a trailing ``s`` means the upstream speaks HTTPS).

Each request then goes through, in order: the URL (404 page when it names nothing; 307 to add a
path app's trailing slash); the subdomain app key exchange (``?coder_application_connect_api_key_…``
→ an app cookie on the app's host, 303 to the clean URL); the app itself (its agent, URL, sharing
level and health, looked up at most once per ``RESOLVE_TTL``); who asks and whether they may
(``appauth.py``: a fresh app ticket, or the session and ``appshare.may_open`` — a member never opens
another member's owner-level app, a subdomain visitor without a session is sent to the auth
redirect); the Origin of cookie-authenticated state changes and websocket upgrades; the agent
(502 page while it is not connected) and the app's health (503 page while unhealthy or starting);
and finally ``AppProxy.proxy`` over a tunnel from ``ServerTailnet.connect``, with coderstack's own
cookies and token header stripped.

Every refusal is a small HTML page (``errorpage.py``), never a traceback or JSON.
"""

from __future__ import annotations

import dataclasses
import functools
import uuid
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import urlsplit

from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request

from coderstack.server import appshare, htmlpage
from coderstack.server.appauth import STRIPPED_COOKIES, AppAuth, Refused, Viewer
from coderstack.server.appkeys import SUBDOMAIN_APP_COOKIE
from coderstack.server.appproxy import AppProxy, Forwarded, Upstream, UpstreamUnavailable
from coderstack.server.appstore import AppStore
from coderstack.server.appurl import (
    AppTarget,
    AppURLError,
    WildcardHost,
    parse_path_app,
    parse_subdomain_label,
    path_app_url,
    subdomain_app_url,
)
from coderstack.server.errorpage import render_error_page
from coderstack.server.jsonhttp import client_of
from coderstack.server.records import Agent, Workspace
from coderstack.server.servertailnet import AgentUnreachable
from coderstack.wire.ports import MIN_FORWARDED_PORT

log = Logger()

#: Host headers whose app label is remembered at most (see AppRouter.subdomain_label).
HOST_LABELS = 1024
_LOOPBACK_HOSTS = frozenset(("localhost", "127.0.0.1", "::1", "[::1]"))
#: How long a resolved app (its agent, URL, sharing level, health) is reused before the next
#: request looks it up again: a burst of requests costs one lookup, a change shows within this.
RESOLVE_TTL = 2.0


class _Redirect(Exception):
    def __init__(self, location: str, status: int = 307, cookie: tuple[str, str] | None = None) -> None:
        super().__init__(location)
        self.location, self.status, self.cookie = location, status, cookie


@dataclass(frozen=True)
class ResolvedApp:
    """What a request named, found: the workspace, its agent and where the app listens."""

    target: AppTarget
    workspace: Workspace
    agent: Agent
    level: appshare.SharingLevel
    upstream_url: str
    health: str  # healthy | unhealthy | initializing | disabled

    @functools.cached_property
    def agent_key(self) -> str:
        """The agent's id as tickets name it."""
        return str(self.agent.id)


class AppRouter:
    """Finds the app a request names and serves it (see the module docstring)."""

    def __init__(self, api: Any, proxy: AppProxy, auth: AppAuth, store: AppStore, *,
                 wildcard: WildcardHost | None, path_apps: bool = True) -> None:
        self.api = api
        self.proxy = proxy
        self.auth = auth
        self.store = store
        self.wildcard = wildcard
        self.path_apps = path_apps
        self._resource = _AppResource(self)
        self._resolved: dict[tuple[AppTarget, bool], tuple[float, ResolvedApp]] = {}
        # Lookups under way: the requests waiting for each (one lookup however many ask).
        self._resolving: dict[tuple[AppTarget, bool], list[Deferred[ResolvedApp]]] = {}
        self._generation = 0  # forget_resolved() since a lookup began: its answer is not kept
        self._labels: dict[bytes, str | None] = {}

    @property
    def d(self) -> Any:
        return self.api.d

    def forget_resolved(self) -> None:
        """Drop the resolved apps (a share changed here: show it now, not within RESOLVE_TTL)."""
        self._resolved.clear()
        self._generation += 1

    def set_wildcard(self, wildcard: WildcardHost | None) -> None:
        """Subdomain apps on (or off); set once the access URL, whose port it may take, is known."""
        self.wildcard = self.auth.wildcard = wildcard
        self._labels.clear()

    # -- which requests are ours -------------------------------------------------------------

    def subdomain_label(self, host: bytes | None) -> str | None:
        # Asked twice per request (claims, then _serve) for the same few hosts: remembered,
        # bounded since the Host header is the client's to choose.
        if self.wildcard is None or not host:
            return None
        try:
            return self._labels[host]
        except KeyError:
            pass
        label = self.wildcard.match(host.decode("latin-1"))
        if len(self._labels) >= HOST_LABELS:
            self._labels.clear()
        self._labels[host] = label
        return label

    def claims(self, host: bytes | None, path: bytes) -> bool:
        """Is this request an app's (decided from the Host header and the path alone, before
        its body is read: an app's body streams to the app instead of being buffered)?"""
        if self.subdomain_label(host) is not None:
            return True
        return path.startswith((b"/@", b"/%40"))

    def resource_for(self, request: Request) -> IResource | None:
        if not self.claims(request.getHeader(b"host"), request.path):
            return None
        return cast(IResource, self._resource)  # Resource implements IResource (zope)

    # -- serving -----------------------------------------------------------------------------

    async def serve(self, request: Request) -> None:
        try:
            await self._serve(request)
        except _Redirect as r:
            if r.cookie is not None:
                name, value = r.cookie
                request.addCookie(name.encode(), value.encode(), path=b"/", httpOnly=True,
                                  sameSite="lax", secure=request.isSecure())
            request.setResponseCode(r.status)
            request.setHeader(b"Location", r.location.encode())
            request.setHeader(b"Cache-Control", b"no-store")
            request.finish()
        except Refused as p:
            self._page(request, p.status, p.title, p.detail)
        except Exception:
            log.failure("serving an app request for {path}", path=request.path)
            self._page(request, 500, "Something went wrong", "The server logged the cause.")

    def _page(self, request: Request, status: int, title: str, detail: str) -> None:
        if getattr(request, "finished", False) or getattr(request, "_disconnected", False):
            return
        body = render_error_page(request, status, title, detail)
        request.write(body)
        request.finish()

    async def _serve(self, request: Request) -> None:
        label = self.subdomain_label(request.getHeader(b"host"))
        raw_path, _, query = request.uri.decode("latin-1").partition("?")
        subdomain = label is not None
        if label is not None:
            try:
                target = parse_subdomain_label(label)
            except AppURLError as e:
                raise Refused(404, "Application not found", str(e)) from None
            rest = raw_path or "/"
            self._exchange_key(request, query)
            identity, cookie_path = label, "/"
        else:
            if not self.path_apps:
                raise Refused(404, "Path-based apps are disabled",
                              "This deployment serves apps on their own subdomains only "
                              "(--disable-path-apps).")
            try:
                parsed = parse_path_app(raw_path)
            except AppURLError as e:
                raise Refused(404, "Application not found", str(e)) from None
            if parsed is None:
                raise Refused(404, "Application not found", "This is not an app's address.")
            target, rest_or_none = parsed
            if rest_or_none is None:
                raise _Redirect(raw_path + "/" + (f"?{query}" if query else ""), 307)
            rest = rest_or_none
            cookie_path = raw_path[: len(raw_path) - len(rest) + 1]
            identity = cookie_path

        app = await self._resolve(target, subdomain)
        ticket = self.auth.ticket(request, identity, app.agent_key, subdomain)
        if ticket is None:
            viewer = await self.auth.viewer(request, subdomain)
            self._authorize(request, app, viewer, subdomain)
            self.auth.issue_ticket(request, identity, viewer, app.agent_key, cookie_path)
        token, from_cookie = self.auth.credential(request, subdomain)
        if token is not None and from_cookie:
            self.auth.check_origin(request, subdomain)

        status, _seen = self.d.agent_status(app.agent)
        if status != "connected":
            raise Refused(502, "The workspace agent is not connected",
                          f"Agent {app.agent.name!r} of workspace {app.workspace.name!r} is {status}. "
                          "Start the workspace, or wait for its agent to connect.")
        if app.health == "unhealthy":
            raise Refused(503, "The app is unhealthy",
                          f"{target.app_label!r} fails its health check; it may have crashed.")
        if app.health == "initializing":
            raise Refused(503, "The app is starting",
                          f"{target.app_label!r} has not passed a health check yet.")
        await self._proxy(request, app, rest + (f"?{query}" if query else ""))

    # -- the steps ---------------------------------------------------------------------------

    def _exchange_key(self, request: Request, query: str) -> None:
        """The end of the auth redirect: the sealed key becomes this host's app cookie."""
        host = (request.getHeader(b"host") or b"").decode("latin-1")
        token, clean = self.auth.keys.exchange(query, host, self.d.reactor.seconds())
        if clean is None:
            return  # no key in the query
        if token is None:
            raise Refused(401, "This sign-in link is invalid or expired", "Open the app again.")
        scheme = "https" if request.isSecure() else "http"
        path = request.uri.split(b"?", 1)[0].decode("latin-1")
        raise _Redirect(f"{scheme}://{host}{path}{('?' + clean) if clean else ''}", 303,
                        cookie=(SUBDOMAIN_APP_COOKIE, token))

    def _authorize(self, request: Request, app: ResolvedApp, viewer: Viewer, subdomain: bool) -> None:
        user = viewer.user
        if appshare.may_open(app.level, viewer_id=user.id if user else None,
                             workspace_owner_id=app.workspace.owner_id):
            return
        if user is None:
            if subdomain:
                raise _Redirect(self.auth.login_redirect(request), 307)
            if htmlpage.wants_page(request):  # a browser: the login form, then back here
                raise _Redirect(htmlpage.login_location(request.uri), 303)
            raise Refused(401, "Log in to open this app",
                          f"Log in to {self.d.access_url} first; this app is not shared publicly.")
        # Someone else's owner-level app does not even admit it exists.
        raise Refused(404 if app.level == "owner" else 403, "You cannot open this app",
                      "It belongs to another user and is not shared with you.")

    async def _resolve(self, target: AppTarget, subdomain: bool) -> ResolvedApp:
        now = float(self.d.reactor.seconds())
        key = (target, subdomain)
        cached = self._resolved.get(key)
        if cached is not None and cached[0] > now:
            return cached[1]
        waiting = self._resolving.get(key)
        if waiting is not None:
            answer: Deferred[ResolvedApp] = Deferred()
            waiting.append(answer)
            return await answer
        waiting = self._resolving[key] = []
        generation = self._generation
        try:
            app = await self._lookup(target, subdomain)
        except BaseException as e:
            del self._resolving[key]
            for w in waiting:
                w.errback(e)
            raise
        del self._resolving[key]
        if generation == self._generation:
            if len(self._resolved) > 4096:
                self._resolved.clear()  # a crude bound; entries are cheap to find again
            self._resolved[key] = (now + RESOLVE_TTL, app)
        for w in waiting:
            w.callback(app)
        return app

    async def _lookup(self, target: AppTarget, subdomain: bool) -> ResolvedApp:
        missing = Refused(404, "Application not found",
                          "No such workspace app (or it is not shared with you).")
        found = await self.d.store.user_by_login(target.username)
        if found is None or found[0].username.lower() != target.username:
            raise missing
        owner = found[0]
        ws = await self.d.store.workspace_by_name(owner.id, target.workspace)
        if ws is None:
            raise missing
        agent = _agent_named(ws, target.agent)
        if agent is None:
            raise Refused(404, "Application not found",
                          "Name the agent: the workspace has several."
                          if target.agent is None and len(ws.agents) > 1 else "The workspace has no such agent.")
        if target.port is not None:
            if target.port < MIN_FORWARDED_PORT:
                raise Refused(404, "Application not found",
                              f"Ports below {MIN_FORWARDED_PORT} are the agent's own and cannot be opened.")
            shared = await self.store.port_share(ws.id, agent.name, target.port)
            level: appshare.SharingLevel = shared.share_level if shared is not None else "owner"
            scheme = "https" if target.https else "http"
            return ResolvedApp(target, ws, agent, level, f"{scheme}://127.0.0.1:{target.port}", "disabled")
        state = await self.api.agent_state.state(agent.id)
        app = next((a for a in state.spec["apps"] if a["slug"] == target.slug), None)
        if app is None:
            raise missing
        if app.get("external") or not app.get("url"):
            raise Refused(404, "This app is not served through the server",
                          "It opens on your own machine (an external app) or runs a command.")
        if app.get("subdomain") and not subdomain:
            if self.wildcard is None:
                raise Refused(404, "This app needs subdomain apps",
                              "It is served on its own subdomain, which this deployment has not set up "
                              "(--wildcard-access-url).")
            named = dataclasses.replace(target, agent=agent.name)
            raise _Redirect(subdomain_app_url(_scheme_of(self.d.access_url), self.wildcard, named), 307)
        if not app.get("subdomain") and subdomain:
            raise missing  # a path app is only served on the access URL
        try:
            level = appshare.parse_level(app.get("sharing_level") or "owner")
        except ValueError:
            level = "owner"
        return ResolvedApp(target, ws, agent, level, app["url"], app.get("health", "disabled"))

    async def _proxy(self, request: Request, app: ResolvedApp, path: str) -> None:
        scheme, host_name, port, url_path, url_query = _split_upstream(app.upstream_url)
        if scheme not in ("http", "https") or host_name not in _LOOPBACK_HOSTS:
            raise Refused(502, "The app's URL cannot be reached",
                          "Apps are reached on the workspace's loopback (http://localhost:PORT).")
        if port < MIN_FORWARDED_PORT:
            raise Refused(502, "The app's URL cannot be reached", f"Port {port} is the agent's own.")
        agent_id: uuid.UUID = app.agent.id
        tailnet = self.d.tailnet

        async def connect() -> Any:
            try:
                return await tailnet.connect(agent_id, port)
            except AgentUnreachable as e:
                raise UpstreamUnavailable(502, "The workspace agent cannot be reached", str(e)) from None

        host = (request.getHeader(b"host") or b"").decode("latin-1")
        upstream = Upstream(scheme=scheme, host_header=host, base_path=url_path.rstrip("/"),
                            default_query=url_query)
        # Behind a trusted load balancer the app sees the client first, then each proxy.
        client = client_of(request, self.d.trusted_proxies, unknown="")
        forwarded = Forwarded(for_=client.forwarded_for, proto="https" if request.isSecure() else "http",
                              host=host)
        self.proxy.proxy(request, key=(agent_id, port, scheme), connect=connect, upstream=upstream,
                         path=path.encode("latin-1"), forwarded=forwarded, strip_cookies=STRIPPED_COOKIES)

    # -- URLs for the API and the CLI --------------------------------------------------------

    def app_url(self, owner: str, workspace: str, agent: str, app: dict[str, Any]) -> str | None:
        """Where a browser opens ``app`` (None: it is not served through the server)."""
        if app.get("external"):
            return str(app.get("url") or "") or None
        if not app.get("url"):
            return None
        target = AppTarget(username=owner, workspace=workspace, agent=agent, slug=app["slug"], port=None)
        if app.get("subdomain"):
            if self.wildcard is None:
                return None
            return subdomain_app_url(_scheme_of(self.d.access_url), self.wildcard, target)
        if not self.path_apps:
            return None
        return path_app_url(self.d.access_url, target)


@functools.lru_cache(maxsize=1024)
def _split_upstream(url: str) -> tuple[str, str, int, str, str]:
    """An app URL's scheme and host (lower-cased), port (the scheme's by default), path and
    query; the same few URLs come with every request."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    return (scheme, (parts.hostname or "").lower(), parts.port or (443 if scheme == "https" else 80),
            parts.path, parts.query)


def _agent_named(ws: Workspace, name: str | None) -> Agent | None:
    if name is None:
        return ws.agents[0] if len(ws.agents) == 1 else None
    return next((a for a in ws.agents if a.name == name), None)


def _scheme_of(url: str) -> str:
    return urlsplit(url).scheme or "http"


def _origin_of(url: str) -> str:
    u = urlsplit(url)
    return f"{u.scheme}://{u.netloc}".lower()


class _AppResource(Resource):
    isLeaf = True

    def __init__(self, router: AppRouter) -> None:
        super().__init__()
        self.router = router

    def render(self, request: Request) -> Any:
        d = Deferred.fromCoroutine(self.router.serve(request))
        d.addErrback(lambda f: log.failure("app request", f))
        return NOT_DONE_YET
