"""An in-memory deployment and a StubTreq client for API tests (no sockets)."""

from __future__ import annotations

import json
from typing import Any

from treq.testing import StubTreq
from twisted.internet import reactor, task

from coderstack.server.api import API
from coderstack.server.database import database_url
from coderstack.server.deployment import Deployment
from coderstack.server.derpsetup import build_derp_map
from coderstack.server.store import Store
from tests.support.tempdirs import made_dir

ACCESS_URL = "http://127.0.0.1:3000"

DEFAULT_CFG = {
    "access-url": ACCESS_URL,
    "derp-server-region-id": 999,
    "derp-server-region-code": "coder",
    "derp-server-region-name": "Coder Embedded Relay",
}


async def make_deployment(testcase: Any, **cfg: Any) -> tuple[Deployment, API]:
    data = made_dir(testcase)
    store = Store(database_url(data, None), reactor)
    testcase.addCleanup(store.stop)
    await store.migrate()
    full = dict(DEFAULT_CFG, **cfg)
    d = Deployment(reactor, store, full["access-url"], await build_derp_map(full, reactor),
                   derp_force_websockets=full.get("derp-force-websockets", False),
                   block_direct=full.get("block-direct-connections", False))
    testcase.addCleanup(d.coordinator.close)
    return d, API(d)


class Caller:
    """JSON requests against an API object; pumps the in-memory transport until answered."""

    def __init__(self, api: API) -> None:
        self.stub = StubTreq(api.app.resource())

    async def call(self, method: str, path: str, body: Any = None, token: str | None = None,
                   raw: bytes | None = None, headers: dict[str, str] | None = None) -> tuple[int, Any]:
        code, _headers, parsed = await self.exchange(method, path, body, token, raw, headers)
        return code, parsed

    async def exchange(self, method: str, path: str, body: Any = None, token: str | None = None,
                       raw: bytes | None = None, headers: dict[str, str] | None = None,
                       ) -> tuple[int, Any, Any]:
        """Like :meth:`call`, with the response headers too (redirects are not followed)."""
        h = {"Accept": "application/json"}
        if token:
            h["Coder-Session-Token"] = token
        h.update(headers or {})
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        # The handlers wait on database threads, so keep pumping the in-memory connection
        # until the whole response has arrived.
        pump = task.LoopingCall(self.stub.flush)
        pump.start(0.001)
        try:
            resp = await self.stub.request(method, ACCESS_URL + path, headers=h, data=data,
                                           allow_redirects=False)
            raw_body = await self.stub.content(resp)
        finally:
            pump.stop()
        try:
            parsed = json.loads(raw_body) if raw_body else None
        except ValueError:
            parsed = raw_body
        return resp.code, resp.headers, parsed

    async def owner(self) -> str:
        await self.call("POST", "/api/v2/users/first",
                        {"username": "alice", "email": "alice@example.com", "password": "correct horse"})
        code, got = await self.call("POST", "/api/v2/users/login",
                                    {"email": "alice@example.com", "password": "correct horse"})
        assert code == 201, got
        return got["session_token"]

    async def member(self, owner_token: str, username: str = "bob") -> str:
        """A member made by the owner (password "<username> password"), logged in: their token."""
        code, got = await self.call("POST", "/api/v2/users",
                                    {"username": username, "email": f"{username}@example.com",
                                     "password": f"{username} password"}, token=owner_token)
        assert code == 201, got
        code, got = await self.call("POST", "/api/v2/users/login",
                                    {"email": username, "password": f"{username} password"})
        assert code == 201, got
        return str(got["session_token"])
