"""``coderstack ssh``: names, options and the OpenSSH command line (the --stdio bridge is in tests.interop)."""

from __future__ import annotations

import os
import shlex
import sys

from twisted.trial import unittest

from coderstack.cli import ssh
from coderstack.cli.context import ConfigDir, Context
from coderstack.cli.main import GlobalOptions


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

    def test_proxy_command_passes_disable_direct_on(self):
        # `coderstack --disable-direct-connections ssh WS` starts OpenSSH, whose ProxyCommand is a
        # new coderstack process: without the flag there it dialed direct (found in the NAT lab).
        proxy = ssh.proxy_command("/cfg", "dev", disable_direct=True)
        self.assertEqual(proxy, f"{os.path.abspath(sys.executable)} -m coderstack --global-config /cfg "
                                "--disable-direct-connections ssh --stdio dev")
        main = GlobalOptions()
        main.parseOptions(shlex.split(proxy)[3:])
        self.assertTrue(main["disable-direct-connections"])
        self.assertEqual((main.subCommand, main.subOptions["workspace"]), ("ssh", "dev"))
        self.assertNotIn("--disable-direct-connections", ssh.proxy_command("/cfg", "dev"))

    def test_proxy_env_passes_url_and_token_overrides_on(self):
        ctx = Context(reactor=None, config=ConfigDir("/cfg"), environ={"PATH": "/bin"},
                      url_override="http://x:1", token_override="secret")
        self.assertEqual(ssh.proxy_env(ctx), {"PATH": "/bin", "CODER_URL": "http://x:1",
                                              "CODER_SESSION_TOKEN": "secret"})
        plain = Context(reactor=None, config=ConfigDir("/cfg"), environ={"PATH": "/bin"})
        self.assertEqual(ssh.proxy_env(plain), {"PATH": "/bin"})
