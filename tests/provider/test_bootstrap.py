"""The agent bootstrap and stop scripts, run with /bin/sh and a stand-in for twistd."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from twisted.trial import unittest

from coderstack.provider.agent import render_init_script
from coderstack.provider.bootstrap import (
    agent_script_env,
    linux_bootstrap,
    linux_stop_script,
)
from tests.interop.tfsupport import alive, fake_twistd_argv, kill_pidfiles


class TextTests(unittest.TestCase):
    def test_placeholders(self):
        text = linux_bootstrap("/opt/venv/bin/twistd")
        self.assertIn('export CODER_AGENT_URL="${ACCESS_URL}"', text)
        self.assertIn('export CODER_AGENT_AUTH="${AUTH_TYPE}"', text)
        self.assertIn("${ARCH}", text)
        self.assertIn("/opt/venv/bin/twistd --pidfile", text)
        self.assertIn("coderstack-agent", text)
        self.assertNotIn("--nodaemon", text)

    def test_script_env(self):
        env = agent_script_env("/x/twistd")
        self.assertEqual(set(env), {"CODER_AGENT_SCRIPT_linux_amd64", "CODER_AGENT_SCRIPT_linux_arm64",
                                    "CODER_AGENT_SCRIPT_linux_armv7"})
        self.assertIn("(linux/arm64)", env["CODER_AGENT_SCRIPT_linux_arm64"])
        self.assertNotIn("${ARCH}", env["CODER_AGENT_SCRIPT_linux_amd64"])

    def test_quoting(self):
        text = linux_bootstrap(["/path with space/python", "-m", "x"], "amd64",
                               {"PYTHONPATH": "/a b;rm -rf /"})
        self.assertIn("'/path with space/python' -m x --pidfile", text)
        self.assertIn("export PYTHONPATH='/a b;rm -rf /'", text)
        self.assertRaises(ValueError, linux_bootstrap, "t", None, {"BAD-NAME": "x"})

    def test_no_other_interpolations(self):
        # Only the three placeholders may contain "${"; the stop script none at all, since it
        # is embedded literally in Terraform configuration.
        text = linux_bootstrap("t")
        for placeholder in ("${ACCESS_URL}", "${AUTH_TYPE}", "${ARCH}"):
            text = text.replace(placeholder, "")
        self.assertNotIn("${", text)
        self.assertNotIn("${", linux_stop_script())
        self.assertNotIn("%{", linux_stop_script())


class RunTests(unittest.TestCase):
    """The scripts as the local-exec provisioners run them."""

    def setUp(self):
        self.dir = Path(self.mktemp()).resolve()
        self.dir.mkdir()
        self.addCleanup(kill_pidfiles, self.dir)
        scripts = agent_script_env(fake_twistd_argv())
        self.script = render_init_script("http://127.0.0.1:5555/api", "linux", "amd64", "token", scripts)

    def sh(self, script: str, **env: str) -> subprocess.CompletedProcess:
        base = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(self.dir)}
        return subprocess.run(["/bin/sh", "-c", script], env={**base, **env},
                              capture_output=True, text=True)

    def start(self) -> int:
        proc = self.sh(self.script, CODER_AGENT_TOKEN="tok-1", CODERSTACK_AGENT_DIR=str(self.dir / "a"),
                       CODER_WORKSPACE_OWNER_SESSION_TOKEN="owner-secret", TF_IN_AUTOMATION="1",
                       CODER_AGENT_SCRIPT_linux_amd64=self.script)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        return int((self.dir / "a" / "agent.pid").read_text())

    def test_start_and_stop(self):
        pid = self.start()
        self.assertTrue(alive(pid))
        log = (self.dir / "a" / "agent.log").read_text()
        self.assertIn("CODER_AGENT_URL=http://127.0.0.1:5555/\n", log)
        self.assertIn("CODER_AGENT_AUTH=token\n", log)
        self.assertIn("CODER_AGENT_TOKEN=tok-1\n", log)
        self.assertIn(f"CODER_AGENT_DATA_DIR={self.dir / 'a' / 'data'}\n", log)
        self.assertIn("service=coderstack-agent\n", log)
        self.assertIn("provisioner_env=\n", log)
        self.assertEqual(os.stat(self.dir / "a").st_mode & 0o777, 0o700)

        stop = self.sh(linux_stop_script(), CODERSTACK_AGENT_DIR=str(self.dir / "a"))
        self.assertEqual(stop.returncode, 0, stop.stderr)
        self.assertIn(f"agent {pid} stopped", stop.stdout)
        self.assertFalse(alive(pid))
        self.assertFalse((self.dir / "a" / "agent.pid").exists())

    def test_second_start_is_a_no_op(self):
        pid = self.start()
        proc = self.sh(self.script, CODER_AGENT_TOKEN="tok-1", CODERSTACK_AGENT_DIR=str(self.dir / "a"))
        self.assertEqual(proc.returncode, 0)
        self.assertIn("already running", proc.stdout)
        self.assertEqual(int((self.dir / "a" / "agent.pid").read_text()), pid)

    def test_token_required(self):
        proc = self.sh(self.script, CODERSTACK_AGENT_DIR=str(self.dir / "a"))
        self.assertNotEqual(proc.returncode, 0)
        self.assertIn("CODER_AGENT_TOKEN is not set", proc.stderr)
        self.assertFalse((self.dir / "a" / "agent.pid").exists())

    def test_default_dir_under_home(self):
        proc = self.sh(self.script, CODER_AGENT_TOKEN="t")
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertTrue((self.dir / ".coderstack" / "agent" / "agent.pid").exists())
        self.sh(linux_stop_script())
        self.assertFalse((self.dir / ".coderstack" / "agent" / "agent.pid").exists())

    def test_stop_without_pidfile(self):
        proc = self.sh(linux_stop_script(), CODERSTACK_AGENT_DIR=str(self.dir / "none"))
        self.assertEqual(proc.returncode, 0)
        self.assertIn("no pidfile", proc.stdout)

    def test_stop_leaves_foreign_process_alone(self):
        # A stale pidfile naming some other process must not get that process killed.
        other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        self.addCleanup(other.wait)
        self.addCleanup(os.kill, other.pid, signal.SIGKILL)
        (self.dir / "a").mkdir()
        (self.dir / "a" / "agent.pid").write_text(str(other.pid))
        proc = self.sh(linux_stop_script(), CODERSTACK_AGENT_DIR=str(self.dir / "a"))
        self.assertIn("not our agent", proc.stdout)
        self.assertIsNone(other.poll())
