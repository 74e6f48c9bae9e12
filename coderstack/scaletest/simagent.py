"""``scaletest agents``: many simulated workspace agents in one process.

Each is what a real agent is to the server, minus the workspace: it fetches its manifest with
its own agent token, holds a coordinator websocket (reopened with backoff, as the agent does),
a DERP connection to its home region and a UDP socket (by default one the process's agents
share, :mod:`coderstack.tailnet.sharedudp`), and runs a real WireGuard device and
netstack that answer handshakes, disco pings and TCP. Its tunnel address serves an echo port for
``scaletest traffic``. What it does not run: scripts, metadata, apps, SSH, the link monitor (one
per process would do, and nothing roams here).

Node updates from the coordinator are timed on arrival (``node.as_of`` is when the sender made
the node; both ends of a scale test share a clock), so the agents' side measures the fan-out of
clients' node changes. ``announce_every`` makes each agent send its node again at that
interval (jittered), a node change for the clients' side to time.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any
from uuid import UUID

from twisted.internet import defer, protocol, task
from twisted.logger import Logger

from coderstack.agent.node import COORDINATE_PATH, MANIFEST_PATH, manifest_conn
from coderstack.backoff import Backoff
from coderstack.coordinator.client import (
    CoordinateClientFactory,
    CoordinationLink,
    open_coordination,
)
from coderstack.derpmap import DERPMap, rewrite_embedded
from coderstack.keys import NodeKeys
from coderstack.scaletest.stats import Errors, Samples, error_kind
from coderstack.sdk import Client
from coderstack.tailnet.client import TailnetClient
from coderstack.tailnet.sharedudp import SharedUDP
from coderstack.tailnet.stack import server_endpoint
from coderstack.twistedtypes import sleep, stream_transport
from coderstack.wire.coordination import (
    CoordinateRequest,
    CoordinateResponse,
    PeerUpdateKind,
)

_log = Logger()

#: The echo service on each simulated agent's tunnel address (RFC 862's port).
ECHO_PORT = 7


class Echo(protocol.Protocol):
    def dataReceived(self, data: bytes) -> None:
        stream_transport(self).write(data)


class FanoutClock:
    """Times each peer's node updates from the node's making to now; one per process. A node is
    counted once (the newest ``as_of`` per peer), never a peer's first (it may be an old one the
    coordinator kept), and only once ``since`` (the clock's seconds) has come: the run's
    measured window, not its set-up."""

    def __init__(self, clock: Any, samples: Samples) -> None:
        self.clock = clock
        self.samples = samples
        self.since = float("-inf")
        self._newest: dict[UUID, float] = {}

    def observe(self, response: CoordinateResponse) -> None:
        now = self.clock.seconds()
        for update in response.peer_updates:
            if update.kind is not PeerUpdateKind.NODE or update.node is None:
                continue
            made = update.node.as_of.timestamp()
            previous = self._newest.get(update.id)
            self._newest[update.id] = max(made, previous or made)
            if previous is not None and made > previous and now >= self.since:
                self.samples.add(now - made)


class SimAgent:
    """One simulated agent (see the module docstring). ``connect`` gets the time from
    :meth:`start` to its first coordinator connection; ``on_state(agent, connected)``."""

    def __init__(self, reactor: Any, url: str, token: str, *, errors: Errors, fanout: FanoutClock,
                 connect: Samples, trust_root: Any = None, backoff_cap: float = 5.0,
                 on_state: Callable[[SimAgent, bool], None] = lambda agent, up: None,
                 shared_udp: SharedUDP | None = None) -> None:
        self.reactor = reactor
        self.url = url
        self.errors = errors
        self.fanout = fanout
        self.connect = connect
        self.on_state = on_state
        self.shared_udp = shared_udp
        self.started_at: float | None = None
        self.ever_connected = False
        self.client = Client(reactor, url, token, trust_root=trust_root)
        self.token = token
        self.link = CoordinationLink(reactor, self, Backoff(first=0.5, cap=backoff_cap))
        self.tailnet: TailnetClient | None = None
        self.agent_id: UUID | None = None
        self.connected = False
        self._listening: Any = None
        self._announcer: task.LoopingCall | None = None

    def start(self) -> None:
        self.started_at = self.reactor.seconds()
        self.link.start()

    def announce_every(self, seconds: float, rng: random.Random) -> None:
        """Send our node again every ``seconds`` (first after a random share of it)."""
        def announce() -> None:
            if self.tailnet is not None and self.connected:
                node = self.tailnet.conn.node()
                if node is not None:
                    self.link.send(CoordinateRequest(update_self=node))

        def begin() -> None:
            self._announcer = task.LoopingCall(announce)
            self._announcer.clock = self.reactor
            self._announcer.start(seconds, now=False).addErrback(
                lambda f: _log.failure("announcing the node failed", f))

        self.reactor.callLater(rng.random() * seconds, begin)

    # -- the link's handler ------------------------------------------------------------------

    async def open_socket(self) -> CoordinateClientFactory:
        manifest = await self.client.get(MANIFEST_PATH)
        # A thousand agents on one address must not also hold a thousand idle HTTP connections
        # (the server limits connections per source address).
        await self.client.close()
        self._tunnel(manifest)
        socket = await open_coordination(self.client, COORDINATE_PATH, self._response)
        socket.closed.addBoth(self._closed)
        return socket

    async def socket_opened(self, reopened: bool) -> None:
        assert self.tailnet is not None
        self.tailnet.register()
        if not self.connected:
            self.connected = True
            if not self.ever_connected and self.started_at is not None:
                self.ever_connected = True
                self.connect.add(self.reactor.seconds() - self.started_at)
            self.on_state(self, True)

    def open_failed(self, err: Exception) -> bool:
        self.errors.add("agent-" + error_kind(err))
        return True

    def _closed(self, result: Any) -> Any:
        if self.connected:
            self.connected = False
            if not self.link.stopped:
                self.errors.add("agent-coordinator-closed")
            self.on_state(self, False)
        return result

    def _response(self, response: CoordinateResponse) -> None:
        self.fanout.observe(response)
        if response.error:
            self.errors.add("agent-coordinator-error")
        if self.tailnet is not None:
            self.tailnet.handle_response(response)

    def _tunnel(self, manifest: dict[str, Any]) -> TailnetClient:
        derp_map = rewrite_embedded(DERPMap.from_json(manifest.get("derp_map") or {}), self.url)
        if self.tailnet is None:
            self.agent_id = agent_id = UUID(manifest["agent_id"])
            conn = manifest_conn(self.reactor, agent_id, manifest, keys=NodeKeys.generate(),
                                 token=self.token, trust_root=self.client.trust_root)
            conn.start(0, shared=self.shared_udp)
            self.tailnet = TailnetClient(self.reactor, conn, accept_incoming=True, link_monitor=False)
            self.tailnet.coordinate(self.link)
            factory = protocol.Factory.forProtocol(Echo)
            d = server_endpoint(self.tailnet.netstack, ECHO_PORT).listen(factory)
            d.addCallback(lambda port: setattr(self, "_listening", port))
        self.tailnet.conn.set_derp_map(derp_map)
        return self.tailnet

    async def close(self) -> None:
        if self._announcer is not None and self._announcer.running:
            self._announcer.stop()
        await self.link.close()
        if self._listening is not None:
            await self._listening.stopListening()
        if self.tailnet is not None:
            await self.tailnet.close()
        await self.client.close()


async def start_agents(reactor: Any, url: str, tokens: list[str], *, errors: Errors,
                       fanout: FanoutClock, connect: Samples, trust_root: Any = None,
                       rate: float = 50.0, shared_udp: SharedUDP | None = None) -> list[SimAgent]:
    """Start one SimAgent per token, ``rate`` per second (a fleet that arrives at once is a
    thundering herd, not a steady state); records the time each took to connect first."""
    agents = []
    for token in tokens:
        agent = SimAgent(reactor, url, token, errors=errors, fanout=fanout, connect=connect,
                         trust_root=trust_root, shared_udp=shared_udp)
        agent.start()
        agents.append(agent)
        await sleep(reactor, 1.0 / rate)
    return agents


async def close_all(agents: list[SimAgent]) -> None:
    ds = [defer.Deferred.fromCoroutine(a.close()) for a in agents]
    await defer.DeferredList(ds, consumeErrors=True)
