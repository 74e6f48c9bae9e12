"""The warm ProxyCommand (coderstack.cli.warm) and the tunnel daemon's gate, without a deployment.

The daemon end to end (reuse, idle exit, another uid, a killed daemon) is in
tests.integration.test_ssh.WarmCLITests.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

from twisted.internet import protocol
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from coderstack.cli import daemonconn, entry, tunneld, warm
from coderstack.cli.context import ConfigDir, Context
from coderstack.sdk import SDKError
from tests.support.processes import REPO_ROOT
from tests.support.tempdirs import made_dir


class ParseTests(unittest.TestCase):
    def test_config_ssh_proxy_command(self) -> None:
        req = warm.parse_stdio(["--global-config", "/cfg", "ssh", "--stdio", "--ssh-host-prefix", "coder.",
                                "coder.dev"], {})
        assert req is not None
        self.assertEqual((req.config_dir, req.host, req.prefix, req.wait, req.disable_direct),
                         ("/cfg", "coder.dev", "coder.", "auto", False))
        self.assertEqual(warm.workspace_name(req.host, req.prefix, req.suffix), "dev")

    def test_coderstack_ssh_proxy_command_and_environment(self) -> None:
        req = warm.parse_stdio(["--global-config=/cfg", "--disable-direct-connections", "ssh", "--stdio",
                                "--wait=no", "dev"], {"CODER_SSH_HOSTNAME_SUFFIX": "coder"})
        assert req is not None
        self.assertEqual((req.disable_direct, req.wait, req.suffix), (True, "no", "coder"))
        req = warm.parse_stdio(["ssh", "--stdio", "dev"], {"CODER_CONFIG_DIR": "/c", "CODER_SSH_WAIT": "yes",
                                                           "CODER_DISABLE_DIRECT_CONNECTIONS": "true"})
        assert req is not None
        self.assertEqual((req.config_dir, req.wait, req.disable_direct), ("/c", "yes", True))

    def test_anything_else_goes_to_the_full_cli(self) -> None:
        for argv in (["ssh", "dev"], ["ssh", "--stdio", "-A", "dev"], ["ssh", "--stdio", "dev", "--", "ls"],
                     ["ssh", "--stdio"], ["ssh", "--stdio", "--wait=maybe", "dev"],
                     ["--url", "http://x", "ssh", "--stdio", "dev"], ["ping", "dev"]):
            self.assertIsNone(warm.parse_stdio(argv, {}), argv)
        self.assertIsNone(warm.parse_stdio(["ssh", "--stdio", "dev"], {"CODER_DISABLE_DIRECT_CONNECTIONS": "x"}))

    def test_command_word_and_switch(self) -> None:
        self.assertEqual(entry.command_word(["--global-config", "/c", "-v", "tunnel-daemon"]), "tunnel-daemon")
        self.assertEqual(entry.command_word(["--url", "http://x", "ssh"]), "ssh")
        self.assertTrue(warm.enabled({}))
        self.assertFalse(warm.enabled({"CODERSTACK_TUNNEL_DAEMON": "0"}))

    def test_the_fast_path_imports_no_twisted(self) -> None:
        code = "import sys, coderstack.__main__; print(sorted(m for m in sys.modules if m.startswith('twisted')))"
        out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=REPO_ROOT),
                             capture_output=True, text=True, check=True).stdout
        self.assertEqual(out.strip(), "[]")


class IdentityTests(unittest.TestCase):
    def test_one_daemon_per_config_dir_and_identity(self) -> None:
        a = warm.fingerprint("https://a", "tok", False)
        self.assertNotEqual(a, warm.fingerprint("https://b", "tok", False))
        self.assertNotEqual(a, warm.fingerprint("https://a", "tok2", False))
        self.assertNotEqual(a, warm.fingerprint("https://a", "tok", True))
        p = warm.paths_for("/cfg", a, {})
        self.assertEqual(p.run_dir, "/cfg/run")
        self.assertNotEqual(p.socket, warm.paths_for("/cfg2", a, {}).socket)
        self.assertNotIn("tok", p.socket + p.fingerprint)
        r = warm.paths_for("/cfg", a, {"XDG_RUNTIME_DIR": "/run/user/7"})
        self.assertEqual(os.path.dirname(r.socket), "/run/user/7/coderstack")
        self.assertEqual(r.log, "/cfg/tunnel-daemon.log")

    def test_identity_reads_environment_before_files(self) -> None:
        cfg = made_dir(self)
        self.assertIsNone(warm.identity(cfg, {}))
        ConfigDir(cfg).write("url", "http://srv/")
        ConfigDir(cfg).write("session", "s3", secret=True)
        self.assertEqual(warm.identity(cfg, {}), ("http://srv", "s3"))
        self.assertEqual(warm.identity(cfg, {"CODER_SESSION_TOKEN": "env"}), ("http://srv", "env"))

    def test_private_dir(self) -> None:
        path = os.path.join(made_dir(self), "run")
        warm.private_dir(path)
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o700)
        os.chmod(path, 0o755)
        warm.private_dir(path)
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o700)


class SocketTests(unittest.TestCase):
    def socket_and_daemon(self) -> tuple[socket.socket, tunneld.Daemon]:
        """One end of a socket pair (as a client's connection), and a daemon not listening."""
        a, b = socket.socketpair()
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        cfg = made_dir(self)
        ctx = Context(reactor=None, config=ConfigDir(cfg))
        return a, tunneld.Daemon(None, ctx, warm.paths_for(cfg, "f" * 64, {}), idle=60)

    def test_peer_uid(self) -> None:
        a, b = socket.socketpair()
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        self.assertEqual(warm.peer_uid(a), os.getuid())

    def test_the_daemon_refuses_another_uid(self) -> None:
        a, daemon = self.socket_and_daemon()
        daemon.uid = os.getuid() + 1  # as if the daemon ran as someone else
        logged: list[str] = []
        self.patch(tunneld, "log", logged.append)
        client = tunneld._Client(daemon)
        transport = StringTransport()
        transport.socket = a  # type: ignore[attr-defined]  # what a reactor's unix transport has
        client.makeConnection(transport)
        self.assertEqual(transport.value(), b"ERR permission denied\n")
        self.assertTrue(transport.disconnecting)
        self.assertEqual((daemon.refused, daemon.clients), (1, 0))
        self.assertEqual(logged, [f"refused a connection from uid {os.getuid()}"])

    def test_the_daemon_refuses_another_identity_and_bad_requests(self) -> None:
        a, daemon = self.socket_and_daemon()
        self.patch(tunneld, "log", lambda line: None)
        for line, answer in ((b"STATUS " + b"e" * 64, b"ERR not this daemon's identity\n"),
                             (b"DIAL " + b"f" * 64 + b" box 22", b"ERR bad request\n")):
            client = tunneld._Client(daemon)
            transport = StringTransport()
            transport.socket = a  # type: ignore[attr-defined]  # what a reactor's unix transport has
            client.makeConnection(transport)
            client.dataReceived(line + b"\n")
            self.assertEqual(transport.value(), answer)

    def test_wait_only_when_ssh_wait_has_something_to_do(self) -> None:
        def ws(state: str) -> dict:
            return {"agents": [{"lifecycle_state": state}]}

        self.assertFalse(tunneld._may_wait("auto", ws("ready")))
        self.assertFalse(tunneld._may_wait("no", ws("starting")))
        self.assertFalse(tunneld._may_wait("yes", {"agents": []}))
        for state in ("created", "starting", "start_error", "start_timeout"):
            self.assertTrue(tunneld._may_wait("auto", ws(state)), state)

    def test_stderr_lines_go_back_as_msg(self) -> None:
        transport = StringTransport()
        out = tunneld._StderrToClient(transport)
        out.write("Waiting for the startup scripts...\nhalf")
        out.write(" a line\n")
        self.assertEqual(transport.value(), b"MSG Waiting for the startup scripts...\nMSG half a line\n")

    def test_a_stale_socket_is_no_daemon(self) -> None:
        # Not under the test's temp dir: a unix socket's path has at most 107 bytes.
        run = tempfile.mkdtemp(prefix="cs-warm-")
        self.addCleanup(shutil.rmtree, run, True)
        paths = warm.Paths(run, "f" * 64, run, os.path.join(run, "t.sock"), os.path.join(run, "t.pid"),
                           os.path.join(run, "t.lock"), os.path.join(run, "log"))
        self.assertIsNone(warm.status(paths))
        dead = socket.socket(socket.AF_UNIX)
        dead.bind(paths.socket)
        dead.close()  # the file stays, nobody listens
        self.assertIsNone(warm.status(paths))
        self.assertRaises(warm.Unavailable, warm.open_daemon, paths, {}, False, start=False)
        tunneld._remove_stale(paths.socket)
        self.assertFalse(os.path.exists(paths.socket))

    def test_pump_half_closes_and_copies_both_ways(self) -> None:
        ours, remote = socket.socketpair()
        self.addCleanup(remote.close)
        stdin_r, stdin_w = os.pipe()
        stdout_r, stdout_w = os.pipe()
        result: list[int] = []
        thread = threading.Thread(target=lambda: result.append(warm.pump(ours, b"early ", stdin_r, stdout_w)))
        thread.start()
        os.write(stdin_w, b"request")
        os.close(stdin_w)  # stdin EOF: the remote sees EOF, and can still answer
        got = b""
        while True:
            data = remote.recv(100)
            if not data:
                break
            got += data
        self.assertEqual(got, b"request")
        remote.sendall(b"answer")
        remote.close()
        thread.join()
        ours.close()
        os.close(stdout_w)
        with os.fdopen(stdout_r, "rb") as f:
            self.assertEqual(f.read(), b"early answer")
        os.close(stdin_r)
        self.assertEqual(result, [0])

    def test_pump_never_wedges_on_a_large_echo(self) -> None:
        # The remote echoes while we are still uploading: with blocking writes both directions
        # would fill and stop.
        ours, remote = socket.socketpair()
        self.addCleanup(remote.close)
        stdin_r, stdin_w = os.pipe()
        stdout_r, stdout_w = os.pipe()
        payload = os.urandom(8 << 20)

        def echo() -> None:
            while True:
                data = remote.recv(1 << 16)
                if not data:
                    break
                remote.sendall(data)
            remote.close()

        def feed() -> None:
            with os.fdopen(stdin_w, "wb") as f:
                f.write(payload)

        got = bytearray()

        def drain() -> None:
            with os.fdopen(stdout_r, "rb") as f:
                got.extend(f.read())

        threads = [threading.Thread(target=t) for t in (echo, feed, drain)]
        for t in threads:
            t.start()
        self.assertEqual(warm.pump(ours, b"", stdin_r, stdout_w), 0)
        ours.close()
        os.close(stdout_w)
        os.close(stdin_r)
        for t in threads:
            t.join()
        self.assertEqual(bytes(got), payload)


class DaemonConnectionTests(unittest.TestCase):
    """The Twisted side of the protocol (coderstack.cli.daemonconn), on a fake transport."""

    def request(self, factory: Any = None) -> tuple[daemonconn._Request, StringTransport]:
        a, b = socket.socketpair()
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        req = daemonconn._Request("DIAL f box 22 no", factory)
        transport = StringTransport()
        transport.socket = a  # type: ignore[attr-defined]  # what a reactor's unix transport has
        req.makeConnection(transport)
        return req, transport

    def test_ok_hands_the_socket_to_the_stream_protocol(self) -> None:
        got: list[bytes] = []

        class Stream(protocol.Protocol):
            def dataReceived(self, data: bytes) -> None:
                got.append(data)

        req, transport = self.request(protocol.Factory.forProtocol(Stream))
        self.assertEqual(transport.value(), b"DIAL f box 22 no\n")
        req.dataReceived(b"MSG waiting\nOK\nSSH-2.0-")
        inner = self.successResultOf(req.ready)
        self.assertIsInstance(inner, Stream)
        self.assertIs(inner.transport, transport)
        req.dataReceived(b"conch\r\n")
        self.assertEqual(b"".join(got), b"SSH-2.0-conch\r\n")

    def test_a_reply_line(self) -> None:
        req, transport = self.request()
        req.dataReceived(b'OK {"a": 1}\n')
        self.assertEqual(self.successResultOf(req.ready), '{"a": 1}')

    def test_fail_err_and_silence(self) -> None:
        req, _ = self.request()
        req.dataReceived(b"FAIL workspace 'x' not found\n")
        self.assertEqual(str(self.failureResultOf(req.ready, warm.Failed).value), "workspace 'x' not found")
        req, _ = self.request()
        req.dataReceived(b"ERR permission denied\n")
        self.failureResultOf(req.ready, warm.Unavailable)
        req, _ = self.request()
        req.connectionLost(None)
        self.failureResultOf(req.ready, warm.Unavailable)


class _RequestTests(unittest.TestCase):
    """Requests to a daemon that is not listening, on fake transports."""

    def client(self, daemon: tunneld.Daemon, line: bytes) -> tuple[tunneld._Client, StringTransport]:
        a, b = socket.socketpair()
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        client = tunneld._Client(daemon)
        transport = StringTransport()
        transport.socket = a  # type: ignore[attr-defined]  # what a reactor's unix transport has
        client.makeConnection(transport)
        client.dataReceived(line + b"\n")
        return client, transport

    def daemon(self) -> tunneld.Daemon:
        self.patch(tunneld, "log", lambda line: None)
        cfg = made_dir(self)
        ctx = Context(reactor=None, config=ConfigDir(cfg))
        return tunneld.Daemon(None, ctx, warm.paths_for(cfg, "f" * 64, {}), idle=60)


class HoldTests(_RequestTests):
    """HOLD on the daemon's side: a connection that keeps it from exiting idle while open."""

    def test_a_hold_keeps_the_daemon_up_until_closed(self) -> None:
        daemon = self.daemon()
        client, transport = self.client(daemon, b"HOLD " + b"f" * 64)
        self.assertEqual(transport.value(), b"OK\n")
        self.assertFalse(transport.disconnecting)
        self.assertEqual((daemon.holds, daemon.status()["holds"]), (1, 1))
        daemon.last_active -= 120  # long past the idle limit
        daemon.check_idle()
        self.assertFalse(daemon.done.called)
        client.dataReceived(b"anything")  # carries nothing: ignored
        client.readConnectionLost()  # the client let go: the daemon closes its side
        self.assertTrue(transport.disconnecting)
        client.connectionLost(None)
        self.assertEqual(daemon.holds, 0)
        daemon.check_idle()  # its end counts as activity: the idle time starts again
        self.assertFalse(daemon.done.called)
        daemon.last_active -= 120
        daemon.check_idle()
        self.assertTrue(daemon.done.called)

    def test_status_is_no_activity(self) -> None:
        daemon = self.daemon()
        daemon.last_active -= 30
        _client, transport = self.client(daemon, b"STATUS " + b"f" * 64)
        status = json.loads(transport.value())
        self.assertGreaterEqual(status["idle_for"], 30)
        self.assertLessEqual(time.monotonic() - daemon.last_active, 31)
        self.assertGreaterEqual(time.monotonic() - daemon.last_active, 30)

    def test_a_hold_for_another_identity_is_refused(self) -> None:
        daemon = self.daemon()
        _client, transport = self.client(daemon, b"HOLD " + b"e" * 64)
        self.assertEqual(transport.value(), b"ERR not this daemon's identity\n")
        self.assertEqual(daemon.holds, 0)


class _FakeEndpoint:
    def __init__(self, answer: Any) -> None:
        self.answer = answer

    def connect(self, factory: Any) -> Any:
        from twisted.internet import defer

        if isinstance(self.answer, Exception):
            return defer.fail(self.answer)
        proto = factory.buildProtocol(None)
        proto.makeConnection(StringTransport())
        return defer.succeed(proto)


class _FakeHeld:
    """What the daemon keeps of a tunnel: ``conn.tunnel.endpoint(port, timeout)``, ``conn.close``."""

    def __init__(self, answer: Any) -> None:
        self.answer, self.closed, self.ports = answer, False, []
        self.conn, self.tunnel = self, self

    def endpoint(self, port: int, timeout: float) -> _FakeEndpoint:
        self.ports.append(port)
        return _FakeEndpoint(self.answer)

    async def close(self) -> None:
        self.closed = True


class StreamTests(_RequestTests):
    """STREAM: over the tunnel an OPEN holds, no lookup; else answered as ``DIAL ... no``."""

    def daemon_holding(self, answer: Any) -> tuple[tunneld.Daemon, _FakeHeld, list[tuple]]:
        daemon = self.daemon()
        held = _FakeHeld(answer)
        daemon.tunnels["agent-1"] = tunneld._Tunnel(held, "agent-1", "box")  # type: ignore[arg-type]  # a fake
        daemon.names["box"] = "agent-1"
        dialed: list[tuple] = []

        async def dial(client: Any, name: str, port: int, wait: str) -> None:
            dialed.append((name, port, wait))

        self.patch(daemon, "_dial_request", dial)
        return daemon, held, dialed

    def test_over_the_held_tunnel(self) -> None:
        daemon, held, dialed = self.daemon_holding(None)
        client, transport = self.client(daemon, b"STREAM " + b"f" * 64 + b" box 8080")
        self.assertEqual(transport.value(), b"OK\n")
        self.assertEqual((held.ports, dialed), ([8080], []))
        self.assertEqual((daemon.dials, daemon.reused, daemon.streams), (1, 1, 1))

    def test_no_held_tunnel_or_a_failing_one_is_a_dial(self) -> None:
        daemon, held, dialed = self.daemon_holding(OSError("no route"))
        self.client(daemon, b"STREAM " + b"f" * 64 + b" other 80")
        self.assertEqual((held.ports, dialed), ([], [("other", 80, "no")]))
        self.client(daemon, b"STREAM " + b"f" * 64 + b" box 81")
        self.assertEqual((held.ports, dialed[1:]), ([81], [("box", 81, "no")]))
        self.assertTrue(held.closed)
        self.assertEqual(daemon.tunnels, {})  # the next one dials a new tunnel

    def test_a_refused_port_is_a_fail_and_keeps_the_tunnel(self) -> None:
        from twisted.internet import error

        daemon, held, dialed = self.daemon_holding(error.ConnectionRefusedError("connection refused"))
        _client, transport = self.client(daemon, b"STREAM " + b"f" * 64 + b" box 7")
        self.assertEqual(transport.value(), b"FAIL Connection was refused by other side: connection refused.\n")
        self.assertEqual((held.ports, dialed, held.closed, list(daemon.tunnels)), ([7], [], False, ["agent-1"]))

    def test_a_failed_tunnel_dial_reaches_every_waiter(self) -> None:
        from twisted.internet import defer

        daemon = self.daemon()
        dials: list[defer.Deferred[Any]] = []

        async def connect_agent(reactor: Any, ctx: Any, name: str) -> Any:
            d: defer.Deferred[Any] = defer.Deferred()
            dials.append(d)
            return await d

        self.patch(tunneld.tunnel, "connect_agent", connect_agent)
        waiters = [defer.Deferred.fromCoroutine(daemon._tunnel("box", "agent-1")) for _ in range(2)]
        self.assertEqual((len(dials), list(daemon.dialing)), (1, ["agent-1"]))
        dials[0].errback(SDKError("cannot reach the agent of workspace 'box'"))
        for waiter in waiters:
            self.failureResultOf(waiter, SDKError)
        self.assertEqual((daemon.dialing, daemon.tunnels), ({}, {}))

    def test_a_bad_stream_request(self) -> None:
        daemon, held, dialed = self.daemon_holding(None)
        _client, transport = self.client(daemon, b"STREAM " + b"f" * 64 + b" box")
        self.assertEqual(transport.value(), b"ERR bad request\n")
        self.assertEqual((held.ports, dialed), ([], []))
