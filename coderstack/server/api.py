"""The /api/v2 control plane (Klein).

Every route authenticates: a session token (users) or an agent token (agents) in the
``Coder-Session-Token`` header (or the ``coder_session_token`` cookie). Bodies and errors are
JSON as :mod:`coderstack.server.jsonhttp` describes; secrets never appear in them or in logs.
"""

from __future__ import annotations

import json
import math
import re
import uuid
from datetime import timedelta
from typing import Any

from klein import Klein
from sqlalchemy import exc as sa_exc
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from werkzeug.exceptions import MethodNotAllowed, NotFound

from coderstack import __version__
from coderstack.derp.mapstream import derp_map_stream_resource
from coderstack.server import (
    agentstate,
    agentviews,
    appsapi,
    auth,
    browseronly,
    dashboard,
    healthcheck,
    healthws,
    livesessions,
    ownerpages,
    ptyapi,
    replicasapi,
    samesite,
    templatepush,
    webassets,
)
from coderstack.server.agentevents import AgentEvents
from coderstack.server.agentstore import AgentStateStore
from coderstack.server.appstore import AppStore
from coderstack.server.builds import Builder
from coderstack.server.deployment import Deployment
from coderstack.server.hashpool import PoolBusy
from coderstack.server.jsonhttp import (
    APIError,
    HTTPRequest,
    client_host,
    field,
    parse_json_object,
    parse_uuid,
    query_flag,
    query_value,
    read_body,
    read_json,
    session_token_of,
    set_headers,
    write_error,
    write_json,
)
from coderstack.server.livesessions import Credential
from coderstack.server.loginlimit import Refused
from coderstack.server.loginstore import begin_login, end_login
from coderstack.server.ptyproxy import PtyCounters
from coderstack.server.records import Agent, Build, User, Workspace, now
from coderstack.server.store import Conflict
from coderstack.server.tferrors import TemplateError

log = Logger()

# Matched with fullmatch: ``$`` alone would also accept a trailing newline ("box\n").
NAME_RE = re.compile(r"[a-zA-Z0-9](?:[a-zA-Z0-9-]{0,30}[a-zA-Z0-9])?")
SESSION_LIFETIME = timedelta(days=7)
#: A template push carries its files (base64) in the JSON body.
MAX_TEMPLATE_BODY = 8 * 1024 * 1024
#: Seconds a client is told to wait when the database does not answer.
DATABASE_RETRY_AFTER = 2


def valid_name(value: str, what: str) -> str:
    if not NAME_RE.fullmatch(value):
        raise APIError(
            400,
            f"Invalid {what} {value[:40]!r}.",
            "1-32 letters, digits or hyphens, not starting or ending with a hyphen",
        )
    return value


def iso(t: Any) -> str | None:
    return t.isoformat() if t is not None else None


class API(agentstate.ReportsHost, agentviews.ViewsHost):
    """The routes; those about agents' reports join from :mod:`~coderstack.server.agentstate`
    and :mod:`~coderstack.server.agentviews`, whose host protocols this class fulfils."""

    app = Klein()

    def __init__(self, deployment: Deployment, builder: Builder | None = None) -> None:
        self.d = deployment
        #: Runs template builds (None: terraform is not available, templates are disabled).
        self.builder = builder
        #: What builds tell agents and what agents report (agentstate.py, agentviews.py).
        self.agent_state = AgentStateStore(deployment.store)
        self.app_store = AppStore(deployment.store)
        self.pty_counters = PtyCounters()
        self.agent_events = AgentEvents()
        # The dashboard's browser files: read now, so a missing npm install is logged at start-up.
        webassets.default_assets()

    @property
    def clock(self) -> IReactorTime:
        return self.d.reactor

    # -- authentication ----------------------------------------------------------------------

    async def user_for_token(self, token: str | None) -> User | None:
        found = await self.session_for_token(token)
        return None if found is None else found[0]

    async def session_for_token(self, token: str | None) -> tuple[User, Credential] | None:
        """The (active) user a session token belongs to, and the credential its connections are
        filed under in the live-session registry."""
        if not token:
            return None
        parts = auth.split_session_token(token)
        if parts is None:
            return None
        key_id, secret = parts
        found = await self.d.store.api_key(key_id)
        if found is None:
            return None
        hashed, expires_at, user = found
        if not auth.secret_matches(secret, hashed) or expires_at < now() or user.is_suspended:
            return None
        return user, Credential(livesessions.token_hash(token), user_id=user.id,
                                expires_at=expires_at.timestamp())

    async def credential_for_token(self, token: str | None) -> Credential | None:
        """The credential of a valid agent or session token, or None."""
        found = await self.agent_for_token(token)
        if found is not None and token:
            return Credential(livesessions.token_hash(token), agent_id=found[0].id)
        session = await self.session_for_token(token)
        return None if session is None else session[1]

    async def agent_for_token(self, token: str | None) -> tuple[Agent, Workspace] | None:
        if not token or not auth.looks_like_agent_token(token):
            return None
        return await self.d.store.agent_by_token_hash(auth.hash_agent_token(token))

    async def require_user(self, request: HTTPRequest) -> User:
        token = session_token_of(request)
        if not token:
            raise APIError(
                401, "You must be logged in to do this.",
                f"send a session token in the {auth.SESSION_HEADER} header",
            )
        user = await self.user_for_token(token)
        if user is None:
            raise APIError(401, "Invalid or expired session token.", "log in again")
        if samesite.cross_site_change(request, self.d.access_url):
            raise APIError(403, "Cross-site request refused.",
                           "a change made with the session cookie must come from this site's pages")
        return user

    async def require_owner(self, request: HTTPRequest) -> User:
        user = await self.require_user(request)
        if not user.is_owner:
            raise APIError(403, "Only an owner can do this.")
        return user

    async def require_agent(self, request: HTTPRequest) -> tuple[Agent, Workspace]:
        found = await self.agent_for_token(session_token_of(request))
        if found is None:
            raise APIError(401, "Invalid agent token.", "the workspace agent token is missing or unknown")
        return found

    def refuse_if_browser_only(self) -> None:
        """A CLI tunnel starts here; browser-only deployments refuse it."""
        if self.d.browser_only:
            raise APIError(403, browseronly.MESSAGE, browseronly.DETAIL)

    # -- errors ------------------------------------------------------------------------------

    @app.handle_errors(APIError)
    def _api_error(self, request: HTTPRequest, failure: Failure) -> bytes:
        return write_error(request, failure.value)

    @app.handle_errors(NotFound)
    def _not_found(self, request: HTTPRequest, failure: Failure) -> bytes:
        return write_json(request, {"message": "Route not found.", "detail": request.path.decode("ascii", "replace")}, 404)

    @app.handle_errors(MethodNotAllowed)
    def _bad_method(self, request: HTTPRequest, failure: Failure) -> bytes:
        return write_json(request, {"message": "Method not allowed.", "detail": request.method.decode("ascii", "replace")}, 405)

    @app.handle_errors(sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError)
    def _database_down(self, request: HTTPRequest, failure: Failure) -> bytes:
        # The database restarting or out of reach: a retryable 503 (the load balancer's health
        # check takes this replica out meanwhile), with the driver's words only in the log.
        # Only the driver's first line: later ones quote the statement and its parameters.
        why = (str(failure.value).strip().splitlines() or [type(failure.value).__name__])[0]
        log.warn("database unavailable serving {path}: {why}", path=request.path, why=why)
        return write_error(request, APIError(503, "The database is unavailable.",
                                             "try again shortly", retry_after=DATABASE_RETRY_AFTER))

    @app.handle_errors(Exception)
    def _internal(self, request: HTTPRequest, failure: Failure) -> bytes:
        # The exception's text stays in the log: it may quote internals (SQL, paths, data).
        log.failure("unhandled error serving {path}", failure, path=request.path)
        return write_json(request, {"message": "Internal error.", "detail": "the server logged the cause"}, 500)

    # -- health and build info ---------------------------------------------------------------

    @app.route("/healthz", methods=["GET", "HEAD"])
    async def healthz(self, request: HTTPRequest) -> bytes:
        """200 ``OK``; 503 while the database does not answer or this replica's heartbeats fail,
        so a load balancer sends requests to the other replicas (why is in the log and
        /api/v2/replicas)."""
        request.setHeader(b"Content-Type", b"text/plain")
        replicas = self.d.replicas
        if replicas is not None and not replicas.healthy:
            request.setResponseCode(503)
            return b"unhealthy: this replica has lost its database\n"
        if await self.d.database_check.problem() is not None:
            request.setResponseCode(503)
            return b"database unavailable"
        return b"OK"

    @app.route("/api/v2/buildinfo", methods=["GET"])
    def buildinfo(self, request: HTTPRequest) -> bytes:
        return write_json(request, {
            "version": __version__,
            "external_url": "https://github.com/coderstack",
            "dashboard_url": self.d.access_url,
            "agent_api_version": "1.0",
            "coordination_protocol": "coderstack.tailnet.v1",
            "derp_version": 2,
        })

    # -- users -------------------------------------------------------------------------------

    @app.route("/api/v2/users/first", methods=["GET"])
    async def first_user_status(self, request: HTTPRequest) -> bytes:
        if await self.d.store.count_users() == 0:
            raise APIError(404, "The initial user has not been created!")
        return write_json(request, {"message": "The initial user has already been created!"})

    @app.route("/api/v2/users/first", methods=["POST"])
    async def first_user(self, request: HTTPRequest) -> bytes:
        body = read_json(request)
        username, email, password = self._new_user_fields(body)
        # Checked before the (slow) hash, so a flood of these after set-up costs nothing.
        if await self.d.store.count_users() != 0:
            raise APIError(409, "The initial user has already been created.")
        pw_hash = await self._hash(password)
        try:
            user = await self.d.store.create_user(
                username, email, pw_hash, roles=("owner",), name=field(body, "name", required=False),
                only_if_first=True,
            )
        except Conflict as err:
            raise APIError(409, "The initial user has already been created.", str(err)) from None
        return write_json(request, {"user_id": str(user.id)}, 201)

    def _new_user_fields(self, body: dict[str, Any]) -> tuple[str, str, str]:
        username = valid_name(field(body, "username"), "username")
        email = field(body, "email")
        if "@" not in email or len(email) > 320 or email.strip() != email:
            raise APIError(400, f"Invalid email {email!r}.")
        password = field(body, "password")
        if len(password) < 8:
            raise APIError(400, "Password is too short.", "use at least 8 characters")
        return username, email, password

    @app.route("/api/v2/users/login", methods=["POST"])
    async def login(self, request: HTTPRequest) -> bytes:
        body = read_json(request)
        source = client_host(request, self.d.trusted_proxies)
        token = await self.authenticate(field(body, "email"), field(body, "password"), source)
        return write_json(request, {"session_token": token}, 201)

    async def authenticate(self, login: str, password: str, source: str) -> str:
        """A new session token for this email or username and password (the login form uses
        it too); APIError 401/429/503 otherwise."""
        found = await self.d.store.user_by_login(login)
        # Limits count per user (an email and a username are one account), else per name given.
        limiter, table = self.d.logins, self.d.login_table
        attempt = await begin_login(limiter, table, str(found[0].id) if found else login, source)
        if isinstance(attempt, Refused):
            raise APIError(
                429, "Too many login attempts.",
                f"try again in {max(1, math.ceil(attempt.retry_after))} s", attempt.retry_after,
            )
        try:
            # Verify a dummy hash for unknown users too, so timing does not reveal who exists.
            stored = found[1] if found else self.d.dummy_password_hash
            ok = await self._verify(password, stored)
        except BaseException:
            await end_login(limiter, table, attempt, None)  # busy or broken: not the caller's failure
            raise
        if not found or not ok:
            await end_login(limiter, table, attempt, False)
            raise APIError(401, "Incorrect email or password.")
        if found[0].is_suspended:
            # The right password: not a guess to count.
            await end_login(limiter, table, attempt, None)
            raise APIError(401, "Your account is suspended.", "ask an owner to activate it")
        await end_login(limiter, table, attempt, True)
        return await self.issue_session(found[0])

    async def _hash(self, password: str) -> str:
        try:
            return await self.d.hash_password(password)
        except PoolBusy:
            raise APIError(503, "The server is busy checking passwords.", "try again shortly", 1.0) from None

    async def _verify(self, password: str, stored: str) -> bool:
        try:
            return await self.d.verify_password(password, stored)
        except PoolBusy:
            raise APIError(503, "The server is busy checking passwords.", "try again shortly", 1.0) from None

    async def issue_session(self, user: User) -> str:
        token, key_id, hashed = auth.new_session_token()
        await self.d.store.insert_api_key(key_id, user.id, hashed, now() + SESSION_LIFETIME)
        return token

    @app.route("/api/v2/users/logout", methods=["POST"])
    async def logout(self, request: HTTPRequest) -> bytes:
        await self.require_user(request)
        await self.end_session(session_token_of(request) or "")
        return write_json(request, {"message": "Logged out."})

    async def end_session(self, token: str) -> None:
        """Delete the session's key and close the connections it opened."""
        parts = auth.split_session_token(token)
        if parts:
            await self.d.store.delete_api_key(parts[0])
            self.d.revocations.token(livesessions.token_hash(token), livesessions.REASON_LOGGED_OUT)

    @app.route("/api/v2/users/me", methods=["GET"])
    async def me(self, request: HTTPRequest) -> bytes:
        user = await self.require_user(request)
        return write_json(request, user.to_json())

    @app.route("/api/v2/users", methods=["GET"])
    async def list_users(self, request: HTTPRequest) -> bytes:
        await self.require_owner(request)
        users = await self.d.store.list_users()
        return write_json(request, {"users": [u.to_json() for u in users], "count": len(users)})

    @app.route("/api/v2/users", methods=["POST"])
    async def create_user(self, request: HTTPRequest) -> bytes:
        await self.require_owner(request)
        body = read_json(request)
        username, email, password = self._new_user_fields(body)
        pw_hash = await self._hash(password)
        try:
            user = await self.d.store.create_user(
                username, email, pw_hash, name=field(body, "name", required=False)
            )
        except Conflict as err:
            raise APIError(409, "User already exists.", str(err)) from None
        return write_json(request, user.to_json(), 201)

    async def _other_user(self, request: HTTPRequest, who: str) -> tuple[User, User]:
        """(the owner asking, the user named by username or id); never the owner itself."""
        me = await self.require_owner(request)
        users = await self.d.store.list_users()
        target = next((u for u in users if who in (u.username, str(u.id))), None)
        if target is None:
            raise APIError(404, f"User {who!r} not found.")
        if target.id == me.id:
            raise APIError(400, "You cannot do this to yourself.", "ask another owner")
        return me, target

    @app.route("/api/v2/users/<string:who>/status/suspend", methods=["PUT"])
    async def suspend_user(self, request: HTTPRequest, who: str) -> bytes:
        user = await self._set_suspended(request, who, True)
        self.d.revocations.user(user.id, livesessions.REASON_USER_SUSPENDED)
        return write_json(request, user.to_json())

    @app.route("/api/v2/users/<string:who>/status/activate", methods=["PUT"])
    async def activate_user(self, request: HTTPRequest, who: str) -> bytes:
        user = await self._set_suspended(request, who, False)
        return write_json(request, user.to_json())

    async def _set_suspended(self, request: HTTPRequest, who: str, suspended: bool) -> User:
        _me, target = await self._other_user(request, who)
        user = await self.d.store.set_user_suspended(target.id, suspended)
        if user is None:
            raise APIError(404, f"User {who!r} not found.")
        return user

    @app.route("/api/v2/users/<string:who>", methods=["DELETE"])
    async def delete_user(self, request: HTTPRequest, who: str) -> bytes:
        _me, target = await self._other_user(request, who)
        try:
            await self.d.store.delete_user(target.id)
        except Conflict as err:
            raise APIError(409, f"User {target.username!r} cannot be deleted yet.", str(err)) from None
        self.d.revocations.user(target.id, livesessions.REASON_USER_DELETED)
        return write_json(request, {"message": f"User {target.username!r} deleted."})

    # -- workspaces --------------------------------------------------------------------------

    async def _owner_for(self, request: HTTPRequest, who: str) -> User:
        user = await self.require_user(request)
        if who in ("me", user.username, str(user.id)):
            return user
        raise APIError(403, "You can only manage your own workspaces.", f"user {who!r}")

    @app.route("/api/v2/users/<string:who>/workspaces", methods=["POST"])
    async def create_workspace(self, request: HTTPRequest, who: str) -> bytes:
        user = await self._owner_for(request, who)
        body = read_json(request)
        name = valid_name(field(body, "name"), "workspace name")
        template_name = field(body, "template_name", required=False)
        template_id = field(body, "template_id", required=False)
        if template_name or template_id:
            return await self._create_templated(request, user, name, template_name, template_id)
        token, token_hash = auth.new_agent_token()
        try:
            ws = await self.d.store.create_workspace(user.id, name, token_hash)
        except Conflict as err:
            raise APIError(409, f"Workspace {name!r} already exists.", str(err)) from None
        out = self.workspace_json(ws)
        # The agent token is shown once, here; only its hash is kept.
        out["agent_token"] = token
        return write_json(request, out, 201)

    @app.route("/api/v2/users/<string:who>/workspace/<string:name>", methods=["GET"])
    async def workspace_by_name(self, request: HTTPRequest, who: str, name: str) -> bytes:
        user = await self._owner_for(request, who)
        ws = await self.d.store.workspace_by_name(user.id, name)
        if ws is None:
            raise APIError(404, f"Workspace {name!r} not found.", f"owner {user.username}")
        return write_json(request, self.workspace_json(ws))

    @app.route("/api/v2/workspaces", methods=["GET"])
    async def list_workspaces(self, request: HTTPRequest) -> bytes:
        user = await self.require_user(request)
        everyone = query_flag(request, b"all") and user.is_owner
        found = await self.d.store.list_workspaces(None if everyone else user.id)
        return write_json(
            request, {"workspaces": [self.workspace_json(w) for w in found], "count": len(found)}
        )

    async def my_workspace(self, request: HTTPRequest, workspace_id: str) -> Workspace:
        user = await self.require_user(request)
        ws_id = parse_uuid(workspace_id, "workspace id")
        ws = await self.d.store.workspace(ws_id)
        if ws is None or ws.owner_id != user.id:
            # Other users' workspaces are indistinguishable from missing ones.
            raise APIError(404, "Workspace not found.", workspace_id)
        return ws

    @app.route("/api/v2/workspaces/<string:workspace_id>", methods=["GET"])
    async def get_workspace(self, request: HTTPRequest, workspace_id: str) -> bytes:
        ws = await self.my_workspace(request, workspace_id)
        return write_json(request, self.workspace_json(ws))

    @app.route("/api/v2/workspaces/<string:workspace_id>", methods=["DELETE"])
    async def delete_workspace(self, request: HTTPRequest, workspace_id: str) -> bytes:
        ws = await self.my_workspace(request, workspace_id)
        orphan = query_flag(request, b"orphan")
        if ws.template_id is not None and not orphan:
            raise APIError(
                409, "This workspace was built from a template: delete it with a destroy build.",
                "POST /api/v2/workspaces/{id}/builds {\"transition\": \"destroy\"}, or "
                "?orphan=true to forget it without running terraform",
            )
        if ws.latest_build is not None and not ws.latest_build.done:
            raise APIError(409, "A build of this workspace is running.", "wait for it to end")
        await self.d.store.delete_workspace(ws.id)
        for agent in ws.agents:
            self.d.agent_removed(agent.id)
        if ws.template_id is not None and self.builder is not None:
            await self.builder.remove_build_dir(ws.id)
        return write_json(request, {"message": f"Workspace {ws.name!r} deleted."})

    @app.route("/api/v2/workspaces/<string:workspace_id>/agent-token", methods=["POST"])
    async def rotate_agent_token(self, request: HTTPRequest, workspace_id: str) -> bytes:
        ws = await self.my_workspace(request, workspace_id)
        if ws.template_id is not None:
            raise APIError(
                409, "This workspace's agent tokens come from its template's builds.",
                "start the workspace again to restart its agents",
            )
        if not ws.agents:
            raise APIError(409, "This workspace has no agent.")
        agent = ws.agents[0]
        token, token_hash = auth.new_agent_token()
        await self.d.store.set_agent_token(agent.id, token_hash)
        # The old token stops working now: drop its live connection too.
        self.d.agent_removed(agent.id)
        return write_json(request, {"agent_id": str(agent.id), "agent_token": token}, 201)

    def workspace_json(self, ws: Workspace) -> dict[str, Any]:
        return {
            "id": str(ws.id),
            "name": ws.name,
            "owner_id": str(ws.owner_id),
            "owner_name": ws.owner_name,
            "template_id": str(ws.template_id) if ws.template_id else None,
            "template_name": ws.template_name,
            "latest_build": ws.latest_build.to_json() if ws.latest_build else None,
            "created_at": iso(ws.created_at),
            "updated_at": iso(ws.updated_at),
            "agents": [self.agent_json(a) for a in ws.agents],
        }

    def agent_json(self, agent: Agent) -> dict[str, Any]:
        status, last_seen = self.d.agent_status(agent)
        return {
            "id": str(agent.id),
            "name": agent.name,
            "status": status,
            "last_seen_at": iso(last_seen),
            "first_connected_at": iso(agent.first_connected_at),
            "last_connected_at": iso(agent.last_connected_at),
            "disconnected_at": iso(agent.disconnected_at),
            "operating_system": agent.os,
            "architecture": agent.arch,
            "directory": agent.directory,
            "ip": str(self.d.agent_address(agent.id)),
            # The URL the agent was told to use (its template's provider url), if built.
            "access_url": agent.access_url or self.d.agent_access_url(agent.id),
            "lifecycle_state": agent.lifecycle_state,
            "started_at": iso(agent.started_at),
            "ready_at": iso(agent.ready_at),
        }

    # -- templates and workspace builds (see builds.py) --------------------------------------

    def _require_builder(self) -> Builder:
        if self.builder is None:
            raise APIError(
                503, "Templates are not available on this server.",
                "terraform was not found when the server started",
            )
        return self.builder

    @app.route("/api/v2/templates", methods=["POST"])
    async def push_template(self, request: HTTPRequest) -> bytes:
        """Create a template, or add a version: {"name", "files": {file name: base64}}."""
        user = await self.require_owner(request)
        builder = self._require_builder()
        raw = read_body(request, MAX_TEMPLATE_BODY)

        def unpack() -> tuple[dict[str, Any], dict[str, bytes]]:
            body = parse_json_object(raw)
            try:
                return body, templatepush.parse_files(body.get("files"))
            except templatepush.PushRejected as err:
                raise APIError(err.code, err.message, err.detail) from None

        # JSON and base64 over megabytes: on a thread, so pings and other requests go on.
        reactor = self.d.reactor
        body, files = await deferToThreadPool(reactor, reactor.getThreadPool(), unpack)
        name = valid_name(field(body, "name"), "template name")
        try:
            kept = await builder.validate(files)
        except TemplateError as err:
            raise APIError(400, f"terraform {err.command} rejected the template.", err.message) from None
        template = await self.d.store.push_template(name, user.id, kept)
        out = template.to_json()
        out["files"] = sorted(kept)
        return write_json(request, out, 201)

    @app.route("/api/v2/templates", methods=["GET"])
    async def list_templates(self, request: HTTPRequest) -> bytes:
        await self.require_user(request)
        found = await self.d.store.list_templates()
        return write_json(request, {"templates": [t.to_json() for t in found], "count": len(found)})

    async def _create_templated(
        self, request: HTTPRequest, user: User, name: str, template_name: str, template_id: str
    ) -> bytes:
        builder = self._require_builder()
        if template_id:
            template = await self.d.store.template(parse_uuid(template_id, "template id"))
        else:
            template = await self.d.store.template_by_name(template_name)
        if template is None:
            raise APIError(404, f"Template {template_name or template_id!r} not found.")
        try:
            ws = await self.d.store.create_templated_workspace(user.id, name, template.id)
        except Conflict as err:
            raise APIError(409, f"Workspace {name!r} already exists.", str(err)) from None
        build = await builder.start(ws, "start", user)
        out = self.workspace_json(ws)
        out["latest_build"] = build.to_json()
        return write_json(request, out, 201)

    @app.route("/api/v2/workspaces/<string:workspace_id>/builds", methods=["POST"])
    async def create_build(self, request: HTTPRequest, workspace_id: str) -> bytes:
        """Start a build: {"transition": "start" | "stop" | "destroy"}."""
        ws = await self.my_workspace(request, workspace_id)
        user = await self.require_user(request)
        builder = self._require_builder()
        transition = field(read_json(request), "transition")
        if transition not in ("start", "stop", "destroy"):
            raise APIError(400, f"Invalid transition {transition!r}.", "start, stop or destroy")
        if ws.template_id is None:
            raise APIError(
                409, "This workspace has no template: there is nothing to build.",
                "its agent is started by hand; delete it with DELETE /api/v2/workspaces/{id}",
            )
        try:
            build = await builder.start(ws, transition, user)
        except Conflict as err:
            raise APIError(409, "Another build of this workspace is running.", str(err)) from None
        except LookupError as err:
            raise APIError(409, "The workspace's template is gone.", str(err)) from None
        return write_json(request, build.to_json(), 201)

    async def _my_build(self, request: HTTPRequest, build_id: str) -> tuple[Build, Any]:
        """The build (and its live log, if the server still has it) of one of my workspaces."""
        user = await self.require_user(request)
        bid = parse_uuid(build_id, "build id")
        live = self.builder.live_log(bid) if self.builder is not None else None
        if live is not None:
            if live.owner_id != user.id:
                raise APIError(404, "Build not found.", build_id)
            return live.build, live
        found = await self.d.store.build(bid)
        ws = await self.d.store.workspace(found[0].workspace_id) if found else None
        if found is None or ws is None or ws.owner_id != user.id:
            raise APIError(404, "Build not found.", build_id)
        return found[0], found[1]

    @app.route("/api/v2/workspacebuilds/<string:build_id>", methods=["GET"])
    async def get_build(self, request: HTTPRequest, build_id: str) -> bytes:
        build, _ = await self._my_build(request, build_id)
        return write_json(request, build.to_json())

    @app.route("/api/v2/workspacebuilds/<string:build_id>/logs", methods=["GET"])
    async def build_logs(self, request: HTTPRequest, build_id: str) -> bytes:
        """The build's output as newline-delimited JSON (see builds.py); with ?follow=true the
        response stays open and streams lines until the build ends."""
        build, logs = await self._my_build(request, build_id)
        follow = query_flag(request, b"follow")
        set_headers(request, b"application/x-ndjson")

        def line(obj: Any) -> bytes:
            return json.dumps(obj).encode() + b"\n"

        if isinstance(logs, str):  # finished and only in the store
            out = b"".join(line({"output": x}) for x in logs.splitlines())
            return out + line({"build": build.to_json()})
        if not follow:
            out = b"".join(line({"output": x}) for x in list(logs.lines))
            return out + line({"build": logs.build.to_json()})
        ended: Deferred[Build | None] = Deferred()
        gone = False

        def lost(_: Any) -> None:
            nonlocal gone
            gone = True
            stop()
            if not ended.called:
                ended.callback(None)

        def on_line(text: str) -> None:
            if not gone:
                request.write(line({"output": text}))

        def on_done(final: Build) -> None:
            if not ended.called:
                ended.callback(final)

        stop = logs.follow(on_line, on_done)
        request.notifyFinish().addErrback(lost)
        final = await ended
        if final is None:
            return b""
        return line({"build": final.to_json()})

    # -- agents ------------------------------------------------------------------------------

    @app.route("/api/v2/workspaceagents/me/manifest", methods=["GET"])
    async def manifest(self, request: HTTPRequest) -> bytes:
        agent, ws = await self.require_agent(request)
        return write_json(request, {
            "agent_id": str(agent.id),
            "agent_name": agent.name,
            "owner_name": ws.owner_name,
            "workspace_id": str(ws.id),
            "workspace_name": ws.name,
            "access_url": self.d.access_url,
            # The URL this agent was given (its template's provider url; see builds.py).
            "agent_url": agent.access_url or self.d.agent_access_url(agent.id),
            "derp_map": self.d.derp_map_json(),
            "derp_force_websockets": self.d.derp_force_websockets,
            "disable_direct_connections": self.d.block_direct,
            **await agentstate.manifest_fields(self.agent_state, agent),
        })

    @app.route("/api/v2/workspaceagents/me/coordinate", methods=["GET"])
    async def agent_coordinate(self, request: HTTPRequest) -> Any:
        agent, ws = await self.require_agent(request)
        credential = await self.credential_for_token(session_token_of(request))
        return self.d.coordinate_resource_for_agent(agent, ws, credential)

    @app.route("/api/v2/workspaceagents/connection", methods=["GET"])
    async def connection_generic(self, request: HTTPRequest) -> bytes:
        await self.require_user(request)
        return write_json(request, self.d.connection_info())

    async def my_agent(self, request: HTTPRequest, agent_id: str) -> tuple[User, Agent, Workspace]:
        user = await self.require_user(request)
        found = await self.d.store.agent(parse_uuid(agent_id, "agent id"))
        if found is None or found[1].owner_id != user.id:
            raise APIError(404, "Agent not found.", agent_id)
        return user, found[0], found[1]

    @app.route("/api/v2/workspaceagents/<string:agent_id>", methods=["GET"])
    async def get_agent(self, request: HTTPRequest, agent_id: str) -> bytes:
        _user, agent, ws = await self.my_agent(request, agent_id)
        fields = await agentviews.agent_fields(self.agent_state, agent)
        if self.d.apps is not None:
            # Where a browser opens each app (through this server), beside the app's own URL.
            for app in fields["apps"]:
                app["browser_url"] = self.d.apps.app_url(ws.owner_name, ws.name, agent.name, app)
        if self.d.tailnet is not None:
            # How the server reaches the agent for apps and the web terminal (p2p or DERP).
            fields["server_path"] = self.d.tailnet.paths().get(agent.id)
        return write_json(request, {**self.agent_json(agent), **fields})

    @app.route("/api/v2/workspaceagents/<string:agent_id>/connection", methods=["GET"])
    async def connection(self, request: HTTPRequest, agent_id: str) -> bytes:
        await self.my_agent(request, agent_id)
        self.refuse_if_browser_only()
        return write_json(request, self.d.connection_info())

    @app.route("/api/v2/workspaceagents/<string:agent_id>/coordinate", methods=["GET"])
    async def client_coordinate(self, request: HTTPRequest, agent_id: str) -> Any:
        user, agent, _ws = await self.my_agent(request, agent_id)
        self.refuse_if_browser_only()
        raw_peer = query_value(request, b"peer_id").decode("ascii", "replace")
        peer_id = parse_uuid(raw_peer, "peer_id") if raw_peer else uuid.uuid4()
        problem = await self.d.client_peer_id_problem(peer_id, user.id, agent.id)
        if problem:
            raise APIError(403, "You cannot coordinate with that peer id.", problem)
        problem = self.d.coordinator_limit_problem(peer_id, user, agent)
        if problem:
            raise APIError(429, "Too many coordinator connections.", problem)
        credential = await self.credential_for_token(session_token_of(request))
        return self.d.coordinate_resource_for_client(peer_id, user, agent, credential)

    # -- deployment and debug ----------------------------------------------------------------

    @app.route("/api/v2/deployment/ssh", methods=["GET"])
    async def deployment_ssh(self, request: HTTPRequest) -> bytes:
        await self.require_user(request)
        return write_json(request, {"hostname_prefix": "coder.", "hostname_suffix": "", "ssh_config_options": {}})

    @app.route("/api/v2/debug/coordinator", methods=["GET"])
    async def debug_coordinator(self, request: HTTPRequest) -> bytes:
        await self.require_owner(request)
        return write_json(request, self.d.coordinator.debug())

    @app.route("/api/v2/debug/health", methods=["GET"])
    async def debug_health(self, request: HTTPRequest) -> bytes:
        """The deployment health report (health.py): owners only; it dials out, so it is slow."""
        await self.require_owner(request)
        token = session_token_of(request) or ""
        return write_json(request, await healthcheck.run(self.d.reactor, self.d, token))

    @app.route(healthws.PATH, methods=["GET"])
    async def debug_ws(self, request: HTTPRequest) -> Any:
        await self.require_owner(request)
        return healthws.echo_resource()

    @app.route("/api/v2/debug/tailnet", methods=["GET"])
    async def debug_tailnet(self, request: HTTPRequest) -> bytes:
        """The server's own tailnet: each agent tunnel's path and latency (servertailnet.py)."""
        await self.require_owner(request)
        paths = self.d.tailnet.paths() if self.d.tailnet is not None else {}
        return write_json(request, {"agents": sorted(paths.values(), key=lambda p: p["agent_id"])})

    # -- the relay, metrics and the DERP map stream --------------------------------------------

    @app.route("/derp", branch=True)
    def derp(self, request: HTTPRequest) -> Any:
        # The relay does its own token check before upgrading (401 JSON without one).
        resource = self.d.mounts.get(b"/derp")
        if resource is None:
            raise APIError(404, "The embedded DERP relay is disabled.", "--derp-server-enable=false")
        return resource

    @app.route("/api/v2/derp-map", methods=["GET"])
    async def derp_map_stream(self, request: HTTPRequest) -> Any:
        credential = await self.credential_for_token(session_token_of(request))
        if credential is None:
            raise APIError(401, "You must be logged in to do this.", "send a session or agent token")
        if request.getHeader("upgrade") is None:
            return write_json(request, self.d.derp_map_json())
        return derp_map_stream_resource(self.d.maps.get, self.d.maps.subscribe,
                                        track=lambda proto: self.d.live.attach(credential, proto).release)

    @app.route("/metrics", methods=["GET"])
    async def metrics(self, request: HTTPRequest) -> bytes:
        await self.require_owner(request)
        request.setHeader(b"Content-Type", b"text/plain; version=0.0.4")
        return self.d.metrics_text().encode()

    @app.route("/", branch=True)
    def mounted(self, request: HTTPRequest) -> Any:
        resource = self.d.mounted_resource(request)
        if resource is None and request.path == b"/":
            return Deferred.fromCoroutine(dashboard.front_door(self, request))
        if resource is None:
            raise NotFound()
        return resource


# The agents' lifecycle routes live in their own modules and join this app.
agentstate.register(API.app)
agentviews.register(API.app)
appsapi.register(API.app)
ptyapi.register(API.app)
replicasapi.register(API.app)
dashboard.register(API.app)
ownerpages.register(API.app)
