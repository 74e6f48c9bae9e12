"""Open sessions while the servers under them fail: three replicas on one PostgreSQL behind
HAProxy, a real agent and ``coderstack ssh`` (stock OpenSSH) holding a session open.

Each replica is SIGKILLed in turn (so whichever held the agent's and the client's coordination
and relay connections is among them): a direct session carries on while the replica is down, a
relayed one resumes once the relay connections have moved. PostgreSQL restarted under the
replicas — with one session open, and with simulated agents and clients moving bytes: they
recover, and the sessions, the agents and new connections all carry on.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from typing import Any

from twisted.trial import unittest

from tests.support import postgres, replicas
from tests.support.processes import CLIUser, Process
from tests.support.replicas import ReplicaSet

SCALE_AGENTS = 10


class ReplicaSessionTests(unittest.TestCase):
    timeout = 300

    def setUp(self) -> None:
        why = replicas.available()
        if why is not None:
            raise unittest.SkipTest(why)
        if shutil.which("ssh") is None:
            raise unittest.SkipTest("OpenSSH's client is not installed (.ci/run installs it)")
        self.lines = 0

    async def workspace(self, n: int, *server_args: str) -> tuple[ReplicaSet, CLIUser, Process]:
        """``n`` replicas; alice (logged in through the load balancer) owns "box", whose agent
        also reaches the server through it."""
        rs = ReplicaSet(self, n, *server_args)
        await rs.start()
        alice = rs.replicas[0].user("alice")
        await alice.login_first("alice", url=rs.url)
        token = await alice.create("box")
        agent = rs.replicas[0].start_agent(token, url=rs.url)
        await alice.wait_status("box", "connected", watch=[agent])
        return rs, alice, agent

    def session(self, alice: CLIUser) -> Process:
        """``coderstack ssh box -- cat``: what it is sent comes back in its log."""
        return Process(self, "ssh-session", [sys.executable, "-m", "coderstack", "ssh", "box", "--", "cat"],
                       alice.cli_env(), alice.home, stdin=True)

    async def echo(self, ssh: Process) -> None:
        """One line through the open session and back."""
        self.lines += 1
        line = f"line {self.lines} through the session"
        ssh.write(f"{line}\n".encode())
        await ssh.output_shows(line, timeout=90)

    async def ping_direct(self, alice: CLIUser) -> bool:
        code, out, err = await alice.run("ping", "box", "-n", "3", "--wait", "200ms", "--output", "json")
        self.assertEqual(code, 0, err)
        doc: dict[str, Any] = json.loads(out)
        self.assertEqual(doc["summary"]["successful"], 3, out)
        return bool(doc["pongs"][-1]["direct"])

    async def test_a_direct_session_carries_on_while_each_replica_is_killed(self) -> None:
        rs, alice, agent = await self.workspace(3)
        self.assertTrue(await self.ping_direct(alice))
        ssh = self.session(alice)
        await self.echo(ssh)
        for i in range(3):
            await rs.kill9(i, wait_down=False)
            # At once, before anything could have reconnected: the path needs no server.
            await self.echo(ssh)
            await rs.lb.wait_status(i, "DOWN")
            await alice.wait_status("box", "connected", watch=[agent])
            await self.echo(ssh)
            await rs.start_replica(i)
            await rs.lb.wait_status(i, "UP")
        ssh.check_running()
        self.assertTrue(await self.ping_direct(alice))

    async def test_a_relayed_session_resumes_after_each_replica_is_killed(self) -> None:
        rs, alice, agent = await self.workspace(3, "--block-direct-connections", "true")
        self.assertFalse(await self.ping_direct(alice))
        ssh = self.session(alice)
        await self.echo(ssh)
        for i in range(3):
            await rs.kill9(i)
            await self.echo(ssh)  # once the relay connections have moved to the others
            await rs.start_replica(i)
            await rs.lb.wait_status(i, "UP")
        ssh.check_running()
        self.assertFalse(await self.ping_direct(alice))

    async def test_postgres_restarted_under_the_replicas(self) -> None:
        rs, alice, agent = await self.workspace(2)
        ssh = self.session(alice)
        await self.echo(ssh)
        cluster = postgres.cluster()
        cluster.stop_server()
        try:
            for i in range(2):
                await rs.lb.wait_status(i, "DOWN")  # /healthz: 503 without the database
            await self.echo(ssh)  # the direct session needs neither
        finally:
            cluster.start_server()
        for i in range(2):
            await rs.lb.wait_status(i, "UP")
            rs.process(i).check_running()
        await alice.wait_status("box", "connected", watch=[agent])
        await self.echo(ssh)
        self.assertTrue(await self.ping_direct(alice))
        out = await alice.ok("ssh", "box", "--", "echo", "a new session")
        self.assertEqual(out.strip(), "a new session")

    async def test_postgres_restarted_under_scaletest_load(self) -> None:
        """Simulated agents spread over two replicas through the load balancer, clients moving
        bytes to them across the restart: afterwards every agent is connected again and a new
        traffic run reaches all of them without an error."""
        rs = ReplicaSet(self, 2)
        await rs.start()
        alice = rs.replicas[0].user("alice")
        await alice.login_first("alice", url=rs.url)
        run_file = os.path.join(alice.home, "run.json")
        await alice.ok("scaletest", "create-workspaces", str(SCALE_AGENTS), "--run-file", run_file)
        agents = Process(self, "scaletest-agents",
                         [sys.executable, "-m", "coderstack", "scaletest", "agents", "--run-file", run_file,
                          "--duration", "10m", "-o", "json"], alice.cli_env(), alice.home)
        await agents.output_shows(f"{SCALE_AGENTS} of {SCALE_AGENTS} agents connected", timeout=60)
        traffic = Process(self, "scaletest-traffic",
                          [sys.executable, "-m", "coderstack", "scaletest", "traffic", "--run-file", run_file,
                           "--duration", "20s", "--bytes-per-tick", "1000", "--tick-interval", "100ms",
                           "-o", "json"], alice.cli_env(), alice.home)
        await traffic.output_shows(f"{SCALE_AGENTS} of {SCALE_AGENTS} connections up", timeout=60)
        cluster = postgres.cluster()
        cluster.stop_server()
        try:
            for i in range(2):
                await rs.lb.wait_status(i, "DOWN")
        finally:
            cluster.start_server()
        for i in range(2):
            await rs.lb.wait_status(i, "UP")
        self.assertEqual(await traffic.wait(timeout=90), 0, traffic.log())
        during = json.loads(traffic.log()[traffic.log().index("{"):])
        # Open tunnels carry on through the outage: every byte back, no error.
        self.assertEqual((during["connected"], during["errors"]), (SCALE_AGENTS, {}), during)
        self.assertEqual(during["bytes_received"], during["bytes_sent"], during)
        after = json.loads(await alice.ok("scaletest", "traffic", "--run-file", run_file, "--duration", "2s",
                                          "-o", "json"))
        self.assertEqual((after["connected"], after["errors"]), (SCALE_AGENTS, {}), after)
        agents.check_running()
