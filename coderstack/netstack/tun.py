"""A Linux TUN device as a packet source/sink for a ``Netstack`` (tests, benchmarks, tools).

``open_tun(name, netns=None)`` creates an ``IFF_TUN | IFF_NO_PI`` device (raw IP packets, no
packet-information prefix), optionally inside a network namespace given by path
(``/run/netns/NAME``): the thread enters the namespace with ``setns(2)`` just long enough for
``TUNSETIFF``, so the device lives there while the file descriptor stays ours.  Needs root.

``TunReader`` reads packets from the descriptor in the reactor and hands them over in batches;
``write`` sends one packet into the kernel.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import struct
from collections.abc import Callable

from twisted.internet import abstract

__all__ = ["TunReader", "open_tun"]

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
CLONE_NEWNET = 0x40000000


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def open_tun(name: str, netns: str | None = None) -> int:
    """Create TUN device ``name`` (in ``netns`` if given); return its non-blocking fd."""
    own: int | None = None
    ns: int | None = None
    if netns is not None:
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        ns = os.open(netns, os.O_RDONLY)
        _setns(ns)
    try:
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TUN | IFF_NO_PI))
        except BaseException:
            os.close(fd)
            raise
    finally:
        if own is not None and ns is not None:
            _setns(own)
            os.close(own)
            os.close(ns)
    return fd


class TunReader(abstract.FileDescriptor):
    """Reads whole IP packets from a TUN fd; ``deliver(list_of_packets)`` gets each batch."""

    batch = 256

    def __init__(self, fd: int, deliver: Callable[[list[bytes]], object], reactor=None) -> None:
        super().__init__(reactor)
        self.tun_fd = fd
        self.deliver = deliver
        self.write_errors = 0

    def fileno(self) -> int:
        return self.tun_fd

    def doRead(self):
        packets = []
        read = os.read
        fd = self.tun_fd
        try:
            for _ in range(self.batch):
                packets.append(read(fd, 65536))
        except BlockingIOError:
            pass
        if packets:
            self.deliver(packets)

    def write_packet(self, packet: bytes) -> None:
        try:
            os.write(self.tun_fd, packet)
        except (BlockingIOError, OSError):
            # The kernel's queue is full: the packet is lost, as on a congested link.
            self.write_errors += 1

    def connectionLost(self, reason) -> None:
        abstract.FileDescriptor.connectionLost(self, reason)

    def close(self) -> None:
        self.stopReading()
        try:
            os.close(self.tun_fd)
        except OSError:
            pass
