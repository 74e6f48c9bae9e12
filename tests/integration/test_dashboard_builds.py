"""The dashboard drives a template workspace in headless Chromium: the build card's state and
buttons, a stop and a start with their build logs streaming onto the page, the startup script's
logs, opening the workspace's app from its page (and from a link, logging in first), deleting
the workspace; the owners' templates,
users (suspend / activate) and health pages; a member refused all three.

Real terraform builds the ``workspace`` example template and starts the real agent; the app is a
small HTTP server in this process. Screenshots go to ``$CODERSTACK_TEST_ARTIFACTS`` when set,
else to the test's temp dir.
"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import threading
from pathlib import Path
from typing import Any

from tests.integration.test_templates import SKIP, TemplateServerCase, free_port

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "terraform" / "templates" / "workspace"
CHROMIUM = "/usr/bin/chromium"
#: How long the page may take to show something (terraform runs in a build).
WAIT_MS = 120_000
APP_TEXT = b"hello from the workspace app"

_skip = SKIP
if _skip is None:
    try:
        import playwright  # noqa: F401  # only to learn whether it is installed
    except ImportError:
        _skip = "playwright is not installed (.ci/run installs the test extras)"
if _skip is None and not os.path.exists(CHROMIUM):
    _skip = f"no {CHROMIUM} (.ci/run installs Debian's chromium)"


class _Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(APP_TEXT)))
        self.end_headers()
        self.wfile.write(APP_TEXT)

    def log_message(self, format: str, *args: object) -> None:
        pass


class DashboardBuildTests(TemplateServerCase):
    skip = _skip

    def setUp(self) -> None:
        super().setUp()
        self.app = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), _Hello)
        threading.Thread(target=self.app.serve_forever, daemon=True).start()
        self.addCleanup(self.app.server_close)
        self.addCleanup(self.app.shutdown)
        self.home = self.tmp / "home"
        self.home.mkdir()
        template = self.tmp / "workspace"
        shutil.copytree(EXAMPLE, template)
        (template / "terraform.tfvars.json").write_text(
            json.dumps({"home": str(self.home), "app_port": self.app.server_address[1]}))
        self.cli("templates", "push", str(template), "--name", "workspace")
        self.cli("create", "box", "--template", "workspace")
        self.cli("users", "create", "--username", "bob", "--email", "bob@example.com", "--password", "bob password")
        self.shots = Path(os.environ.get("CODERSTACK_TEST_ARTIFACTS") or self.tmp) / "dashboard-builds"
        self.shots.mkdir(parents=True, exist_ok=True)

    def test_buttons_logs_app_and_the_owners_pages(self) -> None:
        from playwright.sync_api import sync_playwright

        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            try:
                context = browser.new_context(viewport={"width": 1200, "height": 900})
                page = context.new_page()
                errors: list[str] = []
                page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
                self.login(page, "admin", "correct horse")
                self.workspace_steps(context, page)
                self.owner_pages(page)
                self.app_after_login(browser)
                self.delete_step(page)
                self.assertEqual([e for e in errors if "Failed to load resource" not in e], [])
                context.close()
                self.member_refused(browser)
            finally:
                browser.close()

    def login(self, page: Any, who: str, password: str) -> None:
        page.goto(self.url + "/login")
        page.fill("#email", who)
        page.fill("#password", password)
        page.click("#login-submit")
        page.wait_for_url(self.url + "/workspaces")

    def wait_state(self, page: Any, state: str) -> None:
        page.wait_for_function(f"() => document.getElementById('build-state')?.textContent === {state!r}",
                               timeout=WAIT_MS)

    def buttons(self, page: Any) -> dict[str, bool]:
        return {b: page.is_enabled(f"#build #{b}") for b in ("start", "stop", "delete")}

    def workspace_steps(self, context: Any, page: Any) -> None:
        page.wait_for_selector("tr[data-workspace=box] td.build-state:text('running')", timeout=WAIT_MS)
        page.click("a.workspace-link")
        page.wait_for_url(self.url + "/workspaces/admin/box")
        self.wait_state(page, "running")
        self.assertEqual(self.buttons(page), {"start": False, "stop": True, "delete": True})
        # The last build's log is on the page (fetched once its state is shown); so are the
        # startup script's logs and the app.
        page.wait_for_function("() => document.getElementById('build-log').textContent.includes('Apply complete')",
                               timeout=WAIT_MS)
        page.wait_for_function("() => document.querySelector('.agent .logs').textContent.includes('startup: done')",
                               timeout=WAIT_MS)
        page.wait_for_selector(".apps li[data-app=web] .health-healthy", timeout=WAIT_MS)
        page.screenshot(path=str(self.shots / "workspace-running.png"))
        with context.expect_page() as opened:
            page.click(".apps li[data-app=web] a")
        app = opened.value
        app.wait_for_load_state()
        self.assertEqual(app.url, self.url + "/@admin/box.main/apps/web/")
        self.assertIn(APP_TEXT.decode(), app.text_content("body") or "")
        app.close()

        # Stop: the build's log streams in while it runs (lines appear under "stopping"); the
        # shutdown script ran.
        page.evaluate("""() => {
            window.logStates = [];
            const log = document.getElementById('build-log');
            new MutationObserver(() => window.logStates.push(document.getElementById('build-state').textContent))
                .observe(log, {childList: true, characterData: true, subtree: true});
        }""")
        page.click("#build #stop")
        self.wait_state(page, "stopped")
        self.assertIn("stopping", page.evaluate("() => window.logStates"))
        self.assertEqual(self.buttons(page), {"start": True, "stop": False, "delete": True})
        self.assertIn("Apply complete", page.text_content("#build-log") or "")
        self.assertEqual((self.home / "stopped").read_text().strip(), "bye")
        page.screenshot(path=str(self.shots / "workspace-stopped.png"))

        # Start again: the agent comes back.
        page.click("#build #start")
        self.wait_state(page, "running")
        page.wait_for_function(
            "() => document.querySelector('.agent [data-field=status]')?.textContent === 'connected'",
            timeout=WAIT_MS)
        self.assertEqual(self.buttons(page), {"start": False, "stop": True, "delete": True})

    def owner_pages(self, page: Any) -> None:
        page.click("nav a[href='/templates']")
        page.wait_for_url(self.url + "/templates")
        self.assertEqual(page.text_content("tr[data-template=workspace] td:nth-child(3)"), "1")
        page.screenshot(path=str(self.shots / "templates.png"))

        page.click("nav a[href='/users']")
        page.wait_for_url(self.url + "/users")
        page.click("tr[data-user=bob] button.user-status")
        page.wait_for_selector("tr[data-user=bob] td.status-suspended", timeout=WAIT_MS)
        self.assertEqual(page.text_content("tr[data-user=bob] button.user-status"), "Activate")
        page.screenshot(path=str(self.shots / "users.png"))
        page.click("tr[data-user=bob] button.user-status")
        page.wait_for_selector("tr[data-user=bob] td.status-active", timeout=WAIT_MS)

        page.click("nav a[href='/health']")
        page.wait_for_url(self.url + "/health")
        table = page.text_content("#health")
        for check in ("access_url", "websocket", "derp"):
            self.assertEqual(page.text_content(f"tr[data-check={check}] .state"), "ok", table)
        # A loaded machine may take more than the 15 ms threshold for a database round trip: a
        # warning, never an error; the page's verdict is the worst row's.
        database = page.text_content("tr[data-check=database] .state")
        self.assertIn(database, ("ok", "warning"), table)
        self.assertEqual(page.text_content("h1 .state"), database, table)
        self.assertIn("relay ping", page.text_content("tr[data-check=derp-999]") or "")
        page.screenshot(path=str(self.shots / "health.png"))

    def app_after_login(self, browser: Any) -> None:
        """Someone not logged in who opens the app's link logs in first and lands on the app."""
        context = browser.new_context()
        page = context.new_page()
        app_url = self.url + "/@admin/box.main/apps/web/?from=link"
        page.goto(app_url)
        self.assertTrue(page.url.startswith(self.url + "/login?next="), page.url)
        page.fill("#email", "admin")
        page.fill("#password", "correct horse")
        page.click("#login-submit")
        page.wait_for_url(app_url)
        self.assertIn(APP_TEXT.decode(), page.text_content("body") or "")
        context.close()

    def delete_step(self, page: Any) -> None:
        page.goto(self.url + "/workspaces/admin/box")
        self.wait_state(page, "running")
        page.once("dialog", lambda dialog: dialog.accept())
        page.click("#build #delete")
        page.wait_for_url(self.url + "/workspaces", timeout=WAIT_MS)
        page.wait_for_selector("#workspaces td.muted", timeout=WAIT_MS)
        self.assertNotIn("box", page.text_content("#workspaces tbody") or "")
        self.assertEqual(json.loads(self.cli("list", "--output", "json").stdout), [])

    def member_refused(self, browser: Any) -> None:
        context = browser.new_context()
        page = context.new_page()
        self.login(page, "bob", "bob password")
        self.assertEqual(page.locator("nav a[href='/users']").count(), 0)
        for path in ("/templates", "/users", "/health"):
            resp = page.goto(self.url + path)
            self.assertEqual(resp.status, 404, path)
        context.close()
