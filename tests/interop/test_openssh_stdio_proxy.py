"""OpenSSH with ``coderstack ssh --stdio`` as its ProxyCommand (loopback stands in for the tunnel),
and OpenSSH reading the block ``config-ssh`` writes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile

from twisted.internet import defer, reactor, utils
from twisted.trial import unittest

from coderstack.agent.ssh import ssh_factory
from tests.cli.test_config_ssh import USER_ENTRIES, ConfigSSHCommandTests

SSH, SFTP = shutil.which("ssh"), shutil.which("sftp")
HELPER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ssh_stdio_helper.py")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class StdioProxyTests(unittest.TestCase):
    timeout = 60

    def setUp(self):
        if SSH is None or SFTP is None:  # CI installs openssh-client
            raise unittest.SkipTest("openssh-client is not installed")
        self.dir = tempfile.mkdtemp(prefix="usercmds-stdio-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.port = reactor.listenTCP(0, ssh_factory(os.path.join(self.dir, "data")), interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        self.env = dict(os.environ, USERCMDS_SSH_PORT=str(self.port.getHost().port),
                        PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.opts = ["-o", f"ProxyCommand={sys.executable} {HELPER} %h", "-o", "StrictHostKeyChecking=no",
                     "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes", "-o", "LogLevel=ERROR"]

    @defer.inlineCallbacks
    def test_command_and_exit_status_through_proxycommand(self):
        out, err, code = yield utils.getProcessOutputAndValue(
            SSH, [*self.opts, "coder.dev", "echo ok; exit 3"], env=self.env)
        self.assertEqual((out, code), (b"ok\n", 3), err)

    @defer.inlineCallbacks
    def test_sftp_10_mib_through_proxycommand(self):
        src, dst = os.path.join(self.dir, "src"), os.path.join(self.dir, "dst")
        data = os.urandom(10 * 1024 * 1024)
        with open(src, "wb") as f:
            f.write(data)
        batch = os.path.join(self.dir, "batch")
        with open(batch, "w") as f:
            f.write(f"put {src} {dst}\n")
        out, err, code = yield utils.getProcessOutputAndValue(
            SFTP, ["-q", "-b", batch, *self.opts, "coder.dev"], env=self.env)
        self.assertEqual(code, 0, err)
        with open(dst, "rb") as f:
            self.assertEqual(f.read(), data)

    @defer.inlineCallbacks
    def test_unknown_workspace_fails(self):
        out, err, code = yield utils.getProcessOutputAndValue(SSH, [*self.opts, "coder.nope", "true"], env=self.env)
        self.assertNotEqual(code, 0)
        self.assertIn(b"not found", err)


class OpenSSHReadsConfigSSHTests(unittest.TestCase):
    setUp = ConfigSSHCommandTests.setUp
    run_cmd = ConfigSSHCommandTests.run_cmd
    write = ConfigSSHCommandTests.write

    def test_openssh_parses_the_block(self):
        ssh = SSH
        if ssh is None:  # CI installs openssh-client
            raise unittest.SkipTest("openssh-client is not installed")
        self.write(USER_ENTRIES)
        self.run_cmd(["-y", "-o", "ForwardAgent=yes"])
        got = subprocess.run([ssh, "-G", "-F", self.path, "coder.dev"], capture_output=True, text=True, check=True).stdout
        self.assertIn("forwardagent yes\n", got)
        self.assertIn("stricthostkeychecking false\n", got)
        self.assertIn(f"proxycommand {os.path.abspath(sys.executable)} -m coderstack --global-config "
                      "/home/u/.config/coderstack ssh --stdio --ssh-host-prefix coder. %h\n", got)
        other = subprocess.run([ssh, "-G", "-F", self.path, "github.com"], capture_output=True, text=True, check=True).stdout
        self.assertIn("user git\n", other)
        self.assertNotIn("proxycommand", other)
