"""The foundation end to end, with real processes on 127.0.0.1 and temp dirs.

Servers and agents run under ``twistd`` and the CLI as ``python -m coderstack``, all with this
checkout on ``PYTHONPATH`` (see ``tests/support/processes.py``). Waiting is polling the CLI's
``show --output json``; trial's per-test timeout is the only time bound. Every process is stopped
by PID at cleanup, also when a test fails.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
import uuid
from datetime import UTC, datetime

from nacl.public import PrivateKey
from twisted.internet import reactor
from twisted.trial import unittest

from coderstack.coordinator.client import open_coordination
from coderstack.sdk import Client, SDKError, trust_root_from_env
from coderstack.wire.coordination import CODER_SERVICE_PREFIX, CoordinateRequest, address_from_uuid
from tests.support import postgres
from tests.support.processes import TWISTD, Deployment, Process, pid_alive
from tests.support.tempdirs import made_dir
from tests.support.tlscerts import make_ca_and_server_cert
from tests.support.waiting import wait_until


def client_node(peer_id: uuid.UUID) -> dict:
    """A client's node as the CLI would send it: fresh keys, its /128 from its peer id."""
    address = f"{address_from_uuid(peer_id)}/128"
    return {"id": 4242, "as_of": datetime.now(UTC).isoformat(),
            "key": "nodekey:" + bytes(PrivateKey.generate().public_key).hex(),
            "disco": "discokey:" + bytes(PrivateKey.generate().public_key).hex(),
            "preferred_derp": 999, "addresses": [address], "allowed_ips": [address], "endpoints": []}


# twistd ends a clean SIGTERM shutdown by re-raising the signal, so either status is "stopped".
STOPPED = (0, -signal.SIGTERM)


class FoundationTests(unittest.TestCase):
    async def test_agent_connects_and_reconnects_after_server_restart(self) -> None:
        d = Deployment(self)
        server = await d.start_server()
        alice = d.user("alice")
        await alice.login_first("alice")
        token = await alice.create("ws1")
        ws = await alice.show("ws1")
        self.assertEqual(ws["agents"][0]["status"], "connecting")

        agent = d.start_agent(token)
        ws = await alice.wait_status("ws1", "connected", watch=[agent])
        [a] = ws["agents"]
        self.assertEqual(ipaddress.IPv6Address(a["ip"]), address_from_uuid(uuid.UUID(a["id"])))
        out = await alice.ok("list")
        self.assertRegex(out, r"ws1\s+main\s+connected\s+(created|starting|ready)\s+\S+\s+now")
        # The agent kept its keys in its data dir, owner-only.
        key_file = os.path.join(d.dir, "agent", "data", "wireguard.key")
        self.assertEqual(os.stat(key_file).st_mode & 0o777, 0o600)

        # Stop the server by PID; the CLI says so in one line.
        self.assertIn(await d.stop_server(), STOPPED, server.log())
        code, out, err = await alice.run("show", "ws1")
        self.assertEqual(code, 1)
        self.assertEqual(err.count("\n"), 1, err)
        self.assertIn(f"cannot reach the server at {d.url}", err)
        self.assertTrue(agent.running(), agent.log())

        # Same port, same data dir: the session, the workspace and the agent all come back.
        await d.start_server()
        ws = await alice.wait_status("ws1", "connected", watch=[agent])
        self.assertEqual(ws["agents"][0]["id"], a["id"])
        self.assertTrue(agent.running())
        self.assertGreaterEqual(agent.log().count("coordinator connected"), 2, agent.log())
        self.assertNotIn(token, agent.log())
        self.assertNotIn(token, d.server.log())

    async def test_killed_agent_is_lost_stopped_agent_is_disconnected(self) -> None:
        d = Deployment(self)
        await d.start_server()
        alice = d.user("alice")
        await alice.login_first("alice")
        token = await alice.create("ws1")

        # A wrong token is refused (and never logged); the agent keeps trying.
        impostor = d.start_agent("not-the-token-" + token[-6:], "impostor")
        await impostor.output_shows("Invalid agent token")
        self.assertNotIn("not-the-token-", impostor.log())
        await impostor.stop()

        agent = d.start_agent(token, "agent1")
        await alice.wait_status("ws1", "connected", watch=[agent])
        agent.signal(signal.SIGKILL)
        await agent.wait()
        ws = await alice.wait_status("ws1", "lost")
        self.assertIsNotNone(ws["agents"][0]["last_seen_at"])

        # The same token from the same data dir brings it back; SIGTERM is a graceful leave.
        agent = d.start_agent(token, "agent1")
        await alice.wait_status("ws1", "connected", watch=[agent])
        agent.signal(signal.SIGTERM)
        self.assertIn(await agent.wait(), STOPPED, agent.log())
        ws = await alice.wait_status("ws1", "disconnected")
        self.assertIsNotNone(ws["agents"][0]["disconnected_at"])

    async def test_tunnels_only_to_your_own_agent(self) -> None:
        d = Deployment(self)
        await d.start_server()
        alice, bob = d.user("alice"), d.user("bob")
        await alice.login_first("alice")
        await alice.ok("users", "create", "--username", "bob", "--email", "bob@example.com",
                       "--password", "bob password")
        await bob.login("bob")
        alice_token = await alice.create("a1")
        await bob.create("b1")
        agent = d.start_agent(alice_token)
        a1 = await alice.wait_status("a1", "connected", watch=[agent])
        b1 = await bob.show("b1")
        alice_agent, bob_agent = a1["agents"][0]["id"], b1["agents"][0]["id"]

        bob_api = Client(reactor, d.url, bob.session_token())
        self.addCleanup(bob_api.close)
        alice_api = Client(reactor, d.url, alice.session_token())
        self.addCleanup(alice_api.close)

        # Bob's client cannot even open coordination for Alice's agent: 404 before the upgrade.
        path = f"/api/v2/workspaceagents/{alice_agent}/coordinate"
        with self.assertRaises(SDKError) as caught:
            await bob_api.get(path)
        self.assertEqual((caught.exception.status, caught.exception.message), (404, "Agent not found."))
        with self.assertRaises(ConnectionError) as refused:
            await open_coordination(bob_api, path, lambda r: None)
        self.assertIn("404", str(refused.exception))

        # On the route of his own agent, a tunnel to Alice's agent is refused by the coordinator.
        got = []
        own = await open_coordination(bob_api, f"/api/v2/workspaceagents/{bob_agent}/coordinate", got.append)
        self.addCleanup(own.proto.sendClose)
        own.proto.send_request(CoordinateRequest.from_json({"add_tunnel": {"id": alice_agent}}))
        await wait_until(lambda: got, "the coordinator's answer", interval=0.05)
        self.assertTrue(got[0].error, got[0])
        self.assertEqual(got[0].peer_updates, ())

        # Alice, on the same kind of route to her own agent, gets its node; once the agent has
        # her node it says it is ready for the handshake.
        nodes = []
        me = uuid.uuid4()
        mine = await open_coordination(alice_api, path, nodes.append, query={"peer_id": str(me)})
        self.addCleanup(mine.proto.sendClose)
        mine.proto.send_request(CoordinateRequest.from_json({
            "update_self": {"node": client_node(me)},
            "add_tunnel": {"id": alice_agent},
        }))
        await wait_until(lambda: any(u.kind.value == "READY_FOR_HANDSHAKE" for r in nodes for u in r.peer_updates),
                         "the agent to be ready for the handshake", interval=0.05)
        self.assertEqual([r.error for r in nodes if r.error], [])
        updates = [(str(u.id), u.kind.value) for r in nodes for u in r.peer_updates]
        self.assertEqual(updates, [(alice_agent, "NODE"), (alice_agent, "READY_FOR_HANDSHAKE")])
        update = nodes[0].peer_updates[0]
        # Both of Coder's prefixes, each derived from the agent's UUID.
        agent_uuid = uuid.UUID(alice_agent)
        self.assertEqual([str(a) for a in update.node.addresses],
                         [f"{address_from_uuid(agent_uuid)}/128",
                          f"{address_from_uuid(agent_uuid, CODER_SERVICE_PREFIX)}/128"])
        self.assertEqual(update.node.preferred_derp, 999)  # the embedded relay
        # The owner's debug view shows the tunnel Alice made and not the one Bob asked for.
        debug = await alice_api.get("/api/v2/debug/coordinator")
        dsts = {(t["dst"]) for t in debug["tunnels"]}
        self.assertEqual(dsts, {alice_agent})
        self.assertGreaterEqual(debug["counters"]["refusals"], 1)
        agents = [p for p in debug["peers"] if p["kind"] == "agent"]
        self.assertEqual([(p["id"], p["status"]) for p in agents], [(alice_agent, "connected")])
        with self.assertRaises(SDKError) as caught:
            await bob_api.get("/api/v2/debug/coordinator")
        self.assertEqual(caught.exception.status, 403)
        for proto in (own.proto, mine.proto):
            proto.sendClose()
        await own.closed
        await mine.closed

    async def test_https_with_a_private_ca(self) -> None:
        certs = made_dir(self)
        ca, cert, key = make_ca_and_server_cert(certs)
        d = Deployment(self, tls=(ca, cert, key))
        await d.start_server()
        self.assertTrue(d.url.startswith("https://127.0.0.1:"))
        alice = d.user("alice")
        # Without the CA the certificate is not trusted: one line, nothing stored.
        code, out, err = await alice.run("login", d.url, "--first-user-username", "alice",
                                         "--first-user-email", "alice@example.com",
                                         "--first-user-password", "alice password", SSL_CERT_FILE="")
        self.assertEqual(code, 1)
        self.assertEqual(err.count("\n"), 1, err)
        self.assertIn("cannot reach the server", err)
        self.assertFalse(os.path.exists(os.path.join(alice.config_dir, "session")))

        await alice.login_first("alice")
        token = await alice.create("ws1")
        agent = d.start_agent(token)
        ws = await alice.wait_status("ws1", "connected", watch=[agent])
        self.assertEqual(ws["agents"][0]["access_url"], d.url)
        # The agent's coordination went over wss with the same CA.
        self.assertIn("coordinator connected", agent.log())
        client = Client(reactor, d.url, alice.session_token(), trust_root=trust_root_from_env({"SSL_CERT_FILE": ca}))
        self.addCleanup(client.close)
        self.assertEqual((await client.me())["username"], "alice")

    async def test_dev_mode(self) -> None:
        d = Deployment(self)
        config_dir = os.path.join(d.dir, "dev-config")
        home = os.path.join(d.dir, "home")
        os.makedirs(home)
        # Cleanups run last-first: this one runs after the servers were stopped, for any agent
        # a failed test left behind.
        servers = []
        self.addCleanup(lambda: [self.kill_dev_agents(s) for s in servers])
        server = await d.start_server("--dev", env=d.env(home, CODER_CONFIG_DIR=config_dir))
        servers.append(server)
        user = d.user("dev")
        user.config_dir = config_dir
        # The demo is set up right after the server starts listening: wait for it.
        ws = await user.wait_status("dev", "connected", watch=[server], missing_ok=True)
        self.assertEqual(ws["owner_name"], "admin")
        out = await user.ok("list")
        self.assertRegex(out, r"dev\s+main\s+connected")
        [agent_pid] = server.child_pids(r"started agent process (\d+)")
        self.assertTrue(pid_alive(agent_pid))
        password = os.path.join(d.data_dir, "dev-password")
        self.assertEqual(os.stat(password).st_mode & 0o777, 0o600)
        with open(password) as f:
            self.assertNotIn(f.read().strip(), server.log())

        self.assertIn(await d.stop_server(), STOPPED, server.log())
        await wait_until(lambda: not pid_alive(agent_pid), "the dev agent to exit", interval=0.05)
        self.assertIn("dev agent exited", server.log())

        # Run it again on the same data dir: same user and workspace, a fresh agent token.
        server = await d.start_server("--dev", env=d.env(home, CODER_CONFIG_DIR=config_dir))
        servers.append(server)
        again = await user.wait_status("dev", "connected", watch=[server], missing_ok=True)
        self.assertEqual(again["id"], ws["id"])
        self.assertEqual(again["agents"][0]["id"], ws["agents"][0]["id"])
        [second_pid] = server.child_pids(r"started agent process (\d+)")
        self.assertNotEqual(second_pid, agent_pid)

    def kill_dev_agents(self, server) -> None:
        for pid in server.child_pids(r"started agent process (\d+)"):
            if pid_alive(pid):
                os.kill(pid, signal.SIGKILL)

    async def test_start_up_failures_stop_the_server(self) -> None:
        # The port is taken: one clear line, a non-zero exit, no listener left.
        d = Deployment(self)
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", d.port))
            taken.listen()
            server = Process(self, "taken", [TWISTD, "-n", "--pidfile=", "coderstack-server",
                                             "--data-dir", d.data_dir, "--stun-address", "disable",
                                             *d.server_args], d.env(d.dir), d.dir)
            code = await server.wait()
        self.assertNotIn(code, (0,), server.log())
        self.assertIn("failed to start", server.log())
        self.assertIn(str(d.port), server.log())
        # PostgreSQL that is not there: the same.
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            dead = s.getsockname()[1]
        d2 = Deployment(self, "--postgres-url", f"postgresql://nobody@127.0.0.1:{dead}/none")
        server = Process(self, "nodb", [TWISTD, "-n", "--pidfile=", "coderstack-server",
                                        "--data-dir", d2.data_dir, "--stun-address", "disable",
                                        *d2.server_args], d2.env(d2.dir), d2.dir)
        code = await server.wait()
        self.assertNotEqual(code, 0, server.log())
        self.assertIn("failed to start", server.log())
        self.assertNotIn("listening on", server.log())

    async def test_postgres_store(self) -> None:
        postgres.require()
        url = postgres.cluster().new_database()
        d = Deployment(self, "--postgres-url", url)
        server = await d.start_server()
        self.assertIn("postgres", server.log())
        alice = d.user("alice")
        await alice.login_first("alice")
        token = await alice.create("ws1")
        agent = d.start_agent(token)
        await alice.wait_status("ws1", "connected", watch=[agent])
        await d.stop_server()
        # Nothing was kept in the data dir's SQLite file: it all comes back from PostgreSQL.
        self.assertFalse([f for f in os.listdir(d.data_dir) if f.endswith(".db") or f.endswith(".sqlite")])
        await d.start_server()
        ws = await alice.wait_status("ws1", "connected", watch=[agent])
        self.assertEqual(ws["owner_name"], "alice")
