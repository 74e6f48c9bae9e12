"""Random sequences of coordinator events, checked against what each connection was told.

Each fake connection keeps the view a real peer would build from the peer updates it receives
(NODE -> configure, LOST -> keep the node but mark lost, DISCONNECTED -> forget). After every
step, for every live connection P:

* each tunnel peer Q of P that has a node appears in P's view with exactly that node, as NODE if
  Q is connected and LOST if Q is lost;
* every node in P's view belongs to a current tunnel peer that still has a node.

Nothing is ever sent to a connection after it was closed or reported lost, and a connection the
coordinator stops using (overwrite, disconnect, too many refusals) is closed.
"""

from __future__ import annotations

from datetime import UTC, datetime
from uuid import UUID

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from coderstack.coordinator.core import AgentAuth, ClientAuth, Coordinator, PeerConnection
from coderstack.wire.coordination import (
    CoordinateRequest,
    CoordinateResponse,
    Node,
    prefix_from_uuid,
)

AGENTS = [UUID(int=0xA0 + i) for i in range(2)]
USERS = [UUID(int=0xB0 + i) for i in range(2)]
# Client ids with a fixed agent and user each, so reconnecting with the same id keeps its auth,
# plus one id that sometimes comes back for a different agent (auth change).
CLIENTS = [UUID(int=0xC0 + i) for i in range(4)]
CLIENT_AUTH = {
    CLIENTS[0]: ClientAuth(AGENTS[0], USERS[0]),
    CLIENTS[1]: ClientAuth(AGENTS[0], USERS[1]),
    CLIENTS[2]: ClientAuth(AGENTS[1], USERS[0]),
}
SWITCHER = CLIENTS[3]


class FakeTransport:
    def __init__(self, machine: CoordinatorMachine, peer_id: UUID) -> None:
        self.machine = machine
        self.peer_id = peer_id
        self.view: dict[UUID, tuple[str, Node | None]] = {}
        self.dead = False  # closed by the coordinator or reported lost by us
        self.conn: PeerConnection | None = None

    def send(self, response: CoordinateResponse) -> None:
        assert not self.dead, f"sent to a dead connection of {self.peer_id}: {response}"
        for u in response.peer_updates:
            if u.kind == "NODE":
                self.view[u.id] = ("NODE", u.node)
            elif u.kind == "LOST":
                node = u.node if u.node is not None else self.view.get(u.id, ("", None))[1]
                self.view[u.id] = ("LOST", node)
            elif u.kind == "DISCONNECTED":
                self.view.pop(u.id, None)

    def close(self) -> None:
        self.dead = True


def node(peer_id: UUID, n: int, bad: bool = False) -> Node:
    addr = prefix_from_uuid(UUID(int=0xDEAD) if bad else peer_id)
    return Node(
        id=n,
        as_of=datetime(2026, 1, 1, tzinfo=UTC),
        key=peer_id.bytes + n.to_bytes(16, "big"),
        disco=bytes(32),
        addresses=[addr],
        allowed_ips=[addr],
    )


class CoordinatorMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self.coord = Coordinator(self.clock, lost_timeout=100, max_refusals=4)
        self.transports: list[FakeTransport] = []
        self.counter = 0

    def _connect(self, peer_id: UUID, auth) -> None:
        t = FakeTransport(self, peer_id)
        t.conn = self.coord.connect(peer_id, "p", auth, t.send, t.close)
        self.transports.append(t)

    @rule(i=st.integers(0, len(AGENTS) - 1))
    def connect_agent(self, i: int) -> None:
        self._connect(AGENTS[i], AgentAuth(AGENTS[i]))

    @rule(i=st.integers(0, len(CLIENTS) - 2))
    def connect_client(self, i: int) -> None:
        self._connect(CLIENTS[i], CLIENT_AUTH[CLIENTS[i]])

    @rule(i=st.integers(0, 1))
    def connect_switcher(self, i: int) -> None:
        self._connect(SWITCHER, ClientAuth(AGENTS[i], USERS[0]))

    def _any_live(self) -> bool:
        return any(not t.dead and t.conn.active for t in self.transports)

    def _pick(self, data) -> FakeTransport:
        live = [t for t in self.transports if not t.dead and t.conn.active]
        return data.draw(st.sampled_from(live), label="connection")

    @precondition(_any_live)
    @rule(data=st.data(), bad=st.booleans(), tunnel=st.booleans())
    def update_self(self, data, bad: bool, tunnel: bool) -> None:
        t = self._pick(data)
        self.counter += 1
        auth = t.conn.auth
        add = auth.agent_id if tunnel and isinstance(auth, ClientAuth) else None
        t.conn.handle(
            CoordinateRequest(update_self=node(t.peer_id, self.counter, bad), add_tunnel=add)
        )

    @precondition(_any_live)
    @rule(data=st.data(), to=st.sampled_from(AGENTS + CLIENTS))
    def add_tunnel(self, data, to: UUID) -> None:
        self._pick(data).conn.handle(CoordinateRequest(add_tunnel=to))

    @precondition(_any_live)
    @rule(data=st.data(), to=st.sampled_from(AGENTS + CLIENTS))
    def remove_tunnel(self, data, to: UUID) -> None:
        self._pick(data).conn.handle(CoordinateRequest(remove_tunnel=to))

    @precondition(_any_live)
    @rule(data=st.data(), to=st.lists(st.sampled_from(CLIENTS), max_size=3))
    def ready(self, data, to: list[UUID]) -> None:
        self._pick(data).conn.handle(CoordinateRequest(ready_for_handshake=tuple(to)))

    @precondition(_any_live)
    @rule(data=st.data())
    def garbage(self, data) -> None:
        self._pick(data).conn.handle_text(b"\x00not json")

    @precondition(_any_live)
    @rule(data=st.data())
    def lose(self, data) -> None:
        t = self._pick(data)
        t.dead = True
        t.conn.lost()

    @precondition(_any_live)
    @rule(data=st.data(), via_request=st.booleans())
    def disconnect(self, data, via_request: bool) -> None:
        t = self._pick(data)
        if via_request:
            t.conn.handle(CoordinateRequest(disconnect=True))
        else:
            t.conn.disconnect()
        assert t.dead

    def _any_lost(self) -> bool:
        return any(self.coord.status(p) == "lost" for p in self.coord.peer_ids())

    @precondition(_any_lost)
    @rule(data=st.data())
    def reconnect_lost(self, data) -> None:
        lost = [p for p in self.coord.peer_ids() if self.coord.status(p) == "lost"]
        peer_id = data.draw(st.sampled_from(lost), label="lost peer")
        self._connect(peer_id, self.coord.auth_of(peer_id))

    @rule(seconds=st.sampled_from([1, 50, 99, 100, 150]))
    def advance(self, seconds: int) -> None:
        self.clock.advance(seconds)

    @invariant()
    def views_match_state(self) -> None:
        coord = self.coord
        for t in self.transports:
            # A connection the coordinator no longer uses has been closed (or we lost it).
            assert t.conn.active or t.dead, f"{t.peer_id}: superseded but never closed"
            if t.dead or not t.conn.active:
                continue
            me = t.peer_id
            assert coord.status(me) == "connected"
            for other in coord.tunnel_peers(me):
                other_node = coord.node(other)
                if other_node is None:
                    continue
                want = "NODE" if coord.status(other) == "connected" else "LOST"
                assert t.view.get(other) == (want, other_node), (me, other, t.view.get(other))
            for other, (_kind, seen) in t.view.items():
                if seen is None:
                    continue
                assert other in coord.tunnel_peers(me), (me, other)
                assert coord.node(other) == seen, (me, other)

    @invariant()
    def lost_peers_have_timers(self) -> None:
        lost = [p for p in self.coord.peer_ids() if self.coord.status(p) == "lost"]
        assert len(self.clock.getDelayedCalls()) == len(lost)

    @invariant()
    def debug_is_consistent(self) -> None:
        info = self.coord.debug()
        assert {p["id"] for p in info["peers"]} == {str(p) for p in self.coord.peer_ids()}
        for tunnel in info["tunnels"]:
            assert self.coord.tunnel_between(UUID(tunnel["src"]), UUID(tunnel["dst"]))


CoordinatorMachine.TestCase.settings = settings(
    max_examples=300, stateful_step_count=30, deadline=None
)


class CoordinatorModelTests(SynchronousTestCase):
    def test_model(self) -> None:
        CoordinatorMachine.TestCase("runTest").runTest()
