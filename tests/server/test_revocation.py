"""Revoking a credential closes what it opened; limits refuse cleanly; shutdown says "going away".

A real server in-process (makeService on 127.0.0.1:0), real coordination websockets, real DERP
clients (Upgrade: DERP and websocket) and a real DERP-map stream.
"""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import defer, reactor
from twisted.trial import unittest

from coderstack.coordinator.client import open_coordination
from coderstack.coordinator.websocket import CLOSE_KICKED
from coderstack.derp.client import DERPClient
from coderstack.derpmap import DERPMap
from coderstack.sdk import Client, SDKError
from coderstack.server import auth
from coderstack.server.options import ServerOptions
from coderstack.server.records import now
from coderstack.server.service import makeService
from coderstack.wire import derp as w
from tests.server.test_closed_relay import Inbox as _Inbox
from tests.support.tempdirs import made_dir
from tests.support.waiting import wait_until

CLOSE_REVOKED = 4001
MAP_PATH = "/api/v2/derp-map"


class Inbox(_Inbox):
    def __init__(self) -> None:
        super().__init__()
        self.restarts: list[tuple[float, float]] = []

        self.down_at = 0.0

    def restarting(self, reconnect_in: float, try_for: float) -> None:
        self.restarts.append((reconnect_in, try_for))

    def disconnected(self, reason: str) -> None:
        super().disconnected(reason)
        self.down_at = reactor.seconds()


class _MapProtocol(WebSocketClientProtocol):
    def onOpen(self) -> None:
        self.factory.proto = self

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.factory.maps.append(payload)

    def onClose(self, wasClean: bool, code: Any, reason: Any) -> None:
        if not self.factory.closed.called:
            self.factory.closed.callback((code, reason))


class MapStreamFactory(WebSocketClientFactory):
    protocol = _MapProtocol

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.maps: list[bytes] = []
        self.closed: defer.Deferred[tuple[Any, Any]] = defer.Deferred()
        self.proto: Any = None


class Base(unittest.TestCase):
    extra_args: tuple[str, ...] = ()

    async def setUp(self) -> None:
        opts = ServerOptions(environ={})
        data = made_dir(self)
        opts.parseOptions(["--http-address", "127.0.0.1:0", "--data-dir", data, "--stun-address", "disable",
                           *self.extra_args])
        self.svc = svc = makeService(opts, reactor)
        svc.startService()
        self.addCleanup(lambda: svc.stopService() if svc.running else None)
        await svc.ready
        self.url = svc.config["access-url"]
        anon = self.client()
        await anon.post("/api/v2/users/first", {"username": "alice", "email": "a@example.com",
                                                "password": "alice password"})
        self.alice = await self.login("a@example.com", "alice password")
        await self.alice.post("/api/v2/users", {"username": "bob", "email": "b@example.com",
                                                "password": "bobs password"})
        self.bob = await self.login("b@example.com", "bobs password")
        ws = await self.bob.post("/api/v2/users/me/workspaces", {"name": "dev"})
        self.ws_id = ws["id"]
        self.agent_id = uuid.UUID(ws["agents"][0]["id"])
        self.agent_token = ws["agent_token"]
        self.agent_api = self.client(self.agent_token)
        info = await self.bob.connection_info(str(self.agent_id))
        self.region = DERPMap.from_json(info["derp_map"]).regions[999]

    @property
    def live(self) -> Any:
        return self.svc.deployment.live

    def client(self, token: str | None = None) -> Client:
        c = Client(reactor, self.url, token)
        self.addCleanup(c.close)
        return c

    async def login(self, email: str, password: str) -> Client:
        got = await self.client().post("/api/v2/users/login", {"email": email, "password": password})
        return self.client(got["session_token"])

    async def coordinate(self, api: Client, path: str, query: dict[str, str] | None = None) -> Any:
        factory = await open_coordination(api, path, lambda r: None, query)

        def close() -> None:
            if factory.proto is not None and not factory.closed.called:
                factory.proto.sendClose()

        self.addCleanup(lambda: factory.closed)
        self.addCleanup(close)
        return factory

    async def agent_coordinate(self) -> Any:
        f = await self.coordinate(self.agent_api, "/api/v2/workspaceagents/me/coordinate")
        await wait_until(lambda: self.svc.deployment.coordinator.status(self.agent_id) == "connected",
                         "the agent to connect")
        return f

    async def client_coordinate(self, api: Client) -> Any:
        return await self.coordinate(api, f"/api/v2/workspaceagents/{self.agent_id}/coordinate",
                                     {"peer_id": str(uuid.uuid4())})

    def derp(self, token: str, *, websocket: bool = False) -> tuple[DERPClient, Inbox]:
        inbox = Inbox()
        dc = DERPClient(reactor, self.region, w.generate_private_key(), inbox, token=token,
                        force_websockets=websocket, min_backoff=5.0, max_backoff=5.0)
        dc.start()
        self.addCleanup(dc.stop)
        return dc, inbox

    async def map_stream(self, api: Client) -> MapStreamFactory:
        factory = api.websocket_factory(MapStreamFactory, MAP_PATH)
        await api.websocket_endpoint().connect(factory)
        await wait_until(lambda: factory.maps, "the first DERP map")

        def close() -> None:
            if factory.proto is not None and not factory.closed.called:
                factory.proto.sendClose()

        self.addCleanup(lambda: factory.closed)
        self.addCleanup(close)
        return factory


class RevocationTests(Base):
    async def open_everything(self, api: Client) -> dict[str, Any]:
        opened = {
            "coordinator": await self.client_coordinate(api),
            "map": await self.map_stream(api),
        }
        opened["derp"], opened["derp_inbox"] = self.derp(api.token)
        opened["derp_ws"], opened["derp_ws_inbox"] = self.derp(api.token, websocket=True)
        await wait_until(lambda: opened["derp_inbox"].up and opened["derp_ws_inbox"].up, "both DERP logins")
        return opened

    async def assert_all_closed(self, opened: dict[str, Any], reason: str) -> None:
        code, why = await opened["coordinator"].closed
        self.assertEqual((code, why), (CLOSE_KICKED, reason))
        code, why = await opened["map"].closed
        self.assertEqual((code, why), (CLOSE_REVOKED, reason))
        await wait_until(lambda: not opened["derp_inbox"].up and not opened["derp_ws_inbox"].up,
                         "both DERP connections to close")

    async def test_logout_closes_that_sessions_connections_only(self) -> None:
        other = await self.login("b@example.com", "bobs password")
        keep = await self.client_coordinate(other)
        mine = await self.open_everything(self.bob)
        before = len(self.live)
        await self.bob.post("/api/v2/users/logout")
        await self.assert_all_closed(mine, "session logged out")
        await wait_until(lambda: len(self.live) == before - 4, "the registry to forget them")
        self.assertFalse(keep.closed.called)
        self.assertEqual((await other.me())["username"], "bob")
        # The DERP clients' redials are refused: the token is gone.
        await wait_until(lambda: "401" in mine["derp"].last_error, "a refused redial", timeout=10)

    async def test_suspending_a_user_closes_all_its_sessions_and_refuses_login(self) -> None:
        second = await self.login("b@example.com", "bobs password")
        first_conns = await self.open_everything(self.bob)
        second_coord = await self.client_coordinate(second)
        agent_coord = await self.agent_coordinate()
        got = await self.alice.request("PUT", "/api/v2/users/bob/status/suspend")
        self.assertEqual(got["status"], "suspended")
        await self.assert_all_closed(first_conns, "user suspended")
        code, _ = await second_coord.closed
        self.assertEqual(code, CLOSE_KICKED)
        # The workspace's agent is not the user's session: it stays.
        self.assertFalse(agent_coord.closed.called)
        with self.assertRaises(SDKError) as refused:
            await self.login("b@example.com", "bobs password")
        self.assertEqual(refused.exception.status, 401)
        with self.assertRaises(SDKError) as refused:
            await second.me()
        self.assertEqual(refused.exception.status, 401)
        got = await self.alice.request("PUT", "/api/v2/users/bob/status/activate")
        self.assertEqual(got["status"], "active")
        again = await self.login("b@example.com", "bobs password")
        self.assertEqual((await again.me())["username"], "bob")

    async def test_only_owners_suspend_and_never_themselves(self) -> None:
        with self.assertRaises(SDKError) as refused:
            await self.bob.request("PUT", "/api/v2/users/alice/status/suspend")
        self.assertEqual(refused.exception.status, 403)
        with self.assertRaises(SDKError) as refused:
            await self.alice.request("PUT", "/api/v2/users/alice/status/suspend")
        self.assertEqual(refused.exception.status, 400)
        with self.assertRaises(SDKError) as refused:
            await self.alice.request("PUT", "/api/v2/users/nobody/status/suspend")
        self.assertEqual(refused.exception.status, 404)

    async def test_deleting_a_user(self) -> None:
        await self.alice.post("/api/v2/users", {"username": "carol", "email": "c@example.com",
                                                "password": "carols password"})
        carol = await self.login("c@example.com", "carols password")
        conns = {"map": await self.map_stream(carol)}
        conns["derp"], conns["derp_inbox"] = self.derp(carol.token)
        await wait_until(lambda: conns["derp_inbox"].up, "carol's DERP login")
        # Bob still owns a workspace: refused until it is gone.
        with self.assertRaises(SDKError) as refused:
            await self.alice.delete("/api/v2/users/bob")
        self.assertEqual(refused.exception.status, 409)
        await self.alice.delete("/api/v2/users/carol")
        code, why = await conns["map"].closed
        self.assertEqual((code, why), (CLOSE_REVOKED, "user deleted"))
        await wait_until(lambda: not conns["derp_inbox"].up, "carol's DERP connection to close")
        users = [u["username"] for u in (await self.alice.get("/api/v2/users"))["users"]]
        self.assertEqual(users, ["alice", "bob"])

    async def test_rotating_the_agent_token_closes_the_agents_connections(self) -> None:
        coord = await self.agent_coordinate()
        stream = await self.map_stream(self.agent_api)
        dc, inbox = self.derp(self.agent_token)
        dcw, inbox_ws = self.derp(self.agent_token, websocket=True)
        user_coord = await self.client_coordinate(self.bob)
        await wait_until(lambda: inbox.up and inbox_ws.up, "the agent's DERP logins")
        await self.bob.post(f"/api/v2/workspaces/{self.ws_id}/agent-token")
        code, why = await coord.closed
        self.assertEqual((code, why), (CLOSE_KICKED, "agent token revoked"))
        code, why = await stream.closed
        self.assertEqual((code, why), (CLOSE_REVOKED, "agent token revoked"))
        await wait_until(lambda: not inbox.up and not inbox_ws.up, "the agent's DERP connections to close")
        self.assertFalse(user_coord.closed.called)

    async def test_deleting_the_workspace_closes_the_agents_connections(self) -> None:
        coord = await self.agent_coordinate()
        dc, inbox = self.derp(self.agent_token)
        await wait_until(lambda: inbox.up, "the agent's DERP login")
        await self.bob.delete(f"/api/v2/workspaces/{self.ws_id}")
        code, why = await coord.closed
        self.assertEqual((code, why), (CLOSE_KICKED, "agent token revoked"))
        await wait_until(lambda: not inbox.up, "the agent's DERP connection to close")
        self.assertIsNone(self.svc.deployment.coordinator.status(self.agent_id))

    async def test_a_session_closes_at_its_expiry(self) -> None:
        token, key_id, hashed = auth.new_session_token()
        user = (await self.svc.deployment.store.user_by_login("bob"))[0]
        await self.svc.deployment.store.insert_api_key(key_id, user.id, hashed, now() + timedelta(seconds=1))
        short = self.client(token)
        stream = await self.map_stream(short)
        code, why = await stream.closed
        self.assertEqual((code, why), (CLOSE_REVOKED, "session expired"))
        self.assertEqual(self.live.counters["expired"], 1)


class LimitTests(Base):
    extra_args = ("--derp-connections-per-user", "2", "--coordinator-peers-per-user", "2",
                  "--owner-limit-multiplier", "2")

    async def test_derp_connections_over_the_limit_get_429(self) -> None:
        ups = [self.derp(self.bob.token) for _ in range(2)]
        await wait_until(lambda: all(i.up for _, i in ups), "two DERP logins")
        third, inbox = self.derp(self.bob.token)
        await wait_until(lambda: third.last_error, "the third to be refused")
        self.assertIn("429", third.last_error)
        self.assertFalse(inbox.up)
        text = self.svc.deployment.metrics_text()
        self.assertIn('coderstack_derp_connections_refused_total{reason="per_user_limit"} ', text)
        self.assertGreaterEqual(self.svc.deployment.relay_admission.caps.refused, 1)
        # Another principal is not affected; one closed connection frees a slot.
        other, other_inbox = self.derp(self.agent_token)
        await wait_until(lambda: other_inbox.up, "the agent's DERP login")
        bob_id = uuid.UUID((await self.bob.me())["id"])
        await ups[0][0].stop()
        await wait_until(lambda: self.svc.deployment.relay_admission.caps.count(("user", bob_id)) == 1,
                         "the slot to free")

    async def test_coordinator_peers_over_the_limit_get_429(self) -> None:
        await self.client_coordinate(self.bob)
        await self.client_coordinate(self.bob)
        with self.assertRaises(ConnectionError) as refused:
            await self.client_coordinate(self.bob)
        self.assertIn("429", str(refused.exception))
        self.assertEqual(self.svc.deployment.coordinator.counters["peer_limit_refused"], 0)
        # Owners get the multiplier: alice may hold four.
        ws = await self.alice.post("/api/v2/users/me/workspaces", {"name": "own"})
        for _ in range(4):
            await self.coordinate(self.alice, f"/api/v2/workspaceagents/{ws['agents'][0]['id']}/coordinate")


class ShutdownTests(Base):
    async def test_websockets_get_1001_and_derp_clients_a_restarting_frame(self) -> None:
        coord = await self.agent_coordinate()
        stream = await self.map_stream(self.bob)
        dcw, inbox_ws = self.derp(self.bob.token, websocket=True)
        dc, inbox = self.derp(self.agent_token)
        await wait_until(lambda: inbox.up and inbox_ws.up, "DERP logins")
        started = reactor.seconds()
        await self.svc.stopService()
        took = reactor.seconds() - started
        self.assertEqual(await coord.closed, (1001, "going away"))
        self.assertEqual(await stream.closed, (1001, "going away"))
        await wait_until(lambda: not inbox.up and not inbox_ws.up, "DERP connections to close")
        self.assertEqual(inbox.restarts, [(1.0, 60.0)])
        self.assertEqual(inbox_ws.restarts, [(1.0, 60.0)])
        # The client waits the hinted second before redialling, not its 5 s backoff.
        # (scheduled in the same call that reported the disconnect)
        self.assertLess(abs(dc._retry.getTime() - inbox.down_at - 1.0), 0.05)
        self.assertEqual(len(self.live), 0)
        # A report, not a limit: how long the stop took.
        print(f"\nin-process server stop took {took * 1000:.0f} ms")
