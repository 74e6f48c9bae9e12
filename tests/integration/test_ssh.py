"""Stock OpenSSH into a workspace over the tunnel: real server, real agent, ``coderstack ssh``.

``coderstack ssh WS -- cmd`` runs the system ssh with ``coderstack ssh --stdio`` as its
ProxyCommand; that dials the tunnel (WireGuard over UDP or DERP) and joins OpenSSH to the agent's
conch server on tunnel port 22 through both userspace TCP stacks.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys

from twisted.internet import endpoints, protocol, reactor, utils
from twisted.trial import unittest

from tests.support.processes import Deployment, Process, free_port
from tests.support.waiting import wait_until


class _Echo(protocol.Protocol):
    def dataReceived(self, data: bytes) -> None:
        self.transport.write(data)


class _Collect(protocol.Protocol):
    def __init__(self) -> None:
        self.buf = bytearray()

    def dataReceived(self, data: bytes) -> None:
        self.buf += data


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

    async def test_stock_openssh_with_the_config_ssh_block(self) -> None:
        d, alice = await self.workspace()
        config = os.path.join(d.dir, "ssh_config")
        with open(config, "w") as f:
            f.write("Host mine\n\tHostName example.invalid\n")
        out = await alice.ok("config-ssh", "--ssh-config-file", config, "--yes")
        self.assertIn("Updated", out)
        with open(config) as f:
            text = f.read()
        self.assertIn("Host coder.*", text)
        self.assertIn("Host mine", text)  # the user's own entry is kept
        env = d.env(alice.home, CODER_CONFIG_DIR=alice.config_dir)
        out, err, code = await utils.getProcessOutputAndValue(
            "ssh", ["-F", config, "coder.box", "echo ok; exit 3"], env=env, path=alice.home)
        self.assertEqual((code, out.decode().strip()), (3, "ok"), err.decode())

    async def test_port_forward_carries_tcp(self) -> None:
        d, alice = await self.workspace()
        # A service "in the workspace" (the agent shares this host's loopback).
        remote = await endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            protocol.Factory.forProtocol(_Echo))
        self.addCleanup(remote.stopListening)
        local_port = free_port()
        spec = f"127.0.0.1:{local_port}:{remote.getHost().port}"
        fwd = Process(self, "port-forward", [sys.executable, "-m", "coderstack", "port-forward", "box", "--tcp", spec],
                      d.env(alice.home, CODER_CONFIG_DIR=alice.config_dir), alice.home)
        await fwd.output_shows("Ready!")
        self.assertIn(f"Forwarding 'tcp://127.0.0.1:{local_port}' locally to "
                      f"'tcp://127.0.0.1:{remote.getHost().port}' in the workspace", fwd.log())
        client = await endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", local_port).connect(
            protocol.Factory.forProtocol(_Collect))
        self.addCleanup(client.transport.loseConnection)
        payload = os.urandom(1 << 20)
        client.transport.write(payload)
        await wait_until(lambda: len(client.buf) >= len(payload), "the echoed MiB", interval=0.05)
        self.assertEqual(bytes(client.buf), payload)

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
