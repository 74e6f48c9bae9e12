"""The owners' pages in memory (templates, users, health): who may see them, what they show,
that user text is escaped; and the build card of the workspace page."""

from __future__ import annotations

import uuid
from types import SimpleNamespace
from typing import Any, cast

from twisted.trial import unittest

from coderstack.server import dashboard, health, healthcheck
from coderstack.server.records import Workspace
from tests.support.api import Caller, make_deployment


def header(headers: Any, name: str) -> str:
    return b", ".join(headers.getRawHeaders(name.encode()) or [b""]).decode()


def a_report(*, websocket_error: str | None = None) -> dict[str, Any]:
    derp = {"severity": "ok", "warnings": [], "dismissed": False, "healthy": True, "regions": {
        "999": {"healthy": True, "severity": "ok", "warnings": [],
                "region": {"RegionID": 999, "RegionName": "Embedded <relay>"},
                "node_reports": [
                    {"severity": "ok", "node": {"Name": "999b"}, "can_exchange_messages": True,
                     "round_trip_ping": "1.5ms", "uses_websocket": False,
                     "stun": {"Enabled": True, "CanSTUN": True, "Error": None}},
                    {"severity": "ok", "node": {"Name": "999stun1", "STUNOnly": True},
                     "can_exchange_messages": False, "round_trip_ping": "",
                     "stun": {"Enabled": True, "CanSTUN": False, "Error": "no STUN answer"}}]}}}
    return health.report(
        version="9.9",
        access_url=health.access_url_section("http://127.0.0.1:3000", health.Fetched(200, "OK", None)),
        database=health.database_section(0.002, None),
        websocket=health.websocket_section("x" if websocket_error is None else None, "x", websocket_error),
        derp=derp)


class OwnerPageTests(unittest.TestCase):
    async def setUp(self) -> None:
        self.d, self.api = await make_deployment(self)
        self.c = Caller(self.api)
        self.alice = await self.c.owner()
        self.bob = await self.c.member(self.alice)

    async def get(self, path: str, token: str | None = None) -> tuple[int, Any, Any]:
        headers = {"Cookie": f"coder_session_token={token}"} if token else {}
        return await self.c.exchange("GET", path, headers=headers)

    async def test_only_owners_see_them(self) -> None:
        async def fake_run(reactor: Any, d: Any, token: str) -> dict[str, Any]:
            return a_report()

        self.patch(healthcheck, "run", fake_run)
        for path in ("/templates", "/users", "/health"):
            code, headers, _ = await self.get(path)
            self.assertEqual((code, header(headers, "Location")), (303, "/login?next=" + path))
            code, _, body = await self.get(path, self.bob)
            self.assertEqual(code, 404, path)
            self.assertIn(b"<h1>Not found</h1>", body)
            code, headers, body = await self.get(path, self.alice)
            self.assertEqual(code, 200, path)
            self.assertIn("default-src 'self'", header(headers, "Content-Security-Policy"))
            self.assertNotIn(self.alice.encode(), body)
        # The API's health report is for owners too.
        self.assertEqual((await self.c.call("GET", "/api/v2/debug/health", token=self.bob))[0], 403)
        self.assertEqual((await self.c.call("GET", "/api/v2/debug/ws", token=self.bob))[0], 403)

    async def test_users_page_lists_everyone_with_the_right_buttons(self) -> None:
        code, _ = await self.c.call("PUT", "/api/v2/users/bob/status/suspend", token=self.alice)
        self.assertEqual(code, 200)
        _, _, body = await self.get("/users", self.alice)
        page = body.decode()
        self.assertIn('<tr data-user="bob"><td>bob</td><td>bob@example.com</td><td>member</td>'
                      '<td class="status-suspended">suspended</td>', page)
        self.assertIn('data-user="bob" data-action="activate">Activate</button>', page)
        self.assertIn('<tr data-user="alice"><td>alice</td>', page)
        self.assertIn('<span class="muted">you</span>', page)  # no button to suspend yourself
        self.assertIn('src="/static/app/users.js"', page)

    async def test_templates_page_without_templates_says_how_to_push_one(self) -> None:
        _, _, body = await self.get("/templates", self.alice)
        self.assertIn(b"No templates yet: coderstack templates push DIR", body)

    async def test_health_page_shows_each_check_and_escapes(self) -> None:
        async def fake_run(reactor: Any, d: Any, token: str) -> dict[str, Any]:
            self.assertEqual(token, self.alice)  # the websocket check dials as the asking owner
            return a_report(websocket_error="ConnectionRefusedError: <refused>")

        self.patch(healthcheck, "run", fake_run)
        _, _, body = await self.get("/health", self.alice)
        page = body.decode()
        self.assertIn('<h1>Health <span class="state bad">error</span></h1>', page)
        self.assertIn('<tr data-check="access_url"><th>Access URL</th><td><span class="state ok">ok</span>'
                      "</td><td>http://127.0.0.1:3000/healthz: HTTP 200 OK</td></tr>", page)
        self.assertIn("round trip 2ms (threshold 15 ms)", page)
        self.assertIn("echo through the access URL: ConnectionRefusedError: &lt;refused&gt;", page)
        self.assertIn("EWS01", page)
        self.assertIn("DERP region 999 (Embedded &lt;relay&gt;)", page)
        self.assertIn("999b: relay ping 1.5ms, STUN ok<br>999stun1: STUN only, STUN: no STUN answer", page)


class BuildCardTests(unittest.TestCase):
    def test_a_templated_workspace_gets_the_buttons(self) -> None:
        card = dashboard.build_card(cast(Workspace, SimpleNamespace(template_id=uuid.uuid4())))
        for button in ('id="start" data-transition="start"', 'id="stop" data-transition="stop"',
                       'id="delete" data-transition="destroy" class="danger"'):
            self.assertIn(button, card)
        self.assertEqual(card.count(" disabled>"), 3)  # until builds.js knows the state
        self.assertIn('<pre class="logs" id="build-log">', card)

    def test_a_workspace_started_by_hand_has_nothing_to_build(self) -> None:
        card = dashboard.build_card(cast(Workspace, SimpleNamespace(template_id=None)))
        self.assertNotIn("<button", card)
        self.assertIn("no template", card)
