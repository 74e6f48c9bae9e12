"""The tunnel daemon under a long-running CLI: ``coderstack port-forward`` through it
(coderstack.cli.heldconn), and a daemon's held tunnel across a restart of the agent. Real
server, agent, daemon and CLI processes; the workspace's services listen on this host's
loopback, which the agent shares.

``ssh`` through the daemon (reuse, idle exit, another uid, a killed daemon) is in
tests.integration.test_ssh.WarmCLITests.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from typing import Any

from twisted.internet import defer, endpoints, protocol, reactor
from twisted.trial import unittest

from coderstack.cli import warm
from tests.support.echo import Collect, Echo, UDPClient, UDPEcho
from tests.support.processes import (
    PROCESS_WAIT,
    CLIUser,
    Deployment,
    Process,
    box_connected,
    free_port,
    pid_alive,
)
from tests.support.waiting import wait_until


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class WarmWorkspace:
    """A server, alice (the tunnel daemon on for her), her workspace "box" and its agent."""

    def __init__(self, d: Deployment, alice: CLIUser, token: str, agent: Process) -> None:
        self.d, self.alice, self.token, self.agent = d, alice, token, agent

    def paths(self) -> warm.Paths:
        url, token = warm.identity(self.alice.config_dir, {})  # type: ignore[misc]  # logged in
        return warm.paths_for(self.alice.config_dir, warm.fingerprint(url, token, False), {})

    def status(self) -> dict[str, Any]:
        found = warm.status(self.paths())
        assert found is not None, "no tunnel daemon answers"
        return found

    def daemon_log(self) -> str:
        with open(self.paths().log) as f:
            return f.read()


class _Base(unittest.TestCase):
    timeout = 180
    forwards = 0

    async def workspace(self, **env: str) -> WarmWorkspace:
        d = Deployment(self)
        alice, token, agent = await box_connected(d)
        alice.extra_env.update(CODERSTACK_TUNNEL_DAEMON="1", **env)
        return WarmWorkspace(d, alice, token, agent)

    async def daemon_pid(self, ws: WarmWorkspace) -> int:
        pids = await wait_until(ws.alice.tunnel_daemon_pids, "the tunnel daemon's PID file")
        return pids[0]

    async def echo_service(self) -> int:
        """A TCP echo "in the workspace"; its port."""
        port = await endpoints.TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            protocol.Factory.forProtocol(Echo))
        self.addCleanup(port.stopListening)
        return port.getHost().port

    async def forward(self, ws: WarmWorkspace, *specs: str, **env: str) -> Process:
        """``coderstack port-forward box SPECS``, once it is ready."""
        self.forwards += 1
        fwd = Process(self, f"port-forward{self.forwards}",
                      [sys.executable, "-m", "coderstack", "port-forward", "box", *specs],
                      ws.alice.cli_env(**env), ws.alice.home)
        await fwd.output_shows("Ready!")
        return fwd

    async def echoed(self, port: int, size: int = 256 << 10) -> None:
        """One new connection to ``port``: ``size`` random bytes there and back, byte exact."""
        client = Collect()
        await endpoints.connectProtocol(endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
        payload = os.urandom(size)
        client.transport.write(payload)
        await wait_until(lambda: len(client.buf) >= size or client.lost.called,
                         lambda: f"{size} echoed bytes on :{port} (have {len(client.buf)})", interval=0.02)
        self.assertEqual(bytes(client.buf), payload)
        client.transport.loseConnection()
        await client.lost


class WarmPortForwardTests(_Base):
    async def test_connections_ride_the_daemons_tunnel_which_stays_up(self) -> None:
        ws = await self.workspace(CODERSTACK_TUNNEL_DAEMON_IDLE="1")
        service, local = await self.echo_service(), free_port()
        fwd = await self.forward(ws, "--tcp", f"127.0.0.1:{local}:{service}")
        pid = await self.daemon_pid(ws)
        for _ in range(3):
            await self.echoed(local)
        # Two at once, too.
        await defer.gatherResults([defer.Deferred.fromCoroutine(self.echoed(local, 1 << 20)) for _ in range(2)])
        status = ws.status()
        self.assertEqual((status["pid"], status["tunnels_made"], status["dials"], status["reused"],
                          status["failed"], status["holds"]), (pid, 1, 5, 5, 0, 1), status)
        # No connection open, no dial: only the hold keeps the daemon up past its idle time ...
        await wait_until(lambda: ws.status()["idle_for"] > 3, "the daemon to be idle 3s (its limit: 1s)",
                         timeout=PROCESS_WAIT)
        self.assertTrue(pid_alive(pid))
        await self.echoed(local)
        self.assertEqual(ws.status()["tunnels_made"], 1)
        # ... and once port-forward is gone, the daemon's idle exit comes as before.
        fwd.signal(signal.SIGINT)
        self.assertEqual(await fwd.wait(), 0, fwd.log())
        await wait_until(lambda: not pid_alive(pid), "the daemon to exit idle without its hold",
                         timeout=PROCESS_WAIT)
        log = ws.daemon_log()
        self.assertEqual(log.count("over the held tunnel"), 6, log)
        self.assertIn("idle for 1s: exiting", log)
        self.assertNotIn(ws.alice.session_token(), log)
        self.assertNotIn("dialing here", fwd.log())

    async def test_a_killed_daemon_leaves_port_forward_working(self) -> None:
        ws = await self.workspace()
        service, local = await self.echo_service(), free_port()
        fwd = await self.forward(ws, "--tcp", f"127.0.0.1:{local}:{service}", CODERSTACK_TUNNEL_DAEMON_DEBUG="1")
        await self.echoed(local)
        pid = await self.daemon_pid(ws)
        self.assertEqual(ws.status()["reused"], 1)
        os.kill(pid, signal.SIGKILL)
        await wait_until(lambda: not pid_alive(pid), "the killed daemon to go")
        # The next connections go over a tunnel port-forward dials itself.
        await self.echoed(local)
        await self.echoed(local)
        fwd.check_running()
        self.assertEqual(fwd.log().count("the tunnel daemon went away"), 1, fwd.log())

    async def test_a_failed_dial_says_what_the_in_process_dial_says(self) -> None:
        ws = await self.workspace()
        await ws.alice.create("idle")  # no agent ever connects
        spec = f"127.0.0.1:{free_port()}:80"
        for name, want in (("nope", "error: workspace 'nope' not found"),
                           ("idle", "error: the agent of workspace 'idle' is connecting; start it, then try again")):
            here = await ws.alice.run("port-forward", name, "--tcp", spec, CODERSTACK_TUNNEL_DAEMON="0")
            daemon = await ws.alice.run("port-forward", name, "--tcp", spec, CODERSTACK_TUNNEL_DAEMON_DEBUG="1")
            self.assertEqual((here[0], here[2].strip()), (1, want), here)
            self.assertEqual(daemon, here)
        self.assertEqual(ws.status()["failed"], 2)  # the daemon answered both
        # A port nothing listens on in the workspace: the connection ends at once, as in-process
        # (the agent accepts over the tunnel, then closes), and the daemon keeps its tunnel.
        closed = free_port()
        logs = []
        for daemon_on in ("1", "0"):
            local = free_port()
            fwd = await self.forward(ws, "--tcp", f"127.0.0.1:{local}:{closed}", CODERSTACK_TUNNEL_DAEMON=daemon_on)
            client = Collect()
            await endpoints.connectProtocol(endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", local), client)
            await wait_until(lambda c=client: c.lost.called, "the forwarded connection to a closed port to end")
            logs.append(fwd.log().replace(str(local), "LOCAL"))
        self.assertEqual((bytes(client.buf), logs[0]), (b"", logs[1]))
        self.assertEqual(ws.status()["tunnels_made"], 1)
        self.assertNotIn("dialing again", ws.daemon_log())

    async def test_udp_goes_over_a_tunnel_of_its_own_and_tcp_through_the_daemon(self) -> None:
        ws = await self.workspace()
        service, local_tcp, local_udp = await self.echo_service(), free_port(), free_udp_port()
        echo = reactor.listenUDP(0, UDPEcho(), interface="127.0.0.1")
        self.addCleanup(echo.stopListening)
        await self.forward(ws, "--tcp", f"127.0.0.1:{local_tcp}:{service}",
                           "--udp", f"127.0.0.1:{local_udp}:{echo.getHost().port}")
        await self.echoed(local_tcp)
        udp_client = UDPClient()
        sock = reactor.listenUDP(0, udp_client, interface="127.0.0.1")
        self.addCleanup(sock.stopListening)
        sent = [b"dg %d " % i + os.urandom(size) for i, size in enumerate((0, 100, 1100))]

        def all_answered() -> bool:
            unanswered = [dg for dg in sent if b"echo:" + dg not in udp_client.received]
            for datagram in unanswered:  # UDP may drop: send again what is still unanswered
                sock.write(datagram, ("127.0.0.1", local_udp))
            return not unanswered

        await wait_until(all_answered, "an echo of every datagram", interval=0.2)
        await self.echoed(local_tcp)
        status = ws.status()
        self.assertEqual((status["tunnels_made"], status["reused"]), (1, 2), status)


class HeldTunnelAfterAgentRestartTests(_Base):
    async def test_the_same_daemon_reaches_the_restarted_agent(self) -> None:
        ws = await self.workspace()
        service, local = await self.echo_service(), free_port()
        fwd = await self.forward(ws, "--tcp", f"127.0.0.1:{local}:{service}", CODERSTACK_TUNNEL_DAEMON_DEBUG="1")
        self.assertEqual((await ws.alice.ok("ssh", "box", "--", "echo", "one")).strip(), "one")
        await self.echoed(local)
        pid = await self.daemon_pid(ws)
        self.assertEqual(ws.status()["tunnels_made"], 1)
        # The agent stops and starts again: same token, same data dir, a new process (and new
        # UDP endpoints) behind the same keys.
        await ws.agent.stop()
        await ws.alice.wait_status("box", "disconnected")
        agent = ws.d.start_agent(ws.token)
        await ws.alice.wait_status("box", "connected", watch=[agent])
        self.assertEqual((await ws.alice.ok("ssh", "box", "--", "echo", "two")).strip(), "two")
        await self.echoed(local)
        status = ws.status()
        # The same daemon served both (no restart, no fallback to dialing in ssh or port-forward).
        self.assertEqual((status["pid"], status["dials"], status["failed"]), (pid, 4, 0), status)
        self.assertTrue(pid_alive(pid))
        fwd.check_running()
        self.assertNotIn("dialing here", fwd.log())
