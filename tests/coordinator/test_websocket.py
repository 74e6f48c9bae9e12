"""The coordination websocket adapter on a real in-process server: how each way a connection ends
shows to the peer (close code) and to the workspace (status, disconnected_at)."""

from __future__ import annotations

import uuid

from twisted.internet import reactor
from twisted.trial import unittest

from coderstack.coordinator.client import CoordinateClientFactory, open_coordination
from coderstack.coordinator.websocket import CLOSE_ABUSE, CLOSE_REPLACED
from coderstack.sdk import Client
from coderstack.wire.coordination import CoordinateRequest
from tests.support.inprocess import CLI, start_server
from tests.support.waiting import wait_until

AGENT_PATH = "/api/v2/workspaceagents/me/coordinate"


class CoordinateWebsocketTests(unittest.TestCase):
    async def setUp(self) -> None:
        self.server, self.url = await start_server(self)
        self.cli = CLI(self)
        code, _out, err = await self.cli("login", self.url, "--first-user-username", "alice",
                                         "--first-user-email", "alice@example.com",
                                         "--first-user-password", "alice password")
        self.assertEqual(code, 0, err)
        code, out, err = await self.cli("create", "ws1")
        self.assertEqual(code, 0, err)
        [self.token] = [w.split("=", 1)[1] for w in out.split() if w.startswith("CODER_AGENT_TOKEN=")]
        self.api = Client(reactor, self.url, self.token)
        self.addCleanup(self.api.close)
        self.agent_id = uuid.UUID((await self.api.get("/api/v2/workspaceagents/me/manifest"))["agent_id"])

    async def connect(self) -> CoordinateClientFactory:
        factory = await open_coordination(self.api, AGENT_PATH, lambda r: None)
        self.addCleanup(lambda: factory.proto.sendClose() if not factory.closed.called else None)
        await wait_until(lambda: self.status() == "connected", "the agent to be connected")
        return factory

    async def agent_row(self):
        agent, _ws = await self.server.deployment.store.agent(self.agent_id)
        return agent

    def status(self) -> str:
        return self.server.deployment.coordinator.status(self.agent_id)

    async def recorded_disconnect(self) -> bool:
        return (await self.agent_row()).disconnected_at is not None

    async def test_graceful_disconnect(self) -> None:
        f = await self.connect()
        f.proto.send_request(CoordinateRequest.from_json({"disconnect": {}}))
        code, reason = await f.closed
        self.assertEqual((code, reason), (1000, "graceful disconnect"))
        self.assertIsNone(self.status())
        await wait_until(self.recorded_disconnect, "the disconnect to be recorded")
        status, _seen = self.server.deployment.agent_status(await self.agent_row())
        self.assertEqual(status, "disconnected")

    async def test_a_newer_connection_replaces_the_old_one(self) -> None:
        old = await self.connect()
        new = await open_coordination(self.api, AGENT_PATH, lambda r: None)
        self.addCleanup(lambda: new.proto.sendClose() if not new.closed.called else None)
        code, reason = await old.closed
        self.assertEqual(code, CLOSE_REPLACED)
        self.assertEqual(self.status(), "connected")
        self.assertEqual(self.server.deployment.coordinator.overwrites, 1)
        # The replaced connection's end is not the agent's: nothing is recorded as disconnected.
        # Its close handler (which would record it) has run once the server releases its live
        # session; the store runs its work in order, so the row read after that sees any write.
        await wait_until(lambda: len(self.server.deployment.live) == 1,
                         "the server to release the replaced connection")
        self.assertIsNone((await self.agent_row()).disconnected_at)
        self.assertFalse(new.closed.called)

    async def test_a_dropped_connection_is_lost(self) -> None:
        f = await self.connect()
        f.proto.transport.abortConnection()
        await f.closed
        await wait_until(lambda: self.status() == "lost", "the agent to be lost")
        status, seen = self.server.deployment.agent_status(await self.agent_row())
        self.assertEqual(status, "lost")
        self.assertIsNotNone(seen)
        # The coordinator keeps it (its tunnel peers keep its node) until the lost timeout.
        self.assertIn(self.agent_id, self.server.deployment.coordinator.peer_ids())
        self.assertEqual(self.server.deployment.coordinator.counters["lost"], 1)

    async def test_too_many_refused_requests_close_the_connection(self) -> None:
        f = await self.connect()
        errors = []
        f.response_handler = lambda r: errors.append(r.error) if r.error else None
        # Agents may not add tunnels: every one of these is refused.
        for _ in range(20):
            f.proto.send_request(CoordinateRequest.from_json({"add_tunnel": {"id": str(uuid.uuid4())}}))
        code, reason = await f.closed
        self.assertEqual(code, CLOSE_ABUSE)
        self.assertTrue(errors)
        self.assertIsNone(self.status())
        await wait_until(self.recorded_disconnect, "the disconnect to be recorded")

    async def test_server_shutdown(self) -> None:
        f = await self.connect()
        await self.server.stopService()
        code, reason = await f.closed
        self.assertEqual((code, reason), (1001, "going away"))
