"""Per-user limits: the options that set them, the relay's caps and its admission of principals."""

from __future__ import annotations

import uuid

from twisted.internet.task import Clock
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from coderstack.coordinator.core import PeerLimits
from coderstack.derp.caps import ConnectionCaps
from coderstack.server.limits import UserLimits
from coderstack.server.livesessions import Credential, LiveSessions, token_hash
from coderstack.server.options import ServerOptions
from coderstack.server.relaypolicy import Principal, RelayAdmission
from coderstack.server.service import user_limits


def server(argv: list[str], environ: dict[str, str] | None = None) -> ServerOptions:
    opts = ServerOptions(environ=environ or {})
    opts.parseOptions(argv)
    return opts


class OptionsTests(SynchronousTestCase):
    def test_defaults(self) -> None:
        limits = user_limits(server([]))
        self.assertEqual(limits, UserLimits(100, 100, 100, 10))
        self.assertEqual(limits.peer_limits(False), PeerLimits(connected=100, lost=100))
        self.assertEqual(limits.peer_limits(True), PeerLimits(connected=1000, lost=1000))
        self.assertEqual((limits.derp_connections_for(False), limits.derp_connections_for(True)), (100, 1000))

    def test_env_and_flags(self) -> None:
        env = {"CODERSTACK_COORDINATOR_PEERS_PER_USER": "5", "CODERSTACK_COORDINATOR_LOST_PEERS_PER_USER": "6",
               "CODERSTACK_DERP_CONNECTIONS_PER_USER": "7", "CODERSTACK_OWNER_LIMIT_MULTIPLIER": "2"}
        self.assertEqual(user_limits(server([], env)), UserLimits(5, 6, 7, 2))
        o = server(["--derp-connections-per-user", "9"], env)
        self.assertEqual(user_limits(o).derp_connections, 9)

    def test_bad_values_name_the_flag(self) -> None:
        for bad in ("0", "-1", "many"):
            with self.assertRaises(usage.UsageError) as caught:
                server(["--coordinator-peers-per-user", bad])
            self.assertIn("coordinator-peers-per-user", str(caught.exception))
        with self.assertRaises(usage.UsageError) as caught:
            server([], {"CODERSTACK_DERP_CONNECTIONS_PER_USER": "x"})
        self.assertIn("CODERSTACK_DERP_CONNECTIONS_PER_USER", str(caught.exception))


class CapsTests(SynchronousTestCase):
    def test_acquire_up_to_the_limit_then_refuse(self) -> None:
        caps = ConnectionCaps()
        self.assertIsNone(caps.acquire("a", 2))
        self.assertIsNone(caps.acquire("a", 2))
        self.assertIn("the limit is 2", caps.acquire("a", 2))
        self.assertIsNone(caps.acquire("b", 2))
        self.assertEqual(caps.refused, 1)
        caps.release("a")
        self.assertIsNone(caps.acquire("a", 2))
        for _ in range(3):
            caps.release("b")
        self.assertEqual(caps.count("b"), 0)


class Handler:
    def __init__(self) -> None:
        self.revocations: list[str] = []

    def revoked(self, reason: str) -> None:
        self.revocations.append(reason)

    def going_away(self) -> None:
        pass


class AdmissionTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.live = LiveSessions(Clock())
        self.admission = RelayAdmission(self.live, UserLimits(derp_connections=2, owner_multiplier=3))
        self.user = uuid.uuid4()
        self.cred = Credential(token_hash("t"), user_id=self.user)

    def test_members_and_owners_get_their_limits(self) -> None:
        member = Principal("user", self.user, self.cred, is_owner=False)
        owner = Principal("user", uuid.uuid4(), Credential(token_hash("o"), user_id=uuid.uuid4()), is_owner=True)
        tickets = [self.admission.admit(member) for _ in range(2)]
        self.assertIsInstance(self.admission.admit(member), str)
        self.assertFalse(any(isinstance(self.admission.admit(owner), str) for _ in range(6)))
        self.assertIsInstance(self.admission.admit(owner), str)
        tickets[0].release()
        tickets[0].release()  # once only
        self.assertNotIsInstance(self.admission.admit(member), str)
        self.assertIsInstance(self.admission.admit(member), str)

    def test_a_ticket_files_the_connection_under_its_token(self) -> None:
        ticket = self.admission.admit(Principal("user", self.user, self.cred))
        handler = Handler()
        ticket.bind(handler)
        self.assertEqual(len(self.live), 1)
        self.live.revoke_user(self.user, "user suspended")
        self.assertEqual(handler.revocations, ["user suspended"])
        ticket.release()
        self.assertEqual(len(self.live), 0)

    def test_agents_are_counted_apart_from_users(self) -> None:
        agent = Principal("agent", self.user, Credential(token_hash("a"), agent_id=self.user))
        for _ in range(2):
            self.admission.admit(Principal("user", self.user, self.cred))
        self.assertNotIsInstance(self.admission.admit(agent), str)

    def test_not_a_principal(self) -> None:
        self.assertIsInstance(self.admission.admit("someone"), str)
