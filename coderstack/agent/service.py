"""The workspace agent: dial out, fetch the manifest, stay coordinated, come back after failures.

One loop (a :class:`coderstack.coordinator.client.CoordinationLink`), run for as long as the
service runs:

    manifest -> open coordination websocket -> update_self(node) -> ... until the socket closes
      ^                                                                                |
      +------------------ wait (the agent's Backoff: 0.5 s doubling to reconnect_max) <+

The backoff resets after a session that got as far as an open websocket, so a server restart is
noticed within ``PING_INTERVAL + PING_TIMEOUT`` seconds and reconnected within about a second of
the server coming back. A rejected token is logged once per attempt without the token itself.

The tunnel is a :class:`coderstack.tailnet.client.TailnetClient` (with its Conn) made on the
first manifest (its address comes from the agent id) and kept across coordinator reconnects, so
WireGuard sessions with clients survive a server restart (their peers become LOST, not
DISCONNECTED). Our Node goes to the coordinator as ``update_self`` whenever it changes and on
every new websocket; the clients' NODE updates configure the Conn, and a new client is told
READY_FOR_HANDSHAKE. The Conn runs a link monitor (``coderstack/tailnet/linkmon.py``) unless
``link_monitor`` is false or ``CODERSTACK_LINK_MONITOR=0``.

The first manifest also starts the workspace part (``coderstack/agent/workspace.py``: lifecycle,
scripts, metadata, app health); a graceful stop runs its stop scripts and reports before the
tunnel closes. Every manifest refreshes the environment sessions get (``session_env``), and the
agent keeps a ``coder`` command in ``<data_dir>/bin`` for them. The web terminal's processes
(``coderstack/agent/rpty.py``, tunnel port 2) are hung up when the agent stops, after the stop
scripts.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable
from typing import Any
from uuid import UUID

from twisted.application import service
from twisted.internet.defer import Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from coderstack.agent.api import agent_api_site
from coderstack.agent.datadir import DataDirInUse, agent_data_dir
from coderstack.agent.forward import LocalPortForwarder, LocalUDPForwarder
from coderstack.agent.node import COORDINATE_PATH, MANIFEST_PATH, manifest_conn
from coderstack.agent.rpty import ReconnectingPTYServer
from coderstack.agent.session_env import SessionEnvironment, write_coder_command
from coderstack.agent.speedtest import SpeedtestServerFactory
from coderstack.agent.ssh import ssh_factory
from coderstack.agent.workspace import Workspace
from coderstack.backoff import Backoff
from coderstack.coordinator.client import (
    CoordinateClientFactory,
    CoordinationLink,
    CoordinationSocket,
    open_coordination,
)
from coderstack.derpmap import DERPMap, DERPMapError, rewrite_embedded
from coderstack.keys import NodeKeys, load_node_keys
from coderstack.netstack.endpoints import Netstack
from coderstack.netstack.stack import ANY_PORT
from coderstack.sdk import Client, SDKError
from coderstack.tailnet import linkmon
from coderstack.tailnet.client import TailnetClient
from coderstack.tailnet.conn import Conn
from coderstack.tailnet.conn import home_region as conn_home_region
from coderstack.tailnet.stack import server_endpoint
from coderstack.wire.ports import (
    AGENT_API_PORT,
    RECONNECTING_PTY_PORT,
    SPEEDTEST_PORT,
    SSH_PORT,
    STANDARD_SSH_PORT,
)

log = Logger()



def home_region(derp_map: DERPMap) -> int:
    """Kept for callers of the old API; the tailnet Conn owns the choice now."""
    return conn_home_region(derp_map)


class AgentService(service.Service):
    def __init__(self, reactor: Any, url: str, token: str, data_dir: str, listen_port: int = 0,
                 reconnect_max: float = 10.0, link_monitor: bool | None = None,
                 per_agent_data_dir: bool = False, rng: Callable[[], float] = random.random) -> None:
        self.reactor = reactor
        self.url = url
        self.token = token
        # With per_agent_data_dir, data_dir is the base and the keys live in <data_dir>/<agent id>
        # (see datadir.py); either way they are loaded once the first manifest names the agent.
        self.data_dir = data_dir
        self.per_agent_data_dir = per_agent_data_dir
        self._key_dir: str | None = None
        self.listen_port = listen_port
        self.reconnect_max = reconnect_max
        self.link_monitor = linkmon.enabled_from_env() if link_monitor is None else link_monitor
        self.keys: NodeKeys | None = None
        self.manifest: dict[str, Any] | None = None
        self.tailnet: TailnetClient | None = None
        # A first session that fails waits 1 s, as a second failure in a row does; one that ends
        # after it opened is tried again after 0.5 s.
        self.link = CoordinationLink(reactor, self, Backoff(first=0.5, cap=reconnect_max, rng=rng, failures=1))
        # tunnel port -> protocol factory served on the agent's tunnel address
        self.services: dict[int, Any] = {}
        self._listening: dict[int, Any] = {}
        # takes the datagrams to every UDP port of the tunnel address (attach(netstack), stop())
        self.udp_forwarder: Any = None
        self.sessions = 0
        # What sessions and scripts run with; refreshed by every manifest.
        self._bin_written: str | None = None
        self.session_env = SessionEnvironment(url, bin_dir=os.path.join(data_dir, "bin"),
                                              script_bin_dir=os.path.join(data_dir, "scripts", "bin"))
        self.workspace: Workspace | None = None
        # The web terminal's sessions (port 2), when served: they end when the agent stops.
        self.reconnecting_pty: ReconnectingPTYServer | None = None

    @property
    def conn(self) -> Conn | None:
        return self.tailnet.conn if self.tailnet is not None else None

    @property
    def netstack(self) -> Netstack | None:
        return self.tailnet.netstack if self.tailnet is not None else None

    @property
    def coordination(self) -> CoordinationSocket | None:
        """The open coordination websocket, if there is one."""
        return self.link.socket

    # -- lifecycle ---------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()
        self.client = Client(self.reactor, self.url, self.token)
        self.link.start()

    def stopService(self) -> Any:
        super().stopService()
        self.link.stop()
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        if self.workspace is not None:
            try:
                await self.workspace.stop()
            except Exception:
                log.failure("workspace shutdown failed")
        if self.reconnecting_pty is not None:
            try:
                await self.reconnecting_pty.close()
            except Exception:
                log.failure("ending the reconnecting PTYs failed")
        ds = []
        await self.link.close()  # a graceful disconnect: the clients see DISCONNECTED
        if self.udp_forwarder is not None:
            self.udp_forwarder.stop()
        # Stopped ports stop their factories (the agent API site's log clock among them).
        listening, self._listening = self._listening, {}
        for port in listening.values():
            ds.append(port.stopListening())
        if self.tailnet is not None:
            ds.append(Deferred.fromCoroutine(self.tailnet.close()))
        ds.append(self.client.close())
        await _gather(ds)

    # -- the session (the link's handler) -------------------------------------------------------

    async def open_socket(self) -> CoordinateClientFactory:
        """One session: the manifest (the first one makes the tunnel), then the websocket."""
        manifest = await self.client.get(MANIFEST_PATH)
        self.manifest = manifest
        agent_id = UUID(manifest["agent_id"])
        # First: a data dir another agent owns stops us before any script runs.
        self.load_keys(agent_id)
        if self._bin_written is None:
            # The coder command and the scripts' bin dir live in this agent's own data dir.
            self._bin_written = os.path.join(self.key_dir(), "bin")
            self.session_env.bin_dir = self._bin_written
            self.session_env.script_bin_dir = os.path.join(self.key_dir(), "scripts", "bin")
            try:
                write_coder_command(self._bin_written)
            except OSError as err:
                log.warn("cannot write the coder command: {why}", why=str(err))
        self.session_env.update(manifest)
        if self.workspace is None and self.running:
            self.workspace = Workspace(self.reactor, self.client, self.key_dir(), self.session_env,
                                       backoff_cap=self.reconnect_max)
            self.workspace.start(manifest)
        log.info(
            "agent {id} of {owner}/{ws} connected to {url} (manifest access URL {access})",
            id=agent_id, owner=manifest.get("owner_name"), ws=manifest.get("workspace_name"),
            url=self.url, access=manifest.get("access_url"),
        )
        self._write_state(manifest)
        tailnet = self._tunnel(agent_id, manifest)
        return await open_coordination(self.client, COORDINATE_PATH, tailnet.handle_response)

    async def socket_opened(self, reopened: bool) -> None:
        self.sessions += 1
        if self.tailnet is not None:
            self.tailnet.register()
        log.info("coordinator connected; node sent")

    def open_failed(self, err: Exception) -> bool:
        if isinstance(err, DataDirInUse):
            log.critical("agent stopped: {why}", why=str(err))
            return False
        if isinstance(err, SDKError):
            log.warn("agent cannot talk to {url}: {why}", url=self.url, why=str(err))
        elif isinstance(err, ConnectionError):
            log.warn("coordination closed: {why}", why=str(err))
        else:
            log.failure("agent session failed", Failure(err))
        return True

    def load_keys(self, agent_id: UUID) -> NodeKeys:
        """This agent's keys, from its own data dir (raises DataDirInUse for another's)."""
        if self.keys is None:
            self._key_dir = agent_data_dir(self.data_dir, agent_id, self.per_agent_data_dir)
            self.keys = load_node_keys(self._key_dir)
        return self.keys

    def key_dir(self) -> str:
        """The directory of this agent's keys (known once the first manifest is)."""
        if self._key_dir is None:
            raise RuntimeError("the agent's data dir is chosen when its first manifest arrives")
        return self._key_dir

    async def netcheck_report(self) -> dict[str, Any] | None:
        """The tunnel's newest netcheck report (Tailscale's JSON), for ``ping -v`` diagnostics."""
        report = self.conn.last_report if self.conn is not None else None
        return report.to_json() if report is not None else None

    def serve(self, port: int, factory: Any) -> None:
        """Serve ``factory`` on ``port`` of the tunnel address (now, or once the tunnel is up)."""
        self.services[port] = factory
        if self.netstack is not None:
            self._listen(port, factory)

    def serve_udp(self, forwarder: Any) -> None:
        """Give every UDP port of the tunnel address to ``forwarder`` (now, or once the tunnel is up)."""
        self.udp_forwarder = forwarder
        if self.netstack is not None:
            forwarder.attach(self.netstack)

    def _listen(self, port: int, factory: Any) -> None:
        assert self.netstack is not None
        d = server_endpoint(self.netstack, port).listen(factory)
        d.addCallback(lambda listening: self._listening.__setitem__(port, listening))
        d.addErrback(lambda f: log.failure("cannot serve tunnel port {port}", f, port=port))

    def _tunnel(self, agent_id: UUID, manifest: dict[str, Any]) -> TailnetClient:
        """The tunnel, made on the first manifest; every manifest refreshes its DERP map."""
        assert self.keys is not None
        tailnet = self.tailnet
        if tailnet is None:
            conn = manifest_conn(self.reactor, agent_id, manifest, keys=self.keys, token=self.token,
                                 trust_root=self.client.trust_root)
            conn.start(self.listen_port)
            # The link monitor re-discovers paths and reconnects DERP at once after roaming,
            # renumbering or a wake-up.
            tailnet = self.tailnet = TailnetClient(self.reactor, conn, accept_incoming=True,
                                                   link_monitor=self.link_monitor)
            tailnet.coordinate(self.link)
            for port, factory in self.services.items():
                self._listen(port, factory)
            if self.udp_forwarder is not None:
                self.udp_forwarder.attach(tailnet.netstack)
        try:
            derp_map = rewrite_embedded(DERPMap.from_json(manifest.get("derp_map") or {}), self.url)
        except DERPMapError as err:
            log.warn("the manifest's DERP map is unusable: {why}", why=str(err))
        else:
            tailnet.conn.set_derp_map(derp_map)
        return tailnet

    def _write_state(self, manifest: dict[str, Any]) -> None:
        # What the agent last learned, for people debugging a workspace. No tokens, but the
        # template's environment and scripts may hold secrets of their own: owner-only.
        path = os.path.join(self.key_dir(), "manifest.json")
        tmp = path + ".tmp"
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            os.fchmod(f.fileno(), 0o600)
            json.dump(manifest, f, indent=2)
        os.replace(tmp, path)


async def _gather(ds: list[Any]) -> None:
    for d in ds:
        if isinstance(d, Deferred):
            await d


def makeService(config: dict[str, Any], reactor: Any = None) -> AgentService:
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    svc = AgentService(
        reactor,
        config["url"],
        config["token"],
        config["data-dir"],
        listen_port=config["tailnet-listen-port"],
        reconnect_max=float(config["reconnect-max"]),
        per_agent_data_dir=bool(config.get("data-dir-per-agent")),
    )
    serve_standard_ports(svc, reactor, svc.key_dir)
    return svc


def serve_standard_ports(svc: AgentService, reactor: Any, data_dir: str | Callable[[], str]) -> None:
    """Coder's reserved tunnel ports: SSH on 1 and 22, the reconnecting PTY (web terminal) on 2,
    speedtest on 3, the agent API on 4; every other port, TCP and UDP, is forwarded to the
    workspace's own loopback."""
    ssh = ssh_factory(data_dir, reactor, session_env=svc.session_env)
    svc.serve(SSH_PORT, ssh)
    svc.serve(STANDARD_SSH_PORT, ssh)
    svc.reconnecting_pty = ReconnectingPTYServer(reactor, session_env=svc.session_env)
    svc.serve(RECONNECTING_PTY_PORT, svc.reconnecting_pty)
    svc.serve(SPEEDTEST_PORT, SpeedtestServerFactory(reactor))
    svc.serve(AGENT_API_PORT, agent_api_site(svc.netcheck_report))
    svc.serve(ANY_PORT, LocalPortForwarder(reactor))
    svc.serve_udp(LocalUDPForwarder(reactor))
