"""The tunables of TCP connections.  Defaults follow the RFCs, and Linux where the RFCs leave room."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["TCPConfig"]


@dataclass
class TCPConfig:
    mtu: int = 1280
    # The largest IPv6 packet we can take in (0: ``mtu``). The MSS we announce comes from it, not
    # from the path MTU we send on: the tunnel may carry more towards us than we may send back,
    # and the sender bounds its segments by its own path MTU anyway (RFC 9293 3.7.1).
    receive_mtu: int = 0
    rcvbuf: int = 4 << 20  # receive window we can offer (needs window scaling above 64 KiB)
    initial_rto: float = 1.0  # RFC 6298 (2.1)
    min_rto: float = 0.2  # Linux's; RFC 6298 suggests 1 s
    max_rto: float = 60.0
    syn_retries: int = 6
    retries: int = 12  # consecutive timeouts before giving up on a connection
    delayed_ack: float = 0.04
    msl: float = 30.0  # TIME_WAIT lasts 2 * MSL
    fin_timeout: float = 60.0  # orphaned FIN_WAIT_2
    keepalive: bool = False
    keepalive_idle: float = 7200.0
    keepalive_interval: float = 75.0
    keepalive_count: int = 9
    timestamps: bool = True
    sack: bool = True
    window_scaling: bool = True
    initial_window: int = 10  # segments, RFC 6928
    congestion: str = "cubic"  # or "newreno"
    # A window floor at twice the measured bandwidth-delay product while losses stay under 2%
    # (bdpfloor.py): random loss on a fast path is not congestion.
    bdp_floor: bool = True
    dupthresh: int = 3
    # The shortest tail loss probe timeout: the reactor's timer granularity and the peer's ACK
    # batching make a PTO of 2 SRTT on a sub-millisecond path fire before a healthy ACK.
    tlp_min: float = 0.01
    send_low_water: int = 1 << 20  # writable() fires when unACKed+unsent bytes fall below this

    def wscale(self) -> int:
        """The window scale we offer: the smallest shift that lets us announce all of ``rcvbuf``."""
        if not self.window_scaling:
            return 0
        s = 0
        while (0xFFFF << s) < self.rcvbuf and s < 14:
            s += 1
        return s
