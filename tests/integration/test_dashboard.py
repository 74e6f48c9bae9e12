"""The dashboard in headless Chromium against a real server and a real agent: log in through the
form, see the workspace connected, open its page and its web terminal, type into the shell,
resize, drop the websocket and reload (the same shell and its scrollback come back), another
member's 404s, logging out.

The browser is Debian's chromium driven by Playwright's sync API in a thread (the server and the
agent are processes; the reactor keeps running). Screenshots go to ``$CODERSTACK_TEST_ARTIFACTS``
when set, else to the test's temp dir.
"""

from __future__ import annotations

import os
import re
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from twisted.internet import threads
from twisted.trial import unittest

from coderstack.server.webassets import VENDOR_FILES, WEB_DIR
from tests.integration.tunnel_support import workspace

CHROMIUM = "/usr/bin/chromium"
#: How long the page may take to show something (a loaded CI machine, a first tunnel).
WAIT_MS = 60_000

_skip: str | None = None
try:
    import playwright  # noqa: F401  # only to learn whether it is installed
except ImportError:
    _skip = "playwright is not installed (.ci/run installs the test extras)"
if _skip is None and not os.path.exists(CHROMIUM):
    _skip = f"no {CHROMIUM} (.ci/run installs Debian's chromium)"
if _skip is None and not all((WEB_DIR / "node_modules" / f).is_file() for f in VENDOR_FILES.values()):
    _skip = "web/node_modules is missing (run: npm ci --prefix web)"

TEXT = "() => window.coderstackTerminal ? window.coderstackTerminal.text() : ''"


def _status(url: str, token: str | None = None, method: str = "GET", **headers: str) -> int:
    if token is not None:
        headers["Coder-Session-Token"] = token
    req = urllib.request.Request(url, method=method, headers=headers, data=b"" if method == "POST" else None)
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as err:
        return err.code


class DashboardTests(unittest.TestCase):
    skip = _skip
    timeout = 300

    async def test_login_workspace_terminal_and_logout(self) -> None:
        d, alice, _agent = await workspace(self)
        await alice.ok("users", "create", "--username", "bob", "--email", "bob@example.com",
                       "--password", "bob password")
        shots = Path(os.environ.get("CODERSTACK_TEST_ARTIFACTS") or self.mktemp()) / "dashboard"
        shots.mkdir(parents=True, exist_ok=True)
        self.step = "starting the browser"
        self.console: list[str] = []
        try:
            await threads.deferToThread(self.browse, d.url, shots)
            problem = None
        except Exception as err:  # reported below as one short line
            problem = f"{type(err).__name__}: {str(err)[:800]}"
        if problem is not None:
            # Out of the except block: the report is this line, not the thread's traceback.
            self.fail(f"while {self.step}: {problem}; console errors: {self.console[-5:]}")
        assert d.server is not None
        self.assertNotIn("Traceback", d.server.log())

    def browse(self, url: str, shots: Path) -> None:
        from playwright.sync_api import sync_playwright

        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            try:
                self.owner_steps(browser, url, shots)
                self.member_steps(browser, url)
            finally:
                browser.close()

    def login(self, page: Any, url: str, who: str) -> None:
        resp = page.goto(url + "/")
        self.assertTrue(page.url.startswith(url + "/login"), page.url)
        csp = resp.headers.get("content-security-policy", "")
        self.assertIn("default-src 'self'", csp)
        self.assertIn("frame-ancestors 'none'", csp)
        self.assertNotIn("unsafe-inline", csp)
        self.assertEqual(resp.headers.get("x-content-type-options"), "nosniff")
        page.fill("#email", who)
        page.fill("#password", f"{who} password")
        page.click("#login-submit")
        page.wait_for_url(url + "/workspaces")

    def owner_steps(self, browser: Any, url: str, shots: Path) -> None:
        context = browser.new_context(viewport={"width": 1200, "height": 800})
        page = context.new_page()
        errors = self.console
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)

        # A wrong password shows the form again with the reason.
        page.goto(url + "/login")
        page.fill("#email", "alice")
        page.fill("#password", "not the password")
        page.click("#login-submit")
        self.assertIn("Incorrect", page.text_content("#login-error") or "")

        self.step = "logging in"
        self.login(page, url, "alice")
        cookie = next(c for c in context.cookies() if c["name"] == "coder_session_token")
        self.assertTrue(cookie["httpOnly"])
        self.assertEqual(cookie["sameSite"], "Lax")
        self.assertNotIn(cookie["value"], page.content())  # no token in the HTML

        # The list fills in from the API: the workspace and its connected agent.
        self.step = "waiting for the workspace list"
        page.wait_for_selector("tr[data-workspace=box] .status-connected", timeout=WAIT_MS)
        page.screenshot(path=str(shots / "workspaces.png"))

        # The API's answers are rewritten before the page loads, so every poll it makes sees them.
        self.step = "opening the workspace page"
        self.route_agent_details(page)
        page.click("a.workspace-link")
        page.wait_for_url(url + "/workspaces/alice/box")
        page.wait_for_function(
            "() => document.querySelector('.agent [data-field=status]').textContent === 'connected'",
            timeout=WAIT_MS)
        self.assertEqual(page.text_content(".agent h2 a.terminal-link"), "Terminal")
        self.step = "reading the agent's details"
        self.check_agent_details(page)
        page.screenshot(path=str(shots / "workspace.png"))
        page.unroute_all()

        # The terminal: its page loosens style-src only (xterm.js's own <style> elements).
        # /bin/sh rather than the account's login shell: this machine's root bash profile runs
        # pyenv, whose rehash lock a killed shell can leave behind for the next one to wait on.
        self.assertEqual(page.get_attribute("a.terminal-link", "href"), "/workspaces/alice/box/main/terminal")
        self.step = "opening the terminal"
        response = page.goto(url + "/workspaces/alice/box/main/terminal?command=/bin/sh")
        csp = response.headers.get("content-security-policy", "")
        self.assertIn("script-src 'self';", csp)
        self.assertIn("style-src 'self' 'unsafe-inline'", csp)
        page.wait_for_function(
            "() => document.getElementById('terminal-state').textContent === 'connected'", timeout=WAIT_MS)
        self.step = "typing into the terminal"
        page.click("#terminal")
        page.keyboard.type("echo hi-$((6*7)) $$")
        page.keyboard.press("Enter")
        page.wait_for_function(f"() => ({TEXT})().includes('hi-42 ')", timeout=WAIT_MS)
        pid = re.search(r"hi-42 (\d+)", page.evaluate(TEXT))
        assert pid is not None
        # The xterm rows in the DOM show it too, once xterm.js has drawn its next frame (its
        # buffer, read above, is ahead of the DOM).
        page.wait_for_function("() => document.querySelector('.xterm-rows').textContent.includes('hi-42')",
                               timeout=WAIT_MS)
        self.step = "waiting for the terminal's path to go direct"
        page.wait_for_function(
            "() => document.getElementById('terminal-path').textContent.includes('direct')", timeout=WAIT_MS)
        page.screenshot(path=str(shots / "terminal.png"))

        # A smaller window: the fit addon resizes the terminal, and the PTY follows.
        self.step = "resizing the terminal"
        before = page.evaluate("() => [window.coderstackTerminal.term.rows, window.coderstackTerminal.term.cols]")
        page.set_viewport_size({"width": 700, "height": 450})
        page.wait_for_function(
            "(b) => window.coderstackTerminal.term.rows !== b[0] && window.coderstackTerminal.term.cols !== b[1]",
            arg=before, timeout=WAIT_MS)
        rows, cols = page.evaluate("() => [window.coderstackTerminal.term.rows, window.coderstackTerminal.term.cols]")
        page.keyboard.type("stty size")
        page.keyboard.press("Enter")
        page.wait_for_function(f"() => ({TEXT})().includes('{rows} {cols}')", timeout=WAIT_MS)

        # The connection drops: the page says so, reconnects by itself, and the same shell is back.
        self.step = "dropping the terminal's websocket"
        page.evaluate("""() => {
            window.seenStates = [];
            const el = document.getElementById('terminal-state');
            new MutationObserver(() => window.seenStates.push(el.textContent))
                .observe(el, {childList: true, characterData: true, subtree: true});
            window.oldSocket = window.coderstackTerminal.socket;
            window.oldSocket.close();
        }""")
        page.wait_for_function(
            "() => window.coderstackTerminal.socket && window.coderstackTerminal.socket !== window.oldSocket"
            " && window.coderstackTerminal.socket.readyState === WebSocket.OPEN", timeout=WAIT_MS)
        states = page.evaluate("() => window.seenStates")
        self.assertTrue(any(s.startswith("reconnecting") for s in states), states)
        page.wait_for_function(f"() => ({TEXT})().includes('hi-42 ')", timeout=WAIT_MS)  # scrollback
        page.click("#terminal")
        page.keyboard.type("echo pid-$$")
        page.keyboard.press("Enter")
        page.wait_for_function(f"() => ({TEXT})().includes('pid-{pid[1]}')", timeout=WAIT_MS)

        # A reload keeps the session too (its id is in sessionStorage).
        self.step = "reloading the terminal"
        session = page.evaluate("() => window.coderstackTerminal.session")
        page.reload()
        page.wait_for_function(f"() => ({TEXT})().includes('pid-{pid[1]}')", timeout=WAIT_MS)
        self.assertEqual(page.evaluate("() => window.coderstackTerminal.session"), session)

        # Static files: vendored ones are immutable, ours revalidate; both typed and nosniff.
        self.step = "fetching static files"
        xterm = page.evaluate("() => document.body.dataset.xterm")
        resp = page.request.get(url + xterm)
        self.assertEqual(resp.headers["content-type"], "text/javascript; charset=utf-8")
        self.assertIn("immutable", resp.headers["cache-control"])
        resp = page.request.get(url + "/static/app/dashboard.css")
        self.assertEqual((resp.headers["content-type"], resp.headers["cache-control"]),
                         ("text/css; charset=utf-8", "no-cache"))
        self.assertEqual(page.request.get(url + "/static/app/nothing.js").status, 404)

        # A logout form sent from another site is refused; ours logs out and kills the session.
        self.step = "logging out"
        self.assertEqual(_status(url + "/logout", method="POST", Origin="http://evil.example",
                                 Cookie=f"coder_session_token={cookie['value']}"), 403)
        self.assertEqual(_status(url + "/api/v2/users/me", cookie["value"]), 200)
        page.goto(url + "/workspaces")
        page.click("#logout")
        page.wait_for_url(url + "/login")
        self.assertEqual(_status(url + "/api/v2/users/me", cookie["value"]), 401)
        page.goto(url + "/workspaces/alice/box")
        self.assertTrue(page.url.startswith(url + "/login?next="), page.url)
        self.assertEqual([e for e in errors if "Failed to load resource" not in e], [])
        context.close()

    def route_agent_details(self, page: Any) -> None:
        """What a template gives an agent (metadata, apps, startup logs), fed to the page by
        rewriting the API's answers."""
        polls = {"metadata": 0}

        def metadata(route: Any) -> None:
            polls["metadata"] += 1
            route.fulfill(json=[{"description": {"key": "load", "display_name": "Load"},
                                 "result": {"value": f"<b>{polls['metadata']}</b>", "error": ""}}])

        def agent(route: Any) -> None:
            real = route.fetch().json()
            real["apps"] = [{"slug": "code", "display_name": "Code", "health": "healthy",
                             "browser_url": "http://127.0.0.1:1/@alice/box.main/apps/code/"}]
            real["server_path"] = {"path": "derp", "derp_region": 999, "latency_ms": 12.5}
            route.fulfill(json=real)

        def logs(route: Any) -> None:
            after = route.request.url.split("after=")[1]
            body = '{"id": 1, "output": "hello from <startup>"}\n' if after == "0" else ""
            route.fulfill(body=body, headers={"Content-Type": "application/x-ndjson"})

        page.route("**/api/v2/workspaceagents/*/metadata", metadata)
        page.route("**/api/v2/workspaceagents/*/logs?*", logs)
        page.route(re.compile(r".*/api/v2/workspaceagents/[0-9a-f-]+$"), agent)

    def check_agent_details(self, page: Any) -> None:
        """The rewritten details are shown as text, and updated without a reload."""
        page.wait_for_function(
            "() => /^<b>[0-9]+<\\/b>$/.test(document.querySelector('.metadata tr[data-key=load] td')?.textContent)",
            timeout=WAIT_MS)
        first = page.text_content(".metadata tr[data-key=load] td")
        page.wait_for_function(
            "(v) => document.querySelector('.metadata tr[data-key=load] td').textContent !== v",
            arg=first, timeout=WAIT_MS)
        self.assertEqual(page.text_content(".apps li[data-app=code] .health"), "healthy")
        self.assertEqual(page.get_attribute(".apps li[data-app=code] a", "href"),
                         "http://127.0.0.1:1/@alice/box.main/apps/code/")
        self.assertEqual(page.text_content(".agent [data-field=path]"), "relayed (DERP region 999), 12.5 ms")
        page.wait_for_function("() => document.querySelector('.logs').textContent.includes('hello from <startup>')",
                               timeout=WAIT_MS)
        # Logs are asked for after the last id seen: the line is shown once.
        self.assertEqual(page.text_content(".logs").count("hello from"), 1)
        self.assertEqual(page.locator(".metadata b").count(), 0)  # text, never markup

    def member_steps(self, browser: Any, url: str) -> None:
        self.step = "logging in as another member"
        context = browser.new_context()
        page = context.new_page()
        self.login(page, url, "bob")
        page.wait_for_selector("#workspaces tbody td.muted", timeout=WAIT_MS)  # none of his own
        self.assertNotIn("box", page.text_content("#workspaces") or "")
        for path in ("/workspaces/alice/box", "/workspaces/alice/box/main/terminal",
                     "/workspaces/bob/box", "/workspaces/bob/box/main/terminal"):
            resp = page.goto(url + path)
            self.assertEqual(resp.status, 404, path)
            self.assertIn("Not found", page.text_content("h1") or "")
        context.close()
