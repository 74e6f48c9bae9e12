"""``coderstack port-forward``: Coder's spec grammar and the forwarding machinery.

Spec grammar (Coder's ``cli/portforward.go``; comma-separated and repeatable, for ``--tcp`` /
``-p`` and ``--udp``):

    [BIND:]LOCAL[-LOCAL_END][:REMOTE[-REMOTE_END]]      BIND = a.b.c.d | [v6]

``8000``, ``8888:9999``, ``8000-8005``, ``1-5:6-10``, ``127.0.0.1:4000:4000``,
``[::1]:8080:8081``, ``[::1]:4000-4001:5000-5001``. Ranges must have the same length, port 0
is refused, the same local (network, host, port) twice is an error. Without a bind address
we listen on 127.0.0.1 and, when the host has IPv6 loopback, on ::1 too.

Every accepted local connection dials ``127.0.0.1:<remote>`` in the workspace. The machinery
is written against two hooks so it runs over the tunnel unchanged:

* ``tcp_endpoint(port) -> IStreamClientEndpoint`` — a stream endpoint to that port on the
  agent (over the tunnel: the netstack's client endpoint for the agent's address);
* ``udp_dial(port, on_datagram) -> Deferred[DatagramFlow]`` — a datagram "connection" to that
  port on the agent; ``on_datagram(bytes)`` is called for each reply.

UDP has "TCP-like semantics" as in Coder: each local source address gets its own flow.
:func:`loopback_tcp_endpoint` / :func:`loopback_udp_dial` are the plain-socket versions used in
tests (and handy when the "workspace" is this machine).
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from twisted.internet import defer, protocol
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.logger import Logger

log = Logger()

SPEC_RE = re.compile(r"^((\[[0-9a-fA-F:]+]|\d+\.\d+\.\d+\.\d+):)?(\d+)(-(\d+))?(:(\d+)(-(\d+))?)?$", re.ASCII)
IPV4_LOOPBACK = "127.0.0.1"
IPV6_LOOPBACK = "::1"
DIAL_HOST = "127.0.0.1"


class SpecError(ValueError):
    """A port-forward spec that does not parse; the message is Coder's."""


@dataclass(frozen=True)
class ForwardSpec:
    network: str      # "tcp" | "udp"
    listen_host: str  # "" = not given (127.0.0.1 and ::1)
    listen_port: int
    dial_port: int


def _parse_port(text: str) -> int:
    stripped = text.strip()
    if not stripped.isdigit():
        raise SpecError(f'parse port "{text}": strconv.ParseUint: parsing "{stripped}": invalid syntax')
    port = int(stripped)
    if port > 65535:
        raise SpecError(f'parse port "{text}": strconv.ParseUint: parsing "{stripped}": value out of range')
    if port == 0:
        raise SpecError("port cannot be 0")
    return port


def _parse_range(start: str, end: str | None) -> list[int]:
    try:
        first = _parse_port(start)
    except SpecError as err:
        raise SpecError(f'parse range start port from "{start}": {err}') from None
    last = first
    if end:
        try:
            last = _parse_port(end)
        except SpecError as err:
            raise SpecError(f'parse range end port from "{end}": {err}') from None
    if last < first:
        raise SpecError(f"range end port {last} is less than start port {first}")
    return list(range(first, last + 1))


def parse_spec(text: str) -> list[tuple[str, int, int]]:
    """One spec -> [(listen_host, listen_port, dial_port)]; raises :class:`SpecError`."""
    m = SPEC_RE.fullmatch(text)
    if m is None:
        raise SpecError(f'invalid port specification "{text}"')
    host = ""
    if m.group(2):
        try:
            host = str(ipaddress.ip_address(m.group(2).strip("[]")))
        except ValueError:
            raise SpecError(f'invalid IP address "{m.group(2)}"') from None
    try:
        local = _parse_range(m.group(3), m.group(5))
    except SpecError as err:
        raise SpecError(f'parse local port range from "{text}": {err}') from None
    remote = local
    if m.group(7):
        try:
            remote = _parse_range(m.group(7), m.group(9))
        except SpecError as err:
            raise SpecError(f'parse remote port range from "{text}": {err}') from None
    if len(local) != len(remote):
        raise SpecError(f"port ranges must be the same length, got {len(local)} ports forwarded to {len(remote)} ports")
    return [(host, lp, rp) for lp, rp in zip(local, remote, strict=True)]


def parse_forwards(tcp: list[str], udp: list[str]) -> list[ForwardSpec]:
    specs: list[ForwardSpec] = []
    for network, entries in (("tcp", tcp), ("udp", udp)):
        for entry in entries:
            for spec in entry.split(","):
                try:
                    mapped = parse_spec(spec.strip())
                except SpecError as err:
                    raise SpecError(
                        f'failed to parse {network.upper()} port-forward specification "{spec}": {err}') from None
                specs.extend(ForwardSpec(network, h, lp, rp) for h, lp, rp in mapped)
    seen: set[tuple[str, str, int]] = set()
    for s in specs:
        key = (s.network, s.listen_host, s.listen_port)
        if key in seen:
            shown = s.listen_host or "invalid IP"  # Go prints an unset netip.Addr so
            raise SpecError(f"local {s.network} host:{shown} port:{s.listen_port} is specified twice")
        seen.add(key)
    return specs


def format_addr(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def forwarding_line(network: str, host: str, port: int, dial_port: int) -> str:
    return (f"Forwarding '{network}://{format_addr(host, port)}' locally to "
            f"'{network}://{format_addr(DIAL_HOST, dial_port)}' in the workspace")


def have_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


# --- hooks ---------------------------------------------------------------------------------------


class DatagramFlow(Protocol):
    def send(self, data: bytes) -> None: ...
    def close(self) -> None: ...


TCPEndpointFor = Callable[[int], IStreamClientEndpoint]
UDPDial = Callable[[int, Callable[[bytes], None]], "defer.Deferred[DatagramFlow]"]


def loopback_tcp_endpoint(reactor: Any, host: str = DIAL_HOST) -> TCPEndpointFor:
    return lambda port: TCP4ClientEndpoint(reactor, host, port)


class _FlowSocket(protocol.DatagramProtocol):
    """One local->workspace UDP flow: its own socket, talking to one (host, port) only."""

    def __init__(self, host: str, port: int, on_datagram: Callable[[bytes], None]):
        self.target = (host, port)
        self.on_datagram = on_datagram
        self.dropped = 0  # datagrams from anyone but the target

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        if (addr[0], addr[1]) == self.target:
            self.on_datagram(data)
        else:
            self.dropped += 1

    def send(self, data: bytes) -> None:
        if self.transport is not None:
            try:
                self.transport.write(data, self.target)
            except OSError:  # e.g. ECONNREFUSED from an earlier ICMP: UDP carries on
                pass

    def close(self) -> None:
        if self.transport is not None:
            self.transport.stopListening()


def datagram_flow_dial(listen_udp: Callable[[int, protocol.DatagramProtocol], Any], host: str) -> UDPDial:
    """A ``udp_dial`` from any ``listen_udp(port, DatagramProtocol)`` whose transport has
    ``write(data, (host, port))``: the reactor's (on loopback) or the netstack's
    (``Netstack.listen_udp`` with the agent's tunnel address) alike."""
    def dial(port: int, on_datagram: Callable[[bytes], None]) -> defer.Deferred[DatagramFlow]:
        proto = _FlowSocket(host, port, on_datagram)
        try:
            listen_udp(0, proto)
        except Exception as err:
            return defer.fail(err)
        return defer.succeed(proto)
    return dial


def loopback_udp_dial(reactor: Any, host: str = DIAL_HOST) -> UDPDial:
    return datagram_flow_dial(lambda port, proto: reactor.listenUDP(port, proto, interface=host), host)


# --- TCP -----------------------------------------------------------------------------------------


class _Remote(protocol.Protocol):
    """The workspace side of one forwarded connection."""

    def __init__(self, local: _Local):
        self.local = local

    def connectionMade(self) -> None:
        self.local.remote_connected(self)

    def dataReceived(self, data: bytes) -> None:
        self.local.transport.write(data)

    def connectionLost(self, reason: Any = None) -> None:
        self.local.transport.loseConnection()


class _Local(protocol.Protocol):
    """A connection accepted on the local listener; dials the workspace before reading."""

    def __init__(self, forwarder: Forwarder, spec: ForwardSpec):
        self.forwarder, self.spec = forwarder, spec
        self.remote: _Remote | None = None
        self.closed = False

    def connectionMade(self) -> None:
        self.transport.pauseProducing()
        self.forwarder.active += 1
        endpoint = self.forwarder.tcp_endpoint(self.spec.dial_port)
        d = endpoint.connect(protocol.Factory.forProtocol(lambda: _Remote(self)))
        d.addErrback(self._dial_failed)

    def _dial_failed(self, failure: Any) -> None:
        self.forwarder.say(f"Failed to dial 'tcp://{format_addr(DIAL_HOST, self.spec.dial_port)}' "
                           f"in workspace: {failure.getErrorMessage()}")
        self.transport.loseConnection()

    def remote_connected(self, remote: _Remote) -> None:
        if self.closed:
            remote.transport.loseConnection()
            return
        self.remote = remote
        # Backpressure both ways: each side pauses the other when its write buffer fills.
        self.transport.registerProducer(remote.transport, True)
        remote.transport.registerProducer(self.transport, True)
        self.transport.resumeProducing()

    def dataReceived(self, data: bytes) -> None:
        if self.remote is not None:
            self.remote.transport.write(data)

    def connectionLost(self, reason: Any = None) -> None:
        self.closed = True
        self.forwarder.active -= 1
        if self.remote is not None:
            self.remote.transport.loseConnection()


class _LocalFactory(protocol.Factory):
    def __init__(self, forwarder: Forwarder, spec: ForwardSpec):
        self.forwarder, self.spec = forwarder, spec

    def buildProtocol(self, addr: Any) -> _Local:
        return _Local(self.forwarder, self.spec)


# --- UDP -----------------------------------------------------------------------------------------


class _UDPListener(protocol.DatagramProtocol):
    """Local UDP socket; one workspace flow per local source address."""

    def __init__(self, forwarder: Forwarder, spec: ForwardSpec):
        self.forwarder, self.spec = forwarder, spec
        self.flows: dict[Any, DatagramFlow] = {}
        self.pending: dict[Any, list[bytes]] = {}

    def datagramReceived(self, data: bytes, addr: Any) -> None:
        flow = self.flows.get(addr)
        if flow is not None:
            flow.send(data)
            return
        if addr in self.pending:
            self.pending[addr].append(data)
            return
        self.pending[addr] = [data]
        d = self.forwarder.udp_dial(self.spec.dial_port, lambda reply: self._reply(reply, addr))
        d.addCallbacks(lambda f: self._dialed(f, addr), lambda fail: self._dial_failed(fail, addr))

    def _reply(self, data: bytes, addr: Any) -> None:
        if self.transport is not None:
            self.transport.write(data, addr)

    def _dialed(self, flow: DatagramFlow, addr: Any) -> None:
        self.flows[addr] = flow
        for data in self.pending.pop(addr, []):
            flow.send(data)

    def _dial_failed(self, failure: Any, addr: Any) -> None:
        self.pending.pop(addr, None)
        self.forwarder.say(f"Failed to dial 'udp://{format_addr(DIAL_HOST, self.spec.dial_port)}' "
                           f"in workspace: {failure.getErrorMessage()}")

    def stopProtocol(self) -> None:
        for flow in self.flows.values():
            flow.close()
        self.flows.clear()


# --- the forwarder -------------------------------------------------------------------------------


class Forwarder:
    """Listens for every spec and forwards through the hooks; ``stop()`` closes the listeners."""

    def __init__(self, reactor: Any, tcp_endpoint: TCPEndpointFor, udp_dial: UDPDial | None,
                 say: Callable[[str], None], ipv6: bool | None = None):
        self.reactor, self.tcp_endpoint, self.udp_dial, self.say = reactor, tcp_endpoint, udp_dial, say
        self.ipv6 = have_ipv6_loopback() if ipv6 is None else ipv6
        self.ports: list[Any] = []
        self.active = 0

    def _listen(self, spec: ForwardSpec, host: str) -> Any:
        self.say(forwarding_line(spec.network, host, spec.listen_port, spec.dial_port))
        if spec.network == "tcp":
            port = self.reactor.listenTCP(spec.listen_port, _LocalFactory(self, spec), interface=host)
        else:
            if self.udp_dial is None:
                raise SpecError("UDP forwarding is not available on this connection")
            port = self.reactor.listenUDP(spec.listen_port, _UDPListener(self, spec), interface=host)
        self.ports.append(port)
        return port

    def start(self, specs: list[ForwardSpec]) -> list[Any]:
        """Listen for every spec (raises :class:`ListenError` and closes what it opened)."""
        try:
            for spec in specs:
                if spec.listen_host:
                    hosts = [spec.listen_host]
                else:
                    hosts = [IPV4_LOOPBACK]
                    if self.ipv6:
                        try:
                            self._listen(spec, IPV6_LOOPBACK)
                        except Exception as err:  # opportunistic, as Coder
                            log.info("failed to listen on IPv6 for {spec}: {err}", spec=spec, err=err)
                for host in hosts:
                    try:
                        self._listen(spec, host)
                    except Exception as err:
                        raise ListenError(
                            f"listen '{spec.network}://{format_addr(host, spec.listen_port)}': {err}") from err
        except Exception:
            self.stop()
            raise
        return list(self.ports)

    def stop(self) -> defer.Deferred[Any]:
        ports, self.ports = self.ports, []
        return defer.gatherResults([defer.maybeDeferred(p.stopListening) for p in ports])


class ListenError(Exception):
    pass


# --- the command -----------------------------------------------------------------------------------

from coderstack.cli import tunnel  # noqa: E402
from coderstack.cli.command import Command  # noqa: E402  (the command part sits below the machinery)


class Options(Command):
    synopsis = "coderstack port-forward <workspace> --tcp SPEC [--udp SPEC]..."
    longdesc = "Forward ports from the workspace to this machine (Coder's spec grammar, see the docs)."

    def __init__(self) -> None:
        super().__init__()
        self["tcp"] = []
        self["udp"] = []

    def opt_tcp(self, spec: str) -> None:
        """Forward TCP port(s) from the workspace [env CODER_PORT_FORWARD_TCP] (repeatable)."""
        self["tcp"].append(spec)

    opt_p = opt_tcp

    def opt_udp(self, spec: str) -> None:
        """Forward UDP port(s) from the workspace, with TCP-like per-source flows [env CODER_PORT_FORWARD_UDP]."""
        self["udp"].append(spec)

    def parseArgs(self, workspace: str) -> None:
        self["workspace"] = workspace


def _interrupted(reactor: Any) -> tuple[defer.Deferred[None], Callable[[], None]]:
    import signal

    d: defer.Deferred[None] = defer.Deferred()
    previous: dict[int, Any] = {}

    def handler(signum: int, frame: Any) -> None:
        if not d.called:
            reactor.callFromThread(d.callback, None)
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread
            pass

    def restore() -> None:
        for sig, old in previous.items():
            signal.signal(sig, old)
    return d, restore


async def run_with(reactor: Any, options: Options, ctx: Any, connect: Any,
                   stopped: defer.Deferred[None] | None = None) -> int:
    """Forward until ``stopped`` fires (default: SIGINT/SIGTERM)."""
    tcp = options["tcp"] or [s for s in ctx.environ.get("CODER_PORT_FORWARD_TCP", "").split(",") if s]
    udp = options["udp"] or [s for s in ctx.environ.get("CODER_PORT_FORWARD_UDP", "").split(",") if s]
    try:
        specs = parse_forwards(tcp, udp)
    except SpecError as err:
        ctx.err(f"error: parse port-forward specs: {err}")
        return 2
    if not specs:
        ctx.err("error: no port-forwards requested")
        return 2
    conn = await connect(reactor, ctx, options["workspace"])
    forwarder = Forwarder(reactor, conn.endpoint, getattr(conn, "udp_dial", None), ctx.err)
    restore: Callable[[], None] = lambda: None  # noqa: E731
    try:
        try:
            forwarder.start(specs)
        except (ListenError, SpecError) as err:
            ctx.err(f"error: {err}")
            return 1
        if stopped is None:
            stopped, restore = _interrupted(reactor)
        ctx.err("Ready!")
        await stopped
        ctx.err("\nReceived signal, closing all listeners and active connections")
    finally:
        restore()
        await forwarder.stop()
        conn.close()
    return 0


run = tunnel.command(run_with)
