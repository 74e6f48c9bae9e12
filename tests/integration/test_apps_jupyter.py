"""A real web app through the server: Jupyter in a template workspace, opened in headless
Chromium, path-based and on its own subdomain, starting a kernel and running code over the
kernel's websocket — all through the server's app proxy and its tunnel to the agent.

Real terraform builds the ``jupyter`` example template; its startup script starts two Jupyter
servers in the workspace (one behind a path app, so it knows its prefix; one behind a subdomain
app). The browser is Debian's chromium driven by Playwright (no browser download); ``*.localhost``
resolves to loopback inside Chromium, so ``--wildcard-access-url *.apps.localhost`` works offline.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

from tests.integration.test_templates import SKIP, TemplateServerCase, free_port
from tests.support.processes import pid_alive
from tests.support.waiting import wait_until_blocking

REPO = Path(__file__).resolve().parents[2]
TEMPLATE = REPO / "terraform" / "templates" / "jupyter"
CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = os.environ.get("CODERSTACK_TEST_ARTIFACTS", "")

_skip = SKIP
if _skip is None:
    try:
        import jupyter_server  # noqa: F401  # only to learn whether it is installed
        import playwright  # noqa: F401
    except ImportError as e:
        _skip = f"{e.name} is not installed (.ci/run installs the test extras)"
if _skip is None and not os.path.exists(CHROMIUM):
    _skip = f"no {CHROMIUM} (.ci/run installs Debian's chromium)"

#: Runs in the page: start a kernel through the app, run code over its websocket, and resolve to
#: what the kernel printed. ``base`` is the app's URL (ending in "/").
RUN_CODE = """
async (base) => {
  const xsrf = (document.cookie.match(/(?:^|; )_xsrf=([^;]*)/) || [])[1] || "";
  const resp = await fetch(base + "api/kernels", {method: "POST", headers: {"X-XSRFToken": decodeURIComponent(xsrf)},
                                                  credentials: "same-origin"});
  if (resp.status !== 201) { return "kernel start: HTTP " + resp.status + " " + await resp.text(); }
  const kernel = await resp.json();
  const wsBase = base.replace(/^http/, "ws");
  const ws = new WebSocket(wsBase + "api/kernels/" + kernel.id + "/channels");
  const session = crypto.randomUUID();
  return await new Promise((resolve) => {
    const timer = setTimeout(() => resolve("no output within 60 s"), 60000);
    ws.onerror = () => resolve("websocket error");
    ws.onopen = () => ws.send(JSON.stringify({
      header: {msg_id: crypto.randomUUID(), msg_type: "execute_request", username: "test", session,
               version: "5.3", date: new Date().toISOString()},
      parent_header: {}, metadata: {}, channel: "shell", buffers: [],
      content: {code: "print(6 * 7)", silent: false, store_history: false, user_expressions: {},
                allow_stdin: false, stop_on_error: true}}));
    ws.onmessage = (ev) => {
      const msg = JSON.parse(ev.data);
      if (msg.msg_type === "stream") { clearTimeout(timer); ws.close(); resolve(msg.content.text); }
    };
  });
}
"""


#: Runs in the page: start a kernel, open its websocket and remember when it closes.
OPEN_AND_WATCH = """
async (base) => {
  const xsrf = (document.cookie.match(/(?:^|; )_xsrf=([^;]*)/) || [])[1] || "";
  const resp = await fetch(base + "api/kernels", {method: "POST", headers: {"X-XSRFToken": decodeURIComponent(xsrf)}});
  const kernel = await resp.json();
  window.__closed = false;
  await new Promise((resolve) => {
    const ws = new WebSocket(base.replace(/^http/, "ws") + "api/kernels/" + kernel.id + "/channels");
    ws.onopen = () => resolve(true);
    ws.onclose = () => { window.__closed = true; resolve(false); };
  });
}
"""


def stop_pidfiles(where: Path) -> None:
    """SIGTERM each ``jupyter-*.pid`` process (Jupyter then shuts its kernels down), SIGKILL
    what is left after 10 s."""
    pids = []
    for pidfile in where.glob("jupyter-*.pid"):
        try:
            pids.append(int(pidfile.read_text().strip()))
        except ValueError:
            continue
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 10
    for pid in pids:
        while time.monotonic() < deadline and pid_alive(pid):
            time.sleep(0.1)
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)


class JupyterThroughTheServerTests(TemplateServerCase):
    skip = _skip
    server_args = ("--wildcard-access-url", "*.apps.localhost")

    def api(self, path: str) -> object:
        import urllib.request

        token = (self.config / "session").read_text().strip()
        req = urllib.request.Request(self.url + path, headers={"Coder-Session-Token": token})
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    def test_kernel_runs_code_path_based_and_on_a_subdomain(self) -> None:
        from playwright.sync_api import sync_playwright

        home = self.tmp / "home"
        home.mkdir()
        # The startup script's Jupyter servers (and their kernels) outlive the agent: stop them
        # by the PIDs the script wrote, also when the test fails.
        self.addCleanup(stop_pidfiles, home)
        template = self.tmp / "jupyter"
        shutil.copytree(TEMPLATE, template)
        (template / "terraform.tfvars.json").write_text(json.dumps({
            "home": str(home), "python": sys.executable,
            "path_port": free_port(), "subdomain_port": free_port()}))
        self.cli("templates", "push", str(template), "--name", "jupyter")
        self.cli("create", "box", "--template", "jupyter")
        ws = wait_until_blocking(lambda: (w := self.show("box"))["agents"] and w, "the agent")
        agent_id = ws["agents"][0]["id"]

        def healthy() -> bool:
            apps = self.api(f"/api/v2/workspaceagents/{agent_id}")["apps"]  # type: ignore[index]
            return all(a["health"] == "healthy" for a in apps) and len(apps) == 2

        wait_until_blocking(healthy, "both Jupyter apps to be healthy", timeout=120)
        path_url = self.cli("open", "app", "box", "jupyter").stdout.strip()
        sub_url = self.cli("open", "app", "box", "lab").stdout.strip()
        self.assertEqual(path_url, f"{self.url}/@admin/box.main/apps/jupyter/")
        self.assertEqual(sub_url, f"http://lab--main--box--admin.apps.localhost:{self.port}/")
        self.assertIn(path_url, self.cli("show", "box").stdout)

        token = (self.config / "session").read_text().strip()
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            try:
                context = browser.new_context()
                # The dashboard's login cookie on the access URL (the dashboard sets it at login).
                context.add_cookies([{"name": "coder_session_token", "value": token,
                                      "url": self.url, "httpOnly": True}])
                page = context.new_page()
                resp = page.goto(path_url)
                self.assertEqual(resp.status, 200, page.content()[:500])
                self.assertEqual(page.evaluate(RUN_CODE, path_url).strip(), "42")
                self.screenshot(page, "jupyter-path")

                # The subdomain app sends the browser through the auth redirect once, then it
                # holds an app cookie of its own for that host.
                resp = page.goto(sub_url)
                self.assertEqual(resp.status, 200, page.content()[:500])
                self.assertTrue(page.url.startswith(sub_url), page.url)
                names = {c["name"] for c in context.cookies(sub_url)}
                self.assertIn("coder_subdomain_app_session_token", names)
                self.assertEqual(page.evaluate(RUN_CODE, sub_url).strip(), "42")
                self.screenshot(page, "jupyter-subdomain")

                # The server restarts under an open app websocket: the page sees it close, and
                # its next requests (a new kernel, a new websocket) work through the new server.
                page.evaluate(OPEN_AND_WATCH, sub_url)
                self.stop_server()
                self.start_server()
                wait_until_blocking(lambda: page.evaluate("window.__closed"),
                                    "the page to see its app websocket close")
                self.assertEqual(wait_until_blocking(lambda: self.run_when_back(page, sub_url),
                                                     "the app to answer after the restart",
                                                     timeout=60), "42")

                # A browser that never logged in gets the login form (coming back to the app
                # after it), not the app.
                anon = browser.new_context().new_page()
                resp = anon.goto(path_url)
                self.assertTrue(anon.url.startswith(f"{self.url}/login?next="), anon.url)
                self.assertEqual(resp.status, 200)
                self.assertIn("Log in", anon.content())
                self.assertNotIn("Jupyter", anon.content())
            finally:
                browser.close()

    def run_when_back(self, page: object, url: str) -> str | None:
        """The kernel's output once the app answers again (None while the agent reconnects)."""
        out = str(page.evaluate(RUN_CODE, url)).strip()  # type: ignore[attr-defined]
        return out if out == "42" else None

    def screenshot(self, page: object, name: str) -> None:
        where = Path(ARTIFACTS) if ARTIFACTS else self.tmp
        where.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(where / f"{name}.png"))  # type: ignore[attr-defined]
