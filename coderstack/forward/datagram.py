"""UDP forwarding, local side: datagrams to a local port go to one workspace port, per source.

A ``udp_dial(port, on_datagram) -> Deferred[DatagramFlow]`` opens a datagram "connection" to
that port on the agent; ``on_datagram(bytes)`` gets each reply. :func:`datagram_flow_dial` makes
one from any ``listen_udp(port, DatagramProtocol)``: the netstack's on the agent's tunnel
address, or the reactor's on a loopback. :class:`DatagramForwarder` is the local listener: each
local source address gets a flow of its own (Coder's TCP-like UDP), and what the flow hears back
goes to that source.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from twisted.internet import defer, protocol
from twisted.python.failure import Failure

from coderstack.forward.flows import FlowTable
from coderstack.forward.report import DialReport
from coderstack.twistedtypes import datagram_transport


class DatagramFlow(Protocol):
    def send(self, data: bytes) -> None: ...
    def close(self) -> None: ...


UDPDial = Callable[[int, Callable[[bytes], None]], "defer.Deferred[DatagramFlow]"]
ListenUDP = Callable[[int, protocol.DatagramProtocol], Any]


class FlowSocket(protocol.DatagramProtocol):
    """One local->workspace UDP flow: its own socket, talking to one (host, port) only."""

    def __init__(self, host: str, port: int, on_datagram: Callable[[bytes], None]) -> None:
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
                datagram_transport(self).write(data, self.target)
            except OSError:  # e.g. ECONNREFUSED from an earlier ICMP: UDP carries on
                pass

    def close(self) -> None:
        if self.transport is not None:
            datagram_transport(self).stopListening()


def datagram_flow_dial(listen_udp: ListenUDP, host: str) -> UDPDial:
    """A ``udp_dial`` from any ``listen_udp(port, DatagramProtocol)`` whose transport has
    ``write(data, (host, port))``: the reactor's (on loopback) or the netstack's
    (``Netstack.listen_udp`` with the agent's tunnel address) alike."""
    def dial(port: int, on_datagram: Callable[[bytes], None]) -> defer.Deferred[DatagramFlow]:
        proto = FlowSocket(host, port, on_datagram)
        try:
            listen_udp(0, proto)
        except Exception as err:
            return defer.fail(err)
        return defer.succeed(proto)
    return dial


class DatagramForwarder(protocol.DatagramProtocol):
    """The local UDP socket of one spec; one workspace flow per local source address. Datagrams
    that arrive while a source's flow is being dialed wait for it, in order."""

    def __init__(self, udp_dial: UDPDial, dial_port: int, report: DialReport) -> None:
        self.udp_dial, self.dial_port, self.report = udp_dial, dial_port, report
        self.flows: FlowTable[Any, DatagramFlow] = FlowTable()
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
        d = self.udp_dial(self.dial_port, lambda reply: self._reply(reply, addr))
        d.addCallbacks(lambda f: self._dialed(f, addr), lambda fail: self._dial_failed(fail, addr))

    def _reply(self, data: bytes, addr: Any) -> None:
        if self.transport is not None:
            datagram_transport(self).write(data, addr)

    def _dialed(self, flow: DatagramFlow, addr: Any) -> None:
        self.flows.add(addr, flow)
        for data in self.pending.pop(addr, []):
            flow.send(data)

    def _dial_failed(self, failure: Failure, addr: Any) -> None:
        self.pending.pop(addr, None)
        self.report.dial_failed("udp", self.dial_port, failure.getErrorMessage())

    def stopProtocol(self) -> None:
        self.flows.close_all()
