"""``coderstack ssh``: --stdio as OpenSSH's ProxyCommand end to end (loopback stands in for the tunnel)."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile

from twisted.internet import defer, reactor, utils
from twisted.trial import unittest

from coderstack.agent.ssh import ssh_factory
from coderstack.cli import ssh

SSH, SFTP = shutil.which("ssh"), shutil.which("sftp")
HELPER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ssh_stdio_helper.py")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class PureTests(unittest.TestCase):
    def test_workspace_name(self):
        self.assertEqual(ssh.workspace_name("coder.dev", "coder.", None), "dev")
        self.assertEqual(ssh.workspace_name("dev.coder", None, "coder"), "dev")
        self.assertEqual(ssh.workspace_name("dev", "coder.", "coder"), "dev")
        self.assertEqual(ssh.workspace_name("alice/dev", None, None), "alice/dev")

    def test_options(self):
        opts = ssh.Options()
        opts.parseOptions(["dev", "-A", "--", "ls", "-l"])
        self.assertEqual((opts["workspace"], opts["command"], opts["forward-agent"]), ("dev", ["ls", "-l"], True))

    def test_openssh_argv(self):
        proxy = ssh.proxy_command("/home/u/.config/coderstack", "dev")
        self.assertEqual(proxy, f"{os.path.abspath(sys.executable)} -m coderstack --global-config "
                                "/home/u/.config/coderstack ssh --stdio dev")
        self.assertEqual(ssh.openssh_argv("/usr/bin/ssh", proxy, "dev", True, ["uname", "-a"]), [
            "/usr/bin/ssh", "-o", f"ProxyCommand={proxy}", "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", "-A", "coderstack.dev", "--", "uname", "-a"])


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
