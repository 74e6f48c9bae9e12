"""A DERP client for one region: connect, log in, send, receive, reconnect.

Connection (per attempt, nodes of the region in order, STUN-only nodes skipped):

1. TCP (+ TLS unless the node has ForceHTTP) to HostName (or its IPv4 field) : DERPPort.
2. The transport: ``GET /derp`` with ``Upgrade: DERP`` (:mod:`coderstack.derp.upgrade`); a
   4xx other than 401 means a proxy in the way mangles upgrades: the client switches this
   region to the websocket transport (:mod:`coderstack.derp.wsclient`) for this and later
   attempts and reports the reason (Coder's ``derp_forced_websockets``).
3. DERP login (:mod:`coderstack.derp.session`): ServerKey -> ClientInfo -> ServerInfo.

A ``connector`` replaces steps 1 and 2: ``connector(node, events)`` returns a Deferred firing
with an open :class:`ClientTransport` that reports to ``events`` (the server's own tailnet
reaches its in-process relay this way, through :mod:`coderstack.derp.memory`). The login and
everything after it are the same.

After a connection ends the client dials again with the project's :class:`Backoff` (0.5 s
doubling to 10 s, jitter shortening each delay by up to half), reset by a successful login,
until :meth:`DERPClient.stop`.

The client reports to one :class:`DERPClientHandler`.
"""

from __future__ import annotations

import os
import random
from collections import deque
from collections.abc import Callable, Generator
from typing import Any, Protocol, cast

from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.internet.ssl import CertificateOptions, optionsForClientTLS
from twisted.logger import Logger
from twisted.python.failure import Failure

from coderstack.backoff import Backoff
from coderstack.derp.ipliteral import is_ip
from coderstack.derp.session import ClientSession
from coderstack.derp.transport import ClientTransport, DERPClientError, LinkEvents, UpgradeRefused
from coderstack.derp.upgrade import upgrade_factory
from coderstack.derp.wsclient import websocket_factory
from coderstack.derpmap import DERPNode, DERPRegion
from coderstack.twistedtypes import DelayedCall, cancel
from coderstack.wire import derp as w

_log = Logger()

WRITE_QUEUE_DEPTH = 32
READ_TIMEOUT = 120.0  # two missed server keepalives
PING_TIMEOUT = 5.0
CONNECT_TIMEOUT = 10.0


Connector = Callable[[DERPNode, LinkEvents], "defer.Deferred[ClientTransport]"]


class DERPClientHandler(Protocol):
    """Events from a :class:`DERPClient`.

    Any object with these methods will do; subclass this to inherit do-nothing versions of the
    events you do not need.
    """

    def packet_received(self, src: bytes, data: bytes) -> None:
        """A packet from node key ``src``."""
        return None

    def peer_gone(self, key: bytes, reason: int) -> None:
        """``key`` left the relay (reason 0) or was never here (1, for disco sent to it)."""
        return None

    def peer_present(self, key: bytes, ip: str, port: int, flags: int) -> None:
        """Mesh watchers only."""
        return None

    def connected(self, server_key: bytes, node: DERPNode, websocket: bool) -> None:
        """Logged in to ``node``."""
        return None

    def disconnected(self, reason: str) -> None:
        """The connection ended; the client reconnects unless stopped."""
        return None

    def health(self, problem: str) -> None:
        """The server reports a problem ("" clears it)."""
        return None

    def restarting(self, reconnect_in: float, try_for: float) -> None:
        """The server is restarting: try again after ``reconnect_in`` s for ``try_for`` s."""
        return None

    def forced_websocket(self, region_id: int, reason: str) -> None:
        """This region now uses websockets (report it as Coder's derp_forced_websockets)."""
        return None

    def writable(self, ok: bool) -> None:
        """The connection's write buffer filled (False) or drained (True)."""
        return None


class _Link:
    """One connection of a :class:`DERPClient`, from its attempt on: it hears the transport
    (LinkEvents) and the session (SessionHandler), and the client ignores it once it is not
    the current connection."""

    def __init__(self, client: DERPClient, node: DERPNode) -> None:
        self.client = client
        self.node = node
        self.transport: ClientTransport | None = None  # set when the attempt succeeds
        self.session = ClientSession(client.private_key, self, client.mesh_key)
        self.read_timer: DelayedCall | None = None

    # LinkEvents
    def bytes_received(self, data: bytes) -> None:
        self.client._data(self, data)

    def connection_lost(self, reason: str) -> None:
        self.client._lost(self, reason)

    def writable_changed(self, ok: bool) -> None:
        self.client._set_writable(self, ok)

    # SessionHandler: only while this is the current connection (it is fed from _data).
    def write(self, data: bytes) -> None:
        if self.transport is not None:
            self.transport.send(data)

    def logged_in(self) -> None:
        self.client._logged_in(self)

    def server_info(self, info: w.ServerInfo) -> None:
        self.client._ready(self)

    def packet_received(self, src: bytes, data: bytes) -> None:
        self.client.handler.packet_received(src, data)

    def peer_gone(self, key: bytes, reason: int) -> None:
        self.client.handler.peer_gone(key, reason)

    def peer_present(self, key: bytes, ip: str, port: int, flags: int) -> None:
        self.client.handler.peer_present(key, ip, port, flags)

    def pong(self, data: bytes) -> None:
        self.client._pong(data)

    def health(self, problem: str) -> None:
        self.client.handler.health(problem)

    def restarting(self, reconnect_in: float, try_for: float) -> None:
        self.client._restarting(reconnect_in)
        self.client.handler.restarting(reconnect_in, try_for)

    def disconnect(self) -> None:
        if self.transport is not None:
            self.transport.disconnect()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class DERPClient:
    """Keeps one logged-in DERP connection to a region.

    ``tls_options(hostname)`` returns the client TLS connection creator for a node (default:
    the system trust store with hostname verification). ``trust_root`` (a
    ``twisted.internet.ssl.Certificate`` or any ``IOpenSSLTrustRoot``) is the short way to trust
    a test CA. A node's ``CertName`` replaces HostName as the name verified;
    ``InsecureForTests`` turns verification off.
    """

    def __init__(
        self,
        reactor: Any,
        region: DERPRegion,
        private_key: bytes,
        handler: DERPClientHandler,
        *,
        token: str = "",
        force_websockets: bool = False,
        tls_options: Callable[[str], Any] | None = None,
        trust_root: Any = None,
        mesh_key: str = "",
        extra_headers: dict[bytes, bytes] | None = None,
        rng: random.Random | None = None,
        min_backoff: float = 0.5,
        max_backoff: float = 10.0,
        connector: Connector | None = None,
    ) -> None:
        if not region.derp_nodes:
            raise ValueError(f"DERP region {region.region_id} has no relay nodes")
        self.reactor = reactor  # time, TCP and name resolution for the endpoints
        self.region = region
        self.private_key = private_key
        self.public_key = w.public_key(private_key)
        self.handler = handler
        self.token = token
        self.use_websocket = force_websockets
        self.websocket_reason = "forced by configuration" if force_websockets else ""
        if tls_options is None and trust_root is not None:
            def tls_options(hostname: str) -> Any:
                return optionsForClientTLS(hostname, trustRoot=trust_root)
        self.tls_options = tls_options
        self.mesh_key = mesh_key
        self.connector = connector
        self.extra_headers = dict(extra_headers or {})
        self.rng = rng or random.Random()
        self.backoff = Backoff(first=min_backoff, cap=max_backoff, jitter=0.5, rng=self.rng.random)
        self._running = False
        self._connecting = False
        self._link: _Link | None = None
        self._node: DERPNode | None = None
        self._writable = True
        self._queue: deque[bytes] = deque()
        self._preferred = False
        self._retry: DelayedCall | None = None
        self._pings: dict[bytes, tuple[float, defer.Deferred[float], DelayedCall]] = {}
        self._stop_waiters: list[defer.Deferred[None]] = []
        self._attempt: defer.Deferred[_Link] | None = None
        self._redial = False
        self.reconnects = 0
        self._restart_hint: float | None = None
        self.last_error = ""
        self.dropped = 0
        self.connects = 0

    # --- public API ----------------------------------------------------------------------------

    def start(self) -> None:
        if not self._running:
            self._running = True
            self._dial()

    def stop(self) -> defer.Deferred[None]:
        """Stop reconnecting and close; the result fires once the connection is gone."""
        self._running = False
        cancel(self._retry)
        self._retry = None
        d: defer.Deferred[None] = defer.Deferred()
        self._stop_waiters.append(d)
        if self._link is not None:
            self._link.disconnect()
        if self._attempt is not None and not self._attempt.called:
            self._attempt.cancel()  # rather than wait out the connect timeout
        self._check_stopped()
        return d

    def reconnect(self, why: str = "network changed") -> None:
        """Drop the connection (or the attempt under way) without a goodbye and dial again
        now, backoff reset: after a network change the old one may be bound to an address
        that is gone, and would hang until the read timeout noticed."""
        if not self._running:
            return
        self.reconnects += 1
        self.backoff.reset()
        self._restart_hint = None
        cancel(self._retry)
        self._retry = None
        link = self._link
        if link is not None:
            self._lost(link, why)  # detach first: its connection_lost is then ignored
            cancel(self._retry)
            self._retry = None
            link.abort()
        elif self._attempt is not None and not self._attempt.called:
            self._redial = True
            self._attempt.cancel()  # _dial sees the cancellation and dials again at once
            return
        self._dial()

    def local_address(self) -> str | None:
        """The local IP of the current connection (None while not connected)."""
        link = self._link
        if link is None or link.transport is None:
            return None
        return link.transport.local_host()

    def _check_stopped(self) -> None:
        if self._running or self._connecting or self._link is not None:
            return
        waiters, self._stop_waiters = self._stop_waiters, []
        for d in waiters:
            d.callback(None)

    @property
    def connected(self) -> bool:
        return self._link is not None and self._link.session.server_info is not None

    @property
    def server_key(self) -> bytes | None:
        return self._link.session.server_key if self._link is not None else None

    @property
    def node(self) -> DERPNode | None:
        return self._node

    @property
    def writable(self) -> bool:
        return self._link is not None and self._writable

    def _logged_in_link(self) -> _Link | None:
        link = self._link
        return link if link is not None and link.session.logged_in else None

    def send(self, dst: bytes, packet: bytes) -> bool:
        """Send ``packet`` to node key ``dst``. False if it was dropped (queue full, too big)."""
        if len(dst) != w.KEY_LEN or len(packet) > w.MAX_PACKET_SIZE:
            self.dropped += 1
            return False
        frame = w.encode_send_packet(dst, packet)
        link = self._logged_in_link()
        if link is not None and self._writable and not self._queue:
            link.write(frame)
            return True
        ok = True
        if len(self._queue) >= WRITE_QUEUE_DEPTH:
            self._queue.popleft()
            self.dropped += 1
            ok = False
        self._queue.append(frame)
        return ok

    def note_preferred(self, preferred: bool) -> None:
        """Tell the server whether it is our home relay (sent again after each reconnect)."""
        self._preferred = preferred
        link = self._logged_in_link()
        if link is not None:
            link.write(w.encode(w.NotePreferred(preferred)))

    def watch_conns(self) -> None:
        """Mesh only: ask for PeerPresent/PeerGone of every client on the server."""
        link = self._logged_in_link()
        if link is not None:
            link.write(w.encode(w.WatchConns()))

    def forward_packet(self, src: bytes, dst: bytes, packet: bytes) -> bool:
        """Mesh only: hand a packet to the server for local delivery."""
        link = self._logged_in_link()
        if link is None:
            return False
        link.write(w.encode(w.ForwardPacket(src, dst, packet)))
        return True

    def ping(self, timeout: float = PING_TIMEOUT) -> defer.Deferred[float]:
        """Round-trip time to the server in seconds (DERP Ping/Pong)."""
        link = self._logged_in_link()
        if link is None:
            return defer.fail(DERPClientError("not connected"))
        data = os.urandom(8)
        d: defer.Deferred[float] = defer.Deferred()

        def expire() -> None:
            entry = self._pings.pop(data, None)
            if entry is not None:
                entry[1].errback(DERPClientError("DERP ping timed out"))

        timer = self.reactor.callLater(timeout, expire)
        self._pings[data] = (self.reactor.seconds(), d, timer)
        link.write(w.encode(w.Ping(data)))
        return d

    # --- dialing -------------------------------------------------------------------------------

    def _headers(self) -> dict[bytes, bytes]:
        h = dict(self.extra_headers)
        if self.token:
            h[b"Coder-Session-Token"] = self.token.encode()
        if self.mesh_key:
            h[b"Derp-Mesh"] = b"1"
        return h

    def _endpoint(self, node: DERPNode) -> Any:
        host = node.host_name
        if node.ipv4 and is_ip(node.ipv4):
            host = node.ipv4
        if node.force_http:
            port = node.derp_port or 80
            return HostnameEndpoint(self.reactor, host.encode("idna") if not is_ip(host) else host, port,
                                    timeout=CONNECT_TIMEOUT)
        port = node.effective_derp_port
        ep = HostnameEndpoint(self.reactor, host if is_ip(host) else host.encode("idna"), port,
                              timeout=CONNECT_TIMEOUT)
        verify_name = node.cert_name or node.host_name
        if node.insecure_for_tests:
            opts: Any = CertificateOptions(verify=False)
        elif self.tls_options is not None:
            opts = self.tls_options(verify_name)
        else:
            opts = optionsForClientTLS(verify_name)
        # HostnameEndpoint implements IStreamClientEndpoint through zope, which mypy cannot see.
        return wrapClientTLS(opts, cast(IStreamClientEndpoint, ep))

    @defer.inlineCallbacks
    def _dial(self) -> Generator[defer.Deferred[Any], Any, None]:
        if self._connecting or self._link is not None or not self._running:
            return
        self._connecting = True
        errors = []
        try:
            for node in self.region.derp_nodes:
                if not self._running:
                    return
                try:
                    self._attempt = self._connect_node(node)
                    link = yield self._attempt
                except defer.CancelledError:
                    if self._redial:
                        break  # reconnect(): start over from the first node
                    errors.append(f"{node.name}: cancelled")
                    continue
                except UpgradeRefused as e:
                    errors.append(f"{node.name}: {e}")
                    if 400 <= e.status < 500 and e.status != 401 and not self.use_websocket:
                        # A proxy that does not pass Upgrade: DERP: websockets from now on.
                        self.use_websocket = True
                        self.websocket_reason = f"DERP upgrade got HTTP {e.status}"
                        self.handler.forced_websocket(self.region.region_id, self.websocket_reason)
                        try:
                            link = yield self._connect_node(node)
                        except Exception as e2:
                            errors.append(f"{node.name} (websocket): {e2}")
                            continue
                    else:
                        continue
                except Exception as e:
                    errors.append(f"{node.name}: {_describe(e)}")
                    continue
                if not self._running:
                    link.disconnect()
                    return
                self._attach(link)
                return
            if self._redial:
                return
            self.last_error = "; ".join(errors)
            _log.info("DERP region {rid}: cannot connect: {err}", rid=self.region.region_id,
                      err=self.last_error)
            self._schedule_retry()
        finally:
            self._attempt = None
            self._connecting = False
            redial, self._redial = self._redial, False
            if redial and self._running:
                self.reactor.callLater(0, self._dial)
            self._check_stopped()

    def _connect_node(self, node: DERPNode) -> defer.Deferred[_Link]:
        link = _Link(self, node)
        if self.connector is not None:
            return self._connect_with(self.connector, node, link)
        pending: dict[str, Any] = {}

        def cancel_attempt(_: Any) -> None:
            if "connecting" in pending:
                pending["connecting"].cancel()
            proto = pending.get("proto")
            if proto is not None and proto.transport is not None:
                proto.transport.abortConnection()

        ready: defer.Deferred[ClientTransport] = defer.Deferred(cancel_attempt)
        factory: Factory
        if self.use_websocket:
            factory = websocket_factory(node, self._headers(), link, self.reactor, ready,
                                        CONNECT_TIMEOUT)
        else:
            factory = upgrade_factory(node, self._upgrade_headers(node), link, ready)
        connecting = self._endpoint(node).connect(factory)
        pending["connecting"] = connecting

        def made(proto: Any) -> None:
            pending["proto"] = proto

        def failed(f: Failure) -> None:
            if not ready.called:
                ready.errback(f)

        connecting.addCallbacks(made, failed)
        # Bound the whole sequence (TCP + TLS + upgrade).
        ready.addTimeout(CONNECT_TIMEOUT, self.reactor)

        def opened(transport: ClientTransport) -> _Link:
            link.transport = transport
            return link

        return ready.addCallback(opened)

    def _connect_with(self, connector: Connector, node: DERPNode, link: _Link) -> defer.Deferred[_Link]:
        ready = connector(node, link)
        ready.addTimeout(CONNECT_TIMEOUT, self.reactor)

        def opened(transport: ClientTransport) -> _Link:
            link.transport = transport
            return link

        return ready.addCallback(opened)

    def _upgrade_headers(self, node: DERPNode) -> dict[bytes, bytes]:
        # Tell a node that is not the region's first which one we would rather have used.
        ideal = self.region.derp_nodes[0]
        headers = {b"Ideal-Node": ideal.name.encode()} if ideal.name != node.name else {}
        headers.update(self._headers())
        return headers

    def _attach(self, link: _Link) -> None:
        self._link = link
        self._node = link.node
        self._writable = True
        link.read_timer = self.reactor.callLater(READ_TIMEOUT, self._read_timeout, link)

    # --- events of the current link ------------------------------------------------------------

    def _data(self, link: _Link, data: bytes) -> None:
        if link is not self._link:
            return
        timer = link.read_timer
        if timer is not None and timer.active():
            timer.reset(READ_TIMEOUT)
        try:
            link.session.data_received(data)
        except w.DERPProtocolError as e:
            self.last_error = f"protocol error: {e}"
            link.disconnect()

    def _logged_in(self, link: _Link) -> None:
        if self._preferred:
            link.write(w.encode(w.NotePreferred(True)))
        self._drain()

    def _ready(self, link: _Link) -> None:
        self.backoff.reset()
        self.connects += 1
        self.handler.connected(link.session.server_key or b"", link.node, self.use_websocket)

    def _restarting(self, reconnect_in: float) -> None:
        # The next dial waits as long as the server asked, then backs off from the start.
        self._restart_hint = reconnect_in
        self.backoff.reset()

    def _read_timeout(self, link: _Link) -> None:
        if link is self._link:
            self.last_error = "no frames from the server for 120 s"
            link.disconnect()

    def _lost(self, link: _Link, reason: str) -> None:
        if link is not self._link:
            return
        self._link = None
        cancel(link.read_timer)
        for _t, d, timer in self._pings.values():
            cancel(timer)
            d.errback(DERPClientError("DERP connection lost"))
        self._pings.clear()
        self.last_error = f"disconnected: {reason}"
        self.handler.disconnected(reason)
        self._schedule_retry()
        self._check_stopped()

    def _schedule_retry(self) -> None:
        if not self._running or (self._retry is not None and self._retry.active()):
            return
        if self._restart_hint is not None:
            delay, self._restart_hint = self._restart_hint, None
        else:
            delay = self.backoff.next_delay()
        self._retry = self.reactor.callLater(delay, self._dial)

    def _set_writable(self, link: _Link, ok: bool) -> None:
        if link is not self._link or ok == self._writable:
            return
        self._writable = ok
        if ok:
            self._drain()
        self.handler.writable(ok)

    def _drain(self) -> None:
        q = self._queue
        while q and self._link is not None and self._writable:
            self._link.write(q.popleft())

    def _pong(self, data: bytes) -> None:
        entry = self._pings.pop(data, None)
        if entry is None:
            return
        sent, d, timer = entry
        cancel(timer)
        d.callback(self.reactor.seconds() - sent)



def _describe(e: BaseException) -> str:
    if isinstance(e, defer.TimeoutError):
        return "timed out"
    return str(e) or type(e).__name__
