"""One running deployment: the store, the coordinator, the DERP map and the live agent connections.

The Klein API (``api.py``) asks this object for everything that is not a database row: agent
status, connection info, coordination websockets, and resources mounted beside the API (the DERP
relay, metrics). It is the one place that knows how those pieces fit together.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from ipaddress import IPv6Address
from typing import Any

from autobahn.twisted.resource import WebSocketResource
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.web.resource import IResource

from coderstack.coordinator.core import AgentAuth, ClientAuth, Coordinator
from coderstack.coordinator.websocket import (
    CoordinateFactory,
    CoordinateProtocol,
    coordinate_resource,
)
from coderstack.derp.mapstream import MapPublisher
from coderstack.derp.server import metrics_text
from coderstack.derpmap import DERPMap
from coderstack.server import auth, procmetrics
from coderstack.server.clientaddr import TrustedProxies
from coderstack.server.dbhealth import DatabaseCheck
from coderstack.server.hashpool import HashPool
from coderstack.server.jsonhttp import HTTPRequest
from coderstack.server.limits import UserLimits
from coderstack.server.livesessions import REASON_AGENT_REVOKED, Credential, LiveSessions
from coderstack.server.loginlimit import LoginLimiter
from coderstack.server.loginstore import LoginFailureTable
from coderstack.server.records import Agent, User, Workspace
from coderstack.server.replicas import ReplicaSync
from coderstack.server.revocations import Revocations
from coderstack.server.store import Store
from coderstack.wire.coordination import address_from_uuid

log = Logger()


class Deployment:
    def __init__(
        self,
        reactor: Any,
        store: Store,
        access_url: str,
        derp_map: DERPMap,
        derp_force_websockets: bool = False,
        block_direct: bool = False,
        limits: UserLimits | None = None,
        browser_only: bool = False,
        trusted_proxies: TrustedProxies | None = None,
    ) -> None:
        self.reactor = reactor
        self.store = store
        self.access_url = access_url
        self.maps = MapPublisher(derp_map)
        self.derp_force_websockets = derp_force_websockets
        self.block_direct = block_direct
        #: --browser-only: no CLI tunnels (see browseronly.py).
        self.browser_only = browser_only
        #: --proxy-trusted-headers/-origins: whose word about the client's address is believed
        #: (the login limits and the app proxy use the client, not the load balancer).
        self.trusted_proxies = trusted_proxies or TrustedProxies()
        self.coordinator = Coordinator(reactor)
        self.limits = limits or UserLimits()
        #: Every long-lived connection by the credential that opened it (see livesessions.py).
        self.live = LiveSessions(reactor)
        #: Revoking a credential closes its connections here (and, with several replicas, on
        #: every one: the service swaps in SharedRevocations).
        self.revocations: Revocations = Revocations(self.live)
        self.dummy_password_hash = auth.hash_password(uuid.uuid4().hex)
        self.passwords = HashPool(reactor)
        self.logins = LoginLimiter(reactor)
        #: Where the login limits' counts live when several replicas share them (PostgreSQL;
        #: set by the service): None keeps them in ``logins``' memory (see loginstore.py).
        self.login_table: LoginFailureTable | None = None
        #: /healthz's view of the database (a load balancer takes a replica that lost it out).
        self.database_check = DatabaseCheck(reactor, store.ping)
        # agent id -> its live coordination websocket
        self._agent_sockets: dict[uuid.UUID, CoordinateProtocol] = {}
        # path -> resource served beside the API (the DERP relay's /derp, /latency-check, ...)
        self.mounts: dict[bytes, IResource] = {}
        self.relay: Any = None
        #: The relay's per-user connection caps and live-session filing (RelayAdmission).
        self.relay_admission: Any = None
        self.stun_port: Any = None
        #: The server's own tailnet to agents, for the app proxy (servertailnet.ServerTailnet).
        self.tailnet: Any = None
        #: Workspace apps through the server (apps.AppRouter).
        self.apps: Any = None
        #: This replica's row and the alive set (replicas.ReplicaSync); None until registered.
        self.replicas: ReplicaSync | None = None
        #: The DERP mesh with the other replicas (derp.mesh.Mesh), with PostgreSQL only.
        self.mesh: Any = None
        #: The coordinator shared through PostgreSQL (pgcoord.PGCoordination), with PostgreSQL only.
        self.pgcoord: Any = None

    # -- passwords: scrypt is deliberately slow, so it runs on a thread ------------------------

    # On a small pool of their own with a bounded queue (PoolBusy beyond it), so a login flood
    # cannot hold every thread or pile up requests in memory.

    def hash_password(self, password: str) -> Deferred[str]:
        return self.passwords.run(auth.hash_password, password)

    def verify_password(self, password: str, stored: str) -> Deferred[bool]:
        return self.passwords.run(auth.verify_password, password, stored)

    # -- DERP map ----------------------------------------------------------------------------

    @property
    def derp_map(self) -> DERPMap:
        return self.maps.get()

    def derp_map_json(self) -> dict[str, Any]:
        return self.derp_map.to_json()

    def attach_relay(self, relay: Any, resources: dict[str, IResource], stun_port: Any) -> None:
        self.relay = relay
        self.stun_port = stun_port
        for path, resource in resources.items():
            self.mount(path.encode(), resource)

    def metrics_text(self) -> str:
        """``GET /metrics``: the coordinator, STUN, live sessions, the relay, the server's
        tailnet and the process itself, in Prometheus text format."""
        lines = []
        coordinator = self.coordinator
        for name, value in sorted(coordinator.counters.items()):
            lines.append(f"# TYPE coderstack_coordinator_{name}_total counter")
            lines.append(f"coderstack_coordinator_{name}_total {value}")
        # Counted without debug(), whose per-peer JSON a scrape of thousands of peers would pay.
        by_kind = coordinator.peer_counts()
        lines.append("# TYPE coderstack_coordinator_peers gauge")
        for status in ("connected", "lost"):
            n = sum(v for (_, s), v in by_kind.items() if s == status)
            lines.append(f'coderstack_coordinator_peers{{status="{status}"}} {n}')
        lines.append("# HELP coderstack_coordinator_peers_by_kind Coordinator peers by kind "
                     "(agent, client, server) and status.")
        lines.append("# TYPE coderstack_coordinator_peers_by_kind gauge")
        for (kind, status), n in by_kind.items():
            lines.append(f'coderstack_coordinator_peers_by_kind{{kind="{kind}",status="{status}"}} {n}')
        lines.append("# HELP coderstack_coordinator_tunnels Tunnels (source to agent) the "
                     "coordinator holds.")
        lines.append("# TYPE coderstack_coordinator_tunnels gauge")
        lines.append(f"coderstack_coordinator_tunnels {coordinator.tunnel_count()}")
        lines.extend(coordinator.fanout_seconds.exposition(
            "coderstack_coordinator_fanout_seconds",
            "From receiving a peer's node update to having written it to every connected "
            "tunnel peer.",
        ))
        if self.stun_port is not None:
            c = self.stun_port.protocol.counters
            for name in ("answered", "errors_sent", "dropped_malformed", "rate_limited"):
                lines.append(f"# TYPE coderstack_stun_{name}_total counter")
                lines.append(f"coderstack_stun_{name}_total {getattr(c, name)}")
        lines.append("# TYPE coderstack_live_sessions gauge")
        lines.append(f"coderstack_live_sessions {len(self.live)}")
        for name, value in sorted(self.live.counters.items()):
            lines.append(f"# TYPE coderstack_live_sessions_{name}_total counter")
            lines.append(f"coderstack_live_sessions_{name}_total {value}")
        if self.relay_admission is not None:
            lines.append("# TYPE coderstack_derp_connections_refused_total counter")
            lines.append(
                'coderstack_derp_connections_refused_total{reason="per_user_limit"} '
                f"{self.relay_admission.caps.refused}"
            )
        lines.extend(self._replica_metrics())
        text = "\n".join(lines) + "\n"
        if self.relay is not None:
            text += metrics_text(self.relay)
        if self.tailnet is not None:
            text += self.tailnet.metrics_text()
        return text + procmetrics.metrics_text()

    def _replica_metrics(self) -> list[str]:
        lines = []
        if self.replicas is not None:
            lines.append("# HELP coderstack_replica_healthy 1 while this replica's database "
                         "heartbeats work.")
            lines.append("# TYPE coderstack_replica_healthy gauge")
            lines.append(f"coderstack_replica_healthy {int(self.replicas.healthy)}")
            lines.append("# HELP coderstack_replicas_alive Replicas alive at the last heartbeat, "
                         "this one included.")
            lines.append("# TYPE coderstack_replicas_alive gauge")
            lines.append(f"coderstack_replicas_alive {len(self.replicas.alive_ids())}")
        if self.pgcoord is not None:
            lines.extend(self.pgcoord.metrics_lines())
        lines.extend(self.revocations.metrics_lines())
        if self.mesh is not None:
            peers = list(self.mesh.peers.values())
            up = sum(1 for p in peers if p.client.connected)
            lines.append("# HELP coderstack_derp_mesh_peers DERP mesh links to other replicas' "
                         "relays, by state.")
            lines.append("# TYPE coderstack_derp_mesh_peers gauge")
            lines.append(f'coderstack_derp_mesh_peers{{state="connected"}} {up}')
            lines.append(f'coderstack_derp_mesh_peers{{state="connecting"}} {len(peers) - up}')
            lines.append("# HELP coderstack_derp_mesh_remote_keys Node keys connected to other "
                         "replicas that this relay forwards to.")
            lines.append("# TYPE coderstack_derp_mesh_remote_keys gauge")
            lines.append(f"coderstack_derp_mesh_remote_keys {sum(len(p.keys) for p in peers)}")
        return lines

    def connection_info(self) -> dict[str, Any]:
        return {
            "derp_map": self.derp_map_json(),
            "derp_force_websockets": self.derp_force_websockets,
            "disable_direct_connections": self.block_direct,
            "hostname_suffix": "coder",
        }

    # -- agents ------------------------------------------------------------------------------

    @staticmethod
    def agent_address(agent_id: uuid.UUID) -> IPv6Address:
        return address_from_uuid(agent_id)

    def agent_access_url(self, agent_id: uuid.UUID) -> str:
        return self.access_url

    def agent_status(self, agent: Agent) -> tuple[str, datetime | None]:
        """(connected | lost | disconnected | connecting, last seen)."""
        state = self.coordinator.status(agent.id)
        if state == "connected":
            return "connected", datetime.now(UTC)
        if state == "lost":
            seen = self.coordinator.last_seen(agent.id)
            return "lost", datetime.fromtimestamp(seen, UTC) if seen else agent.last_connected_at
        if agent.first_connected_at is None:
            return "connecting", None
        return "disconnected", agent.disconnected_at or agent.last_connected_at

    def agent_removed(self, agent_id: uuid.UUID) -> None:
        """The agent's token or workspace is gone: close every live connection it opened."""
        self.revocations.agent(agent_id, REASON_AGENT_REVOKED)
        proto = self._agent_sockets.pop(agent_id, None)
        if proto is not None:
            proto.kick("agent token revoked")

    # -- coordination ------------------------------------------------------------------------

    def _track(self, credential: Credential | None) -> tuple[Any, Any]:
        """on_open/on_close hooks that file a coordination websocket under its credential."""
        if credential is None:
            return (lambda proto: None), (lambda proto, replaced: None)
        sessions: dict[CoordinateProtocol, Any] = {}

        def opened(proto: CoordinateProtocol) -> None:
            session = sessions[proto] = self.live.open(credential)
            session.bind(proto)

        def closed(proto: CoordinateProtocol, replaced: bool) -> None:
            session = sessions.pop(proto, None)
            if session is not None:
                session.release()

        return opened, closed

    def coordinate_resource_for_agent(
        self, agent: Agent, ws: Workspace, credential: Credential | None = None
    ) -> WebSocketResource:
        track_open, track_close = self._track(credential)

        def opened(proto: CoordinateProtocol) -> None:
            track_open(proto)
            self._agent_sockets[agent.id] = proto
            self.store.note_agent_connected(agent.id).addErrback(
                lambda f: log.failure("noting agent connected", f)
            )

        def closed(proto: CoordinateProtocol, replaced: bool) -> None:
            track_close(proto, replaced)
            if self._agent_sockets.get(agent.id) is proto:
                del self._agent_sockets[agent.id]
            if not replaced:
                self.store.note_agent_disconnected(agent.id).addErrback(
                    lambda f: log.failure("noting agent disconnected", f)
                )

        factory = CoordinateFactory(
            self.coordinator,
            agent.id,
            f"{ws.owner_name}/{ws.name}/{agent.name}",
            AgentAuth(agent_id=agent.id),
            on_open=opened,
            on_close=closed,
        )
        return coordinate_resource(factory)

    async def client_peer_id_problem(self, peer_id: uuid.UUID, user_id: uuid.UUID, agent_id: uuid.UUID) -> str | None:
        """Why a client may not coordinate as ``peer_id``, or None.

        A client may reuse its own peer id (to replace its stale connection), never an agent's
        (even an offline one's) nor another user's.
        """
        existing = self.coordinator.auth_of(peer_id)
        if existing is not None and not (isinstance(existing, ClientAuth) and existing.user_id == user_id):
            return "that peer id belongs to someone else"
        problem = self.coordinator.check_peer_id(peer_id, ClientAuth(agent_id=agent_id, user_id=user_id))
        if problem:
            return problem
        if await self.store.agent(peer_id) is not None:
            return "that peer id belongs to an agent"
        return None

    def coordinator_limit_problem(self, peer_id: uuid.UUID, user: User, agent: Agent) -> str | None:
        """Why this client would be over its user's coordinator peer limit, or None."""
        return self.coordinator.limit_problem(
            peer_id, ClientAuth(agent_id=agent.id, user_id=user.id), self.limits.peer_limits(user.is_owner)
        )

    def coordinate_resource_for_client(
        self, peer_id: uuid.UUID, user: User, agent: Agent, credential: Credential | None = None
    ) -> WebSocketResource:
        track_open, track_close = self._track(credential)
        factory = CoordinateFactory(
            self.coordinator,
            peer_id,
            f"{user.username}/client",
            ClientAuth(agent_id=agent.id, user_id=user.id),
            on_open=track_open,
            on_close=track_close,
            limits=self.limits.peer_limits(user.is_owner),
        )
        return coordinate_resource(factory)

    # -- other mounted resources -------------------------------------------------------------

    def mount(self, path: bytes, resource: IResource) -> None:
        self.mounts[path.rstrip(b"/") or b"/"] = resource

    def mounted_resource(self, request: HTTPRequest) -> IResource | None:
        path = request.path.rstrip(b"/") or b"/"
        return self.mounts.get(path)
