"""The DERP mesh between replicas of one server (``--derp-server-relay-url``).

Each replica dials every other replica's ``/derp`` with the shared mesh key (header
``Derp-Mesh: 1`` instead of a session token; the key itself travels in the boxed ClientInfo),
sends WatchConns, and learns which node keys are connected there from PeerPresent/PeerGone.
Packets its own clients send to such a key go over that connection as ForwardPacket; the
other replica delivers them locally and never forwards them again. Authorization happened on
the replica where the packet entered (both replicas share the coordinator).

PeerPresent comes once per connection of a key but PeerGone only when the key's last
connection leaves, so the watcher keeps a set, not a count.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import urlsplit

from twisted.internet import defer
from twisted.logger import Logger

from coderstack.derp.client import DERPClient, DERPClientHandler
from coderstack.derp.relay import Relay
from coderstack.derpmap import DERPNode, DERPRegion

_log = Logger()


def _region_for_url(url: str) -> DERPRegion:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"DERP relay URL {url!r} must be http:// or https:// with a host")
    http = parts.scheme == "http"
    node = DERPNode(name="mesh", region_id=1, host_name=parts.hostname,
                    derp_port=parts.port or (80 if http else 443), force_http=http, stun_port=-1)
    return DERPRegion(1, "mesh", url, (node,))


class MeshPeer(DERPClientHandler):
    """A watch connection to one other replica."""

    def __init__(self, reactor: Any, relay: Relay, url: str, mesh_key: str,
                 tls_options: Callable[[str], Any] | None = None) -> None:
        self.relay = relay
        self.url = url
        self.keys: set[bytes] = set()
        self.client = DERPClient(reactor, _region_for_url(url), relay.private_key, self,
                                 mesh_key=mesh_key, tls_options=tls_options, max_backoff=5.0)

    def start(self) -> None:
        self.client.start()

    def stop(self) -> defer.Deferred[None]:
        self._forget_all()
        return self.client.stop()

    def _forward(self, src: bytes, dst: bytes, data: bytes) -> None:
        self.client.forward_packet(src, dst, data)

    def connected(self, server_key: bytes, node: DERPNode, websocket: bool) -> None:
        if server_key == self.relay.public_key:
            _log.info("DERP mesh: {url} is this server; not meshing with itself", url=self.url)
            self.client.stop()
            return
        self.client.watch_conns()

    def peer_present(self, key: bytes, ip: str, port: int, flags: int) -> None:
        if key not in self.keys:
            self.keys.add(key)
            self.relay.add_packet_forwarder(key, self._forward)

    def peer_gone(self, key: bytes, reason: int) -> None:
        if key in self.keys:
            self.keys.discard(key)
            self.relay.remove_packet_forwarder(key, self._forward)

    def disconnected(self, reason: str) -> None:
        self._forget_all()  # reconnecting replays PeerPresent for everyone

    def _forget_all(self) -> None:
        for key in list(self.keys):
            self.relay.remove_packet_forwarder(key, self._forward)
        self.keys.clear()


class Mesh:
    """All watch connections of this replica; ``set_addresses`` follows the replica set."""

    def __init__(self, reactor: Any, relay: Relay, mesh_key: str,
                 tls_options: Callable[[str], Any] | None = None) -> None:
        if not mesh_key:
            raise ValueError("a DERP mesh needs a mesh key")
        self.reactor = reactor
        self.relay = relay
        self.mesh_key = mesh_key
        self.tls_options = tls_options
        self.peers: dict[str, MeshPeer] = {}

    def set_addresses(self, urls: Iterable[str]) -> None:
        """The relay URLs of the other replicas in this region (never our own access URL)."""
        wanted = set(urls)
        for url in list(self.peers):
            if url not in wanted:
                self.peers.pop(url).stop()
        for url in wanted - set(self.peers):
            peer = MeshPeer(self.reactor, self.relay, url, self.mesh_key, self.tls_options)
            self.peers[url] = peer
            peer.start()

    def stop(self) -> defer.Deferred[Any]:
        peers, self.peers = list(self.peers.values()), {}
        return defer.gatherResults([p.stop() for p in peers])
