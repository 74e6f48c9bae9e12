"""``coderstack ssh``: names, options and the OpenSSH command line (the --stdio bridge is in tests.interop)."""

from __future__ import annotations

import os
import sys

from twisted.trial import unittest

from coderstack.cli import ssh
from coderstack.cli.context import ConfigDir, Context


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

    def test_proxy_environment_carries_global_flags(self):
        """OpenSSH's ProxyCommand is a new ``coderstack`` process: flags given to this one must
        reach it (``ssh --disable-direct-connections`` used to dial directly)."""
        base = {"HOME": "/home/u", "CODER_VERBOSE": "1"}
        ctx = Context(reactor=None, config=ConfigDir("/c"), environ=dict(base))
        self.assertEqual(ssh.proxy_environment(ctx), base)
        ctx = Context(reactor=None, config=ConfigDir("/c"), environ=dict(base), disable_direct=True,
                      url_override="https://coder.example", token_override="secret")
        self.assertEqual(ssh.proxy_environment(ctx), {
            **base, "CODER_DISABLE_DIRECT_CONNECTIONS": "true", "CODER_URL": "https://coder.example",
            "CODER_SESSION_TOKEN": "secret"})
        self.assertEqual(ctx.environ, base)  # the command's own environment is left alone
