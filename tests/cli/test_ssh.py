"""``coderstack ssh``: names, options and the OpenSSH command line (the --stdio bridge is in tests.interop)."""

from __future__ import annotations

import os
import sys

from twisted.trial import unittest

from coderstack.cli import ssh


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
