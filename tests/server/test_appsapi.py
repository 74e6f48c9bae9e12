"""The app API in memory: shared ports (4xx JSON for bad input, owner only, the template cap)
and the auth redirect (only to this deployment's app hosts, only for a logged-in browser)."""

from __future__ import annotations

from urllib.parse import parse_qs, quote, urlsplit

from twisted.trial import unittest

from coderstack.server.appauth import AppAuth
from coderstack.server.appkeys import APP_KEY_QUERY, AppKeys
from coderstack.server.appproxy import AppProxy
from coderstack.server.apps import AppRouter
from coderstack.server.appurl import WildcardHost
from tests.support.api import Caller, make_deployment


class AppsAPITests(unittest.TestCase):
    async def setUp(self) -> None:
        self.d, self.api = await make_deployment(self)
        self.keys = AppKeys(b"s" * 32)
        router = AppRouter(self.api, AppProxy(self.d.reactor), AppAuth(self.api, self.keys, None),
                           self.api.app_store, wildcard=None)
        router.set_wildcard(WildcardHost.parse("*.apps.example.com"))
        self.d.apps = router
        self.c = Caller(self.api)
        self.alice = await self.c.owner()
        await self.c.call("POST", "/api/v2/users", {"username": "bob", "email": "bob@example.com",
                                                    "password": "bobs password"}, token=self.alice)
        _code, got = await self.c.call("POST", "/api/v2/users/login", {"email": "bob", "password": "bobs password"})
        self.bob = got["session_token"]
        code, ws = await self.c.call("POST", "/api/v2/users/me/workspaces", {"name": "box"}, token=self.bob)
        self.assertEqual(code, 201, ws)
        self.path = f"/api/v2/workspaces/{ws['id']}/port-share"

    async def test_port_shares(self) -> None:
        share = {"agent_name": "main", "port": 8080, "share_level": "authenticated", "protocol": "http"}
        code, got = await self.c.call("POST", self.path, share, token=self.bob)
        self.assertEqual((code, got["share_level"]), (200, "authenticated"))
        code, got = await self.c.call("GET", self.path, token=self.bob)
        self.assertEqual([s["port"] for s in got["shares"]], [8080])
        # Someone else's workspace does not exist for them, site owner or not.
        code, got = await self.c.call("GET", self.path, token=self.alice)
        self.assertEqual(code, 404)
        code, _ = await self.c.call("POST", self.path, share, token=self.alice)
        self.assertEqual(code, 404)
        code, _ = await self.c.call("GET", self.path)
        self.assertEqual(code, 401)
        for bad, word in (({**share, "port": 4}, "port"), ({**share, "port": "80"}, "port"),
                          ({**share, "port": 70000}, "port"), ({**share, "share_level": "everyone"}, "share_level"),
                          ({**share, "protocol": "gopher"}, "protocol"), ({**share, "agent_name": "nope"}, "agent")):
            code, got = await self.c.call("POST", self.path, bad, token=self.bob)
            self.assertEqual(code, 400, bad)
            self.assertIn(word, (got["message"] + got["detail"]).lower(), got)
        code, got = await self.c.call("DELETE", self.path, {"agent_name": "main", "port": 8080}, token=self.bob)
        self.assertEqual(code, 200, got)
        code, got = await self.c.call("DELETE", self.path, {"agent_name": "main", "port": 8080}, token=self.bob)
        self.assertEqual(code, 404)

    async def test_auth_redirect(self) -> None:
        app = "http://code--main--box--bob.apps.example.com/x?y=1"
        base = "/api/v2/applications/auth-redirect?redirect_uri="
        code, page = await self.c.call("GET", base + quote(app, safe=""))
        self.assertEqual(code, 401)
        self.assertIn(b"Log in", page)
        # A browser is sent to the login form, which comes back here to finish.
        code, headers, _ = await self.c.exchange("GET", base + quote(app, safe=""),
                                                 headers={"Accept": "text/html,*/*;q=0.8"})
        self.assertEqual(code, 303)
        location = headers.getRawHeaders("location")[0]
        self.assertEqual(location, "/login?next=" + quote(base + quote(app, safe=""), safe="/"))
        for elsewhere in ("http://evil.example/", "http://apps.example.com/", "javascript:alert(1)",
                          "http://a.b.apps.example.com/", ""):
            code, _page = await self.c.call("GET", base + quote(elsewhere, safe=""), token=self.bob)
            self.assertEqual(code, 400, elsewhere)
        code, headers, _body = await self.c.exchange("GET", base + quote(app, safe=""), token=self.bob)
        self.assertEqual(code, 307)
        location = urlsplit(headers.getRawHeaders("location")[0])
        self.assertEqual(location.netloc, "code--main--box--bob.apps.example.com")
        sealed = parse_qs(location.query)[APP_KEY_QUERY][0]
        self.assertEqual(parse_qs(location.query)["y"], ["1"])
        token = self.keys.open(sealed, location.netloc, self.d.reactor.seconds())
        self.assertIsNotNone(token)
        self.assertNotEqual(token, self.bob)  # a session of its own for the app's host
        code, me = await self.c.call("GET", "/api/v2/users/me", token=token)
        self.assertEqual((code, me["username"]), (200, "bob"))
