"""The /api/v2 routes, in memory: authentication, users, workspaces, agents, errors as JSON."""

from __future__ import annotations

import uuid

from twisted.trial import unittest

from coderstack.derpmap import DERPMap
from tests.support.api import Caller, make_deployment


class APITests(unittest.TestCase):
    async def setUpAPI(self, **cfg):
        self.d, self.api = await make_deployment(self, **cfg)
        self.c = Caller(self.api)
        return self.c

    async def test_healthz_and_buildinfo_need_no_auth(self) -> None:
        c = await self.setUpAPI()
        code, body = await c.call("GET", "/healthz")
        self.assertEqual((code, body), (200, b"OK"))
        code, body = await c.call("GET", "/api/v2/buildinfo")
        self.assertEqual(code, 200)
        self.assertEqual(body["dashboard_url"], "http://127.0.0.1:3000")

    async def test_first_user_then_login(self) -> None:
        c = await self.setUpAPI()
        code, body = await c.call("GET", "/api/v2/users/first")
        self.assertEqual(code, 404)
        self.assertIn("message", body)
        token = await c.owner()
        code, body = await c.call("GET", "/api/v2/users/first")
        self.assertEqual(code, 200)
        code, me = await c.call("GET", "/api/v2/users/me", token=token)
        self.assertEqual((code, me["username"], me["roles"]), (200, "alice", [{"name": "owner"}]))
        # A second "first user" is refused.
        code, body = await c.call("POST", "/api/v2/users/first",
                                  {"username": "mallory", "email": "m@example.com", "password": "12345678"})
        self.assertEqual(code, 409)
        self.assertEqual(set(body), {"message", "detail"})

    async def test_bad_credentials_and_tokens(self) -> None:
        c = await self.setUpAPI()
        token = await c.owner()
        code, body = await c.call("POST", "/api/v2/users/login", {"email": "alice@example.com", "password": "nope nope"})
        self.assertEqual(code, 401)
        code, body = await c.call("POST", "/api/v2/users/login", {"email": "ghost@example.com", "password": "nope nope"})
        self.assertEqual(code, 401)
        for bad in (None, "garbage", token[:-1] + ("A" if token[-1] != "A" else "B"), "x" * 10 + "-" + "y" * 22):
            code, body = await c.call("GET", "/api/v2/users/me", token=bad)
            self.assertEqual(code, 401, bad)
            self.assertEqual(set(body), {"message", "detail"})
        # Logging out revokes the token.
        code, _ = await c.call("POST", "/api/v2/users/logout", token=token)
        self.assertEqual(code, 200)
        code, _ = await c.call("GET", "/api/v2/users/me", token=token)
        self.assertEqual(code, 401)

    async def test_malformed_requests_are_4xx_json(self) -> None:
        c = await self.setUpAPI()
        code, body = await c.call("POST", "/api/v2/users/first", raw=b"{not json")
        self.assertEqual(code, 400)
        self.assertEqual(body["message"], "Request body must be valid JSON.")
        code, body = await c.call("POST", "/api/v2/users/first", raw=b"[1,2]")
        self.assertEqual(code, 400)
        code, body = await c.call("POST", "/api/v2/users/first", {"username": "a b", "email": "x@y", "password": "12345678"})
        self.assertEqual(code, 400)
        self.assertIn("username", body["message"])
        code, body = await c.call("POST", "/api/v2/users/first", {"username": "ab", "email": "x@y", "password": "short"})
        self.assertEqual(code, 400)
        code, body = await c.call("POST", "/api/v2/users/first", {"username": 5, "email": "x@y", "password": "12345678"})
        self.assertEqual(code, 400)
        code, body = await c.call("GET", "/api/v2/no/such/route")
        self.assertEqual(code, 404)
        self.assertEqual(body["message"], "Route not found.")
        code, body = await c.call("POST", "/api/v2/users/first", raw=b"x" * (70 * 1024))
        self.assertEqual(code, 413)

    async def test_users_create_is_owner_only(self) -> None:
        c = await self.setUpAPI()
        token = await c.owner()
        code, bob = await c.call("POST", "/api/v2/users", {"username": "bob", "email": "bob@example.com", "password": "bobs password"}, token=token)
        self.assertEqual(code, 201)
        self.assertEqual(bob["roles"], [])
        code, _ = await c.call("POST", "/api/v2/users", {"username": "bob", "email": "bob2@example.com", "password": "bobs password"}, token=token)
        self.assertEqual(code, 409)
        code, got = await c.call("POST", "/api/v2/users/login", {"email": "bob", "password": "bobs password"})
        bob_token = got["session_token"]
        code, _ = await c.call("POST", "/api/v2/users", {"username": "eve", "email": "e@example.com", "password": "12345678"}, token=bob_token)
        self.assertEqual(code, 403)
        code, _ = await c.call("GET", "/api/v2/users", token=bob_token)
        self.assertEqual(code, 403)
        code, got = await c.call("GET", "/api/v2/users", token=token)
        self.assertEqual(got["count"], 2)
        code, _ = await c.call("GET", "/api/v2/debug/coordinator", token=bob_token)
        self.assertEqual(code, 403)
        code, dbg = await c.call("GET", "/api/v2/debug/coordinator", token=token)
        self.assertEqual((code, dbg["peers"], dbg["tunnels"]), (200, [], []))

    async def test_workspace_lifecycle_and_agent_token(self) -> None:
        c = await self.setUpAPI()
        token = await c.owner()
        code, ws = await c.call("POST", "/api/v2/users/me/workspaces", {"name": "dev"}, token=token)
        self.assertEqual(code, 201)
        agent_token = ws["agent_token"]
        agent = ws["agents"][0]
        self.assertEqual(agent["status"], "connecting")
        self.assertTrue(agent["ip"].startswith("fd7a:115c:a1e0:"))
        code, _ = await c.call("POST", "/api/v2/users/me/workspaces", {"name": "dev"}, token=token)
        self.assertEqual(code, 409)
        code, got = await c.call("GET", "/api/v2/users/me/workspace/dev", token=token)
        self.assertEqual((code, got["id"]), (200, ws["id"]))
        self.assertNotIn("agent_token", got)
        code, listed = await c.call("GET", "/api/v2/workspaces", token=token)
        self.assertEqual([w["name"] for w in listed["workspaces"]], ["dev"])

        # The agent authenticates with its token and gets its manifest.
        code, manifest = await c.call("GET", "/api/v2/workspaceagents/me/manifest", token=agent_token)
        self.assertEqual(code, 200)
        self.assertEqual((manifest["agent_id"], manifest["workspace_name"], manifest["owner_name"]),
                         (agent["id"], "dev", "alice"))
        dm = DERPMap.from_json(manifest["derp_map"])
        self.assertEqual(dm.regions[999].region_name, "Coder Embedded Relay")
        self.assertFalse(manifest["disable_direct_connections"])
        # A session token is not an agent token, and vice versa.
        code, _ = await c.call("GET", "/api/v2/workspaceagents/me/manifest", token=token)
        self.assertEqual(code, 401)
        code, _ = await c.call("GET", "/api/v2/users/me", token=agent_token)
        self.assertEqual(code, 401)

        code, conn = await c.call("GET", f"/api/v2/workspaceagents/{agent['id']}/connection", token=token)
        self.assertEqual(code, 200)
        self.assertEqual(set(conn), {"derp_map", "derp_force_websockets", "disable_direct_connections", "hostname_suffix"})

        code, rotated = await c.call("POST", f"/api/v2/workspaces/{ws['id']}/agent-token", token=token)
        self.assertEqual(code, 201)
        code, _ = await c.call("GET", "/api/v2/workspaceagents/me/manifest", token=agent_token)
        self.assertEqual(code, 401)
        code, _ = await c.call("GET", "/api/v2/workspaceagents/me/manifest", token=rotated["agent_token"])
        self.assertEqual(code, 200)

        code, _ = await c.call("DELETE", f"/api/v2/workspaces/{ws['id']}", token=token)
        self.assertEqual(code, 200)
        code, _ = await c.call("GET", f"/api/v2/workspaces/{ws['id']}", token=token)
        self.assertEqual(code, 404)
        code, _ = await c.call("GET", "/api/v2/workspaceagents/me/manifest", token=rotated["agent_token"])
        self.assertEqual(code, 401)

    async def test_other_users_workspaces_are_invisible(self) -> None:
        c = await self.setUpAPI()
        token = await c.owner()
        await c.call("POST", "/api/v2/users", {"username": "bob", "email": "bob@example.com", "password": "bobs password"}, token=token)
        _, got = await c.call("POST", "/api/v2/users/login", {"email": "bob@example.com", "password": "bobs password"})
        bob = got["session_token"]
        _, ws = await c.call("POST", "/api/v2/users/me/workspaces", {"name": "secret"}, token=token)
        agent_id = ws["agents"][0]["id"]
        for method, path in (
            ("GET", f"/api/v2/workspaces/{ws['id']}"),
            ("DELETE", f"/api/v2/workspaces/{ws['id']}"),
            ("POST", f"/api/v2/workspaces/{ws['id']}/agent-token"),
            ("GET", f"/api/v2/workspaceagents/{agent_id}"),
            ("GET", f"/api/v2/workspaceagents/{agent_id}/connection"),
            ("GET", f"/api/v2/workspaceagents/{agent_id}/coordinate"),
        ):
            code, body = await c.call(method, path, token=bob)
            self.assertEqual(code, 404, path)
            self.assertIn("message", body)
        code, _ = await c.call("GET", "/api/v2/users/alice/workspace/secret", token=bob)
        self.assertEqual(code, 403)
        code, _ = await c.call("POST", "/api/v2/users/alice/workspaces", {"name": "x"}, token=bob)
        self.assertEqual(code, 403)
        code, _ = await c.call("GET", f"/api/v2/workspaces/{uuid.uuid4()}", token=bob)
        self.assertEqual(code, 404)
        code, body = await c.call("GET", "/api/v2/workspaces/not-a-uuid", token=bob)
        self.assertEqual(code, 400)

    async def test_block_direct_and_force_websockets_reach_clients(self) -> None:
        c = await self.setUpAPI(**{"block-direct-connections": True, "derp-force-websockets": True})
        token = await c.owner()
        _, ws = await c.call("POST", "/api/v2/users/me/workspaces", {"name": "dev"}, token=token)
        _, manifest = await c.call("GET", "/api/v2/workspaceagents/me/manifest", token=ws["agent_token"])
        self.assertTrue(manifest["disable_direct_connections"])
        self.assertTrue(manifest["derp_force_websockets"])
        _, conn = await c.call("GET", "/api/v2/workspaceagents/connection", token=token)
        self.assertTrue(conn["disable_direct_connections"])
