"""Two tailnet Conns, each with a Netstack, on real UDP sockets with a real DERP relay: the pieces
the path-MTU tests and bench/bench_pmtu.py share."""

from __future__ import annotations

import hashlib
import ipaddress
from typing import Any

from twisted.internet import defer, protocol

from coderstack.tailnet.conn import Conn
from coderstack.tailnet.stack import attach_netstack, client_endpoint, server_endpoint


class Sink(protocol.Protocol):
    """Hashes what arrives; ``done`` fires with (bytes, sha256 hex) at the peer's close."""

    def __init__(self) -> None:
        self.hash = hashlib.sha256()
        self.count = 0
        self.done: defer.Deferred[tuple[int, str]] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.hash.update(data)
        self.count += len(data)

    def connectionLost(self, reason: Any = None) -> None:
        if not self.done.called:
            self.done.callback((self.count, self.hash.hexdigest()))


class Source(protocol.Protocol):
    """Writes ``total`` bytes of a repeating pseudo-random block as a pull producer, then closes."""

    def __init__(self, total: int, block: bytes) -> None:
        self.total = total
        self.block = block
        self.sent = 0
        self.hash = hashlib.sha256()

    def connectionMade(self) -> None:
        self.transport.registerProducer(self, False)

    def resumeProducing(self) -> None:
        if self.sent >= self.total:
            return
        chunk = self.block[: min(len(self.block), self.total - self.sent)]
        self.sent += len(chunk)
        self.hash.update(chunk)
        self.transport.write(chunk)
        if self.sent >= self.total:
            self.transport.unregisterProducer()
            self.transport.loseConnection()
            self.finished()

    def finished(self) -> None:
        """Called once everything is written (a hook for subclasses)."""

    def stopProducing(self) -> None:
        pass


def make_conn(reactor: Any, derp_map: Any, host: str = "127.0.0.1", *, pmtu: bool | None = None,
              block: bool = False, **kw: Any) -> Conn:
    conn = Conn(reactor, derp_token="tok", netcheck=False, block_endpoints=block, pmtu=pmtu,
                interface_addresses=lambda: [ipaddress.ip_address(host)], **kw)
    conn.start(0, host)
    conn.set_derp_map(derp_map)
    conn.netstack = attach_netstack(conn, reactor)  # type: ignore[attr-defined]
    return conn


def introduce(a: Conn, b: Conn) -> None:
    nodes: dict[str, Any] = {}
    a.on_node_change(lambda n: nodes.__setitem__("a", n))
    b.on_node_change(lambda n: nodes.__setitem__("b", n))
    a.update_peer(nodes["b"])
    b.update_peer(nodes["a"])


async def transfer(reactor: Any, a: Conn, b: Conn, total: int, port: int = 5001) -> tuple[int, str, str]:
    """Send ``total`` bytes a -> b over the netstacks: (received, sent sha256, received sha256)."""
    sink = Sink()
    factory = protocol.Factory.forProtocol(lambda: sink)
    listening = await server_endpoint(b.netstack, port).listen(factory)  # type: ignore[attr-defined]
    try:
        block = hashlib.shake_256(b"pmtu").digest(256 << 10)
        source = Source(total, block)
        await client_endpoint(a.netstack, b.address, port).connect(  # type: ignore[attr-defined]
            protocol.Factory.forProtocol(lambda: source))
        count, digest = await sink.done
        return count, source.hash.hexdigest(), digest
    finally:
        await listening.stopListening()
