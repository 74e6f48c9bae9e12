"""The web terminal route in memory: who may open it and what a bad query gets (4xx JSON), and
the bridge's check of what the browser types."""

from __future__ import annotations

import json
import uuid

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial import unittest

from coderstack.server.ptyproxy import valid_input
from tests.support.api import Caller, make_deployment

UPGRADE = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
           "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}


class PtyRouteTests(unittest.TestCase):
    async def setUp(self) -> None:
        self.d, self.api = await make_deployment(self)
        self.c = Caller(self.api)
        self.alice = await self.c.owner()
        await self.c.call("POST", "/api/v2/users", {"username": "bob", "email": "bob@example.com",
                                                    "password": "bobs password"}, token=self.alice)
        _code, got = await self.c.call("POST", "/api/v2/users/login", {"email": "bob", "password": "bobs password"})
        self.bob = got["session_token"]
        _code, ws = await self.c.call("POST", "/api/v2/users/me/workspaces", {"name": "box"}, token=self.bob)
        self.path = f"/api/v2/workspaceagents/{ws['agents'][0]['id']}/pty"

    async def test_refusals(self) -> None:
        code, body = await self.c.call("GET", self.path, headers=UPGRADE)
        self.assertEqual(code, 401)
        code, body = await self.c.call("GET", self.path, token=self.alice, headers=UPGRADE)
        self.assertEqual(code, 404)  # someone else's agent, even for a site owner
        for query, word in (("width=abc", "width"), ("height=0", "height"), ("width=5000", "width"),
                            ("reconnect=nope", "reconnect"), ("command=" + "x" * 5000, "command")):
            code, body = await self.c.call("GET", f"{self.path}?{query}", token=self.bob, headers=UPGRADE)
            self.assertEqual(code, 400, query)
            self.assertIn(word, json.dumps(body).lower(), query)
        code, body = await self.c.call("GET", self.path, token=self.bob)
        self.assertEqual(code, 400)
        self.assertIn("websocket", body["message"])
        code, body = await self.c.call("GET", f"{self.path}?reconnect={uuid.uuid4()}", token=self.bob,
                                       headers=UPGRADE)
        self.assertEqual(code, 502)  # its agent never connected
        self.assertIn("not connected", body["message"])


class InputTests(unittest.SynchronousTestCase):
    def test_shapes(self) -> None:
        for ok in (b'{"data":"ls\\r"}', b'{"height":40,"width":100}', b"{}", b'{"data":"x","width":1}'):
            self.assertTrue(valid_input(ok), ok)
        for bad in (b"ls", b"[]", b'{"data":1}', b'{"height":"40"}', b'{"width":-1}', b'{"other":1}',
                    b'{"height":true}', b"\xff"):
            self.assertFalse(valid_input(bad), bad)

    @given(st.binary(max_size=200))
    def test_any_bytes_are_judged(self, raw: bytes) -> None:
        valid_input(raw)
