"""The workspace environment: merge order, secrets scrubbed, directory, motd, the coder command;
and a real SSH exec session (OpenSSH against the agent's server) that sees it."""

from __future__ import annotations

import os
import shutil

from twisted.internet import reactor, utils
from twisted.trial import unittest

from coderstack.agent.session_env import (
    SessionEnvironment,
    motd_for_login,
    workspace_directory,
    workspace_environment,
    write_coder_command,
)
from coderstack.agent.ssh import ssh_factory

MANIFEST = {"workspace_name": "ws1", "owner_name": "alice", "agent_name": "main",
            "environment_variables": {"EDITOR": "vim", "LANG": "C.UTF-8", "CODER": "false",
                                      "CODER_AGENT_TOKEN": "not-from-template"}}


class EnvironmentTests(unittest.TestCase):
    def test_order_process_then_manifest_then_coder_vars_then_path(self) -> None:
        base = {"PATH": "/usr/bin:/bin", "LANG": "POSIX", "KEEP": "1", "CODER_AGENT_TOKEN": "secret",
                "CODER_AGENT_TOKEN_FILE": "/run/token", "CODER_SESSION_TOKEN": "s"}
        env = workspace_environment(base, MANIFEST, "https://coder.example.com", "/data/bin", "/data/scripts/bin")
        self.assertEqual(env["KEEP"], "1")
        self.assertEqual(env["LANG"], "C.UTF-8")  # the template wins over the process
        self.assertEqual(env["EDITOR"], "vim")
        self.assertEqual(env["CODER"], "true")  # ours win over the template
        self.assertEqual(env["CODER_WORKSPACE_NAME"], "ws1")
        self.assertEqual(env["CODER_WORKSPACE_OWNER_NAME"], "alice")
        self.assertEqual(env["CODER_WORKSPACE_AGENT_NAME"], "main")
        self.assertEqual(env["CODER_AGENT_URL"], "https://coder.example.com")
        self.assertEqual(env["PATH"], "/data/bin:/data/scripts/bin:/usr/bin:/bin")
        for secret in ("CODER_AGENT_TOKEN", "CODER_AGENT_TOKEN_FILE", "CODER_SESSION_TOKEN"):
            self.assertNotIn(secret, env)

    def test_without_a_manifest_secrets_are_still_scrubbed(self) -> None:
        env = SessionEnvironment("http://s", base={"CODER_AGENT_TOKEN": "x", "A": "b"}).environment()
        self.assertNotIn("CODER_AGENT_TOKEN", env)
        self.assertEqual(env["A"], "b")

    def test_directory(self) -> None:
        home = os.path.abspath(self.mktemp())
        os.makedirs(os.path.join(home, "project"))
        self.assertEqual(workspace_directory({"directory": ""}, home), home)
        self.assertEqual(workspace_directory(None, home), home)
        os.environ["COD_TEST_HOME"] = home
        self.addCleanup(os.environ.pop, "COD_TEST_HOME")
        self.assertEqual(workspace_directory({"directory": "$COD_TEST_HOME/project"}, "/"),
                         os.path.join(home, "project"))
        self.assertEqual(workspace_directory({"directory": "/does/not/exist"}, home), home)

    def test_motd_unless_hushlogin(self) -> None:
        home = os.path.abspath(self.mktemp())
        os.makedirs(home)
        motd = os.path.join(home, "motd")
        with open(motd, "w") as f:
            f.write("Welcome!\n")
        self.assertEqual(motd_for_login(motd, home), b"Welcome!\n")
        self.assertEqual(motd_for_login("", home), b"")
        self.assertEqual(motd_for_login(os.path.join(home, "missing"), home), b"")
        open(os.path.join(home, ".hushlogin"), "w").close()
        self.assertEqual(motd_for_login(motd, home), b"")

    async def test_coder_command_wrapper_answers_stat(self) -> None:
        bin_dir = os.path.abspath(self.mktemp())
        path = write_coder_command(bin_dir)
        self.assertEqual(path, os.path.join(bin_dir, "coder"))
        self.assertTrue(os.access(path, os.X_OK))
        out, err, code = await utils.getProcessOutputAndValue(path, ["stat", "disk", "--path", bin_dir,
                                                                     "--output", "json"], env=dict(os.environ))
        self.assertEqual(code, 0, err)
        import json

        got = json.loads(out)
        self.assertEqual(got["unit"], "B")
        self.assertGreater(got["total"], got["used"])
        out, err, code = await utils.getProcessOutputAndValue(path, ["stat", "nope"], env=dict(os.environ))
        self.assertEqual(code, 2)
        self.assertIn(b"invalid choice", err)


SSH = shutil.which("ssh")


class SSHSessionEnvironmentTests(unittest.TestCase):
    timeout = 30

    def setUp(self) -> None:
        if SSH is None:
            raise unittest.SkipTest("openssh-client is not installed")
        self.dir = os.path.abspath(self.mktemp())
        self.project = os.path.join(self.dir, "project")
        os.makedirs(self.project)
        self.session_env = SessionEnvironment("http://127.0.0.1:3000", bin_dir=os.path.join(self.dir, "bin"),
                                              base=dict(os.environ, CODER_AGENT_TOKEN="must-not-leak"))
        write_coder_command(os.path.join(self.dir, "bin"))
        self.session_env.update({**MANIFEST, "directory": self.project})
        factory = ssh_factory(os.path.join(self.dir, "data"), reactor,
                              env=dict(os.environ, CODER_AGENT_TOKEN="must-not-leak"),
                              session_env=self.session_env)
        self.port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)

    async def test_exec_session_sees_the_workspace_environment(self) -> None:
        opts = ["-p", str(self.port.getHost().port), "-o", "StrictHostKeyChecking=no",
                "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes", "-o", "LogLevel=ERROR"]
        command = ('echo "$CODER|$CODER_WORKSPACE_NAME|$CODER_WORKSPACE_OWNER_NAME|$CODER_WORKSPACE_AGENT_NAME|'
                   '$CODER_AGENT_URL|$EDITOR|${CODER_AGENT_TOKEN:-none}"; pwd; command -v coder')
        out, err, code = await utils.getProcessOutputAndValue(SSH, [*opts, "127.0.0.1", command],
                                                              env=dict(os.environ))
        self.assertEqual(code, 0, err)
        lines = out.decode().splitlines()
        self.assertEqual(lines[0], "true|ws1|alice|main|http://127.0.0.1:3000|vim|none")
        self.assertEqual(lines[1], self.project)
        self.assertEqual(lines[2], os.path.join(self.dir, "bin", "coder"))

    async def test_login_shell_prints_the_motd(self) -> None:
        import subprocess

        from twisted.internet import threads

        motd = os.path.join(self.dir, "motd")
        with open(motd, "w") as f:
            f.write("Welcome to ws1\nsecond line\n")
        self.session_env.update({**MANIFEST, "directory": self.project, "motd_path": motd})
        stdin = os.path.join(self.dir, "stdin")
        with open(stdin, "w") as f:
            f.write("exit 0\n")
        opts = ["-p", str(self.port.getHost().port), "-o", "StrictHostKeyChecking=no",
                "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes", "-o", "LogLevel=ERROR"]
        with open(stdin) as f:
            done = await threads.deferToThread(subprocess.run, [SSH, "-tt", *opts, "127.0.0.1"], stdin=f,
                                               capture_output=True, timeout=20)
        self.assertIn(b"Welcome to ws1\r\nsecond line\r\n", done.stdout)
