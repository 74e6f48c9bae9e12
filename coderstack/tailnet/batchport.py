"""The tunnel's UDP socket on Linux, batched: GSO sends and GRO reads (see :mod:`udpbatch`).

A ``twisted.internet.udp.Port`` whose reads use ``recvmsg`` with ``UDP_GRO`` (one read, many
datagrams, each handed to the protocol as if read alone) and which adds :meth:`BatchPort.write_many`:
runs of equal-size datagrams to one address go out in one ``sendmsg`` with ``UDP_SEGMENT``.
Where the kernel refuses either (an old kernel, a device without checksum offload: ``EIO``), the
port says so once in its counters and goes on one datagram per call, as Twisted's own port does.
Addresses are IP literals (checked once per address): a host name would make ``sendmsg`` resolve
it, blocking the reactor.
"""

from __future__ import annotations

import errno
import os
import socket
import sys
from collections import Counter
from collections.abc import Mapping
from typing import Any

from twisted.internet import abstract, error, udp
from twisted.logger import Logger

from coderstack.tailnet import udpbatch
from coderstack.tailnet.udpbatch import Address

log = Logger()

_CMSG_SPACE = socket.CMSG_SPACE(4)
#: Errors that mean "not this way on this socket": stop trying GSO (or GRO) on it.
_UNSUPPORTED = frozenset({errno.EIO, errno.EINVAL, errno.ENOPROTOOPT, errno.EOPNOTSUPP})
_KNOWN_ADDRESSES = 4096
_READ_AGAIN = frozenset({errno.EAGAIN, errno.EWOULDBLOCK, errno.EINTR})


ENV = "CODERSTACK_UDP_BATCH"  # "0", "false", "off" or "no": one datagram per call


def supported(reactor: Any, environ: Mapping[str, str] | None = None) -> bool:
    """Should the tunnel's socket be a :class:`BatchPort`: a real posix reactor on Linux, unless
    ``CODERSTACK_UDP_BATCH`` turns it off (a way out should some kernel misbehave where it
    claims support; the port already falls back by itself where the kernel refuses)."""
    value = (os.environ if environ is None else environ).get(ENV, "").strip().lower()
    if value in ("0", "false", "off", "no") or not sys.platform.startswith("linux"):
        return False
    from twisted.internet.posixbase import PosixReactorBase

    return isinstance(reactor, PosixReactorBase)


def listen(reactor: Any, port: int, protocol: Any, interface: str = "", max_packet_size: int = 1 << 16) -> BatchPort:
    """Like ``reactor.listenUDP``, with batching."""
    p = BatchPort(port, protocol, interface, max_packet_size, reactor)
    p.startListening()
    return p


class BatchPort(udp.Port):
    """See the module doc. :attr:`counters`: ``gso_sends``, ``gso_datagrams``, ``gro_reads``,
    ``gro_datagrams``, ``gso_off`` / ``gro_off`` (the kernel refused), ``send_errors``,
    ``truncated_reads``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.gso = True
        self.gro = False
        self.counters: Counter[str] = Counter()
        self._checked: set[Address] = set()

    def startListening(self) -> None:
        super().startListening()
        try:
            self.socket.setsockopt(udpbatch.SOL_UDP, udpbatch.UDP_GRO, 1)
            self.gro = True
        except OSError:
            self.counters["gro_off"] += 1

    def connectionLost(self, reason: Any = None) -> None:
        if self.counters:
            log.info("UDP batching on port {port}: {counters}", port=self._realPortNumber,
                     counters=dict(self.counters))
        super().connectionLost(reason)

    # -- reading -----------------------------------------------------------------------------

    def doRead(self) -> None:
        if not self.gro:
            super().doRead()
            return
        read = 0
        sock, protocol = self.socket, self.protocol
        v6 = self.addressFamily == socket.AF_INET6
        while read < self.maxThroughput:
            try:
                data, ancillary, flags, addr = sock.recvmsg(self.maxPacketSize, _CMSG_SPACE)
            except OSError as se:
                no = se.args[0]
                if no in _READ_AGAIN:
                    return
                if no == errno.ECONNREFUSED:
                    if self._connectedAddr:
                        protocol.connectionRefused()
                    return
                raise
            read += len(data)
            if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
                # Cut short, or its segment size lost: the datagrams cannot be told apart, and
                # WireGuard would reject the pieces anyway. Dropped and counted; TCP resends.
                self.counters["truncated_reads"] += 1
                continue
            if v6:
                addr = addr[:2]  # no flow info or scope id, as Twisted's own port gives
            size = udpbatch.gro_size(ancillary) if ancillary else None
            if size is not None:
                self.counters["gro_reads"] += 1
            for datagram in udpbatch.split(data, size):
                if size is not None:
                    self.counters["gro_datagrams"] += 1
                try:
                    protocol.datagramReceived(datagram, addr)
                except BaseException:
                    log.failure("UDP protocol failed on a datagram")

    # -- writing -----------------------------------------------------------------------------

    def write_many(self, writes: list[tuple[bytes, Address]]) -> list[str]:
        """Send each ``(datagram, address)`` in order; per write, "" if sent, else why not
        (``udp-emsgsize``: larger than the route allows with don't-fragment)."""
        results: list[str] = []
        for run in udpbatch.runs(writes):
            if len(run.datagrams) > 1 and self.gso and self._literal(run.address):
                why = self._send_run(run)
                if why is None:
                    results.extend([""] * len(run.datagrams))
                    continue
                if why:  # the whole run failed in a way each datagram shares
                    results.extend([why] * len(run.datagrams))
                    continue
            results.extend(self._send_one(d, run.address) for d in run.datagrams)
        return results

    def _literal(self, address: Address) -> bool:
        if address in self._checked:
            return True
        host = address[0]
        ok = abstract.isIPv6Address(host) if self.addressFamily == socket.AF_INET6 else abstract.isIPAddress(host)
        if ok:
            if len(self._checked) >= _KNOWN_ADDRESSES:
                self._checked.clear()
            self._checked.add(address)
        return ok

    def _sendmsg(self, *args: Any) -> int:
        return int(self.socket.sendmsg(*args))

    def _send_run(self, run: udpbatch.Run) -> str | None:
        """None if sent; "" to send the datagrams one by one instead; else why all failed."""
        try:
            self._sendmsg([b"".join(run.datagrams)], run.control(), 0, run.address)
        except OSError as se:
            no = se.args[0]
            if no == errno.EINTR:
                return self._send_run(run)
            if no == errno.EMSGSIZE:
                return ""  # one by one: each finds out its own size (path MTU probing)
            if no in _UNSUPPORTED:
                self.gso = False
                self.counters["gso_off"] += 1
                log.info("UDP segmentation offload refused on this socket ({why}); sending datagrams one by one",
                         why=errno.errorcode.get(no, str(no)))
                return ""
            self.counters["send_errors"] += 1
            return "udp-" + errno.errorcode.get(no, "error").lower()
        self.counters["gso_sends"] += 1
        self.counters["gso_datagrams"] += len(run.datagrams)
        return None

    def _send_one(self, datagram: bytes, address: Address) -> str:
        try:
            self.write(datagram, address)
            return ""
        except error.MessageLengthError:
            return "udp-emsgsize"
        except OSError as e:
            self.counters["send_errors"] += 1
            return "udp-" + errno.errorcode.get(e.errno or 0, "error").lower()
