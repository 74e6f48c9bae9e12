"""A DERP client for one region: connect, log in, send, receive, reconnect.

Connection (per attempt, nodes of the region in order, STUN-only nodes skipped):

1. TCP (+ TLS unless the node has ForceHTTP) to HostName (or its IPv4 field) : DERPPort.
2. ``GET /derp`` with ``Upgrade: DERP`` and ``Coder-Session-Token``; expect ``101``. A 4xx other
   than 401 means a proxy in the way mangles upgrades: the client switches this region to the
   websocket transport (``GET /derp`` websocket, subprotocol ``derp``) for this and later attempts
   and reports the reason (Coder's ``derp_forced_websockets``).
3. DERP login: ServerKey -> ClientInfo (boxed to the server key) -> ServerInfo.

After a connection ends the client dials again with exponential backoff (0.5 s doubling to
10 s, with jitter), reset by a successful login, until :meth:`DERPClient.stop`.

The frame handling is :class:`ClientSession` (sans-IO: bytes in, events and bytes out);
``DERPClient`` only moves bytes and runs timers on an injected reactor.
"""

from __future__ import annotations

import ipaddress
import os
import random
from collections import deque
from collections.abc import Callable
from typing import Any

from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol
from twisted.internet import defer
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IDelayedCall, IPushProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.ssl import CertificateOptions, optionsForClientTLS
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from coderstack.derp.tcpopts import no_delay
from coderstack.derpmap import DERPNode, DERPRegion
from coderstack.wire import derp as w

_log = Logger()

WRITE_QUEUE_DEPTH = 32
READ_TIMEOUT = 120.0  # two missed server keepalives
PING_TIMEOUT = 5.0
CONNECT_TIMEOUT = 10.0


class DERPClientError(Exception):
    pass


class UpgradeRefused(DERPClientError):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"DERP upgrade refused: HTTP {status} {reason}")
        self.status = status


class DERPClientHandler:
    """Events from a :class:`DERPClient`. Subclass and override what you need."""

    def packet_received(self, src: bytes, data: bytes) -> None:
        """A packet from node key ``src``."""

    def peer_gone(self, key: bytes, reason: int) -> None:
        """``key`` left the relay (reason 0) or was never here (1, for disco sent to it)."""

    def peer_present(self, key: bytes, ip: str, port: int, flags: int) -> None:
        """Mesh watchers only."""

    def connected(self, server_key: bytes, node: DERPNode, websocket: bool) -> None:
        """Logged in to ``node``."""

    def disconnected(self, reason: str) -> None:
        """The connection ended; the client reconnects unless stopped."""

    def health(self, problem: str) -> None:
        """The server reports a problem ("" clears it)."""

    def restarting(self, reconnect_in: float, try_for: float) -> None:
        """The server is restarting: try again after ``reconnect_in`` s for ``try_for`` s."""

    def forced_websocket(self, region_id: int, reason: str) -> None:
        """This region now uses websockets (report it as Coder's derp_forced_websockets)."""

    def writable(self, ok: bool) -> None:
        """The connection's write buffer filled (False) or drained (True)."""


class ClientSession:
    """DERP client frame logic for one connection, sans-IO."""

    def __init__(self, private_key: bytes, handler: DERPClientHandler, write: Callable[[bytes], None],
                 mesh_key: str = "") -> None:
        self.private_key = private_key
        self.public_key = w.public_key(private_key)
        self.handler = handler
        self.write = write
        self.mesh_key = mesh_key
        self.server_key: bytes | None = None
        self.server_info: w.ServerInfo | None = None
        self.logged_in = False  # ClientInfo sent: packets may flow
        self._reader = w.FrameReader(w.MAX_FRAME_SIZE)
        self.on_login: Callable[[], None] = lambda: None
        self.on_server_info: Callable[[], None] = lambda: None
        self.on_pong: Callable[[bytes], None] = lambda data: None
        self.on_restarting: Callable[[float, float], None] = lambda a, b: None

    def data_received(self, data: bytes) -> None:
        """Raises :class:`w.DERPProtocolError` on a broken stream (the caller disconnects)."""
        handler = self.handler
        for ftype, payload in self._reader.feed(data):
            if ftype == w.RECV_PACKET and self.logged_in:
                if len(payload) < w.KEY_LEN:
                    raise w.DERPProtocolError("RecvPacket too short")
                handler.packet_received(payload[: w.KEY_LEN], payload[w.KEY_LEN :])
                continue
            self._frame(w.decode(ftype, payload))

    def _frame(self, frame: w.Frame) -> None:
        h = self.handler
        match frame:
            case w.ServerKey(key):
                if self.server_key is not None:
                    return  # a late greeting is ignored
                self.server_key = key
                info = w.ClientInfo(mesh_key=self.mesh_key)
                self.write(w.seal_client_info(self.private_key, self.public_key, key, info))
                self.logged_in = True
                self.on_login()
            case _ if self.server_key is None:
                raise w.DERPProtocolError("the server did not start with ServerKey")
            case w.ServerInfoFrame():
                self.server_info = w.open_server_info(frame, self.private_key, self.server_key)
                self.on_server_info()
            case w.RecvPacket(src, data):
                h.packet_received(src, data)
            case w.KeepAlive():
                pass
            case w.PeerGone(key, reason):
                h.peer_gone(key, reason)
            case w.PeerPresent(key, ip, port, flags):
                h.peer_present(key, ip, port, flags)
            case w.Ping(data):
                self.write(w.encode(w.Pong(data)))
            case w.Pong(data):
                self.on_pong(data)
            case w.Health(problem):
                h.health(problem)
            case w.Restarting(a, b):
                self.on_restarting(a / 1000.0, b / 1000.0)
                h.restarting(a / 1000.0, b / 1000.0)
            case _:
                pass  # unknown or server-bound frames are ignored


# --- transports ------------------------------------------------------------------------------


@implementer(IPushProducer)
class _UpgradeProtocol(Protocol):
    """HTTP/1.1 ``Upgrade: DERP`` then raw frames."""

    def __init__(self, client: DERPClient, node: DERPNode, ready: defer.Deferred[Any]) -> None:
        self.client = client
        self.node = node
        self.ready = ready
        self._head = b""
        self._upgraded = False

    def connectionMade(self) -> None:
        headers = [
            b"GET /derp HTTP/1.1",
            b"Host: " + _host_header(self.node).encode(),
            b"Upgrade: DERP",
            b"Connection: Upgrade",
            b"User-Agent: coderstack-derp",
        ]
        ideal = self.client.region.derp_nodes[0]
        if ideal.name != self.node.name:
            headers.append(b"Ideal-Node: " + ideal.name.encode())
        headers += [k + b": " + v for k, v in self.client._headers().items()]
        no_delay(self.transport)
        self.transport.write(b"\r\n".join(headers) + b"\r\n\r\n")
        self.transport.registerProducer(self, True)

    def dataReceived(self, data: bytes) -> None:
        if self._upgraded:
            self.client._data(self, data)
            return
        self._head += data
        end = self._head.find(b"\r\n\r\n")
        if end < 0:
            if len(self._head) > 16384:
                self._fail(DERPClientError("HTTP response head too long"))
            return
        head, rest = self._head[:end], self._head[end + 4 :]
        self._head = b""
        status_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = status_line.split(" ", 2)
        try:
            status = int(parts[1])
        except (IndexError, ValueError):
            self._fail(DERPClientError(f"bad HTTP status line {status_line!r}"))
            return
        if status != 101:
            self._fail(UpgradeRefused(status, parts[2] if len(parts) > 2 else ""))
            return
        self._upgraded = True
        d, self.ready = self.ready, None
        if d is not None:
            d.callback(self)
        if rest:
            self.client._data(self, rest)

    def _fail(self, err: Exception) -> None:
        d, self.ready = self.ready, None
        self.transport.abortConnection()
        if d is not None:
            d.errback(Failure(err))

    def connectionLost(self, reason: Failure = None) -> None:
        d, self.ready = self.ready, None
        if d is not None:
            if not d.called:  # not when cancelled (a timeout or reconnect() aborted us)
                d.errback(reason)
        elif self._upgraded:
            self.client._lost(self, reason.getErrorMessage() if reason else "closed")

    def send(self, data: bytes) -> None:
        self.transport.write(data)

    def disconnect(self) -> None:
        # TLS waits for a registered producer to leave before it shuts down.
        self.transport.unregisterProducer()
        self.transport.loseConnection()

    def abort(self) -> None:
        # No goodbye: over a vanished address it would wait for a flush that never comes.
        self.transport.unregisterProducer()
        self.transport.abortConnection()

    def local_host(self) -> str | None:
        return _local_host(self.transport)

    def pauseProducing(self) -> None:
        self.client._set_writable(self, False)

    def resumeProducing(self) -> None:
        self.client._set_writable(self, True)

    def stopProducing(self) -> None:
        pass


class _WSClientProtocol(WebSocketClientProtocol):
    client: DERPClient
    ready: defer.Deferred[Any] | None

    def onOpen(self) -> None:
        no_delay(self.transport)
        self.transport.registerProducer(_WSClientProducer(self), True)
        d, self.ready = self.ready, None
        if d is not None:
            d.callback(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if isBinary:
            self.client._data(self, payload)

    def onClose(self, wasClean: bool, code: Any, reason: Any) -> None:
        d, self.ready = self.ready, None
        why = str(reason or getattr(self, "wasNotCleanReason", "") or f"closed ({code})")
        if d is not None:
            if not d.called:
                d.errback(Failure(_ws_error(why)))
        else:
            self.client._lost(self, why)

    _pending: list[bytes] | None = None

    def send(self, data: bytes) -> None:
        # Autobahn costs tens of microseconds per message: coalesce the frames written in
        # one reactor turn into one binary message (the stream has no message boundaries).
        if self._pending is None:
            self._pending = [data]
            self.client.reactor.callLater(0, self._flush)
        else:
            self._pending.append(data)

    def _flush(self) -> None:
        pending, self._pending = self._pending, None
        if pending and self.state == self.STATE_OPEN:
            self.sendMessage(b"".join(pending), isBinary=True)

    def disconnect(self) -> None:
        self._flush()
        self.sendClose(1000)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.unregisterProducer()
            self.transport.abortConnection()

    def local_host(self) -> str | None:
        return _local_host(self.transport)

    def _closeConnection(self, abort: bool = False) -> None:
        if self.transport is not None:
            self.transport.unregisterProducer()
        super()._closeConnection(abort)


@implementer(IPushProducer)
class _WSClientProducer:
    def __init__(self, proto: _WSClientProtocol) -> None:
        self.proto = proto

    def pauseProducing(self) -> None:
        self.proto.client._set_writable(self.proto, False)

    def resumeProducing(self) -> None:
        self.proto.client._set_writable(self.proto, True)

    def stopProducing(self) -> None:
        pass


def _local_host(transport: Any) -> str | None:
    try:
        return str(transport.getHost().host)
    except Exception:  # no transport, or one without an IP address
        return None


def _ws_error(why: str) -> Exception:
    # Autobahn reports "WebSocket connection upgrade failed [401]: ..." for a non-101 answer.
    import re

    m = re.search(r"\[(\d{3})\]", why)
    if m:
        return UpgradeRefused(int(m.group(1)), why)
    return DERPClientError(why)


def _host_header(node: DERPNode) -> str:
    host = node.host_name
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    default = 80 if node.force_http else 443
    port = node.effective_derp_port if not node.force_http else (node.derp_port or 80)
    return host if port == default else f"{host}:{port}"


# --- the client --------------------------------------------------------------------------------


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
    ) -> None:
        if not region.derp_nodes:
            raise ValueError(f"DERP region {region.region_id} has no relay nodes")
        self.reactor = reactor
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
        self.extra_headers = dict(extra_headers or {})
        self.rng = rng or random.Random()
        self.min_backoff, self.max_backoff = min_backoff, max_backoff
        self._backoff = min_backoff
        self._running = False
        self._connecting = False
        self._conn: Any = None
        self._session: ClientSession | None = None
        self._node: DERPNode | None = None
        self._writable = True
        self._queue: deque[bytes] = deque()
        self._preferred = False
        self._retry: IDelayedCall | None = None
        self._read_timer: IDelayedCall | None = None
        self._pings: dict[bytes, tuple[float, defer.Deferred[float], IDelayedCall]] = {}
        self._stop_waiters: list[defer.Deferred[None]] = []
        self._attempt: defer.Deferred[Any] | None = None
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
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        d: defer.Deferred[None] = defer.Deferred()
        self._stop_waiters.append(d)
        if self._conn is not None:
            self._conn.disconnect()
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
        self._backoff = self.min_backoff
        self._restart_hint = None
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        conn = self._conn
        if conn is not None:
            self._lost(conn, why)  # detach first: its connectionLost is then ignored
            if self._retry is not None and self._retry.active():
                self._retry.cancel()
            self._retry = None
            conn.abort()
        elif self._attempt is not None and not self._attempt.called:
            self._redial = True
            self._attempt.cancel()  # _dial sees the cancellation and dials again at once
            return
        self._dial()

    def local_address(self) -> str | None:
        """The local IP of the current connection (None while not connected)."""
        return self._conn.local_host() if self._conn is not None else None

    def _check_stopped(self) -> None:
        if self._running or self._connecting or self._conn is not None:
            return
        waiters, self._stop_waiters = self._stop_waiters, []
        for d in waiters:
            d.callback(None)

    @property
    def connected(self) -> bool:
        return self._session is not None and self._session.server_info is not None

    @property
    def server_key(self) -> bytes | None:
        return self._session.server_key if self._session else None

    @property
    def node(self) -> DERPNode | None:
        return self._node

    @property
    def writable(self) -> bool:
        return self._conn is not None and self._writable

    def send(self, dst: bytes, packet: bytes) -> bool:
        """Send ``packet`` to node key ``dst``. False if it was dropped (queue full, too big)."""
        if len(dst) != w.KEY_LEN or len(packet) > w.MAX_PACKET_SIZE:
            self.dropped += 1
            return False
        frame = w.encode_send_packet(dst, packet)
        if self._session is not None and self._session.logged_in and self._writable and not self._queue:
            self._conn.send(frame)
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
        if self._session is not None and self._session.logged_in:
            self._conn.send(w.encode(w.NotePreferred(preferred)))

    def watch_conns(self) -> None:
        """Mesh only: ask for PeerPresent/PeerGone of every client on the server."""
        if self._session is not None and self._session.logged_in:
            self._conn.send(w.encode(w.WatchConns()))

    def forward_packet(self, src: bytes, dst: bytes, packet: bytes) -> bool:
        """Mesh only: hand a packet to the server for local delivery."""
        if self._session is None or not self._session.logged_in:
            return False
        self._conn.send(w.encode(w.ForwardPacket(src, dst, packet)))
        return True

    def ping(self, timeout: float = PING_TIMEOUT) -> defer.Deferred[float]:
        """Round-trip time to the server in seconds (DERP Ping/Pong)."""
        if self._session is None or not self._session.logged_in:
            return defer.fail(DERPClientError("not connected"))
        data = os.urandom(8)
        d: defer.Deferred[float] = defer.Deferred()

        def expire() -> None:
            entry = self._pings.pop(data, None)
            if entry is not None:
                entry[1].errback(DERPClientError("DERP ping timed out"))

        timer = self.reactor.callLater(timeout, expire)
        self._pings[data] = (self.reactor.seconds(), d, timer)
        self._conn.send(w.encode(w.Ping(data)))
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
        if node.ipv4 and _is_ip(node.ipv4):
            host = node.ipv4
        if node.force_http:
            port = node.derp_port or 80
            return HostnameEndpoint(self.reactor, host.encode("idna") if not _is_ip(host) else host, port,
                                    timeout=CONNECT_TIMEOUT)
        port = node.effective_derp_port
        ep = HostnameEndpoint(self.reactor, host if _is_ip(host) else host.encode("idna"), port,
                              timeout=CONNECT_TIMEOUT)
        verify_name = node.cert_name or node.host_name
        if node.insecure_for_tests:
            opts: Any = CertificateOptions(verify=False)
        elif self.tls_options is not None:
            opts = self.tls_options(verify_name)
        else:
            opts = optionsForClientTLS(verify_name)
        return wrapClientTLS(opts, ep)

    @defer.inlineCallbacks
    def _dial(self) -> Any:
        if self._connecting or self._conn is not None or not self._running:
            return
        self._connecting = True
        errors = []
        try:
            for node in self.region.derp_nodes:
                if not self._running:
                    return
                try:
                    self._attempt = self._connect_node(node)
                    conn = yield self._attempt
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
                            conn = yield self._connect_node(node)
                        except Exception as e2:
                            errors.append(f"{node.name} (websocket): {e2}")
                            continue
                    else:
                        continue
                except Exception as e:
                    errors.append(f"{node.name}: {_describe(e)}")
                    continue
                if not self._running:
                    conn.disconnect()
                    return
                self._attach(conn, node)
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

    def _connect_node(self, node: DERPNode) -> defer.Deferred[Any]:
        pending: dict[str, Any] = {}

        def cancel(_: Any) -> None:
            if "connecting" in pending:
                pending["connecting"].cancel()
            proto = pending.get("proto")
            if proto is not None and proto.transport is not None:
                proto.transport.abortConnection()

        ready: defer.Deferred[Any] = defer.Deferred(cancel)
        ep = self._endpoint(node)
        if self.use_websocket:
            scheme = "ws" if node.force_http else "wss"
            factory = WebSocketClientFactory(
                f"{scheme}://{_host_header(node)}/derp", protocols=["derp"], headers={
                    k.decode(): v.decode() for k, v in self._headers().items()
                },
            )
            factory.setProtocolOptions(maxMessagePayloadSize=8 << 20, maxFramePayloadSize=8 << 20,
                                       openHandshakeTimeout=CONNECT_TIMEOUT)
            client = self

            class P(_WSClientProtocol):
                pass

            P.client = client
            P.ready = ready
            factory.protocol = P
        else:
            factory = Factory.forProtocol(lambda: _UpgradeProtocol(self, node, ready))
        connecting = ep.connect(factory)
        pending["connecting"] = connecting

        def made(proto: Any) -> None:
            pending["proto"] = proto

        def failed(f: Failure) -> None:
            if not ready.called:
                ready.errback(f)

        connecting.addCallbacks(made, failed)
        # Bound the whole sequence (TCP + TLS + upgrade).
        ready.addTimeout(CONNECT_TIMEOUT, self.reactor)
        return ready

    def _attach(self, conn: Any, node: DERPNode) -> None:
        self._conn = conn
        self._node = node
        self._writable = True
        session = ClientSession(self.private_key, self.handler, conn.send, self.mesh_key)
        self._session = session

        def login() -> None:
            if self._preferred:
                conn.send(w.encode(w.NotePreferred(True)))
            self._drain()

        def server_info() -> None:
            self._backoff = self.min_backoff
            self.connects += 1
            self.handler.connected(session.server_key or b"", node, self.use_websocket)

        session.on_login = login
        session.on_server_info = server_info
        session.on_pong = self._pong

        def restarting(reconnect_in: float, try_for: float) -> None:
            # The next dial waits as long as the server asked, then backs off from the start.
            self._restart_hint = reconnect_in
            self._backoff = self.min_backoff

        session.on_restarting = restarting
        self._read_timer = self.reactor.callLater(READ_TIMEOUT, self._read_timeout, conn)

    def _data(self, conn: Any, data: bytes) -> None:
        if conn is not self._conn or self._session is None:
            return
        timer = self._read_timer
        if timer is not None and timer.active():
            timer.reset(READ_TIMEOUT)
        try:
            self._session.data_received(data)
        except w.DERPProtocolError as e:
            self.last_error = f"protocol error: {e}"
            conn.disconnect()

    def _read_timeout(self, conn: Any) -> None:
        if conn is self._conn:
            self.last_error = "no frames from the server for 120 s"
            conn.disconnect()

    def _lost(self, conn: Any, reason: str) -> None:
        if conn is not self._conn:
            return
        self._conn = None
        self._session = None
        if self._read_timer is not None and self._read_timer.active():
            self._read_timer.cancel()
        for _t, d, timer in self._pings.values():
            if timer.active():
                timer.cancel()
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
            delay = self._backoff * (0.5 + self.rng.random() / 2)
            self._backoff = min(self._backoff * 2, self.max_backoff)
        self._retry = self.reactor.callLater(delay, self._dial)

    def _set_writable(self, conn: Any, ok: bool) -> None:
        if conn is not self._conn or ok == self._writable:
            return
        self._writable = ok
        if ok:
            self._drain()
        self.handler.writable(ok)

    def _drain(self) -> None:
        q = self._queue
        while q and self._conn is not None and self._writable:
            self._conn.send(q.popleft())

    def _pong(self, data: bytes) -> None:
        entry = self._pings.pop(data, None)
        if entry is None:
            return
        sent, d, timer = entry
        if timer.active():
            timer.cancel()
        d.callback(self.reactor.seconds() - sent)


def _is_ip(s: str) -> bool:
    try:
        ipaddress.ip_address(s)
    except ValueError:
        return False
    return True


def _describe(e: BaseException) -> str:
    if isinstance(e, defer.TimeoutError):
        return "timed out"
    return str(e) or type(e).__name__
