"""The dashboard's pages in memory: redirects, the login form and its cookie, same-site form
checks, logout, owner-only pages, security headers, escaping, and the static files."""

from __future__ import annotations

import hashlib
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from twisted.logger import globalLogPublisher
from twisted.trial import unittest

from coderstack.server import htmlpage, webassets
from coderstack.server.dashboard import terminal_page
from coderstack.server.records import User
from tests.support.api import ACCESS_URL, Caller, make_deployment

FORM = {"Content-Type": "application/x-www-form-urlencoded", "Accept": "text/html"}


def header(headers: Any, name: str) -> str:
    got = headers.getRawHeaders(name.encode()) or [b""]
    return b", ".join(got).decode()


class DashboardPageTests(unittest.TestCase):
    async def setUp(self) -> None:
        self.d, self.api = await make_deployment(self)
        self.c = Caller(self.api)
        self.alice = await self.c.owner()

    async def get(self, path: str, token: str | None = None) -> tuple[int, Any, Any]:
        headers = {"Cookie": f"coder_session_token={token}"} if token else {}
        return await self.c.exchange("GET", path, headers=headers)

    async def post_form(self, path: str, fields: dict[str, str], token: str | None = None,
                        origin: str | None = ACCESS_URL) -> tuple[int, Any, Any]:
        headers = dict(FORM)
        if origin is not None:
            headers["Origin"] = origin
        if token:
            headers["Cookie"] = f"coder_session_token={token}"
        return await self.c.exchange("POST", path, raw=urlencode(fields).encode(), headers=headers)

    def assertPageHeaders(self, headers: Any) -> None:
        csp = header(headers, "Content-Security-Policy")
        for part in ("default-src 'self'", "script-src 'self';", "style-src 'self';",
                     "connect-src 'self' ws://127.0.0.1:3000;", "frame-ancestors 'none'"):
            self.assertIn(part, csp)
        self.assertEqual(header(headers, "X-Content-Type-Options"), "nosniff")
        self.assertEqual(header(headers, "Cache-Control"), "no-store")
        self.assertEqual(header(headers, "Content-Type"), "text/html; charset=utf-8")

    async def test_front_door_and_anonymous_pages_redirect(self) -> None:
        code, headers, _ = await self.get("/")
        self.assertEqual((code, header(headers, "Location")), (303, "/login"))
        code, headers, _ = await self.get("/", self.alice)
        self.assertEqual((code, header(headers, "Location")), (303, "/workspaces"))
        for path in ("/workspaces", "/workspaces/alice/box", "/workspaces/alice/box/main/terminal"):
            code, headers, _ = await self.get(path)
            self.assertEqual((code, header(headers, "Location")), (303, "/login?next=" + path), path)
        code, headers, body = await self.get("/login")
        self.assertEqual(code, 200)
        self.assertPageHeaders(headers)
        self.assertIn(b'<form method="post" action="/login"', body)
        self.assertNotIn(b"<script>", body)
        # Other routes are untouched.
        code, _, body = await self.get("/nothing")
        self.assertEqual((code, body["message"]), (404, "Route not found."))
        self.assertEqual((await self.get("/healthz"))[0], 200)

    async def test_login_form_sets_the_cookie_and_goes_next(self) -> None:
        code, headers, _ = await self.post_form("/login", {"email": "alice", "password": "correct horse",
                                                           "next": "/workspaces/alice/box"})
        self.assertEqual((code, header(headers, "Location")), (303, "/workspaces/alice/box"))
        cookie = header(headers, "Set-Cookie")
        self.assertTrue(cookie.startswith("coder_session_token="), cookie)
        for attr in ("httponly", "samesite=lax", "path=/", f"max-age={7 * 24 * 3600}"):
            self.assertIn(attr, cookie.lower())
        self.assertNotIn("Secure", cookie)  # plain HTTP here
        token = cookie.split(";", 1)[0].split("=", 1)[1]
        self.assertEqual((await self.c.call("GET", "/api/v2/users/me", token=token))[0], 200)

        # Only paths on this site are followed after login.
        for bad in ("//evil.example/", "https://evil.example/", "/\\evil.example", "workspaces"):
            code, headers, _ = await self.post_form("/login", {"email": "alice", "password": "correct horse",
                                                               "next": bad})
            self.assertEqual((code, header(headers, "Location")), (303, "/workspaces"), bad)

    async def test_login_failures_show_the_form_again(self) -> None:
        code, headers, body = await self.post_form("/login", {"email": "alice", "password": "wrong one<"})
        self.assertEqual(code, 401)
        self.assertPageHeaders(headers)
        self.assertIn(b"Incorrect email or password.", body)
        self.assertIn(b'value="alice"', body)
        self.assertNotIn(b"wrong one", body)  # the password is never echoed
        self.assertEqual(header(headers, "Set-Cookie"), "")

    async def test_form_posts_from_other_sites_are_refused(self) -> None:
        fields = {"email": "alice", "password": "correct horse"}
        for origin in ("http://evil.example", None):
            code, headers, body = await self.post_form("/login", fields, origin=origin)
            self.assertEqual(code, 403, origin)
            self.assertEqual(header(headers, "Set-Cookie"), "")
            code, _, _ = await self.post_form("/logout", {}, self.alice, origin=origin)
            self.assertEqual(code, 403, origin)
        self.assertEqual((await self.c.call("GET", "/api/v2/users/me", token=self.alice))[0], 200)
        # A Referer from this site stands in for a missing Origin.
        headers = {**FORM, "Referer": ACCESS_URL + "/login"}
        code, _, _ = await self.c.exchange("POST", "/login", raw=urlencode(fields).encode(), headers=headers)
        self.assertEqual(code, 303)

    async def test_logout_clears_the_cookie_and_ends_the_session(self) -> None:
        code, headers, _ = await self.post_form("/logout", {}, self.alice)
        self.assertEqual((code, header(headers, "Location")), (303, "/login"))
        cookie = header(headers, "Set-Cookie")
        self.assertIn("coder_session_token=;", cookie)
        self.assertIn("Max-Age=0", cookie)
        self.assertEqual((await self.c.call("GET", "/api/v2/users/me", token=self.alice))[0], 401)
        # Logging out again (no valid session) still clears the cookie.
        code, _, _ = await self.post_form("/logout", {}, self.alice)
        self.assertEqual(code, 303)

    async def test_workspace_pages_are_the_owners_only(self) -> None:
        code, _ = await self.c.call("POST", "/api/v2/users/me/workspaces", {"name": "box"}, token=self.alice)
        self.assertEqual(code, 201)
        code, _ = await self.c.call("POST", "/api/v2/users", {"username": "bob", "email": "bob@example.com",
                                                              "password": "bob password"}, token=self.alice)
        self.assertEqual(code, 201)
        _, got = await self.c.call("POST", "/api/v2/users/login", {"email": "bob", "password": "bob password"})
        bob = got["session_token"]

        code, headers, body = await self.get("/workspaces", self.alice)
        self.assertEqual(code, 200)
        self.assertPageHeaders(headers)
        self.assertIn(b'src="/static/app/workspaces.js"', body)
        self.assertNotIn(self.alice.encode(), body)
        code, headers, body = await self.get("/workspaces/alice/box", self.alice)
        self.assertEqual(code, 200)
        self.assertPageHeaders(headers)
        self.assertIn(b'href="/workspaces/alice/box/main/terminal"', body)
        self.assertNotIn(self.alice.encode(), body)
        code, headers, body = await self.get("/workspaces/alice/box/main/terminal", self.alice)
        self.assertEqual(code, 200)
        self.assertIn("style-src 'self' 'unsafe-inline';", header(headers, "Content-Security-Policy"))
        self.assertIn(b'src="/static/app/terminal.js"', body)
        self.assertNotIn(self.alice.encode(), body)

        for path, token in (("/workspaces/alice/box", bob), ("/workspaces/alice/box/main/terminal", bob),
                            ("/workspaces/bob/box", bob), ("/workspaces/alice/nope", self.alice),
                            ("/workspaces/alice/box/other/terminal", self.alice)):
            code, headers, body = await self.get(path, token)
            self.assertEqual(code, 404, path)
            self.assertPageHeaders(headers)
            self.assertIn(b"<h1>Not found</h1>", body)

    async def test_static_files(self) -> None:
        code, headers, body = await self.get("/static/app/terminal.js")
        self.assertEqual(code, 200)
        self.assertEqual(header(headers, "Content-Type"), "text/javascript; charset=utf-8")
        self.assertEqual(header(headers, "Cache-Control"), "no-cache")
        self.assertEqual(header(headers, "X-Content-Type-Options"), "nosniff")
        for path in ("/static/app/nothing.js", "/static/app/../dashboard.py", "/static/vendor/x/xterm.mjs"):
            code, headers, _ = await self.get(path)
            self.assertEqual(code, 404, path)


class AssetsTests(unittest.TestCase):
    def test_vendor_files_get_content_addressed_immutable_urls(self) -> None:
        app = Path(self.mktemp())
        app.mkdir()
        (app / "x.js").write_text("export {};\n")
        (app / "notes.txt").write_text("not served")
        modules = Path(self.mktemp())
        for rel in webassets.VENDOR_FILES.values():
            (modules / rel).parent.mkdir(parents=True, exist_ok=True)
            (modules / rel).write_text(rel)
        assets = webassets.Assets(app, modules)
        self.assertTrue(assets.terminal_available)
        digest = hashlib.sha256(b"@xterm/xterm/css/xterm.css").hexdigest()[:16]
        self.assertEqual(assets.vendor_urls["xterm.css"], f"/static/vendor/{digest}/xterm.css")
        css = assets.get(assets.vendor_urls["xterm.css"])
        assert css is not None
        self.assertEqual((css.body, css.content_type, css.cache_control),
                         (b"@xterm/xterm/css/xterm.css", b"text/css; charset=utf-8", webassets.VENDOR_CACHE))
        own = assets.get("/static/app/x.js")
        assert own is not None
        self.assertEqual(own.cache_control, b"no-cache")
        self.assertIsNone(assets.get("/static/app/notes.txt"))

    def test_missing_node_modules_is_one_error_line_not_a_crash(self) -> None:
        events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(events.append)
        self.addCleanup(globalLogPublisher.removeObserver, events.append)
        assets = webassets.Assets(Path(self.mktemp()), Path(self.mktemp()))
        self.assertFalse(assets.terminal_available)
        self.assertEqual(assets.vendor_urls, {})
        errors = [e for e in events if e.get("log_level") is not None and e["log_level"].name == "error"]
        self.assertEqual(len(errors), 1)
        self.assertIn("npm ci --prefix web", errors[0]["log_format"])

    def test_the_terminal_page_without_xterm_says_how_to_install_it(self) -> None:
        import uuid
        from datetime import UTC, datetime

        from coderstack.server.records import User, Workspace

        assets = webassets.Assets(Path(self.mktemp()), Path(self.mktemp()))
        t = datetime.now(UTC)
        user = User(uuid.uuid4(), "alice", "a@example.com", "", ("owner",), t)
        ws = Workspace(uuid.uuid4(), user.id, "alice", "box", None, t, t)
        page, inline = terminal_page(user, ws, "id", "main", assets)
        self.assertFalse(inline)
        self.assertIn(b"npm ci --prefix web", page)
        self.assertNotIn(b"<script", page)


class HTMLPageTests(unittest.TestCase):
    def test_layout_escapes_and_carries_no_inline_script(self) -> None:
        who = User(uuid.uuid4(), "<b>", "b@example.com", "", ("owner",), datetime.now(UTC))
        page = htmlpage.layout('<x>"', "<p>ok</p>", user=who, script="/static/app/a.js",
                               data={"agent-id": '"><script>'})
        self.assertIn(b"&lt;x&gt;&quot;", page)
        self.assertIn(b'<span class="who">&lt;b&gt;</span>', page)
        self.assertIn(b'data-agent-id="&quot;&gt;&lt;script&gt;"', page)
        self.assertEqual(page.count(b"<script"), 1)
        self.assertIn(b'<script type="module" src="/static/app/a.js"></script>', page)
        # Owners get the deployment's pages in the menu; members do not.
        self.assertIn(b'<a href="/health">Health</a>', page)
        member = htmlpage.layout("t", "", user=User(uuid.uuid4(), "m", "m@example.com", "", (), who.created_at))
        self.assertNotIn(b'href="/users"', member)

    def test_csp_follows_the_access_url_scheme(self) -> None:
        self.assertIn(b"connect-src 'self' wss://coder.example.com;",
                      htmlpage.content_security_policy("https://coder.example.com/"))

    def test_safe_next(self) -> None:
        for good in ("/workspaces", "/workspaces/a/b?x=1"):
            self.assertEqual(htmlpage.safe_next(good), good)
        for bad in ("", "//x", "/\\x", "http://x/", "/a\r\nSet-Cookie: x", "x"):
            self.assertEqual(htmlpage.safe_next(bad), "/workspaces")


class CookieTests(unittest.TestCase):
    def test_the_session_cookie_is_secure_over_tls(self) -> None:
        from twisted.web.server import Request
        from twisted.web.test.requesthelper import DummyChannel

        from coderstack.server.dashboard import set_session_cookie

        for transport, secure in ((DummyChannel.SSL(), True), (DummyChannel.TCP(), False)):
            channel = DummyChannel()
            channel.transport = transport
            request = Request(channel)
            set_session_cookie(request, "token", 60)
            [cookie] = request.cookies
            self.assertEqual(b"; Secure" in cookie, secure, cookie)
            self.assertIn(b"; HttpOnly", cookie)
