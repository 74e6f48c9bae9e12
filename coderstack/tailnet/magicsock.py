"""magicsock: one UDP socket and the DERP clients, carrying WireGuard, disco and STUN.

The socket's datagrams are told apart by their first bytes:

    STUN       RFC 8489 header (type 0b00..., magic cookie 0x2112A442 at offset 4)
    disco      "TS💬" and at least 62 bytes (coderstack/wire/disco.py)
    WireGuard  byte 0 in 1..4 and bytes 1..3 zero (coderstack/wire/wireguard.py)
    anything else is counted in ``drops`` and dropped

DERP packets from a peer's node key are either disco (same test) or WireGuard. A DERP source is
written :class:`DERPSource` (region, node key) so a WireGuard ``Reply`` can go back the same way.

Path choice per peer is :class:`coderstack.tailnet.endpoint.Endpoint` (sans-IO); this module
seals/opens disco, writes to the socket or the right DERP client (the peer's home region, dialled
on demand; our home region is kept up), and runs one housekeeping timer (heartbeats, re-probes,
ping timeouts; every 0.1 s instead of 0.5 while a peer's direct path is being checked for
failover). Each change of a peer's path is logged at info: "path to <peer> now DERP(<region>)
(direct <ip:port> stopped answering)" or "path to <peer> now direct via <ip:port>".
``block_endpoints`` disables direct paths: no UDP pings, no CallMeMaybe, all
traffic via DERP.

Path MTU (``pmtu_enabled``; sizes in ``coderstack/tailnet/pmtu.py``): the socket never
fragments (IP_MTU_DISCOVER = IP_PMTUDISC_DO) and takes datagrams up to 64 KiB; the Endpoints
probe direct paths with padded pings, and ``on_path_mtu(node_key, mtu)`` hears whenever a peer's usable inner
MTU changes (a probe proved a larger one; trust lapsed and packets go via DERP; a proven size
stopped working). A send refused with EMSGSIZE is counted (``drops["udp-emsgsize"]``), never
raised, and makes the address prove its MTU again.
"""

from __future__ import annotations

import errno
import os
import socket
import sys
from collections import Counter
from collections.abc import Callable
from typing import Any, NamedTuple, cast

from twisted.internet import defer
from twisted.internet.error import MessageLengthError
from twisted.internet.protocol import DatagramProtocol
from twisted.logger import Logger

from coderstack.derp.client import DERPClient, DERPClientHandler
from coderstack.derpmap import DERPMap
from coderstack.stun.client import STUNClient
from coderstack.tailnet import batchport, pmtu
from coderstack.tailnet.endpoint import (
    Addr,
    DiscoOut,
    Endpoint,
    PingResult,
    PongResult,
    WantCallMeMaybe,
    format_addr,
)
from coderstack.tailnet.sharedudp import SharedUDP
from coderstack.twistedtypes import DatagramTransport, DelayedCall
from coderstack.wire import disco
from coderstack.wire.stun import is_stun
from coderstack.wire.wireguard import is_wireguard

_log = Logger()

HOUSEKEEPING_INTERVAL = 0.5
FAST_HOUSEKEEPING_INTERVAL = 0.1  # while a peer's direct path is being checked for failover
# Socket buffers as wireguard-go asks for (7 MiB). With 64 KiB datagrams the kernel's default
# (~208 KiB) holds three of them, and a TCP burst overflows it: 1 Gbit/s instead of 0.6 through
# two Conns on loopback (bench/bench_pmtu.py); no change at 1280.
SOCKET_BUFFER = 7 << 20
_BASE_WIRE_SIZE = pmtu.wire_size(pmtu.BASE_MTU)  # every path carries datagrams this large
DERP_INACTIVE_CLEANUP = 60.0  # close a non-home DERP connection unused this long


# Linux values (<linux/in.h>, <linux/in6.h>); Python's socket module does not export them.
_IP_MTU_DISCOVER = 10
_IPV6_MTU_DISCOVER = 23
_PMTUDISC_DO = 2


def set_dont_fragment(sock: Any) -> bool:
    """Make ``sock`` refuse to fragment: an oversize send fails with EMSGSIZE (or the datagram
    is lost further along) instead of arriving in pieces, which would make every probe succeed.
    Linux only; returns whether it was set."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        if sock.family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, _IPV6_MTU_DISCOVER, _PMTUDISC_DO)
        else:
            sock.setsockopt(socket.IPPROTO_IP, _IP_MTU_DISCOVER, _PMTUDISC_DO)
    except OSError:
        return False
    return True


def _set_buffers(sock: Any, size: int) -> None:
    """Ask for ``size``-byte socket buffers (beyond the sysctl maximum where we are allowed)."""
    for opt, force in ((socket.SO_RCVBUF, 33), (socket.SO_SNDBUF, 32)):  # SO_*BUFFORCE
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, size)
        except OSError:
            try:
                sock.setsockopt(socket.SOL_SOCKET, opt, size)
            except OSError:
                pass


class DERPSource(NamedTuple):
    region: int
    key: bytes


class PingTimeout(Exception):
    """No pong within the disco ping timeout."""


class _RegionHandler(DERPClientHandler):
    def __init__(self, sock: MagicSock, region: int) -> None:
        self.sock = sock
        self.region = region

    def packet_received(self, src: bytes, data: bytes) -> None:
        self.sock.derp_received(self.region, src, data)

    def forced_websocket(self, region_id: int, reason: str) -> None:
        self.sock.forced_websockets[region_id] = reason
        self.sock._changed()

    def connected(self, server_key: bytes, node: Any, websocket: bool) -> None:
        self.sock.derp_connected.add(self.region)

    def disconnected(self, reason: str) -> None:
        self.sock.derp_connected.discard(self.region)


class MagicSock(DatagramProtocol):
    """``on_wireguard(datagram, source)`` receives every WireGuard datagram (source: UDP address
    or :class:`DERPSource`); ``local_endpoints()`` gives our endpoints for CallMeMaybe."""

    def __init__(
        self,
        reactor: Any,
        node_private: bytes,
        node_public: bytes,
        disco_private: bytes,
        disco_public: bytes,
        on_wireguard: Callable[[bytes, object], None],
        *,
        local_endpoints: Callable[[], list[Addr]] = list,
        derp_token: str = "",
        force_websockets: bool = False,
        trust_root: Any = None,
        block_endpoints: bool = False,
        derp_client_factory: Callable[..., Any] | None = None,
        urandom: Callable[[int], bytes] = os.urandom,
        pmtu_enabled: bool = False,
        derp_mtu: int = pmtu.BASE_MTU,
    ) -> None:
        self.reactor = reactor
        self.node_private = node_private
        self.node_public = node_public
        self.disco_private = disco_private
        self.disco_public = disco_public
        self.on_wireguard = on_wireguard
        self.local_endpoints = local_endpoints
        self.derp_token = derp_token
        self.force_websockets = force_websockets
        self.trust_root = trust_root
        self.block_endpoints = block_endpoints
        self.derp_client_factory = derp_client_factory or self._default_derp_client
        self.urandom = urandom
        self.pmtu_enabled = pmtu_enabled
        self.derp_mtu = derp_mtu if pmtu_enabled else pmtu.BASE_MTU
        self.dont_fragment = False
        self.socket_buffer = SOCKET_BUFFER
        self.on_path_mtu: Callable[[bytes, int], None] = lambda node_key, mtu: None
        self.stun = STUNClient(self._write_stun, reactor)
        self.derp_map: DERPMap | None = None
        self.home_region = 0
        self.derp: dict[int, Any] = {}
        self._derp_used: dict[int, float] = {}
        self.derp_connected: set[int] = set()
        self.forced_websockets: dict[int, str] = {}
        self.peers: dict[bytes, Endpoint] = {}
        self._by_disco: dict[bytes, Endpoint] = {}
        self._shared: dict[bytes, bytes] = {}
        self._user_pings: dict[bytes, tuple[defer.Deferred[PingResult], Endpoint]] = {}
        self._timer: DelayedCall | None = None
        self._closed = False
        self.drops: Counter[str] = Counter()
        self.disco_stats: Counter[str] = Counter()  # "<type> in|out udp|derp"
        self.on_change: Callable[[], None] = lambda: None
        self.port: Any = None
        self._v4_only = True  # the socket is IPv4 (set by listen)

    # -- lifecycle --------------------------------------------------------------------------

    def listen(self, port: int = 0, interface: str = "", shared: SharedUDP | None = None) -> Any:
        """Open our UDP socket, or join a process's ``shared`` one (sharedudp.py)."""
        # Peers with path-MTU probing send us datagrams up to the UDP maximum. On Linux the
        # socket is batched: GSO sends for a burst, GRO reads (batchport.py).
        if shared is not None:
            self.port = shared.join(self)
            self.makeConnection(self.port)
        elif batchport.supported(self.reactor):
            self.port = batchport.listen(self.reactor, port, self, interface=interface, max_packet_size=1 << 16)
        else:
            self.port = self.reactor.listenUDP(port, self, interface=interface, maxPacketSize=1 << 16)
        self._v4_only = ":" not in self.port.getHost().host
        sock = getattr(self.port, "socket", None)
        if sock is not None and self.socket_buffer:
            _set_buffers(sock, self.socket_buffer)
        if self.pmtu_enabled:
            self.dont_fragment = sock is not None and set_dont_fragment(sock)
            if not self.dont_fragment:
                # Without it a probe could arrive fragmented and prove nothing.
                _log.info("path MTU probing off: cannot set don't-fragment on the UDP socket")
                self.pmtu_enabled = False
                self.derp_mtu = pmtu.BASE_MTU
                for ep in self.peers.values():
                    ep.pmtu_enabled = False
                    ep.derp_mtu = pmtu.BASE_MTU
        self._schedule()
        return self.port

    @property
    def local_port(self) -> int:
        return self.port.getHost().port if self.port is not None else 0

    async def close(self) -> None:
        self._closed = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        self.stun.cancel_all()
        for d, _ep in list(self._user_pings.values()):
            if not d.called:
                d.errback(PingTimeout("closed"))
        self._user_pings.clear()
        clients, self.derp = list(self.derp.values()), {}
        for c in clients:
            await c.stop()
        if self.port is not None:
            await defer.maybeDeferred(self.port.stopListening)
            self.port = None

    def _changed(self) -> None:
        self.on_change()

    # -- DERP -------------------------------------------------------------------------------

    def _default_derp_client(self, region: Any, handler: DERPClientHandler) -> DERPClient:
        return DERPClient(self.reactor, region, self.node_private, handler, token=self.derp_token,
                          force_websockets=self.force_websockets, trust_root=self.trust_root)

    def set_derp_map(self, derp_map: DERPMap) -> None:
        self.derp_map = derp_map
        for rid in [r for r in self.derp if derp_map.region(r) is None]:
            self.derp.pop(rid).stop()
            self.derp_connected.discard(rid)
        for ep in self.peers.values():
            ep.derp_region_name = self.region_name(ep.derp_region)

    def set_home(self, region_id: int) -> None:
        if region_id == self.home_region:
            return
        old = self.derp.get(self.home_region)
        if old is not None:
            old.note_preferred(False)
        self.home_region = region_id
        client = self._client(region_id)
        if client is not None:
            client.note_preferred(True)

    def derp_map_regions(self) -> set[int]:
        return set(self.derp_map.regions) if self.derp_map is not None else set()

    def _cleanup_idle_derp(self, now: float) -> None:
        for rid in list(self.derp):
            if rid != self.home_region and now - self._derp_used.get(rid, now) > DERP_INACTIVE_CLEANUP:
                self.derp.pop(rid).stop()
                self.derp_connected.discard(rid)
                self._derp_used.pop(rid, None)

    def network_changed(self) -> None:
        """Forget every best address; the next sends re-probe all candidates."""
        for ep in self.peers.values():
            ep.network_changed()

    def own_endpoints_changed(self) -> None:
        """Our endpoints changed (a new STUN mapping): peers still without a direct path get
        pings and a CallMeMaybe with the new ones at once."""
        now = self.reactor.seconds()
        for ep in list(self.peers.values()):
            actions = ep.own_endpoints_changed(now)
            if actions:
                self._act(ep, actions)

    def reconnect_derp(self, stale: Callable[[str | None], bool]) -> list[int]:
        """Reconnect the DERP clients whose connection's local address ``stale(ip)`` rejects
        (None: not connected now); returns their region IDs. A TCP connection whose source
        address vanished would otherwise hang until the read timeout."""
        regions = []
        for rid, client in list(self.derp.items()):
            local = getattr(client, "local_address", None)
            if local is None or not hasattr(client, "reconnect"):
                continue
            if stale(local()):
                regions.append(rid)
                self.derp_connected.discard(rid)
                client.reconnect()
        return regions

    def region_name(self, region_id: int) -> str:
        region = self.derp_map.region(region_id) if self.derp_map is not None else None
        if region is None:
            return str(region_id)
        return region.region_name or region.region_code or str(region_id)

    def _client(self, region_id: int) -> Any:
        client = self.derp.get(region_id)
        if client is not None or self._closed:
            return client
        region = self.derp_map.region(region_id) if self.derp_map is not None else None
        if region is None or not region.derp_nodes:
            return None
        client = self.derp_client_factory(region, _RegionHandler(self, region_id))
        self.derp[region_id] = client
        self._derp_used.setdefault(region_id, self.reactor.seconds())
        client.start()
        return client

    def _send_derp(self, ep: Endpoint, datagram: bytes) -> None:
        region = ep.derp_region or self.home_region
        if region not in self.derp_map_regions():
            region = self.home_region  # the peer's home is not in our map: try through ours
        self._derp_used[region] = self.reactor.seconds()
        client = self._client(region)
        if client is None:
            self.drops["no-derp"] += 1
            return
        if not client.send(ep.node_key, datagram):
            self.drops["derp-queue"] += 1

    def derp_received(self, region: int, src: bytes, data: bytes) -> None:
        if disco.looks_like_disco(data):
            self._disco_in(data, None, src)
        elif is_wireguard(data):
            self.on_wireguard(data, DERPSource(region, src))
        else:
            self.drops["derp-unknown"] += 1

    # -- UDP --------------------------------------------------------------------------------

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:
        src = (addr[0], addr[1])
        if disco.looks_like_disco(datagram):
            self._disco_in(datagram, src, None)
        elif is_wireguard(datagram):
            self.on_wireguard(datagram, src)
        elif is_stun(datagram):
            if not self.stun.datagram_received(datagram, src):
                self.drops["stun-unmatched"] += 1
        else:
            self.drops["udp-unknown"] += 1

    def _write(self, datagram: bytes, addr: Addr) -> str:
        """Write one datagram: "" if sent, else why not (counted in ``drops``)."""
        if self.transport is None:
            why = "no-socket"
        elif self._v4_only and ":" in addr[0]:
            why = "no-ipv6"
        else:
            try:
                cast(DatagramTransport, self.transport).write(datagram, addr)  # not None: tested above
                return ""
            except MessageLengthError:
                # Larger than the route's MTU with don't-fragment set (Twisted's EMSGSIZE).
                why = "udp-emsgsize"
            except OSError as e:
                # Unreachable networks are normal for some candidates; count, never raise.
                why = "udp-" + (errno.errorcode.get(e.errno or 0, "error").lower())
        self.drops[why] += 1
        return why

    def _write_stun(self, datagram: bytes, addr: Addr) -> None:
        self._write(datagram, addr)

    # -- WireGuard out ----------------------------------------------------------------------

    def send(self, peer_key: bytes, datagram: bytes) -> None:
        """Send one WireGuard datagram to a peer the way its Endpoint decides."""
        ep = self.peers.get(peer_key)
        if ep is None:
            self.drops["unknown-peer"] += 1
            return
        now = self.reactor.seconds()
        udp, via_derp, actions = ep.send_plan(now)
        if udp is not None:
            if len(datagram) <= _BASE_WIRE_SIZE:
                self._write(datagram, udp)
            elif via_derp and len(datagram) > pmtu.wire_size(ep.udp_mtu(udp, now)):
                self.drops["udp-skipped-too-big"] += 1  # not proven there; DERP carries it
            elif self._write(datagram, udp) == "udp-emsgsize":
                ep.udp_too_big(udp, len(datagram), now)
                self._check_mtu(ep, now)
        if via_derp:
            self._send_derp(ep, datagram)
            if ep.reported_mtu != self.derp_mtu:
                self._check_mtu(ep, now)  # trust lapsed: DERP's MTU from this packet on
        if actions:
            self._act(ep, actions)
            self._note_path(ep, now)

    def send_many(self, transmits: list[tuple[bytes, bytes]]) -> None:
        """Send WireGuard datagrams ``(peer key, datagram)`` in order, as :meth:`send` would,
        with the UDP ones written together (one ``sendmsg`` per run of equal-size datagrams to
        one address, where the socket is batched)."""
        port = self.port
        if len(transmits) == 1 or not isinstance(port, batchport.BatchPort) or self.transport is None:
            for peer_key, datagram in transmits:
                self.send(peer_key, datagram)
            return
        now = self.reactor.seconds()
        writes: list[tuple[bytes, Addr]] = []
        sent_by: list[Endpoint] = []
        for peer_key, datagram in transmits:
            ep = self.peers.get(peer_key)
            if ep is None:
                self.drops["unknown-peer"] += 1
                continue
            udp, via_derp, actions = ep.send_plan(now)
            if udp is not None:
                if self._v4_only and ":" in udp[0]:
                    self.drops["no-ipv6"] += 1
                elif (len(datagram) > _BASE_WIRE_SIZE and via_derp
                      and len(datagram) > pmtu.wire_size(ep.udp_mtu(udp, now))):
                    self.drops["udp-skipped-too-big"] += 1  # not proven there; DERP carries it
                else:
                    writes.append((datagram, udp))
                    sent_by.append(ep)
            if via_derp:
                self._send_derp(ep, datagram)
                if ep.reported_mtu != self.derp_mtu:
                    self._check_mtu(ep, now)
            if actions:
                self._act(ep, actions)
                self._note_path(ep, now)
        if not writes:
            return
        for (datagram, udp), ep, why in zip(writes, sent_by, port.write_many(writes), strict=True):
            if not why:
                continue
            self.drops[why] += 1
            if why == "udp-emsgsize" and len(datagram) > _BASE_WIRE_SIZE:
                ep.udp_too_big(udp, len(datagram), now)
                self._check_mtu(ep, now)

    def udp_authenticated(self, peer_key: bytes, addr: Addr) -> None:
        """WireGuard authenticated a packet from ``peer_key`` that came from ``addr`` over UDP."""
        ep = self.peers.get(peer_key)
        if ep is not None:
            ep.note_udp_rx(addr, self.reactor.seconds())

    def _note_path(self, ep: Endpoint, now: float) -> None:
        change = ep.path_change(now)
        if change is None:
            return
        if change.direct is not None:
            _log.info("path to {peer} now direct via {addr}", peer=ep.name, addr=format_addr(change.direct))
        else:
            _log.info("path to {peer} now {derp} ({why})", peer=ep.name, derp=ep.derp_name(), why=change.why)

    def _check_mtu(self, ep: Endpoint, now: float) -> None:
        mtu = ep.path_mtu(now)
        if mtu != ep.reported_mtu:
            ep.reported_mtu = mtu
            _log.debug("peer {key}: path MTU {mtu}", key=ep.node_key.hex()[:8], mtu=mtu)
            self.on_path_mtu(ep.node_key, mtu)

    def reply(self, source: object, datagram: bytes) -> None:
        """Answer a source as-is (WireGuard cookie replies)."""
        if isinstance(source, DERPSource):
            client = self._client(source.region)
            if client is not None:
                client.send(source.key, datagram)
        elif isinstance(source, tuple):
            self._write(datagram, source)

    # -- peers ------------------------------------------------------------------------------

    def set_peer(self, node_key: bytes, disco_key: bytes, endpoints: list[Addr], derp_region: int,
                 name: str = "") -> Endpoint:
        """Add or update a peer; ``name`` (its tunnel address, say) names it in the log."""
        now = self.reactor.seconds()
        ep = self.peers.get(node_key)
        if ep is not None and ep.disco_key != disco_key:
            # A new disco key means the peer restarted: start its path state afresh.
            self.remove_peer(node_key)
            ep = None
        if ep is None:
            ep = Endpoint(node_key, disco_key, direct_disabled=self.block_endpoints, urandom=self.urandom,
                          pmtu_enabled=self.pmtu_enabled, own_node_key=self.node_public,
                          derp_mtu=self.derp_mtu)
            self.peers[node_key] = ep
            self._by_disco[disco_key] = ep
        ep.name = name or ep.name or ep.node_key.hex()[:8]
        ep.derp_region = derp_region
        ep.derp_region_name = self.region_name(derp_region)
        ep.set_node_endpoints([] if self.block_endpoints else endpoints, now)
        return ep

    def remove_peer(self, node_key: bytes) -> None:
        ep = self.peers.pop(node_key, None)
        if ep is not None:
            self._by_disco.pop(ep.disco_key, None)
            self._shared.pop(ep.disco_key, None)
            for tx, (d, owner) in list(self._user_pings.items()):
                if owner is ep:
                    del self._user_pings[tx]
                    d.errback(PingTimeout("peer removed"))

    def path(self, node_key: bytes) -> tuple[str, str]:
        ep = self.peers.get(node_key)
        if ep is None:
            return "none", "unknown peer"
        return ep.path(self.reactor.seconds())

    # -- disco ------------------------------------------------------------------------------

    def knows_disco(self, key: bytes) -> bool:
        """Is ``key`` the disco key of one of our peers (for a shared socket's routing)."""
        return key in self._by_disco

    def opens_disco(self, datagram: bytes) -> bool:
        """Was this disco packet sealed for us (our disco key opens it)?"""
        try:
            sender = disco.sender_key(datagram)
            if sender not in self._by_disco:
                return False
            disco.open_packet(datagram, self._key(sender))
        except disco.DiscoError:
            return False
        return True

    def _key(self, peer_disco: bytes) -> bytes:
        key = self._shared.get(peer_disco)
        if key is None:
            key = self._shared[peer_disco] = disco.shared_key(self.disco_private, peer_disco)
        return key

    def _disco_in(self, datagram: bytes, src: Addr | None, derp_src: bytes | None) -> None:
        try:
            sender = disco.sender_key(datagram)
            ep = self._by_disco.get(sender)
            if ep is None:
                self.drops["disco-unknown-sender"] += 1
                return
            if derp_src is not None and derp_src != ep.node_key:
                self.drops["disco-derp-key-mismatch"] += 1
                return
            msg = disco.open_packet(datagram, self._key(sender))
        except disco.DiscoError:
            self.drops["disco-malformed"] += 1
            return
        now = self.reactor.seconds()
        self.disco_stats[f"{type(msg).__name__.lower()} in {'derp' if src is None else 'udp'}"] += 1
        if isinstance(msg, disco.Ping):
            self._act(ep, ep.handle_ping(msg, src, now))
        elif isinstance(msg, disco.Pong):
            result = ep.handle_pong(msg, src, now)
            if result is None:
                self.drops["disco-pong-unmatched"] += 1
                return
            self._pong(ep, result)
            if result.size or ep.reported_mtu != ep.path_mtu(now):
                self._check_mtu(ep, now)
            self._note_path(ep, now)
        elif isinstance(msg, disco.CallMeMaybe):
            if src is not None:
                self.drops["disco-cmm-over-udp"] += 1  # only accepted via DERP
                return
            self._act(ep, ep.handle_call_me_maybe(msg.endpoints, now))

    def _pong(self, ep: Endpoint, result: PongResult) -> None:
        waiting = self._user_pings.pop(result.tx_id, None)
        if waiting is not None:
            d, _ = waiting
            if result.via is not None:
                d.callback(PingResult.direct(result.latency, format_addr(result.via)))
            else:
                d.callback(PingResult.relayed(result.latency, ep.derp_region, ep.derp_region_name))

    def _act(self, ep: Endpoint, actions: list) -> None:
        for action in actions:
            if isinstance(action, DiscoOut):
                self.disco_stats[f"{type(action.message).__name__.lower()} out "
                                 f"{'derp' if action.dest is None else 'udp'}"] += 1
                packet = disco.seal(action.message, self.disco_public, self._key(ep.disco_key), self.urandom)
                if action.dest is None:
                    self._send_derp(ep, packet)
                else:
                    self._write(packet, action.dest)
            elif isinstance(action, WantCallMeMaybe):
                eps = [] if self.block_endpoints else self.local_endpoints()
                if eps:
                    self.disco_stats["callmemaybe out derp"] += 1
                    cmm = disco.CallMeMaybe(tuple(eps[:64]))
                    self._send_derp(ep, disco.seal(cmm, self.disco_public, self._key(ep.disco_key), self.urandom))

    def ping(self, node_key: bytes) -> defer.Deferred[PingResult]:
        """A disco ping over the current path: fires with its latency and the path it took."""
        ep = self.peers.get(node_key)
        if ep is None:
            return defer.fail(KeyError("unknown peer"))
        tx, actions = ep.user_ping(self.reactor.seconds())
        d: defer.Deferred[PingResult] = defer.Deferred()
        self._user_pings[tx] = (d, ep)
        self._act(ep, actions)
        return d

    # -- housekeeping -----------------------------------------------------------------------

    def _schedule(self) -> None:
        if not self._closed:
            now = self.reactor.seconds()
            fast = any(ep.checking(now) for ep in self.peers.values())
            interval = FAST_HOUSEKEEPING_INTERVAL if fast else HOUSEKEEPING_INTERVAL
            self._timer = self.reactor.callLater(interval, self._housekeeping)

    def _housekeeping(self) -> None:
        now = self.reactor.seconds()
        for ep in list(self.peers.values()):
            for tx in ep.expired_user_pings(now):
                waiting = self._user_pings.pop(tx, None)
                if waiting is not None:
                    waiting[0].errback(PingTimeout("no pong within 5 s"))
            actions = ep.tick(now)
            if actions:
                self._act(ep, actions)
            self._note_path(ep, now)
            if ep.pmtu_enabled:
                self._check_mtu(ep, now)
        self._cleanup_idle_derp(now)
        self._schedule()
