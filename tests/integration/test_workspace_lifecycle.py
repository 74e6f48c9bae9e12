"""End to end: a Coder-style template takes full effect in the workspace.

A real server process, the CLI, the ``workspace`` example template (HCL, written the way Coder's
example templates are), real terraform and the real agent it starts. Inside the workspace: the
files the start scripts wrote, the environment they and an SSH session see (coder_env, the agent's
env, ``CODER_*``), the lifecycle reaching ready, metadata values from ``coder stat``, the app's
health following its server, a cron script firing, the scripts' logs through ``coderstack logs``,
and the shutdown script on stop.
"""

from __future__ import annotations

import http.server
import json
import shutil
import threading
import urllib.request
from pathlib import Path

from tests.integration.test_templates import SKIP, TemplateServerCase, free_port
from tests.support.waiting import wait_until_blocking

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "terraform" / "templates" / "workspace"


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


class _App:
    """The workspace's web app: a plain HTTP server on 127.0.0.1 that can stop and start."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.server: http.server.HTTPServer | None = None

    def start(self) -> None:
        self.server = http.server.HTTPServer(("127.0.0.1", self.port), _Quiet)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


class WorkspaceLifecycleTests(TemplateServerCase):
    skip = SKIP

    def api(self, path: str) -> object:
        token = (self.config / "session").read_text().strip()
        req = urllib.request.Request(self.url + path, headers={"Coder-Session-Token": token})
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())

    def test_the_template_takes_full_effect(self) -> None:
        home = self.tmp / "home"
        home.mkdir()
        app = _App(free_port())
        app.start()
        self.addCleanup(app.stop)
        template = self.tmp / "workspace"
        shutil.copytree(EXAMPLE, template)
        (template / "terraform.tfvars.json").write_text(json.dumps({"home": str(home), "app_port": app.port}))
        self.cli("templates", "push", str(template), "--name", "workspace")
        self.cli("create", "box", "--template", "workspace")

        ws = wait_until_blocking(lambda: (w := self.show("box"))["agents"] and w, "the agent")
        agent_id = ws["agents"][0]["id"]
        agent = wait_until_blocking(
            lambda: (a := self.api(f"/api/v2/workspaceagents/{agent_id}"))["lifecycle_state"] == "ready" and a,
            "the lifecycle to reach ready")
        self.assertTrue(agent["started_at"] and agent["ready_at"])

        # The start scripts ran in the agent's directory with the workspace environment.
        self.assertEqual((home / "started").read_text().strip(), "hello")
        self.assertEqual((home / "dotfiles").read_text().strip(), "dotfiles installed")
        env = dict(line.split("=", 1) for line in (home / "startup.env").read_text().splitlines() if "=" in line)
        self.assertEqual((env["GREETING"], env["EDITOR"], env["PROJECT_ROOT"]), ("hello", "vi", str(home)))
        self.assertEqual((env["CODER"], env["CODER_WORKSPACE_NAME"], env["CODER_WORKSPACE_AGENT_NAME"]),
                         ("true", "box", "main"))
        self.assertNotIn("CODER_AGENT_TOKEN", env)

        # An SSH session (OpenSSH over the tunnel) sees the same environment and starts in the dir.
        out = self.cli("ssh", "box", "--", "env; pwd; command -v coder").stdout
        self.assertIn("GREETING=hello", out)
        self.assertIn(f"PROJECT_ROOT={home}", out)
        self.assertIn("CODER_WORKSPACE_OWNER_NAME=admin", out)
        self.assertIn(f"\n{home}\n", out)
        self.assertNotIn("CODER_AGENT_TOKEN", out)

        # Metadata from `coder stat`, collected every second.
        def metadata() -> dict[str, dict]:
            items = self.api(f"/api/v2/workspaceagents/{agent_id}/metadata")
            return {i["description"]["key"]: i["result"] for i in items}  # type: ignore[union-attr]

        got = wait_until_blocking(lambda: (m := metadata())["cpu"]["value"] and m["mem"]["value"] and m,
                                  "metadata values")
        self.assertRegex(got["cpu"]["value"], r"cores \(\d+%\)")
        self.assertRegex(got["mem"]["value"], r"iB \(\d+%\)")

        # App health follows the app's server.
        def health() -> str:
            apps = self.api(f"/api/v2/workspaceagents/{agent_id}")["apps"]  # type: ignore[index]
            return next(a["health"] for a in apps if a["slug"] == "web")

        wait_until_blocking(lambda: health() == "healthy", "the app to be healthy")
        app.stop()
        wait_until_blocking(lambda: health() == "unhealthy", "the app to be unhealthy")
        app.start()
        wait_until_blocking(lambda: health() == "healthy", "the app to be healthy again")

        # The cron script fires every 2 s.
        wait_until_blocking(lambda: (home / "heartbeat").exists()
                            and len((home / "heartbeat").read_text().split()) >= 2, "the cron script twice")

        # Script output is in the agent's logs; `show` tells lifecycle, metadata, apps, resources.
        logs = self.cli("logs", "box").stdout
        self.assertIn("startup: preparing", logs)
        self.assertIn("startup: done", logs)
        shown = self.cli("show", "box").stdout
        self.assertIn("ready", shown)
        self.assertIn("CPU Usage", shown)
        self.assertIn(f"Web  {self.url}/@admin/box.main/apps/web/", shown)  # through the server
        self.assertIn("healthy", shown)
        self.assertIn("this machine", shown)
        self.assertNotIn("not-for-your-eyes", shown)

        # `ssh --wait=yes` on a ready workspace connects straight away.
        self.assertIn("hello", self.cli("ssh", "box", "--wait=yes", "--", "echo $GREETING").stdout)

        # Stopping the workspace runs the shutdown script before the agent goes.
        self.cli("stop", "box")
        self.assertEqual((home / "stopped").read_text().strip(), "bye")
        self.cli("delete", "box", "--yes")
