"""The live-session registry on a task.Clock: what revokes which connection, expiry, shutdown."""

from __future__ import annotations

from uuid import uuid4

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from coderstack.server.livesessions import (
    REASON_EXPIRED,
    REASON_LOGGED_OUT,
    Credential,
    LiveSessions,
    token_hash,
)


class Handler:
    def __init__(self) -> None:
        self.revocations: list[str] = []
        self.going = 0

    def revoked(self, reason: str) -> None:
        self.revocations.append(reason)

    def going_away(self) -> None:
        self.going += 1


class LiveSessionsTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.live = LiveSessions(self.clock)
        self.user = uuid4()
        self.session = Credential(token_hash("abcdefghij-" + "x" * 22), user_id=self.user)
        self.agent_id = uuid4()
        self.agent = Credential(token_hash(str(uuid4())), agent_id=self.agent_id)

    def attach(self, credential: Credential) -> tuple[Handler, object]:
        h = Handler()
        return h, self.live.attach(credential, h)

    def test_revoking_a_token_closes_only_its_connections(self) -> None:
        a, _ = self.attach(self.session)
        b, _ = self.attach(self.session)
        other_token = Credential(token_hash("klmnopqrst-" + "y" * 22), user_id=self.user)
        c, _ = self.attach(other_token)
        d, _ = self.attach(self.agent)
        self.assertEqual(self.live.revoke_token(self.session.token_hash), 2)
        self.assertEqual((a.revocations, b.revocations), ([REASON_LOGGED_OUT], [REASON_LOGGED_OUT]))
        self.assertEqual((c.revocations, d.revocations), ([], []))

    def test_revoking_a_user_closes_all_its_sessions_not_agents(self) -> None:
        a, _ = self.attach(self.session)
        b, _ = self.attach(Credential(token_hash("other-token"), user_id=self.user))
        c, _ = self.attach(Credential(token_hash("stranger"), user_id=uuid4()))
        d, _ = self.attach(self.agent)
        self.assertEqual(self.live.revoke_user(self.user, "user suspended"), 2)
        self.assertEqual(a.revocations + b.revocations, ["user suspended"] * 2)
        self.assertEqual(c.revocations + d.revocations, [])

    def test_revoking_an_agent(self) -> None:
        a, _ = self.attach(self.agent)
        b, _ = self.attach(self.session)
        self.assertEqual(self.live.revoke_agent(self.agent_id), 1)
        self.assertEqual(len(a.revocations), 1)
        self.assertEqual(b.revocations, [])

    def test_a_released_connection_is_forgotten(self) -> None:
        a, session = self.attach(self.session)
        self.assertEqual(len(self.live), 1)
        session.release()
        session.release()
        self.assertEqual(len(self.live), 0)
        self.assertEqual(self.live.revoke_token(self.session.token_hash), 0)
        self.assertEqual(a.revocations, [])

    def test_revoked_before_the_connection_exists_closes_it_when_bound(self) -> None:
        session = self.live.open(self.session)
        self.live.revoke_user(self.user, "user deleted")
        h = Handler()
        session.bind(h)
        self.assertEqual(h.revocations, ["user deleted"])

    def test_revoked_once_even_if_revoked_twice(self) -> None:
        a, _ = self.attach(self.session)
        self.live.revoke_token(self.session.token_hash)
        self.live.revoke_user(self.user, "user suspended")
        self.assertEqual(a.revocations, [REASON_LOGGED_OUT])

    def test_expiry_revokes_at_expires_at(self) -> None:
        self.clock.advance(1000)
        cred = Credential(token_hash("t"), user_id=self.user, expires_at=1060.0)
        a, _ = self.attach(cred)
        self.clock.advance(59.9)
        self.assertEqual(a.revocations, [])
        self.clock.advance(0.1)
        self.assertEqual(a.revocations, [REASON_EXPIRED])
        self.assertEqual(self.live.counters["expired"], 1)

    def test_already_expired_is_revoked_on_the_next_turn(self) -> None:
        self.clock.advance(100)
        a, _ = self.attach(Credential(token_hash("t"), user_id=self.user, expires_at=50.0))
        self.clock.advance(0)
        self.assertEqual(a.revocations, [REASON_EXPIRED])

    def test_release_cancels_the_expiry_timer(self) -> None:
        _a, session = self.attach(Credential(token_hash("t"), user_id=self.user, expires_at=60.0))
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        session.release()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_shutdown_tells_everyone_and_fires_when_all_have_ended(self) -> None:
        a, sa = self.attach(self.session)
        b, sb = self.attach(self.agent)
        done = self.live.shutdown(grace=0.5)
        self.assertEqual((a.going, b.going), (1, 1))
        self.assertNoResult(done)
        sa.release()
        self.assertNoResult(done)
        sb.release()
        self.successResultOf(done)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_shutdown_gives_up_after_the_grace(self) -> None:
        self.attach(self.session)
        done = self.live.shutdown(grace=0.5)
        self.clock.advance(0.49)
        self.assertNoResult(done)
        self.clock.advance(0.01)
        self.successResultOf(done)

    def test_shutdown_with_nothing_open_fires_at_once(self) -> None:
        self.successResultOf(self.live.shutdown(grace=0.5))

    def test_a_failing_handler_does_not_stop_the_others(self) -> None:
        class Broken(Handler):
            def revoked(self, reason: str) -> None:
                raise RuntimeError("transport gone")

        self.live.attach(self.session, Broken())
        a, _ = self.attach(self.session)
        self.live.revoke_token(self.session.token_hash)
        self.assertEqual(a.revocations, [REASON_LOGGED_OUT])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
