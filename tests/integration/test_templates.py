"""End to end: a real server process, the CLI, the example template, real terraform, real agent.

The server listens on two addresses.  The pushed template (the example ``local`` template plus a
``terraform.tfvars.json`` setting its ``access_url_override``) names the second one in the
provider ``url``, so the agent the bootstrap starts must connect through it: its log says so,
``coderstack show`` shows that URL and the agent as connected.  ``coderstack delete`` runs the
destroy build, whose destroy-time provisioner stops the agent by its pidfile.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

from twisted.trial import unittest

from tests.interop.tfsupport import SKIP_NO_TERRAFORM, alive, kill_pidfiles
from tests.support.waiting import wait_until_blocking

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "terraform" / "templates" / "local"
TWISTD = os.path.join(os.path.dirname(sys.executable), "twistd")
SKIP = SKIP_NO_TERRAFORM
if SKIP is None and not os.path.exists(TWISTD):
    SKIP = f"no twistd next to {sys.executable} (CI runs from the project venv)"
#: A guard against a hung child, far above what any step takes.
GUARD = 180


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CODER_", "TF_"))}
    env["PYTHONPATH"] = str(REPO)
    env.update(extra)
    return env


class TemplateServerCase(unittest.TestCase):
    """A real server with a second listener, and the CLI logged in to it as the first user."""

    skip = SKIP
    timeout = GUARD * 2
    #: More server options, for a subclass.
    server_args: tuple[str, ...] = ()

    def setUp(self) -> None:
        self.tmp = Path(self.mktemp()).resolve()
        self.data = self.tmp / "data"
        self.config = self.tmp / "cli"
        self.data.mkdir(parents=True)
        self.addCleanup(kill_pidfiles, self.data)  # any agent still running, by its pidfile
        self.port, self.extra_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.extra_url = f"http://127.0.0.1:{self.extra_port}"
        self.server_log = open(self.tmp / "server.log", "wb")
        self.addCleanup(self.server_log.close)
        self.addCleanup(self.stop_server)
        self.start_server()
        self.cli("login", self.url, "--first-user-username", "admin",
                 "--first-user-email", "admin@example.com", "--first-user-password", "correct horse")

    def start_server(self) -> None:
        """(Re)start the server on the same ports and data dir, and wait until it answers."""
        self.server = subprocess.Popen(
            [TWISTD, "-n", "--pidfile=", "coderstack-server",
             "--http-address", f"127.0.0.1:{self.port}",
             "--http-extra-address", f"127.0.0.1:{self.extra_port}",
             "--stun-address", "disable", "--data-dir", str(self.data), *self.server_args],
            env=child_env(), stdout=self.server_log, stderr=subprocess.STDOUT, cwd=self.tmp,
        )
        wait_until_blocking(self.healthy, "the server to answer /healthz")

    def stop_server(self) -> None:
        if self.server.poll() is None:
            self.server.send_signal(signal.SIGTERM)
            try:
                self.server.wait(20)
            except subprocess.TimeoutExpired:
                self.server.kill()
                self.server.wait()

    def healthy(self) -> bool:
        if self.server.poll() is not None:
            raise AssertionError("server exited:\n" + (self.tmp / "server.log").read_text())
        try:
            with urllib.request.urlopen(self.url + "/healthz", timeout=2) as resp:
                return resp.status == 200
        except OSError:
            return False

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [sys.executable, "-m", "coderstack.cli.main", *args],
            env=child_env(CODER_CONFIG_DIR=str(self.config)), capture_output=True, text=True,
            timeout=GUARD, cwd=self.tmp,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"coderstack {' '.join(args)} failed ({proc.returncode}):\n"
                                 f"{proc.stdout}\n{proc.stderr}")
        return proc

    def show(self, name: str) -> dict:
        return json.loads(self.cli("show", name, "--output", "json").stdout)


class TemplateEndToEndTests(TemplateServerCase):
    def test_override_url_agent_connects_through_second_address_and_delete_stops_it(self) -> None:
        template = self.tmp / "local-override"
        shutil.copytree(EXAMPLE, template, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
        (template / "terraform.tfvars.json").write_text(
            json.dumps({"access_url_override": self.extra_url}))

        pushed = self.cli("templates", "push", str(template), "--name", "local")
        self.assertIn("Template 'local' version 1 pushed.", pushed.stdout)
        listed = self.cli("templates", "list")
        self.assertRegex(listed.stdout, r"local\s+1\s")

        created = self.cli("create", "dev", "--template", "local")
        # The build log was streamed: terraform's own lines (the bootstrap's output is hidden
        # by terraform because the agent token is in its environment).
        self.assertIn("terraform_data.agent_process[0]: Provisioning with 'local-exec'...",
                      created.stdout)
        self.assertIn("Apply complete! Resources: 3 added", created.stdout)

        ws = wait_until_blocking(
            lambda: (w := self.show("dev"))["agents"] and w["agents"][0]["status"] == "connected" and w,
            "the agent to connect")
        (agent,) = ws["agents"]
        self.assertEqual(agent["access_url"], self.extra_url)
        self.assertEqual((ws["template_name"], ws["latest_build"]["status"]), ("local", "succeeded"))
        shown = self.cli("show", "dev").stdout
        self.assertIn(f"access URL  {self.extra_url}", shown)
        self.assertIn("agent main: connected", shown)

        agent_dir = self.data / "builds" / ws["id"] / ".coderstack" / "agents" / agent["id"]
        pid = int((agent_dir / "agent.pid").read_text())
        self.assertTrue(alive(pid))
        agent_log = (agent_dir / "agent.log").read_text()
        self.assertIn(f"connected to {self.extra_url} (manifest access URL {self.url})", agent_log)

        manifest = json.loads((agent_dir / "data" / "manifest.json").read_text())
        self.assertEqual((manifest["access_url"], manifest["agent_url"]), (self.url, self.extra_url))

        # stop: the agent process goes (start_count 0 destroys its terraform_data); start: back.
        stopped = self.cli("stop", "dev")
        self.assertIn("Workspace 'dev' stopped.", stopped.stdout)
        self.assertIn(f"coderstack stop: agent {pid} stopped", stopped.stdout)
        self.assertFalse(alive(pid))
        wait_until_blocking(lambda: self.show("dev")["agents"][0]["status"] == "disconnected",
                            "the server to see the agent gone")
        self.assertIn("Workspace 'dev' started.", self.cli("start", "dev").stdout)
        ws = wait_until_blocking(
            lambda: (w := self.show("dev"))["agents"][0]["status"] == "connected" and w,
            "the agent to connect again")
        self.assertEqual(ws["agents"][0]["id"], agent["id"])
        pid = int((agent_dir / "agent.pid").read_text())
        self.assertTrue(alive(pid))

        deleted = self.cli("delete", "dev", "--yes")
        self.assertIn(f"coderstack stop: agent {pid} stopped", deleted.stdout)
        self.assertIn("Workspace 'dev' destroyed and deleted.", deleted.stdout)
        self.assertFalse(alive(pid))
        self.assertFalse((self.data / "builds" / ws["id"]).exists())
        gone = self.cli("show", "dev", check=False)
        self.assertEqual(gone.returncode, 1)
        self.assertIn("workspace 'dev' not found", gone.stderr)
        listed = json.loads(self.cli("list", "--output", "json").stdout)
        self.assertEqual(listed, [])

    def test_failed_build_shows_terraforms_message(self) -> None:
        template = self.tmp / "broken"
        template.mkdir()
        (template / "main.tf").write_text(
            'terraform {\n  required_providers {\n    coder = { source = "coder/coder" }\n  }\n}\n'
            'resource "coder_agent" "main" {\n  os   = "linux"\n  arch = "amd64"\n}\n'
            'resource "terraform_data" "boom" {\n'
            '  provisioner "local-exec" { command = "echo no-room-left >&2; exit 7" }\n}\n')
        self.cli("templates", "push", str(template))
        created = self.cli("create", "dev", "--template", "broken", check=False)
        self.assertEqual(created.returncode, 1)
        self.assertIn("error: the start build failed:", created.stderr)
        self.assertIn("no-room-left", created.stderr)
        ws = self.show("dev")
        self.assertEqual((ws["agents"], ws["latest_build"]["status"]), ([], "failed"))
        bad = self.tmp / "invalid"
        bad.mkdir()
        (bad / "main.tf").write_text(
            'terraform {\n  required_providers {\n    coder = { source = "coder/coder" }\n  }\n}\n'
            'resource "coder_agent" "main" {\n  os = "linux"\n}\n')
        pushed = self.cli("templates", "push", str(bad), check=False)
        self.assertEqual(pushed.returncode, 1)
        self.assertIn('The argument "arch" is required', pushed.stderr)
