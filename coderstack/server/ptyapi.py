"""``GET /api/v2/workspaceagents/{id}/pty?reconnect=&width=&height=&command=``: the web terminal.

The workspace's owner only (a session cookie or the ``Coder-Session-Token`` header; someone
else's agent is a 404), a websocket from the access URL's origin only when the session came in a
cookie (another site could otherwise type into the user's terminal), the agent connected (502
JSON otherwise). Browser-only mode leaves it open: it is the browser's way in. The bridge itself
is ``ptyproxy.py``; it reaches the agent through the server tailnet, direct when it can be.
"""

from __future__ import annotations

import uuid
from typing import Any, Protocol, cast

from klein import Klein
from twisted.web.server import Request

from coderstack.server.appauth import Refused
from coderstack.server.jsonhttp import (
    APIError,
    HTTPRequest,
    parse_uuid,
    query_value,
    session_token_of,
)
from coderstack.server.ptyproxy import (
    MAX_COMMAND,
    PtyCounters,
    PtyFactory,
    PtyRequest,
    pty_resource,
)
from coderstack.server.records import Agent, User, Workspace
from coderstack.wire.ports import RECONNECTING_PTY_PORT


class PtyHost(Protocol):
    d: Any
    pty_counters: PtyCounters

    async def my_agent(self, request: HTTPRequest, agent_id: str) -> tuple[User, Agent, Workspace]: ...
    async def credential_for_token(self, token: str | None) -> Any: ...


def _size(request: HTTPRequest, name: bytes, default: int) -> int:
    raw = query_value(request, name, str(default).encode())
    try:
        value = int(raw)
    except ValueError:
        raise APIError(400, f"Query {name.decode()!r} must be a number.", repr(raw)[:40]) from None
    if not 1 <= value <= 1000:
        raise APIError(400, f"Query {name.decode()!r} must be from 1 to 1000.", str(value))
    return value


def parse_pty_request(request: HTTPRequest) -> PtyRequest:
    raw = query_value(request, b"reconnect").decode("ascii", "replace")
    reconnect = parse_uuid(raw, "reconnect") if raw else uuid.uuid4()
    command = query_value(request, b"command").decode("utf-8", "replace")
    if len(command) > MAX_COMMAND:
        raise APIError(400, "Query 'command' is too long.", f"at most {MAX_COMMAND} characters")
    return PtyRequest(reconnect, _size(request, b"width", 80), _size(request, b"height", 24), command)


def register(app: Klein) -> None:
    @app.route("/api/v2/workspaceagents/<string:agent_id>/pty", methods=["GET"])
    async def agent_pty(self: PtyHost, request: HTTPRequest, agent_id: str) -> Any:
        _user, agent, _ws = await self.my_agent(request, agent_id)
        pty = parse_pty_request(request)
        from_cookie = request.getHeader(b"Coder-Session-Token") is None
        if from_cookie and self.d.apps is not None:
            try:
                self.d.apps.auth.check_origin(cast(Request, request), subdomain=False)
            except Refused as r:
                raise APIError(403, "Cross-site terminal refused.", r.detail) from None
        if request.getHeader(b"upgrade") is None:
            raise APIError(400, "This is a websocket endpoint.", "connect with Upgrade: websocket")
        status, _seen = self.d.agent_status(agent)
        if status != "connected" or self.d.tailnet is None:
            raise APIError(502, "The workspace agent is not connected.", f"agent {agent.name!r} is {status}")
        tailnet, agent_uuid = self.d.tailnet, agent.id

        async def connect() -> Any:
            return await tailnet.connect(agent_uuid, RECONNECTING_PTY_PORT)

        credential = await self.credential_for_token(session_token_of(request))
        sessions: dict[Any, Any] = {}

        def opened(proto: Any) -> None:
            if credential is not None:
                session = sessions[proto] = self.d.live.open(credential)
                session.bind(proto)

        def closed(proto: Any) -> None:
            session = sessions.pop(proto, None)
            if session is not None:
                session.release()

        return pty_resource(PtyFactory(pty, connect, self.pty_counters, opened, closed))
