"""The DERP relay on the server's HTTP(S) port: twisted.web resources around :class:`Relay`.

Routes (mounted by the server's Klein app; see :func:`make_derp_resources`)::

    GET /derp  Upgrade: DERP       -> 101 Switching Protocols, Derp-Version: 2,
                                      Derp-Public-Key: <64 hex>; then DERP frames both ways
    GET /derp  Upgrade: websocket  -> websocket, subprotocol "derp", binary messages carry the
                                      same byte stream (message boundaries mean nothing)
    GET /derp  (no upgrade)        -> 426 {"message","detail"}
    upgrade without a valid token  -> 401 {"message","detail"}   (header Coder-Session-Token,
                                      or the coder_session_token cookie)
    upgrade over the principal's connection limit (ConnectionAdmission) -> 429 {"message","detail"}
    GET|HEAD /derp/probe, /derp/latency-check, /latency-check -> empty 200,
                                      Access-Control-Allow-Origin: *
    GET /generate_204              -> 204; X-Tailscale-Challenge: c -> X-Tailscale-Response: response c

An admitted connection's ticket is bound to its protocol: ``revoked(reason)`` (the token was
revoked) closes it at once; ``going_away()`` (shutdown) closes a websocket with 1001 and an
Upgrade: DERP stream after its queued frames (the relay's Restarting frame) are written.

A replica of the same server dialing for the DERP mesh sends ``Derp-Mesh: 1`` instead of a
token; such a connection is closed at login unless its ClientInfo carries the mesh key.

twisted.web has no upgrade API, so the upgrade takes the HTTP channel's transport over
(:func:`coderstack.httptakeover.take_over`) and binds it to a plain Protocol feeding the relay.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, cast

from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from autobahn.websocket.types import ConnectionDeny
from twisted.internet.interfaces import IPushProducer
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from coderstack.derp.policy import (
    TOKEN_HEADER,
    AdmissionTicket,
    AdmittedConnection,
    ConnectionAdmission,
    Refusal,
    RelayPolicy,
)
from coderstack.derp.relay import ConnSink, Relay, ServerConn
from coderstack.derp.tcpopts import no_delay
from coderstack.httptakeover import take_over
from coderstack.twistedtypes import Clock, StreamTransport, stream_transport
from coderstack.wire import derp as w
from coderstack.wsclose import close_going_away

_log = Logger()

MESH_HEADER = b"Derp-Mesh"
_CHALLENGE_RE = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


# --- keys --------------------------------------------------------------------------------------


def load_or_create_private_key(path: str) -> bytes:
    """The server's DERP private key, kept in ``path`` as ``privkey:<64 hex>`` (mode 0600).

    Created on first use. A stable key lets clients keep their connections' identity across
    restarts and lets mesh peers recognise each other.
    """
    try:
        with open(path) as f:
            text = f.read().strip()
    except FileNotFoundError:
        key = w.generate_private_key()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"privkey:{key.hex()}\n")
        return key
    text = text.removeprefix("privkey:")
    try:
        key = bytes.fromhex(text)
    except ValueError:
        raise ValueError(f"{path}: not a DERP private key (expected privkey:<64 hex>)") from None
    if len(key) != w.KEY_LEN:
        raise ValueError(f"{path}: DERP private key must be 32 bytes")
    return key


def make_relay(private_key: bytes, policy: RelayPolicy, reactor: Clock, **kwargs: Any) -> Relay:
    """A :class:`Relay` that asks ``policy.allows`` for every new (source, destination) pair."""
    return Relay(private_key, reactor, policy.allows, **kwargs)


_REASONS = {426: b"Upgrade Required", 429: b"Too Many Requests"}  # twisted.web has no phrase for 426


def _json_error(request: Request, code: int, message: str, detail: str = "") -> bytes:
    request.setResponseCode(code, _REASONS.get(code))
    request.setHeader(b"Content-Type", b"application/json")
    return json.dumps({"message": message, "detail": detail}).encode()


def _token(request: Request) -> str:
    raw = request.getHeader(TOKEN_HEADER) or request.getCookie(b"coder_session_token") or b""
    return raw.decode("latin-1").strip()


# --- what both transports share ------------------------------------------------------------------


@implementer(IPushProducer)
class _Admitted:
    """One admitted connection's place on the relay, the same for both transports: its
    :class:`ServerConn`, its ticket, and the transport's flow control passed on to the relay."""

    def __init__(self, relay: Relay, principal: Any, require_mesh: bool,
                 ticket: AdmissionTicket | None = None) -> None:
        self.relay = relay
        self.principal = principal
        self.require_mesh = require_mesh
        self.ticket = ticket
        self.conn: ServerConn | None = None

    def open(self, sink: ConnSink, transport: StreamTransport) -> ServerConn:
        """Accept the connection on the relay; the transport's pauses reach it from now on."""
        peer = transport.getPeer()
        addr = (getattr(peer, "host", ""), getattr(peer, "port", 0))
        conn = self.conn = self.relay.accept(sink, self.principal, addr, require_mesh=self.require_mesh)
        no_delay(transport)
        transport.registerProducer(self, True)
        return conn

    def bind(self, handler: AdmittedConnection) -> None:
        """Hand the connection to its ticket (which may revoke it at once)."""
        if self.ticket is not None:
            self.ticket.bind(handler)

    def revoked(self, reason: str) -> None:
        if self.conn is not None:
            self.conn.close(reason)

    def lost(self) -> None:
        if self.conn is not None:
            self.conn.connection_lost()
        if self.ticket is not None:
            self.ticket.release()

    # IPushProducer: the transport's write buffer is full / drained.
    def pauseProducing(self) -> None:
        if self.conn is not None:
            self.conn.set_writable(False)

    def resumeProducing(self) -> None:
        if self.conn is not None:
            self.conn.set_writable(True)

    def stopProducing(self) -> None:
        pass


# --- the DERP byte stream over a raw (upgraded) connection ---------------------------------------


class DERPStreamProtocol(Protocol):
    """Moves bytes between an upgraded connection and its :class:`ServerConn`."""

    def __init__(self, admitted: _Admitted) -> None:
        self.admitted = admitted

    def connectionMade(self) -> None:
        self.admitted.open(self, stream_transport(self))
        self.admitted.bind(self)

    # AdmittedConnection: the token was revoked, or the server is shutting down.
    def revoked(self, reason: str) -> None:
        self.admitted.revoked(reason)

    def going_away(self) -> None:
        conn = self.admitted.conn
        if conn is not None:
            conn.flush()
            conn.close("server going away")

    def start(self, buffered: bytes) -> None:
        conn = self.admitted.conn
        assert conn is not None, "start() follows connectionMade"
        conn.start()
        if buffered:
            conn.data_received(buffered)

    def dataReceived(self, data: bytes) -> None:
        if self.admitted.conn is not None:
            self.admitted.conn.data_received(data)

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.admitted.lost()

    # ConnSink
    def write_frames(self, frames: list[bytes]) -> None:
        stream_transport(self).writeSequence(frames)

    def close(self, reason: str) -> None:
        transport = stream_transport(self)
        # TLS waits for a registered producer to leave before it shuts down.
        transport.unregisterProducer()
        if reason == "write timeout":
            transport.abortConnection()  # its buffer will never drain
        else:
            transport.loseConnection()


# --- the same over a websocket -------------------------------------------------------------------


class DERPWebSocketProtocol(WebSocketServerProtocol):
    def __init__(self, admitted: _Admitted) -> None:
        super().__init__()
        self.admitted = admitted

    def onConnect(self, request: Any) -> str:
        if "derp" not in request.protocols:
            raise ConnectionDeny(400, "websocket subprotocol must be derp")
        return "derp"

    def onOpen(self) -> None:
        self.admitted.open(self, stream_transport(self)).start()
        self.admitted.bind(self)

    # AdmittedConnection
    def revoked(self, reason: str) -> None:
        self.admitted.revoked(reason)

    def going_away(self) -> None:
        if self.admitted.conn is not None:
            self.admitted.conn.flush()
        close_going_away(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        conn = self.admitted.conn
        if conn is None:
            return
        if not isBinary:
            conn.close("text message on a DERP websocket")
            return
        conn.data_received(payload)

    def onClose(self, wasClean: bool, code: Any, reason: Any) -> None:
        self.admitted.lost()

    # ConnSink
    def write_frames(self, frames: list[bytes]) -> None:
        self.sendMessage(b"".join(frames), isBinary=True)

    def close(self, reason: str) -> None:
        if reason == "write timeout":
            transport = stream_transport(self)
            transport.unregisterProducer()
            transport.abortConnection()
        else:
            self.sendClose(1000, reason[:100])

    def _closeConnection(self, abort: bool = False) -> None:
        # TLS waits for a registered producer to leave before it shuts down.
        if self.transport is not None:
            stream_transport(self).unregisterProducer()
        super()._closeConnection(abort)


# --- resources -------------------------------------------------------------------------------


class ProbeResource(Resource):
    """``/derp/probe``, ``/derp/latency-check``, ``/latency-check``: an empty 200 for latency."""

    isLeaf = True

    def render(self, request: Request) -> bytes:
        request.setHeader(b"Access-Control-Allow-Origin", b"*")
        request.setHeader(b"Cache-Control", b"no-cache, no-store, must-revalidate")
        return b""


class Generate204Resource(Resource):
    """Captive-portal check: 204, echoing a well-formed ``X-Tailscale-Challenge``."""

    isLeaf = True

    def render(self, request: Request) -> bytes:
        request.setResponseCode(204)
        request.setHeader(
            b"Cache-Control", b"no-cache, no-store, must-revalidate, no-transform, max-age=0"
        )
        challenge = (request.getHeader(b"X-Tailscale-Challenge") or b"").decode("latin-1")
        if challenge and _CHALLENGE_RE.match(challenge):
            request.setHeader(b"X-Tailscale-Response", f"response {challenge}".encode())
        return b""


class DERPResource(Resource):
    """``/derp``: the upgrade endpoint; children ``probe`` and ``latency-check``."""

    def __init__(
        self, relay: Relay, policy: RelayPolicy, *, max_ws_message: int = 8 << 20,
        admission: ConnectionAdmission | None = None,
    ) -> None:
        super().__init__()
        self.relay = relay
        self.policy = policy
        self.admission = admission
        probe = _resource(ProbeResource())
        self.putChild(b"probe", probe)
        self.putChild(b"latency-check", probe)
        self.ws_factory = WebSocketServerFactory()
        self.ws_factory.setProtocolOptions(
            maxMessagePayloadSize=max_ws_message, maxFramePayloadSize=max_ws_message
        )

    def getChild(self, path: bytes, request: Request) -> IResource:
        if path == b"":
            return _resource(self)
        return super().getChild(path, request)

    def render(self, request: Request) -> bytes | int:
        upgrade = (request.getHeader(b"Upgrade") or b"").strip().lower()
        if upgrade not in (b"derp", b"websocket"):
            request.setHeader(b"Upgrade", b"DERP")
            return _json_error(
                request, 426, "DERP requires connection upgrade",
                "Send Upgrade: DERP (or a websocket with subprotocol derp) to use the relay.",
            )
        if request.channel is None or request.channel.transport is None:
            return _json_error(request, 426, "DERP requires HTTP/1.1 connection upgrade")
        if request.getHeader(MESH_HEADER) == b"1" and self.relay.mesh_key:
            self._upgrade(request, upgrade, None, require_mesh=True)
            return NOT_DONE_YET
        token = _token(request)
        if not token:
            return _unauthorized(request)
        finished: list[bool] = []
        request.notifyFinish().addBoth(lambda _: finished.append(True))
        d = self.policy.authenticate(token)

        def authed(principal: Any) -> None:
            if finished:
                return
            if principal is None:
                request.write(_unauthorized(request))
                request.finish()
                return
            ticket: AdmissionTicket | None = None
            if self.admission is not None:
                admitted = self.admission.admit(principal)
                if isinstance(admitted, Refusal):
                    request.write(_json_error(request, admitted.status, admitted.message, admitted.detail))
                    request.finish()
                    return
                if isinstance(admitted, str):
                    request.write(_json_error(request, 429, "Too many DERP connections.", admitted))
                    request.finish()
                    return
                ticket = admitted
            try:
                self._upgrade(request, upgrade, principal, require_mesh=False, ticket=ticket)
            except BaseException:
                if ticket is not None:
                    ticket.release()
                raise

        def failed(f: Failure) -> None:
            _log.failure("DERP token check failed", f)
            if not finished:
                request.write(_json_error(request, 500, "Internal error checking the token"))
                request.finish()

        d.addCallback(authed).addErrback(failed)
        return NOT_DONE_YET

    def _upgrade(
        self, request: Request, upgrade: bytes, principal: Any, require_mesh: bool,
        ticket: AdmissionTicket | None = None,
    ) -> None:
        admitted = _Admitted(self.relay, principal, require_mesh, ticket)
        if upgrade == b"derp":
            proto = DERPStreamProtocol(admitted)
            stream_transport(request.channel).write(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: DERP\r\nConnection: Upgrade\r\n"
                b"Derp-Version: %d\r\nDerp-Public-Key: %s\r\n\r\n"
                % (w.PROTOCOL_VERSION, self.relay.public_key.hex().encode())
            )
            buffered = take_over(request, proto)
            proto.start(buffered)
            return
        ws = DERPWebSocketProtocol(admitted)
        ws.factory = self.ws_factory  # what the factory's buildProtocol would set
        buffered = take_over(request, ws)
        # Replay the handshake request into Autobahn, as its own WebSocketResource does.
        data = request.method + b" " + request.uri + b" HTTP/1.1\r\n"
        for name, values in request.requestHeaders.getAllRawHeaders():
            data += name + b": " + b",".join(values) + b"\r\n"
        body = request.content.read() if request.content is not None else b""
        data += b"\r\n" + body + buffered
        ws.dataReceived(data)


def admit_stream(relay: Relay, principal: Any,
                 admission: ConnectionAdmission | None = None) -> DERPStreamProtocol | Refusal | str:
    """The relay's protocol for a connection that needs no HTTP upgrade (an in-process client
    whose principal is already known; see :mod:`coderstack.derp.memory`), admitted as an
    upgrade would be: a :class:`Refusal` or a limit's ``str`` when it may not connect. Connect
    it to a transport, then call its ``start(b"")``."""
    ticket: AdmissionTicket | None = None
    if admission is not None:
        admitted = admission.admit(principal)
        if isinstance(admitted, Refusal | str):
            return admitted
        ticket = admitted
    return DERPStreamProtocol(_Admitted(relay, principal, False, ticket))


def _unauthorized(request: Request) -> bytes:
    request.setHeader(b"WWW-Authenticate", b'Coder-Session-Token realm="derp"')
    return _json_error(
        request, 401, "Authentication required to use the DERP relay.",
        "Send a valid session or agent token in the Coder-Session-Token header.",
    )


def make_derp_resources(
    relay: Relay, policy: RelayPolicy, admission: ConnectionAdmission | None = None
) -> dict[str, IResource]:
    """The resources to mount, by absolute path.

    ``/derp`` has its own children (``probe``, ``latency-check``); in Klein mount it with
    ``branch=True``.
    """
    return {
        "/derp": _resource(DERPResource(relay, policy, admission=admission)),
        "/latency-check": _resource(ProbeResource()),
        "/generate_204": _resource(Generate204Resource()),
    }


def _resource(resource: Resource) -> IResource:
    # Resource implements IResource through zope.interface, which mypy cannot see.
    return cast(IResource, resource)


# --- metrics -------------------------------------------------------------------------------


#: Why the relay drops a packet (``Relay.drops``; ``write_error`` and ``ping_slot_full`` count
#: other things).
PACKET_DROP_REASONS = ("unknown_dest", "unknown_dest_on_fwd", "unauthorized", "queue_head",
                       "queue_tail", "gone_disconnected")


def metrics_text(relay: Relay, prefix: str = "coderstack_derp_") -> str:
    """Prometheus text exposition of the relay's counters."""
    lines: list[str] = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
        full = prefix + name
        lines.append(f"# HELP {full} {help_}")
        lines.append(f"# TYPE {full} {kind}")
        for labels, value in samples:
            lines.append(f"{full}{labels} {value:g}" if isinstance(value, float) else f"{full}{labels} {value}")

    metric("clients_connected", "gauge", "DERP connections currently logged in.", [("", relay.clients)])
    metric("client_keys", "gauge", "Distinct node keys connected.", [("", relay.unique_keys)])
    metric("duplicate_client_conns", "gauge", "Connections beyond the first for a key.",
           [("", relay.duplicate_conns)])
    metric("home_clients", "gauge", "Clients that say this relay is their home.", [("", relay.home_clients)])
    metric("accepts_total", "counter", "Connections accepted.", [("", relay.accepts)])
    metric("packets_received_total", "counter", "Packets received from clients.", [("", relay.packets_received)])
    metric("bytes_received_total", "counter", "Packet bytes received from clients.", [("", relay.bytes_received)])
    metric("packets_relayed_total", "counter", "Packets written to receivers.", [("", relay.packets_sent)])
    metric("bytes_relayed_total", "counter", "Packet bytes written to receivers.", [("", relay.bytes_sent)])
    metric("packets_forwarded_total", "counter", "Packets forwarded over the mesh.",
           [('{direction="out"}', relay.packets_forwarded_out), ('{direction="in"}', relay.packets_forwarded_in)])
    metric("bytes_forwarded_total", "counter", "Packet bytes forwarded over the mesh.",
           [('{direction="out"}', relay.bytes_forwarded_out), ('{direction="in"}', relay.bytes_forwarded_in)])
    # Every reason from the start, so a rate() over a drop that has not happened yet is 0, not absent.
    reasons = sorted(set(relay.drops) | set(PACKET_DROP_REASONS) | {"write_error"})
    metric("packets_dropped_total", "counter", "Packets dropped, by reason.",
           [(f'{{reason="{r}"}}', relay.drops[r]) for r in reasons])
    reasons = sorted(set(relay.dropped_bytes) | set(PACKET_DROP_REASONS))
    metric("bytes_dropped_total", "counter", "Packet bytes dropped, by reason (a failed write's "
           "are not: they were counted as relayed).",
           [(f'{{reason="{r}"}}', relay.dropped_bytes[r]) for r in reasons])
    metric("peer_gone_sent_total", "counter", "PeerGone frames sent, by reason.",
           [('{reason="disconnected"}', relay.peer_gone_frames["disconnected"]),
            ('{reason="not_here"}', relay.peer_gone_frames["not_here"])])
    metric("bad_frames_total", "counter", "Connections closed for malformed frames.", [("", relay.bad_frames)])
    metric("unknown_frames_total", "counter", "Unknown frame types skipped.", [("", relay.unknown_frames)])
    metric("pings_total", "counter", "Ping frames received.", [("", relay.pings)])
    return "\n".join(lines) + "\n"
