"""Twisted adapters over the sans-IO stack: endpoints, transports and a datagram port.

``Netstack(address, send_packet, reactor)`` owns a ``Stack``.  The tunnel hands it inbound IPv6
packets with ``packet_received(bytes)`` (or ``packets_received(iterable)``), and the stack hands
outbound packets to ``send_packet(bytes)``.  Timers run on the injected ``IReactorTime``.

On top of it:

- ``NetstackServerEndpoint(netstack, port)`` — ``IStreamServerEndpoint``
- ``NetstackClientEndpoint(netstack, host, port)`` — ``IStreamClientEndpoint``
- ``NetstackTransport`` — ``ITCPTransport`` + ``IConsumer`` + ``IPushProducer``: writes pause a
  registered producer above ``send_high_water`` bytes buffered; ``pauseProducing`` stops delivery
  and the receive window closes as the buffer fills, so a slow reader costs at most the receive
  buffer.
- ``Netstack.listen_udp(port, DatagramProtocol)`` — a datagram port (``write(data, (host, port))``).
- ``Netstack.listen_udp_any(handler)`` — datagrams to every port nobody bound, with their
  destination (``handler.datagram_received(data, src, dst)``); replies with ``write(data, src, dst)``.
- ``Netstack.ping(host)`` — ICMPv6 echo, fires with the round-trip time.
"""

from __future__ import annotations

import ipaddress
import itertools
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any, Protocol, cast

from twisted.internet import defer, error
from twisted.internet.address import IPv6Address
from twisted.internet.interfaces import (
    IConsumer,
    IHalfCloseableProtocol,
    IListeningPort,
    IPushProducer,
    IStreamClientEndpoint,
    IStreamServerEndpoint,
    ITCPTransport,
)
from twisted.python import failure, log
from zope.interface import implementer

from .listener import Listener
from .stack import Stack, UDPSocket, to_address
from .tcp import Connection
from .tcpconfig import TCPConfig
from .tcpstate import State

__all__ = [
    "Netstack",
    "NetstackClientEndpoint",
    "NetstackListeningPort",
    "NetstackServerEndpoint",
    "NetstackTransport",
    "NetstackUDPCatchAll",
    "NetstackUDPPort",
]


class DelayedCall(Protocol):
    """What is used here of Twisted's ``IDelayedCall`` (a zope interface, which mypy cannot
    check calls against)."""

    def active(self) -> bool: ...

    def cancel(self) -> None: ...

    def reset(self, seconds: float) -> None: ...


class Clock(Protocol):
    """What is used here of ``IReactorTime``: a reactor, or ``task.Clock`` in tests."""

    def seconds(self) -> float: ...

    def callLater(self, delay: float, f: Callable[..., object], /, *args: Any, **kw: Any) -> DelayedCall: ...


class StreamProtocol(Protocol):
    """What the transport calls on the application's protocol (an ``IProtocol``)."""

    def makeConnection(self, transport: Any) -> None: ...

    def dataReceived(self, data: bytes) -> None: ...

    def connectionLost(self, reason: failure.Failure) -> None: ...


class HalfCloseable(Protocol):
    """A protocol that provides ``IHalfCloseableProtocol``."""

    def readConnectionLost(self) -> None: ...

    def writeConnectionLost(self) -> None: ...


class StreamFactory(Protocol):
    """What is used here of an ``IProtocolFactory`` (``twisted.internet.protocol.Factory``)."""

    def buildProtocol(self, addr: Any) -> StreamProtocol | None: ...

    def doStart(self) -> None: ...

    def doStop(self) -> None: ...


class DatagramHandler(Protocol):
    """What is used here of a ``DatagramProtocol``."""

    def makeConnection(self, transport: Any) -> None: ...

    def datagramReceived(self, datagram: bytes, addr: Any) -> None: ...

    def doStop(self) -> None: ...


class Producer(Protocol):
    """A producer registered with the transport (``IPushProducer``, or ``IPullProducer``,
    which is never paused)."""

    def resumeProducing(self) -> None: ...

    def pauseProducing(self) -> None: ...

    def stopProducing(self) -> None: ...


class CatchAllHandler(Protocol):
    def datagram_received(self, data: bytes, src: tuple[str, int], dst: tuple[str, int]) -> None: ...


def _text(addr: bytes) -> str:
    return ipaddress.IPv6Address(addr).compressed


_REASONS = {
    "connection refused": error.ConnectionRefusedError,
    "connection timed out": error.TCPTimedOutError,
    "keepalive timed out": error.TCPTimedOutError,
    "connection aborted": error.ConnectionAborted,
}


def _failure(reason: str | None) -> failure.Failure:
    if reason is None:
        return failure.Failure(error.ConnectionDone())
    return failure.Failure(_REASONS.get(reason, error.ConnectionLost)(reason))


class Netstack:
    """One node's userspace TCP/IP stack, driven by a reactor's clock."""

    send_high_water = 4 << 20

    def __init__(
        self,
        address: Iterable[str | bytes] | str | bytes,
        send_packet: Callable[[bytes], object],
        reactor: Clock,
        *,
        mtu: int = 1280,
        config: TCPConfig | None = None,
        **stack_kwargs: Any,
    ) -> None:
        if config is None:
            config = TCPConfig(mtu=mtu)
        self.reactor = reactor
        self.send_packet = send_packet
        self.stack = Stack(address, self._emit, config=config, **stack_kwargs)
        self.stack.echo_handler = self._echo_reply
        self.stack.on_error = lambda e: log.err(e, "netstack: packet handling failed")
        self.address = _text(self.stack.address)
        self._timer: DelayedCall | None = None
        self._timer_at = 0.0
        self._stopped = False
        self._in_input = False
        self._dirty: set[Connection] = set()
        self._flush_call: DelayedCall | None = None
        self._pings: dict[tuple[bytes, int, int], tuple[defer.Deferred[float], float, DelayedCall]] = {}
        self._ping_seq = itertools.count(1)

    @property
    def stats(self) -> Counter[str]:
        return self.stack.stats

    def _emit(self, packet: bytes) -> None:
        try:
            self.send_packet(packet)
        except Exception:
            # The tunnel refused the packet (too big, closed, ...): it is lost, as on a real link;
            # TCP recovers.  Raising here would leave the connection's state half-updated.
            self.stack.stats["send_errors"] += 1

    # -------------------------------------------------------------- packets in, timers

    def packet_received(self, packet: bytes) -> None:
        """Feed one inbound IPv6 packet from the tunnel."""
        now = self.reactor.seconds()
        self._in_input = True
        try:
            self.stack.receive(packet, now)
        except Exception:
            self.stack.stats["internal_error"] += 1
            log.err(None, "netstack: packet handling failed")
        finally:
            self._in_input = False
        self._after(now)

    def packets_received(self, packets: Iterable[bytes]) -> None:
        """Feed a batch of inbound packets (one timer/flush pass for the whole batch)."""
        now = self.reactor.seconds()
        self._in_input = True
        try:
            self.stack.receive_batch(packets, now)
        except Exception:
            self.stack.stats["internal_error"] += 1
            log.err(None, "netstack: packet handling failed")
        finally:
            self._in_input = False
        self._after(now)

    def _after(self, now: float) -> None:
        if self._dirty:
            dirty = self._dirty
            self._dirty = set()
            for conn in dirty:
                if conn.state is not State.CLOSED:
                    conn.flush(now)
        deadline = self.stack.next_deadline()
        if deadline is None or self._stopped:
            return
        timer = self._timer
        if timer is None:
            self._timer_at = deadline
            self._timer = self.reactor.callLater(max(0.0, deadline - now), self._on_timer)
        elif deadline < self._timer_at:
            # A new call, not timer.reset(): moving a reactor's DelayedCall sooner searches the
            # reactor's whole timer heap, which a process with a thousand tunnels (the server's
            # tailnet, a load generator) paid on almost every packet; a cancel costs nothing.
            timer.cancel()
            self._timer_at = deadline
            self._timer = self.reactor.callLater(max(0.0, deadline - now), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        now = self.reactor.seconds()
        self._in_input = True
        try:
            self.stack.tick(now)
        except Exception:
            self.stack.stats["internal_error"] += 1
            log.err(None, "netstack: timer handling failed")
        finally:
            self._in_input = False
        self._after(now)

    def _want_flush(self, conn: Connection) -> None:
        self._dirty.add(conn)
        if not self._in_input and self._flush_call is None and not self._stopped:
            self._flush_call = self.reactor.callLater(0, self._flush)

    def _flush(self) -> None:
        self._flush_call = None
        self._after(self.reactor.seconds())

    def stop(self) -> None:
        """Cancel timers (for tests and shutdown); connections are aborted."""
        self._stopped = True
        for conn in list(self.stack.connections.values()):
            conn.abort()
        for call in (self._timer, self._flush_call):
            if call is not None and call.active():
                call.cancel()
        self._timer = self._flush_call = None
        pings, self._pings = self._pings, {}
        for d, _t0, call in pings.values():
            if call.active():
                call.cancel()
            d.errback(error.ConnectionDone("netstack stopped"))

    def set_path_mtu(self, host: str, mtu: int | None) -> None:
        """The tunnel's path to ``host`` changed its MTU (e.g. a direct path probed at 9000, or
        back to 1280 over DERP).  None returns to the default."""
        now = self.reactor.seconds()
        self.stack.set_path_mtu(host, mtu, now)
        self._after(now)

    # -------------------------------------------------------------- TCP

    def connect_tcp(
        self, host: str, port: int, factory: StreamFactory, timeout: float | None = 30
    ) -> defer.Deferred[StreamProtocol]:
        """Connect to ``[host]:port``; fires with the protocol (like ``connectProtocol``)."""
        transport = NetstackTransport(self, None)
        d: defer.Deferred[StreamProtocol] = defer.Deferred(lambda _d: transport._cancel())
        transport._connecting = (d, factory)
        transport.conn = self.stack.connect(host, port, transport, self.reactor.seconds())
        if timeout is not None:
            transport._timeout_call = self.reactor.callLater(timeout, transport._connect_timeout)
        self._after(self.reactor.seconds())
        return d

    def listen_tcp(self, port: int, factory: StreamFactory, backlog: int = 128) -> NetstackListeningPort:
        lp = NetstackListeningPort(self, port, factory, backlog)
        lp.startListening()
        return lp

    # -------------------------------------------------------------- UDP, ICMP

    def listen_udp(self, port: int, protocol: DatagramHandler) -> NetstackUDPPort:
        udp_port = NetstackUDPPort(self, protocol)
        udp_port.sock = self.stack.udp_bind(port, udp_port)
        protocol.makeConnection(udp_port)
        return udp_port

    def listen_udp_any(self, handler: CatchAllHandler) -> NetstackUDPCatchAll:
        """Datagrams to any UDP port without a socket (the agent's forwarder to its host's ports)."""
        catch_all = NetstackUDPCatchAll(self, handler)
        self.stack.udp_catch_all = catch_all
        return catch_all

    def ping(self, host: str, data: bytes = b"", timeout: float = 5.0) -> defer.Deferred[float]:
        """ICMPv6 echo; fires with the round-trip time in seconds or fails with TimeoutError."""
        remote = to_address(host)
        seq = next(self._ping_seq) & 0xFFFF
        key = (remote, 0xC5, seq)
        d: defer.Deferred[float] = defer.Deferred()
        call = self.reactor.callLater(timeout, self._ping_timeout, key)
        self._pings[key] = (d, self.reactor.seconds(), call)
        self.stack.ping(remote, 0xC5, seq, data)
        return d

    def _ping_timeout(self, key: tuple[bytes, int, int]) -> None:
        entry = self._pings.pop(key, None)
        if entry is not None:
            entry[0].errback(error.TimeoutError("no echo reply"))

    def _echo_reply(self, src: bytes, ident: int, seq: int, data: bytes) -> None:
        entry = self._pings.pop((src, ident, seq), None)
        if entry is not None:
            if entry[2].active():
                entry[2].cancel()
            entry[0].callback(self.reactor.seconds() - entry[1])


@implementer(ITCPTransport, IConsumer, IPushProducer)
class NetstackTransport:
    """The ITransport of one netstack TCP connection; also the core's connection handler."""

    def __init__(self, netstack: Netstack, protocol: StreamProtocol | None) -> None:
        """``conn`` is set next: by ``connect_tcp``, or by the listening port that accepted it."""
        self.netstack = netstack
        self.conn: Connection
        self.protocol = protocol
        self.connected = False
        self.disconnecting = False
        self.disconnected = False
        self.producer: Producer | None = None
        self.streaming = False
        self._producer_paused = False
        self._connecting: tuple[defer.Deferred[StreamProtocol], StreamFactory] | None = None
        self._timeout_call: DelayedCall | None = None
        self._half_closeable: HalfCloseable | None = None  # the protocol, if it provides IHalfCloseableProtocol
        self._close_after_producer = False  # a pull producer is registered: close on unregister
        self._close_pending = False         # a push producer is registered: close next turn
        self._close_when_resumed = False    # ... or once the paused push producer is resumed

    # ------------------------------------------------ core handler callbacks

    def connection_made(self, conn: Connection) -> None:
        self.conn = conn
        self.connected = True
        if self._connecting is not None:
            d, factory = self._connecting
            self._connecting = None
            if self._timeout_call is not None and self._timeout_call.active():
                self._timeout_call.cancel()
            protocol = factory.buildProtocol(self.getPeer())
            if protocol is None:
                conn.abort()
                d.errback(error.ConnectError("factory refused the connection"))
                return
            self.protocol = protocol
            self._made(protocol)
            d.callback(protocol)
        else:
            assert self.protocol is not None  # a listening port's transport comes with its protocol
            self._made(self.protocol)

    def _made(self, protocol: StreamProtocol) -> None:
        if IHalfCloseableProtocol.providedBy(protocol):
            # zope's providedBy is no type guard: say what it has checked.
            self._half_closeable = cast(HalfCloseable, protocol)
        protocol.makeConnection(self)

    def data_received(self, data: bytes) -> None:
        protocol = self.protocol
        assert protocol is not None  # made before the first byte arrives
        try:
            protocol.dataReceived(data)
        except Exception:
            # As Twisted's own transports do: a protocol that raises loses its connection.
            log.err(None, "netstack: dataReceived raised; aborting the connection")
            self.abortConnection()

    def eof_received(self) -> None:
        if self._half_closeable is not None:
            self._half_closeable.readConnectionLost()
        else:
            # The peer is done: close our side too once buffered data is out (a registered
            # producer is not waited for; it is stopped when the connection is gone).
            self._close_after_producer = False
            self._close()

    def connection_lost(self, reason: str | None) -> None:
        self.connected = False
        self.disconnected = True
        if self._timeout_call is not None and self._timeout_call.active():
            self._timeout_call.cancel()
        if self._connecting is not None:
            d, _factory = self._connecting
            self._connecting = None
            d.errback(_failure(reason or "connection refused"))
            return
        if self.producer is not None:
            producer, self.producer = self.producer, None
            producer.stopProducing()
        if self.protocol is not None:
            self.protocol.connectionLost(_failure(reason))

    def writable(self) -> None:
        if self._producer_paused and self.producer is not None:
            self._producer_paused = False
            self.producer.resumeProducing()
            if self._close_when_resumed:
                self._close_when_resumed = False
                self._schedule_close()

    def _connect_timeout(self) -> None:
        self._timeout_call = None
        if self._connecting is not None:
            self.conn.abort("connection timed out")
            self.netstack._after(self.netstack.reactor.seconds())

    def _cancel(self) -> None:
        if self._connecting is not None:
            d, _f = self._connecting
            self._connecting = None
            if self._timeout_call is not None and self._timeout_call.active():
                self._timeout_call.cancel()
            self.conn.abort()

    # ------------------------------------------------ ITransport

    def write(self, data: bytes) -> None:
        conn = self.conn
        if not data or self.disconnecting or self.disconnected or conn.write_closed:
            return
        conn.write(data)
        if self.producer is not None and not self._producer_paused:
            if not self.streaming:
                # A pull producer writes once per resumeProducing(): ask for more when the send
                # buffer has drained (now, on the next turn, if it already has).
                self._producer_paused = True
                if conn.send_buffered <= conn.cfg.send_low_water:
                    self.netstack.reactor.callLater(0, self.writable)
                else:
                    conn.want_writable = True
            elif conn.send_buffered > self.netstack.send_high_water:
                self._producer_paused = True
                conn.want_writable = True
                self.producer.pauseProducing()
        self.netstack._want_flush(conn)

    def writeSequence(self, data) -> None:
        self.write(b"".join(data))

    def loseConnection(self) -> None:
        """Close after all written data is sent. As Twisted's transports do: a registered pull
        producer must unregister first; a push producer does not hold the close back (it may
        be a transport that is gone, as in a proxy, and will never unregister) but may still
        write during this reactor turn, and once more if it was paused for a full buffer."""
        if self.disconnecting or self.disconnected:
            return
        if self.producer is not None:
            if not self.streaming:
                self._close_after_producer = True
            else:
                self._schedule_close()
            return
        self._close()

    def _schedule_close(self) -> None:
        if not self._close_pending:
            self._close_pending = True
            self.netstack.reactor.callLater(0, self._close_if_idle)

    def _close_if_idle(self) -> None:
        self._close_pending = False
        if self.disconnecting or self.disconnected:
            return
        if self.producer is not None and self.streaming and self._producer_paused:
            self._close_when_resumed = True  # writable() resumes it, then we close
            return
        self._close()

    def _close(self) -> None:
        if self.disconnecting or self.disconnected:
            return
        self.disconnecting = True
        self.conn.close(self.netstack.reactor.seconds())
        self.netstack._after(self.netstack.reactor.seconds())

    def loseWriteConnection(self) -> None:
        if self.disconnected or self.conn.write_closed:
            return
        self.conn.shutdown_write(self.netstack.reactor.seconds())
        self.netstack._after(self.netstack.reactor.seconds())
        if self._half_closeable is not None and not self.disconnected:
            # Our FIN is queued behind the written data: the write side is done.
            self._half_closeable.writeConnectionLost()

    def abortConnection(self) -> None:
        if self.disconnected:
            return
        self.disconnecting = True
        self.conn.abort()
        self.netstack._after(self.netstack.reactor.seconds())

    def getPeer(self) -> IPv6Address:
        return IPv6Address("TCP", _text(self.conn.remote), self.conn.rport)

    def getHost(self) -> IPv6Address:
        return IPv6Address("TCP", _text(self.conn.local), self.conn.lport)

    def getTcpNoDelay(self) -> bool:
        return True

    def setTcpNoDelay(self, enabled: bool) -> None:
        """Nagle's algorithm is never used; segments go out as soon as the windows allow."""

    def getTcpKeepAlive(self) -> bool:
        return self.conn.cfg.keepalive

    def setTcpKeepAlive(self, enabled: bool) -> None:
        self.conn.set_keepalive(bool(enabled), self.netstack.reactor.seconds())
        self.netstack._after(self.netstack.reactor.seconds())

    # ------------------------------------------------ IConsumer

    def registerProducer(self, producer, streaming: bool) -> None:
        if self.producer is not None:
            raise RuntimeError("a producer is already registered")
        self.producer = producer
        self.streaming = streaming
        if not streaming:
            producer.resumeProducing()

    def unregisterProducer(self) -> None:
        self.producer = None
        self._producer_paused = False
        if self._close_after_producer:
            self._close_after_producer = False
            self._close()

    # ------------------------------------------------ IPushProducer (towards the protocol)

    def pauseProducing(self) -> None:
        self.conn.pause_reading()

    def resumeProducing(self) -> None:
        now = self.netstack.reactor.seconds()
        self.conn.resume_reading(now)
        self.netstack._after(now)

    def stopProducing(self) -> None:
        self.loseConnection()


@implementer(IListeningPort)
class NetstackListeningPort:
    def __init__(self, netstack: Netstack, port: int, factory: StreamFactory, backlog: int) -> None:
        self.netstack = netstack
        self.port = port
        self.factory = factory
        self.backlog = backlog
        self.listener: Listener | None = None

    def startListening(self) -> None:
        self.listener = self.netstack.stack.listen(self.port, self._accept, self.backlog)
        self.factory.doStart()

    def _accept(self, conn: Connection) -> NetstackTransport | None:
        addr = IPv6Address("TCP", _text(conn.remote), conn.rport)
        protocol = self.factory.buildProtocol(addr)
        if protocol is None:
            return None
        transport = NetstackTransport(self.netstack, protocol)
        transport.conn = conn
        return transport

    def stopListening(self) -> defer.Deferred[None]:
        if self.listener is not None:
            self.listener.close()
            self.listener = None
            self.factory.doStop()
        return defer.succeed(None)

    loseConnection = stopListening

    def getHost(self) -> IPv6Address:
        return IPv6Address("TCP", self.netstack.address, self.port)


@implementer(IStreamServerEndpoint)
class NetstackServerEndpoint:
    """Listen for TCP connections on the node's tunnel address."""

    def __init__(self, netstack: Netstack, port: int, backlog: int = 128) -> None:
        self.netstack = netstack
        self.port = port
        self.backlog = backlog

    def listen(self, factory: StreamFactory) -> defer.Deferred[NetstackListeningPort]:
        try:
            return defer.succeed(self.netstack.listen_tcp(self.port, factory, self.backlog))
        except Exception:
            return defer.fail()


@implementer(IStreamClientEndpoint)
class NetstackClientEndpoint:
    """Connect over the tunnel to ``[host]:port``."""

    def __init__(self, netstack: Netstack, host: str, port: int, timeout: float | None = 30) -> None:
        self.netstack = netstack
        self.host = host
        self.port = port
        self.timeout = timeout

    def connect(self, factory: StreamFactory) -> defer.Deferred[StreamProtocol]:
        try:
            return self.netstack.connect_tcp(self.host, self.port, factory, self.timeout)
        except Exception:
            return defer.fail()


class NetstackUDPPort:
    """A bound UDP port for a ``DatagramProtocol``: ``write(data, (host, port))``."""

    def __init__(self, netstack: Netstack, protocol: DatagramHandler) -> None:
        self.netstack = netstack
        self.protocol = protocol
        self.sock: UDPSocket | None = None  # bound by listen_udp; None once stopped

    def _bound(self) -> UDPSocket:
        if self.sock is None:
            raise error.NotListeningError("the UDP port was stopped")
        return self.sock

    def datagram_received(self, data: bytes, addr: tuple[bytes, int]) -> None:
        self.protocol.datagramReceived(data, (_text(addr[0]), addr[1]))

    def write(self, data: bytes, addr: tuple[str, int]) -> None:
        sock = self._bound()
        try:
            sock.sendto(data, to_address(addr[0]), addr[1])
        except ValueError as e:  # larger than the tunnel MTU: as Twisted's UDP ports say it
            raise error.MessageLengthError(str(e)) from None

    def getHost(self) -> IPv6Address:
        return IPv6Address("UDP", self.netstack.address, self._bound().port)

    def stopListening(self) -> defer.Deferred[None]:
        if self.sock is not None:
            self.sock.close()
            self.sock = None
            self.protocol.doStop()
        return defer.succeed(None)

    loseConnection = stopListening


class NetstackUDPCatchAll:
    """Every datagram to a UDP port nobody bound, with both ends: ``handler.datagram_received(data,
    (src_host, src_port), (dst_host, dst_port))``. ``write(data, src, dst)`` answers from ``src``,
    which must be one of this stack's addresses (normally the ``dst`` a datagram arrived at)."""

    def __init__(self, netstack: Netstack, handler: CatchAllHandler) -> None:
        self.netstack = netstack
        self.handler = handler

    def datagram_received(self, data: bytes, src: tuple[bytes, int], dst: tuple[bytes, int]) -> None:
        self.handler.datagram_received(data, (_text(src[0]), src[1]), (_text(dst[0]), dst[1]))

    def write(self, data: bytes, src: tuple[str, int], dst: tuple[str, int]) -> None:
        local = to_address(src[0])
        if local not in self.netstack.stack.addresses:
            raise ValueError(f"{src[0]} is not an address of this stack")
        try:
            self.netstack.stack.udp_send(data, local, src[1], to_address(dst[0]), dst[1])
        except ValueError as e:  # larger than the tunnel MTU: as Twisted's UDP ports say it
            raise error.MessageLengthError(str(e)) from None

    def stopListening(self) -> defer.Deferred[None]:
        if self.netstack.stack.udp_catch_all is self:
            self.netstack.stack.udp_catch_all = None
        return defer.succeed(None)
