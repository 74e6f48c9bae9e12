"""Cookie-authenticated state changes through the API must come from our own pages."""

from __future__ import annotations

from twisted.trial import unittest

from tests.support.api import ACCESS_URL, Caller, make_deployment


class CrossSiteTests(unittest.TestCase):
    async def setUp(self) -> None:
        self.d, self.api = await make_deployment(self)
        self.c = Caller(self.api)
        self.alice = await self.c.owner()
        await self.c.member(self.alice)

    async def put(self, path: str, **headers: str) -> tuple[int, object]:
        return await self.c.call("PUT", path, headers=headers)

    async def test_a_change_by_cookie_from_another_site_is_refused(self) -> None:
        cookie = f"coder_session_token={self.alice}"
        # A workspace app on a subdomain is the same site (SameSite=Lax sends the cookie) but not
        # the same origin.
        for origin in ("http://evil.example", "http://app--main--box--alice.127.0.0.1:3000"):
            code, body = await self.put("/api/v2/users/bob/status/suspend", Cookie=cookie, Origin=origin)
            self.assertEqual(code, 403, origin)
            self.assertEqual(body["message"], "Cross-site request refused.")  # type: ignore[index]
        code, _ = await self.put("/api/v2/users/bob/status/suspend", Cookie=cookie)  # no Origin, no Referer
        self.assertEqual(code, 403)
        _, me = await self.c.call("GET", "/api/v2/users", token=self.alice)
        self.assertEqual({u["username"]: u["status"] for u in me["users"]}["bob"], "active")  # type: ignore[index]

    async def test_our_pages_the_header_and_reads_pass(self) -> None:
        cookie = f"coder_session_token={self.alice}"
        code, _ = await self.put("/api/v2/users/bob/status/suspend", Cookie=cookie, Origin=ACCESS_URL)
        self.assertEqual(code, 200)
        code, _ = await self.put("/api/v2/users/bob/status/activate", Cookie=cookie,
                                 Referer=ACCESS_URL + "/users")
        self.assertEqual(code, 200)
        # The header is something no other site's page can send: no Origin needed.
        code, _ = await self.put("/api/v2/users/bob/status/suspend", **{"Coder-Session-Token": self.alice,
                                                                        "Origin": "http://evil.example"})
        self.assertEqual(code, 200)
        code, _ = await self.c.call("GET", "/api/v2/users", headers={"Cookie": cookie, "Origin": "http://evil.example"})
        self.assertEqual(code, 200)
