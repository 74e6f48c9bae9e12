"""Stock OpenSSH into a workspace over the tunnel: real server, real agent, ``coderstack ssh``.

``coderstack ssh WS -- cmd`` runs the system ssh with ``coderstack ssh --stdio`` as its
ProxyCommand; that dials the tunnel (WireGuard over UDP or DERP) and joins OpenSSH to the agent's
conch server on tunnel port 22 through both userspace TCP stacks.
"""

from __future__ import annotations

import hashlib
import os
import shutil

from twisted.trial import unittest

from tests.support.processes import Deployment


class SSHTests(unittest.TestCase):
    timeout = 120

    def setUp(self) -> None:
        if shutil.which("ssh") is None:
            raise unittest.SkipTest("OpenSSH's client is not installed (.ci/run installs it)")

    async def workspace(self, *server_args: str) -> tuple[Deployment, object]:
        d = Deployment(self, *server_args)
        await d.start_server()
        alice = d.user("alice")
        await alice.login_first("alice")
        token = await alice.create("box")
        agent = d.start_agent(token)
        await alice.wait_status("box", "connected", watch=[agent])
        return d, alice

    async def test_command_exit_status_and_stdin(self) -> None:
        d, alice = await self.workspace()
        out = await alice.ok("ssh", "box", "--", "echo", "ok", "from", "$(hostname)")
        self.assertIn("ok from", out)
        code, out, err = await alice.run("ssh", "box", "--", "exit", "7")
        self.assertEqual(code, 7, err)
        # 2 MiB through stdin and back, byte-exact.
        path = os.path.join(d.dir, "blob")
        data = os.urandom(2 << 20)
        with open(path, "wb") as f:
            f.write(data)
        out = await alice.ok("ssh", "box", "--", "sha256sum", path)
        self.assertEqual(out.split()[0], hashlib.sha256(data).hexdigest())

    async def test_relayed_only(self) -> None:
        d, alice = await self.workspace("--block-direct-connections", "true")
        out = await alice.ok("ssh", "box", "--", "echo", "relayed")
        self.assertEqual(out.strip(), "relayed")

    async def test_offline_agent_is_one_clear_line(self) -> None:
        d = Deployment(self)
        await d.start_server()
        alice = d.user("alice")
        await alice.login_first("alice")
        await alice.create("idle")
        code, out, err = await alice.run("ssh", "idle", "--", "true")
        self.assertEqual(code, 1)
        self.assertEqual(err.strip().count("\n"), 0, err)
        self.assertIn("is connecting", err)
        code, out, err = await alice.run("ssh", "nope", "--", "true")
        self.assertEqual(code, 1)
        self.assertIn("not found", err)
