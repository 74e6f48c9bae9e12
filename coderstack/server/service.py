"""``makeService(config, reactor)`` for ``twistd coderstack-server``.

Start-up order matters: the data dir, the store and its migrations, the DERP map, then the
listeners — nothing accepts a request before the schema is current. A start-up failure (database
unreachable, port taken, bad DERP map) is logged as one clear line and stops the process.
"""

from __future__ import annotations

import os
import socket
import uuid
from typing import Any, Protocol, cast
from urllib.parse import urlsplit

from twisted.application import service
from twisted.internet import endpoints
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IAddress, IProtocolFactory
from twisted.logger import Logger

from coderstack import __version__, envopts
from coderstack.derp.mesh import Mesh
from coderstack.derp.relay import Relay
from coderstack.fdlimit import connection_budget, raise_open_files_limit
from coderstack.server.admission import Admission
from coderstack.server.api import API
from coderstack.server.appauth import AppAuth
from coderstack.server.appkeys import AppKeys
from coderstack.server.appproxy import AppProxy
from coderstack.server.apps import AppRouter
from coderstack.server.appstore import APP_KEY_NAME, AppStore
from coderstack.server.appurl import WildcardHost
from coderstack.server.builds import Builder, make_builder
from coderstack.server.clientaddr import TrustedProxies
from coderstack.server.database import database_url
from coderstack.server.deployment import Deployment
from coderstack.server.derpsetup import build_derp_map, start_relay, start_stun
from coderstack.server.dev import DevDemo
from coderstack.server.httpguard import AdmissionFactory, GuardedSite
from coderstack.server.limits import UserLimits
from coderstack.server.loginstore import LOGIN_KEY_NAME, LoginFailureTable
from coderstack.server.meshkey import derp_mesh_key
from coderstack.server.pgcoord import PGCoordination
from coderstack.server.pubsub import Listener
from coderstack.server.relaypolicy import CoordinatorRelayPolicy, RelayAdmission
from coderstack.server.replicamesh import MeshFollower, RelayAddress, relay_address
from coderstack.server.replicas import ReplicaSync
from coderstack.server.revocations import SharedRevocations
from coderstack.server.servertailnet import ServerTailnet
from coderstack.server.solereplica import refuse_another_replica
from coderstack.server.store import Store
from coderstack.server.streamingrequest import stream_claimed_bodies

log = Logger()

#: How long shutdown waits for websockets and DERP connections to finish closing.
SHUTDOWN_GRACE = 0.5
#: The replica heartbeat, and how many missed ones make a replica count as gone.
REPLICA_INTERVAL = 2.0
REPLICA_MISSED = 3


class ListeningPort(Protocol):
    """The part of ``IListeningPort`` the service uses."""

    def getHost(self) -> IAddress: ...

    def stopListening(self) -> Deferred[None] | None: ...


class QuietSite(GuardedSite):
    """A Site whose access log never includes query strings (they may carry tokens), and whose
    workspace-app requests (found by Host and path alone) go to the app router, not the API."""

    apps: AppRouter | None = None

    def log(self, request: Any) -> None:
        pass

    def getResourceFor(self, request: Any) -> Any:
        if self.apps is not None:
            found = self.apps.resource_for(request)
            if found is not None:
                request.site, request.sitepath = self, list(request.prepath)
                return found
        return super().getResourceFor(request)


class ServerService(service.MultiService):
    def __init__(self, config: dict[str, Any], reactor: Any) -> None:
        super().__init__()
        self.config = config
        self.reactor = reactor
        self.store: Store | None = None
        self.deployment: Deployment | None = None
        self.builder: Builder | None = None
        self.ports: list[ListeningPort] = []  # HTTP(S) listeners
        self.stun: ListeningPort | None = None  # the first of stun_ports (its counters are all of them)
        self.stun_ports: list[ListeningPort] = []
        self.ready: Deferred[None] = Deferred()
        self.app_proxy: AppProxy | None = None
        self.replicas: ReplicaSync | None = None
        self.mesh: Mesh | None = None
        self.pgcoord: PGCoordination | None = None
        self.revocations: SharedRevocations | None = None
        self.listener: Listener | None = None

    def startService(self) -> None:
        super().startService()
        d = Deferred.fromCoroutine(self._start())

        def failed(f: Any) -> None:
            log.critical("coderstack server failed to start: {why}", why=f.getErrorMessage())
            log.failure("start-up failure", f)
            if not self.ready.called:
                self.ready.errback(f)
            if self.reactor.running:
                self.reactor.stop()

        d.addErrback(failed)

    async def _start(self) -> None:
        cfg = self.config
        data_dir = cfg["data-dir"]
        os.makedirs(data_dir, mode=0o700, exist_ok=True)
        os.chmod(data_dir, 0o700)  # also when it existed: it holds the database and the DERP key
        self.store = Store(database_url(data_dir, cfg.get("postgres-url")), self.reactor)
        version = await self.store.migrate()
        log.info("database ready ({kind}, schema v{version})",
                 kind="postgres" if cfg.get("postgres-url") else "sqlite", version=version)

        # This replica's row in the replica registry; on SQLite it must be the only one.
        replica_id = uuid.uuid4()
        postgres = bool(cfg.get("postgres-url"))
        if not postgres:
            await refuse_another_replica(self.reactor, self.store, replica_id,
                                         interval=REPLICA_INTERVAL, expiry=REPLICA_INTERVAL * REPLICA_MISSED)
            if cfg.get("derp-server-relay-url"):
                log.warn("--derp-server-relay-url {url} is ignored: it meshes the relays of several "
                         "replicas, which need --postgres-url", url=cfg["derp-server-relay-url"])
        elif cfg.get("derp-server-relay-url"):
            relay_address(cfg, None)  # refuse the access URL before anything listens
        self.stun_ports = list(start_stun(cfg, self.reactor))
        stun = self.stun = self.stun_ports[0] if self.stun_ports else None
        for p in self.stun_ports:
            log.info("STUN listening on udp {host}:{port}", host=p.getHost().host, port=p.getHost().port)
        stun_port_numbers = [p.getHost().port for p in self.stun_ports]
        derp_map = await build_derp_map(cfg, self.reactor, stun_port_numbers)
        self.deployment = Deployment(
            self.reactor,
            self.store,
            cfg["access-url"],
            derp_map,
            derp_force_websockets=cfg["derp-force-websockets"],
            block_direct=cfg["block-direct-connections"],
            limits=user_limits(cfg),
            browser_only=cfg.get("browser-only", False),
            trusted_proxies=trusted_proxies(cfg),
        )
        if postgres:
            # Replicas may share this database: their login limits count in it too. SQLite has
            # one server only, whose counts stay in memory, off the database's single thread.
            secret = await AppStore(self.store).deployment_secret(LOGIN_KEY_NAME)
            self.deployment.login_table = LoginFailureTable(self.store, secret)
        # Workspace builds from Terraform templates (None when terraform is missing).
        self.builder = builder = await make_builder(self.reactor, self.store, self.deployment, cfg)
        api = API(self.deployment, builder=builder)
        self.deployment.relay_admission = admission = RelayAdmission(
            self.deployment.live, self.deployment.limits, browser_only=cfg.get("browser-only", False))
        relay, resources = start_relay(
            cfg, self.reactor, CoordinatorRelayPolicy(api, self.deployment.coordinator), admission
        )
        self.deployment.attach_relay(relay, resources, stun)
        mesh_key = ""
        if postgres and relay is not None:
            # Every replica's relay takes the others' mesh connections with this key.
            relay.mesh_key = mesh_key = await derp_mesh_key(api.app_store)
        # The server's own tailnet to agents (the app proxy's), its DERP in memory.
        self.deployment.tailnet = ServerTailnet(self.reactor, self.deployment)
        await self.deployment.tailnet.start()
        site = QuietSite(api.app.resource())
        router = await self._app_router(api)
        site.apps = self.deployment.apps = router
        # An app's request body streams to the app as it arrives, instead of being read first.
        stream_claimed_bodies(site, router.claims)
        # One budget for every listener: per source address, and in all below the fd limit.
        open_files = raise_open_files_limit()
        self.admission = Admission(cfg.get("max-connections-per-source", 0) or 0, *connection_budget(open_files))
        log.info("open-file limit {n}: at most {total} HTTP connections, {per} per source address",
                 n=open_files, total=self.admission.max_open, per=self.admission.per_source or "any number")

        def guarded() -> AdmissionFactory:
            return AdmissionFactory(site, self.admission)

        if cfg["http-address"] is not None:
            host, port = cfg["http-address"]
            p = await self._listen(host, port, guarded())
            log.info("listening on http://{host}:{port}", host=host or "0.0.0.0", port=p.getHost().port)
        if cfg["tls-enable"]:
            host, port = cfg["tls-address"]
            # TLS inside the admission check, so a refused connection costs no handshake and
            # websockets see the TLS transport itself.
            from twisted.protocols.tls import TLSMemoryBIOFactory

            # Site implements IProtocolFactory (zope declares it; the type checker cannot see that).
            wrapped = cast(IProtocolFactory, site)
            tls = TLSMemoryBIOFactory(tls_options(cfg["tls-cert-file"], cfg["tls-key-file"]), False, wrapped)
            p = await self._listen(host, port, AdmissionFactory(tls, self.admission, answer_refusals=False))
            log.info("listening on https://{host}:{port}", host=host or "0.0.0.0", port=p.getHost().port)
        if cfg.get("access-url-derived") and self.ports and cfg["access-url"].endswith(":0"):
            # Listening on an ephemeral port: the derived access URL (and the embedded DERP
            # node built from it) names the port we actually got.
            web = self.ports[-1].getHost()
            scheme = "https" if cfg["tls-enable"] else "http"
            cfg["access-url"] = f"{scheme}://{web.host}:{web.port}"
            self.deployment.access_url = cfg["access-url"]
            self.deployment.maps.set(await build_derp_map(cfg, self.reactor, stun_port_numbers))
        if cfg.get("http-extra-address") is not None:
            # A second address for the same API (a template's provider url may name it).
            host, port = cfg["http-extra-address"]
            p = await self._listen(host, port, guarded())
            log.info("also listening on http://{host}:{port}", host=host or "0.0.0.0", port=p.getHost().port)
        log.info("access URL: {url}", url=cfg["access-url"])
        await self._start_replica(replica_id, postgres, relay if postgres else None, mesh_key)
        if cfg.get("wildcard-access-url"):
            router.set_wildcard(WildcardHost.parse(cfg["wildcard-access-url"],
                                                   urlsplit(cfg["access-url"]).port))
            log.info("subdomain apps under {wildcard}", wildcard=cfg["wildcard-access-url"])

        if cfg.get("dev"):
            demo = DevDemo(self.reactor, self.deployment, api, cfg)
            demo.setServiceParent(self)
            await demo.ready
        if not self.ready.called:
            self.ready.callback(None)

    async def _start_replica(self, replica_id: uuid.UUID, shared: bool, relay: Relay | None,
                             mesh_key: str) -> None:
        """This replica's row and heartbeat; with PostgreSQL (``shared``), the coordinator and
        revocations shared with the other replicas, and (``relay`` given) the DERP mesh with
        those of this region."""
        cfg = self.config
        assert self.store is not None and self.deployment is not None
        address = RelayAddress("")
        if relay is not None:
            listen = None
            if cfg["http-address"] is not None and self.ports:
                listen = (cfg["http-address"][0], self.ports[0].getHost().port)
            address = relay_address(cfg, listen)
            if address.warning:
                log.warn(address.warning)
        region_id = int(cfg["derp-server-region-id"])
        sync = self.replicas = ReplicaSync(
            self.reactor, self.store, replica_id=replica_id, hostname=socket.gethostname(),
            region_id=region_id, relay_url=address.url, version=__version__,
            interval=REPLICA_INTERVAL, missed=REPLICA_MISSED)
        self.deployment.replicas = sync
        if shared:
            # The coordinator shared with the other replicas: theirs reach ours, ours theirs.
            # (Also without an embedded relay: the peers may use other DERP servers.)
            # One LISTEN connection for both.
            listener = self.listener = Listener(self.reactor, self.store.url)
            self.pgcoord = PGCoordination(self.reactor, self.store, self.deployment.coordinator, replica_id,
                                          listener)
            self.deployment.pgcoord = self.pgcoord
            sync.add_handler(self.pgcoord)
            self.pgcoord.start()
            self.revocations = SharedRevocations(self.store, self.deployment.live, replica_id, listener)
            self.deployment.revocations = self.revocations
            listener.start()
        if relay is not None and address.url:
            self.mesh = Mesh(self.reactor, relay, mesh_key)
            self.deployment.mesh = self.mesh
            sync.add_handler(MeshFollower(self.mesh, replica_id, region_id,
                                          [address.url, cfg["access-url"]]))
            log.info("DERP mesh: this replica's relay is {url}", url=address.url)
        await sync.start()
        log.info("replica {id} registered", id=replica_id)

    async def _app_router(self, api: API) -> AppRouter:
        """Workspace apps through the server: their keys (shared by every replica, in the
        database), the proxy, and the router that finds and authorizes each app."""
        keys = AppKeys(await api.app_store.deployment_secret(APP_KEY_NAME))
        self.app_proxy = AppProxy(self.reactor)
        return AppRouter(api, self.app_proxy, AppAuth(api, keys, None), api.app_store, wildcard=None,
                         path_apps=not self.config.get("disable-path-apps", False))

    async def _listen(self, host: str, port: int, factory: AdmissionFactory) -> ListeningPort:
        """An HTTP(S) listener on ``host:port``, kept in :attr:`ports`."""
        ep = endpoints.serverFromString(self.reactor, envopts.tcp_endpoint(host, port))
        p: ListeningPort = await ep.listen(factory)
        self.ports.append(p)
        return p

    async def _stop(self) -> None:
        if self.builder is not None:
            await self.builder.stop()  # interrupt terraform while the store can record it
        if self.replicas is not None:
            await self.replicas.stop()  # the other replicas drop this one at once
        if self.mesh is not None:
            await self.mesh.stop()
        if self.pgcoord is not None:
            self.pgcoord.stop()
        if self.listener is not None:
            self.listener.stop()
        for p in self.ports + self.stun_ports:
            stopped = p.stopListening()
            if stopped is not None:
                await stopped
        self.ports, self.stun, self.stun_ports = [], None, []
        if self.app_proxy is not None:
            await self.app_proxy.close()
        if self.deployment is not None:
            if self.deployment.relay is not None:
                # Tell DERP clients we are going away and when to come back.
                self.deployment.relay.announce_restart(reconnect_in=1.0, try_for=60.0)
            if self.deployment.tailnet is not None:
                await self.deployment.tailnet.close()  # a graceful leave, before the coordinator goes
            self.deployment.coordinator.close()
            # Close every other long-lived connection as "going away" and give the close
            # handshakes a moment to finish, so clients see 1001 rather than a dropped socket.
            await self.deployment.live.shutdown(grace=SHUTDOWN_GRACE)
        if self.store is not None:
            self.store.stop()

    def stopService(self) -> Deferred[None]:
        d = super().stopService()
        return d.addCallback(lambda _: Deferred.fromCoroutine(self._stop()))


def tls_options(cert_file: str, key_file: str) -> Any:
    """The server's TLS settings: the certificate file may hold the whole chain; TLS 1.2 at least."""
    from OpenSSL import crypto
    from twisted.internet import ssl

    with open(cert_file, "rb") as f:
        pem = f.read()
    with open(key_file, "rb") as f:
        key_pem = f.read()
    certs = []
    marker = b"-----BEGIN CERTIFICATE-----"
    for chunk in pem.split(marker)[1:]:
        certs.append(crypto.load_certificate(crypto.FILETYPE_PEM, marker + chunk))
    if not certs:
        raise ValueError(f"--tls-cert-file {cert_file!r} holds no PEM certificate")
    key = crypto.load_privatekey(crypto.FILETYPE_PEM, key_pem)
    options = ssl.CertificateOptions(
        privateKey=key,
        certificate=certs[0],
        extraCertChain=certs[1:],
        raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
    )
    return options


def trusted_proxies(cfg: dict[str, Any]) -> TrustedProxies:
    """--proxy-trusted-headers and --proxy-trusted-origins (trusting no one where a caller left
    them out); either alone trusts no one, which the log says."""
    proxies = TrustedProxies(tuple(cfg.get("proxy-trusted-headers") or ()),
                             tuple(cfg.get("proxy-trusted-origins") or ()))
    if bool(proxies.headers) != bool(proxies.origins):
        given, missing = (("--proxy-trusted-headers", "--proxy-trusted-origins") if proxies.headers
                          else ("--proxy-trusted-origins", "--proxy-trusted-headers"))
        log.warn("{given} is ignored without {missing}: no proxy's word about the client is believed",
                 given=given, missing=missing)
    elif proxies.enabled:
        log.info("client addresses from {headers} on connections from {origins}",
                 headers=", ".join(proxies.headers), origins=", ".join(map(str, proxies.origins)))
    return proxies


def user_limits(cfg: dict[str, Any]) -> UserLimits:
    """The per-user limits from the server options (defaults where a caller left them out)."""
    base = UserLimits()
    return UserLimits(
        coordinator_peers=int(cfg.get("coordinator-peers-per-user") or base.coordinator_peers),
        coordinator_lost_peers=int(cfg.get("coordinator-lost-peers-per-user") or base.coordinator_lost_peers),
        derp_connections=int(cfg.get("derp-connections-per-user") or base.derp_connections),
        owner_multiplier=int(cfg.get("owner-limit-multiplier") or base.owner_multiplier),
    )


def makeService(config: dict[str, Any], reactor: Any = None) -> ServerService:
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    return ServerService(dict(config), reactor)

