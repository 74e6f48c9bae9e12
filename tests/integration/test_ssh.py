"""Stock OpenSSH into a workspace over the tunnel: real server, real agent, ``coderstack ssh``.

``coderstack ssh WS -- cmd`` runs the system ssh with ``coderstack ssh --stdio`` as its
ProxyCommand; that dials the tunnel (WireGuard over UDP or DERP) and joins OpenSSH to the agent's
conch server on tunnel port 22 through both userspace TCP stacks.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import socket
import sys

from twisted.internet import endpoints, protocol, reactor, utils
from twisted.trial import unittest

from coderstack.cli import warm
from tests.support.echo import Collect, Echo
from tests.support.processes import (
    PROCESS_WAIT,
    CLIUser,
    Deployment,
    Process,
    connected_workspace,
    free_port,
    pid_alive,
)
from tests.support.waiting import wait_until


class SSHTests(unittest.TestCase):
    timeout = 120

    def setUp(self) -> None:
        if shutil.which("ssh") is None:
            raise unittest.SkipTest("OpenSSH's client is not installed (.ci/run installs it)")

    async def workspace(self, *server_args: str) -> tuple[Deployment, object]:
        d, alice, _agent = await connected_workspace(self, *server_args)
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
            protocol.Factory.forProtocol(Echo))
        self.addCleanup(remote.stopListening)
        local_port = free_port()
        spec = f"127.0.0.1:{local_port}:{remote.getHost().port}"
        fwd = Process(self, "port-forward", [sys.executable, "-m", "coderstack", "port-forward", "box", "--tcp", spec],
                      d.env(alice.home, CODER_CONFIG_DIR=alice.config_dir), alice.home)
        await fwd.output_shows("Ready!")
        self.assertIn(f"Forwarding 'tcp://127.0.0.1:{local_port}' locally to "
                      f"'tcp://127.0.0.1:{remote.getHost().port}' in the workspace", fwd.log())
        client = await endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", local_port).connect(
            protocol.Factory.forProtocol(Collect))
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


class WarmCLITests(unittest.TestCase):
    """config-ssh's ProxyCommand through the per-user tunnel daemon (coderstack.cli.warm)."""

    timeout = 180

    def setUp(self) -> None:
        if shutil.which("ssh") is None:
            raise unittest.SkipTest("OpenSSH's client is not installed (.ci/run installs it)")

    async def workspace(self, **env: str) -> tuple[Deployment, CLIUser, str]:
        d, alice, _agent = await connected_workspace(self)
        config = os.path.join(d.dir, "ssh_config")
        open(config, "w").close()
        await alice.ok("config-ssh", "--ssh-config-file", config, "--yes")
        alice.extra_env.update(CODERSTACK_TUNNEL_DAEMON="1", **env)
        return d, alice, config

    async def ssh(self, alice: CLIUser, config: str, command: str = "true") -> str:
        code, out, err = await alice.run_program("ssh", "-F", config, "coder.box", command)
        self.assertEqual(code, 0, err)
        return out

    def paths(self, alice: CLIUser) -> warm.Paths:
        url, token = warm.identity(alice.config_dir, {})  # type: ignore[misc]  # logged in above
        return warm.paths_for(alice.config_dir, warm.fingerprint(url, token, False), {})

    async def daemon_pid(self, alice: CLIUser) -> int:
        pids = await wait_until(alice.tunnel_daemon_pids, "the tunnel daemon's PID file")
        return pids[0]

    async def test_second_ssh_reuses_the_daemons_tunnel(self) -> None:
        d, alice, config = await self.workspace()
        self.assertEqual((await self.ssh(alice, config, "echo one")).strip(), "one")
        self.assertEqual((await self.ssh(alice, config, "echo two")).strip(), "two")
        paths = self.paths(alice)
        status = warm.status(paths)
        assert status is not None
        self.assertEqual((status["dials"], status["tunnels_made"], status["reused"]), (2, 1, 1), status)
        self.assertEqual(status["pid"], await self.daemon_pid(alice))
        with open(paths.log) as f:
            log = f.read()
        self.assertEqual(log.count("over a new tunnel"), 1, log)
        self.assertEqual(log.count("over the held tunnel"), 1, log)
        self.assertNotIn(alice.session_token(), log)
        self.assertEqual(os.stat(paths.run_dir).st_mode & 0o777, 0o700)
        self.assertEqual(os.stat(paths.socket).st_mode & 0o777, 0o600)
        # 8 MiB echoed back while it is still going up (every buffer on the path fills), byte
        # exact, and stdin EOF passed on (cat ends).
        blob = os.path.join(d.dir, "blob")
        data = os.urandom(8 << 20)
        with open(blob, "wb") as f:
            f.write(data)
        out, err, code = await utils.getProcessOutputAndValue(
            "sh", ["-c", f"ssh -F {config} coder.box 'cat; exit 4' < {blob} | sha256sum"],
            env=alice.cli_env(), path=alice.home)
        self.assertEqual(out.split()[0].decode(), hashlib.sha256(data).hexdigest(), err)
        # A missing workspace: the daemon's answer is the in-process one, one line, no fallback.
        code, out, err = await alice.run_program("ssh", "-F", config, "coder.nope", "true",
                                                 CODERSTACK_TUNNEL_DAEMON_DEBUG="1")
        self.assertNotEqual(code, 0)
        self.assertEqual(err.splitlines()[0], "error: workspace 'nope' not found", err)
        self.assertNotIn("not using the tunnel daemon", err)  # (then OpenSSH's own line)

    async def test_ping_uses_the_daemons_tunnel(self) -> None:
        d, alice, config = await self.workspace()
        for _ in range(2):
            code, out, err = await alice.run("ping", "box", "-n", "2")
            self.assertEqual(code, 0, err)
            self.assertEqual(out.count("pong from box"), 2, out)
            self.assertIn("You are connected directly (p2p)", err)
            self.assertNotIn("Wireguard is not connected", err)  # the diagnostics are live ones
        await self.ssh(alice, config)  # ssh shares the tunnel
        status = warm.status(self.paths(alice))
        assert status is not None
        self.assertEqual(status["tunnels_made"], 1, status)
        with open(self.paths(alice).log) as f:
            self.assertEqual(f.read().count("open box"), 2)
        code, out, err = await alice.run("ping", "nope", "-n", "1")
        self.assertEqual((code, err.strip()), (1, "error: workspace 'nope' not found"))

    async def test_daemon_exits_when_idle(self) -> None:
        d, alice, config = await self.workspace(CODERSTACK_TUNNEL_DAEMON_IDLE="1")
        await self.ssh(alice, config)
        pid = await self.daemon_pid(alice)
        paths = self.paths(alice)
        await wait_until(lambda: not pid_alive(pid), "the idle daemon to exit", timeout=PROCESS_WAIT)
        self.assertFalse(os.path.exists(paths.socket))
        self.assertFalse(os.path.exists(paths.pid))
        with open(paths.log) as f:
            self.assertIn("idle for 1s: exiting", f.read())
        await self.ssh(alice, config)  # and the next one starts a new daemon

    async def test_another_uid_is_refused(self) -> None:
        if shutil.which("setpriv") is None or os.getuid() != 0:
            raise unittest.SkipTest("needs root and setpriv to run a client as nobody")
        d, alice, config = await self.workspace()
        await self.ssh(alice, config)
        paths = self.paths(alice)
        probe = ("import socket, sys\n"
                 "s = socket.socket(socket.AF_UNIX)\n"
                 "try:\n    s.connect(sys.argv[1])\n"
                 "except OSError as e:\n    print('connect', e.errno); sys.exit()\n"
                 "print(s.recv(4096).decode().strip())\n")  # (refused before any request)
        nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c", probe,
                  paths.socket]
        # The 0700 directory keeps other users out before they reach the socket...
        code, out, err = await alice.run_program(*nobody)
        self.assertEqual(out.strip(), "connect 13", err)
        # ... and with the directory and socket opened up, SO_PEERCRED still does.
        for path in (d.dir, alice.home, alice.config_dir):
            os.chmod(path, os.stat(path).st_mode | 0o011)
        os.chmod(paths.run_dir, 0o711)
        os.chmod(paths.socket, 0o666)
        try:
            code, out, err = await alice.run_program(*nobody)
        finally:
            os.chmod(paths.run_dir, 0o700)
            os.chmod(paths.socket, 0o600)
        self.assertEqual(out.strip(), "ERR permission denied", err)
        status = warm.status(paths)
        assert status is not None
        self.assertEqual(status["refused_peers"], 1)

    async def test_killed_daemon_and_stale_socket(self) -> None:
        d, alice, config = await self.workspace()
        paths = self.paths(alice)
        # A stale socket file (nobody listening) before the first daemon ever ran.
        os.makedirs(paths.run_dir, mode=0o700, exist_ok=True)
        stale = socket.socket(socket.AF_UNIX)
        stale.bind(paths.socket)
        stale.close()
        await self.ssh(alice, config)
        first = await self.daemon_pid(alice)
        # SIGKILL mid-session: that session ends, the socket file stays behind ...
        long = Process(self, "ssh-long", ["ssh", "-F", config, "coder.box", "sleep 600"], alice.cli_env(),
                       alice.home)
        await wait_until(lambda: (warm.status(paths) or {}).get("open_streams") == 1, "the open stream")
        os.kill(first, signal.SIGKILL)
        await long.wait()
        await wait_until(lambda: not pid_alive(first), "the killed daemon to go")
        self.assertTrue(os.path.exists(paths.socket))
        # ... and the next ssh replaces it with a new daemon.
        self.assertEqual((await self.ssh(alice, config, "echo again")).strip(), "again")
        second = await self.daemon_pid(alice)
        self.assertNotEqual(first, second)
        status = warm.status(paths)
        assert status is not None
        self.assertEqual((status["pid"], status["tunnels_made"]), (second, 1))

    async def test_turned_off_and_fallback(self) -> None:
        d, alice, config = await self.workspace()
        # Off: no daemon is started.
        await self.ssh_env(alice, config, CODERSTACK_TUNNEL_DAEMON="0")
        self.assertEqual(alice.tunnel_daemon_pids(), [])
        # A daemon that cannot start (its run dir is not a directory): ssh works all the same,
        # and the debug flag says why once on stderr.
        run_dir = os.path.join(alice.config_dir, "run")
        open(run_dir, "w").close()
        code, out, err = await alice.run_program("ssh", "-F", config, "coder.box", "echo fell back",
                                                 CODERSTACK_TUNNEL_DAEMON_DEBUG="1")
        self.assertEqual((code, out.strip()), (0, "fell back"), err)
        self.assertEqual(err.count("not using the tunnel daemon"), 1, err)

    async def ssh_env(self, alice: CLIUser, config: str, **env: str) -> None:
        code, out, err = await alice.run_program("ssh", "-F", config, "coder.box", "true", **env)
        self.assertEqual(code, 0, err)
