"""The tailnet node: keys, overlay address, WireGuard device and magicsock, used alike by the
agent and the CLI.

    conn = Conn(reactor, keys=..., address=...)          # keys default to fresh ones
    conn.start(listen_port=0)                            # the UDP socket
    conn.set_derp_map(derp_map)                          # home DERP, STUN, netcheck
    conn.on_node_change(lambda node: coordinator.update_self(node))
    conn.update_peer(node) / conn.remove_peer(node_key)  # from coordinator peer updates
    conn.on_packet(lambda src_key, ipv6_packet: ...)     # decrypted packets for the netstack
    conn.on_path_mtu(lambda addresses, mtu: ...)         # a peer's usable inner MTU changed
    conn.send_packet(dst_key, ipv6_packet)               # dst_key None: route by destination
    await conn.ping(node_key) -> PingResult (latency seconds; p2p "ip:port" or DERP region)
    conn.status() -> dict (see :meth:`Conn.status`)
    await conn.close()

Cryptokey routing is here: an outgoing packet goes to the peer whose /128 is its destination
(unless a key is given), and an incoming packet is delivered only when its source address is one
of the sending peer's addresses. A Node is not announced until it has a home DERP region (a peer
could not reach it for discovery otherwise).

Path MTU: with ``pmtu`` (default: on unless ``CODERSTACK_PMTUD=0``; see
``coderstack/tailnet/pmtu.py``) magicsock probes each direct path and ``on_path_mtu`` callbacks
hear ``(peer's packed /128s, inner MTU)`` whenever it changes, and 1280 when the peer goes away.
``receive_mtu`` is the largest packet we can take in (what the netstack's MSS announces).
"""

from __future__ import annotations

import hashlib
import ipaddress
import random
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

from coderstack import netinfo
from coderstack.derpmap import DERPMap
from coderstack.keys import NodeKeys
from coderstack.tailnet import pmtu as pmtu_sizes
from coderstack.tailnet.endpoint import Addr, PingResult, format_addr, parse_addr
from coderstack.tailnet.magicsock import MagicSock
from coderstack.tailnet.netcheck.checker import Netchecker
from coderstack.tailnet.netcheck.httpget import TreqHTTP
from coderstack.tailnet.sharedudp import SharedUDP
from coderstack.twistedtypes import DelayedCall
from coderstack.wire.coordination import TAILSCALE_SERVICE_PREFIX, Node
from coderstack.wire.wireguard import (
    Device,
    HandshakeComplete,
    Packet,
    Reply,
    Transmit,
)

_log = Logger()

RESTUN_INTERVAL = 23.0  # Tailscale re-STUNs every 20-26 s while active
# DERP frames carry up to 64 KiB over TCP, which needs no probing: with TCP_NODELAY on the relay's
# connections a relayed tunnel at this MTU moved 3.3-3.6x the bytes of one at 1280 (BENCHMARKS.md).
# CODERSTACK_PMTUD=0 puts relayed paths back at 1280 with the direct ones.
DERP_MTU = pmtu_sizes.MAX_MTU


def home_region(derp_map: DERPMap) -> int:
    """Before netcheck has measured: the embedded relay, else the lowest region with a relay."""
    regions = [r for r in derp_map.regions.values() if r.derp_nodes]
    for r in regions:
        if r.embedded_relay:
            return r.region_id
    return min((r.region_id for r in regions), default=0)


def random_address(rng: random.Random | None = None) -> ipaddress.IPv6Address:
    """A random /128 in Tailscale's service prefix (what Coder's CLI uses)."""
    rng = rng or random.SystemRandom()
    return ipaddress.IPv6Address(TAILSCALE_SERVICE_PREFIX.network_address.packed[:6] + rng.randbytes(10))


class Conn:
    """One tailnet node. ``interface_addresses`` and ``netcheck`` are seams for tests;
    ``derp_client_factory(region, handler)`` makes the DERP clients and ``netcheck_http`` does
    netcheck's GETs (the server's own tailnet reaches its embedded relay in memory with them)."""

    def __init__(
        self,
        reactor: Any,
        *,
        keys: NodeKeys | None = None,
        address: ipaddress.IPv6Address | None = None,
        extra_addresses: tuple[ipaddress.IPv6Address, ...] = (),
        node_id: int | None = None,
        derp_token: str = "",
        block_endpoints: bool = False,
        force_websockets: bool = False,
        trust_root: Any = None,
        netcheck: bool = True,
        interface_addresses: Callable[[], list[Any]] = netinfo.interface_addresses,
        derp_client_factory: Callable[..., Any] | None = None,
        pmtu: bool | None = None,
        derp_mtu: int = DERP_MTU,
        netcheck_http: Any = None,
    ) -> None:
        self.reactor = reactor
        self.keys = keys or NodeKeys.generate()
        self.address = address or random_address()
        self.addresses = (self.address, *extra_addresses)
        self.node_id = node_id if node_id is not None else int.from_bytes(
            hashlib.sha256(self.keys.node_public).digest()[:7], "big")
        self.block_endpoints = block_endpoints
        self.netcheck_enabled = netcheck
        self.interface_addresses = interface_addresses
        self.pmtu = pmtu_sizes.enabled_from_env() if pmtu is None else pmtu
        # WireGuard pads a packet up to a multiple of 16 but never past the device MTU: with
        # probing, that cap is the largest rung (every rung is a multiple of 16).
        self.device = Device(self.keys.node_private, mtu=pmtu_sizes.MAX_MTU if self.pmtu else pmtu_sizes.BASE_MTU)
        self.sock = MagicSock(
            reactor, self.keys.node_private, self.keys.node_public, self.keys.disco_private,
            self.keys.disco_public, self._wireguard_in, local_endpoints=self.local_endpoints,
            derp_token=derp_token, force_websockets=force_websockets, trust_root=trust_root,
            block_endpoints=block_endpoints, derp_client_factory=derp_client_factory,
            pmtu_enabled=self.pmtu, derp_mtu=derp_mtu,
        )
        self.sock.on_change = self._node_changed
        self.sock.on_path_mtu = self._path_mtu_changed
        self.path_mtus: dict[bytes, int] = {}  # node key -> inner MTU, where not 1280
        self._mtu_callbacks: list[Callable[[list[bytes], int], object]] = []
        self.derp_map: DERPMap | None = None
        self.preferred_derp = 0
        self.derp_latency: dict[str, float] = {}
        self.stun_endpoints: list[Addr] = []
        self.peer_addresses: dict[bytes, set[bytes]] = {}  # node key -> packed /128s
        self._routes: dict[bytes, bytes] = {}  # packed address -> node key
        self._node_callbacks: list[Callable[[Node], object]] = []
        self._packet_callbacks: list[Callable[[bytes, bytes], object]] = []
        self._last_node: Node | None = None
        self._timer: DelayedCall | None = None
        self._timer_at = float("inf")
        self._netcheck_call: DelayedCall | None = None
        self.last_report: Any = None  # the newest netcheck Report, for diagnostics
        self._netchecker: Any = None
        self._netcheck_d: defer.Deferred[Any] | None = None
        # netcheck's HTTP(S) GETs (a netcheck ``HTTPGet`` with ``close()``); default: treq
        self._http: Any = netcheck_http
        self._closed = False
        self.last_handshake: dict[bytes, float] = {}
        self.drops: Counter[str] = Counter()
        self._close_hooks: list[Callable[[], Any]] = []
        self._netcheck_again = False
        self.link_monitor: Any = None  # set by coderstack.tailnet.linkmon.monitor_conn

    # -- lifecycle --------------------------------------------------------------------------

    def start(self, listen_port: int = 0, interface: str = "", shared: SharedUDP | None = None) -> None:
        """Listen on our own UDP socket, or join a process's ``shared`` one (a load generator's)."""
        self.sock.listen(listen_port, interface, shared)

    def add_close_hook(self, hook: Callable[[], Any]) -> None:
        """``hook()`` (may return an awaitable) runs first in :meth:`close`."""
        self._close_hooks.append(hook)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for hook in self._close_hooks:
            result = hook()
            if hasattr(result, "__await__"):
                await result
        for call in (self._timer, self._netcheck_call):
            if call is not None and call.active():
                call.cancel()
        if self._netcheck_d is not None and not self._netcheck_d.called:
            self._netcheck_d.cancel()
        await self.sock.close()
        if self._http is not None:
            await self._http.close()

    # -- our node ---------------------------------------------------------------------------

    def local_endpoints(self) -> list[Addr]:
        """Our direct UDP candidates: STUN-mapped first, then interface addresses (IPv4)."""
        if self.block_endpoints or self.sock.port is None:
            return []
        port = self.sock.local_port
        out: list[Addr] = list(self.stun_endpoints)
        for ip in self.interface_addresses():
            if ipaddress.ip_address(ip).version == 4:
                addr = (str(ip), port)
                if addr not in out:
                    out.append(addr)
        return out

    def node(self) -> Node | None:
        """Our current Node, or None while we have no home DERP region."""
        if not self.preferred_derp:
            return None
        prefixes = tuple(ipaddress.IPv6Network((a, 128)) for a in self.addresses)
        return Node(
            id=self.node_id,
            as_of=datetime.fromtimestamp(self.reactor.seconds(), UTC),
            key=self.keys.node_public,
            disco=self.keys.disco_public,
            preferred_derp=self.preferred_derp,
            derp_latency=dict(self.derp_latency),
            derp_forced_websockets=dict(self.sock.forced_websockets),
            addresses=prefixes,
            allowed_ips=prefixes,
            endpoints=tuple(format_addr(a) for a in self.local_endpoints()),
        )

    def on_node_change(self, callback: Callable[[Node], object]) -> None:
        """Call ``callback(node)`` now (if we have a node) and whenever it changes."""
        self._node_callbacks.append(callback)
        node = self.node()
        if node is not None:
            callback(node)

    def _node_changed(self) -> None:
        node = self.node()
        if node is None:
            return
        last = self._last_node
        if last is not None and _same(last, node):
            return
        self._last_node = node
        for cb in list(self._node_callbacks):
            cb(node)

    def set_derp_map(self, derp_map: DERPMap) -> None:
        self.derp_map = derp_map
        self.sock.set_derp_map(derp_map)
        if self.preferred_derp not in derp_map.regions or not derp_map.regions[self.preferred_derp].derp_nodes:
            self._set_home(home_region(derp_map))
        self._node_changed()
        if self.netcheck_enabled:
            self._schedule_netcheck(0.0)

    def network_changed(self, derp_stale: Callable[[str | None], bool] | None = None) -> None:
        """Call on a link change or wake-up: re-STUN now and re-probe every peer's candidates.
        ``derp_stale(local_ip)`` picks the DERP connections to make again (see
        ``coderstack/tailnet/linkmon.py``, which calls this)."""
        if derp_stale is not None:
            self.sock.reconnect_derp(derp_stale)
        self.sock.network_changed()
        self._node_changed()
        if self.netcheck_enabled and self.derp_map is not None:
            self._schedule_netcheck(0.0)

    def _set_home(self, region: int) -> None:
        self.preferred_derp = region
        if region:
            self.sock.set_home(region)

    def _schedule_netcheck(self, delay: float) -> None:
        if self._closed:
            return
        if self._netcheck_call is not None and self._netcheck_call.active():
            self._netcheck_call.cancel()
        self._netcheck_call = self.reactor.callLater(delay, self._run_netcheck)

    def _run_netcheck(self) -> None:
        if self.derp_map is None or self._closed:
            return
        if self._netcheck_d is not None and not self._netcheck_d.called:
            # One report at a time; the running one schedules the next, at once if it may
            # have measured the network as it was before a change.
            self._netcheck_again = True
            return
        self._netcheck_again = False
        if self._netchecker is None:
            if self._http is None:
                self._http = TreqHTTP(self.reactor)
            self._netchecker = Netchecker(self.reactor, self.sock.stun, self._http)
        d = self._netcheck_d = self._netchecker.get_report(self.derp_map)
        d.addCallbacks(self._netcheck_done, self._netcheck_failed)
        d.addBoth(lambda _: self._schedule_netcheck(0.0 if self._netcheck_again else RESTUN_INTERVAL))

    def _netcheck_done(self, report: Any) -> None:
        if self._closed:
            return
        self.last_report = report
        self.derp_latency = {f"{rid}-v4": lat for rid, lat in report.region_v4_latency.items()}
        self.derp_latency.update({f"{rid}-v6": lat for rid, lat in report.region_v6_latency.items()})
        for rid, lat in report.region_latency.items():  # measured over HTTP(S): no family
            if f"{rid}-v4" not in self.derp_latency and f"{rid}-v6" not in self.derp_latency:
                self.derp_latency[f"{rid}-v4"] = lat
        stun_eps = []
        for text in (report.global_v4,):
            if text:
                try:
                    stun_eps.append(parse_addr(text))
                except ValueError:
                    pass
        new_endpoints = set(stun_eps) - set(self.stun_endpoints)
        self.stun_endpoints = stun_eps
        if new_endpoints:
            self.sock.own_endpoints_changed()
        if report.preferred_derp and self.derp_map is not None:
            region = self.derp_map.region(report.preferred_derp)
            if region is not None and region.derp_nodes:
                self._set_home(report.preferred_derp)
        self._node_changed()

    def _netcheck_failed(self, failure: Any) -> None:
        if self._closed:
            return
        _log.info("netcheck failed: {why}", why=failure.getErrorMessage())

    # -- peers ------------------------------------------------------------------------------

    def update_peer(self, node: Node) -> None:
        """Add or update a peer from its coordinated Node."""
        key = node.key
        self.device.add_peer(key)
        endpoints = []
        for text in node.endpoints:
            try:
                endpoints.append(parse_addr(text))
            except ValueError:
                continue
        name = str(node.addresses[0].network_address) if node.addresses else ""
        self.sock.set_peer(key, node.disco, endpoints, node.preferred_derp, name=name)
        old = self.peer_addresses.get(key, set())
        new = {a.network_address.packed for a in (*node.addresses, *node.allowed_ips)}
        for packed in old - new:
            self._routes.pop(packed, None)
        for packed in new:
            self._routes[packed] = key
        self.peer_addresses[key] = new
        mtu = self.path_mtus.get(key)
        if mtu is not None and new - old:
            self._tell_mtu(sorted(new - old), mtu)

    def remove_peer(self, node_key: bytes) -> None:
        addresses = self.peer_addresses.pop(node_key, set())
        for packed in addresses:
            if self._routes.get(packed) == node_key:
                del self._routes[packed]
        if self.path_mtus.pop(node_key, None) is not None:
            self._tell_mtu(sorted(addresses), pmtu_sizes.BASE_MTU)
        self.sock.remove_peer(node_key)
        self.device.remove_peer(node_key)
        self.last_handshake.pop(node_key, None)

    # -- path MTU ---------------------------------------------------------------------------

    @property
    def receive_mtu(self) -> int:
        """The largest inner packet peers may send us (the MSS to announce comes from it)."""
        return pmtu_sizes.RECEIVE_MTU if self.pmtu else pmtu_sizes.BASE_MTU

    def on_path_mtu(self, callback: Callable[[list[bytes], int], object]) -> None:
        """``callback(peer_addresses_packed, mtu)`` whenever a peer's path MTU changes."""
        self._mtu_callbacks.append(callback)
        for key, mtu in self.path_mtus.items():
            callback(sorted(self.peer_addresses.get(key, ())), mtu)

    def path_mtu(self, node_key: bytes) -> int:
        return self.path_mtus.get(node_key, pmtu_sizes.BASE_MTU)

    def _path_mtu_changed(self, node_key: bytes, mtu: int) -> None:
        if mtu == pmtu_sizes.BASE_MTU:
            if self.path_mtus.pop(node_key, None) is None:
                return
        else:
            self.path_mtus[node_key] = mtu
        self._tell_mtu(sorted(self.peer_addresses.get(node_key, ())), mtu)

    def _tell_mtu(self, addresses: list[bytes], mtu: int) -> None:
        if addresses:
            for cb in list(self._mtu_callbacks):
                cb(addresses, mtu)

    # -- packets ----------------------------------------------------------------------------

    def on_packet(self, callback: Callable[[bytes, bytes], object]) -> None:
        """``callback(src_node_key, ipv6_packet)`` for every packet a peer sends us."""
        self._packet_callbacks.append(callback)

    def send_packet(self, dst_key: bytes | None, packet: bytes) -> None:
        """Encrypt and send one IPv6 packet (``dst_key`` None: by its destination address)."""
        if dst_key is None:
            dst_key = self._routes.get(bytes(packet[24:40]))
            if dst_key is None:
                self.drops["no-route"] += 1
                return
        if dst_key not in self.device.peers:
            self.drops["unknown-peer"] += 1
            return
        self._events(self.device.send(dst_key, packet, self.reactor.seconds()))

    def send_packets(self, packets: list[bytes]) -> None:
        """Encrypt and send IPv6 packets routed by destination, one ``send_many`` per peer."""
        routes, peers = self._routes, self.device.peers
        by_key: dict[bytes, list[bytes]] = {}
        for packet in packets:
            key = routes.get(bytes(packet[24:40]))
            if key is None:
                self.drops["no-route"] += 1
            elif key not in peers:
                self.drops["unknown-peer"] += 1
            else:
                by_key.setdefault(key, []).append(packet)
        now = self.reactor.seconds()
        for key, batch in by_key.items():
            self._events(self.device.send_many(key, batch, now))

    def _wireguard_in(self, datagram: bytes, source: object) -> None:
        events = self.device.receive(datagram, self.reactor.seconds(), source)
        if type(source) is tuple:
            # An authenticated packet over UDP shows the direct path works (magicsock's failover).
            for event in events:
                if type(event) is Packet:
                    self.sock.udp_authenticated(event.peer_key, source)
                    break
        self._events(events)

    def _events(self, events: list) -> None:
        sock = self.sock
        # Datagrams go out together at the end (one write per run on a batched socket), still
        # in the order WireGuard made them.
        transmits: list[tuple[bytes, bytes]] = []
        for event in events:
            kind = type(event)
            if kind is Transmit:
                transmits.append((event.peer_key, event.datagram))
            elif kind is Packet:
                data = event.data
                if bytes(data[8:24]) not in self.peer_addresses.get(event.peer_key, ()):
                    self.drops["source-not-allowed"] += 1
                    continue
                for cb in self._packet_callbacks:
                    cb(event.peer_key, data)
            elif kind is Reply:
                sock.reply(event.source, event.datagram)
            elif kind is HandshakeComplete:
                self.last_handshake[event.peer_key] = self.reactor.seconds()
        if transmits:
            if len(transmits) == 1:
                sock.send(*transmits[0])
            else:
                sock.send_many(transmits)
        deadline = self.device.next_deadline()
        if deadline is not None and deadline < self._timer_at:
            if self._timer is not None and self._timer.active():
                self._timer.cancel()
            self._timer_at = deadline
            self._timer = self.reactor.callLater(max(0.0, deadline - self.reactor.seconds()), self._tick)

    def _tick(self) -> None:
        self._timer = None
        self._timer_at = float("inf")
        if not self._closed:
            self._events(self.device.tick(self.reactor.seconds()))

    # -- diagnostics ------------------------------------------------------------------------

    def start_handshake(self, node_key: bytes) -> None:
        """Begin the WireGuard handshake now rather than on the first packet (dialing)."""
        if node_key in self.device.peers:
            self._events(self.device.initiate(node_key, self.reactor.seconds()))

    def ping(self, node_key: bytes) -> defer.Deferred[PingResult]:
        """Disco ping over the current path: its latency and the path it took."""
        return self.sock.ping(node_key)

    def path(self, node_key: bytes) -> tuple[str, str]:
        return self.sock.path(node_key)

    def status(self) -> dict[str, Any]:
        """What diagnostics need: home region, our endpoints, per-peer path and reason."""
        now = self.reactor.seconds()
        peers = {}
        for key, ep in self.sock.peers.items():
            path, reason = ep.path(now)
            wg = self.device.peers.get(key)
            peers[key.hex()] = {
                "path": path,
                "reason": reason,
                "best_latency": ep.best.latency if ep.best is not None and ep.best.addr else None,
                "candidates": [format_addr(a) for a in ep.candidates],
                "last_handshake": self.last_handshake.get(key),
                "rx_bytes": wg.rx_bytes if wg else 0,
                "tx_bytes": wg.tx_bytes if wg else 0,
                "path_mtu": self.path_mtu(key),
            }
        return {
            "node_key": self.keys.node_public.hex(),
            "address": str(self.address),
            "home_region": self.preferred_derp,
            "home_region_name": self.sock.region_name(self.preferred_derp) if self.preferred_derp else "",
            "derp_connected": sorted(self.sock.derp_connected),
            "derp_latency": dict(self.derp_latency),
            "derp_forced_websockets": dict(self.sock.forced_websockets),
            "derp_websocket": sorted(r for r, c in self.sock.derp.items() if getattr(c, "use_websocket", False)),
            "endpoints": [format_addr(a) for a in self.local_endpoints()],
            "block_endpoints": self.block_endpoints,
            "pmtu": self.sock.pmtu_enabled,
            "local_port": self.sock.local_port,
            "peers": peers,
            "drops": dict(self.drops + self.sock.drops),
            "disco": dict(self.sock.disco_stats),
        }


def _same(a: Node, b: Node) -> bool:
    fields = ("preferred_derp", "derp_forced_websockets", "addresses", "endpoints")
    if any(getattr(a, f) != getattr(b, f) for f in fields):
        return False
    # Latency jitters constantly; only a change of regions or a 10 ms move is news.
    if set(a.derp_latency) != set(b.derp_latency):
        return False
    return all(abs(a.derp_latency[k] - b.derp_latency[k]) < 0.010 for k in a.derp_latency)
