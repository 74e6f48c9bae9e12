"""Path-MTU probing sizes: which inner MTUs a direct path is tried at, and how big a probe is.

The tunnel's MTU is the largest IPv6 packet WireGuard carries inside one datagram. 1280 (IPv6's
minimum) is assumed everywhere without proof, as Tailscale does. Larger ones must be proven per
direct path with padded disco pings: a pong for a ping of N bytes proves the path carried N bytes
from us to the peer without fragmentation (magicsock's socket sets the don't-fragment bit).

Sizes on the wire (outer IPv4; IPv6 adds 20 bytes of header)::

    link MTU  = outer IP header (20 | 40) + UDP (8) + WireGuard datagram
    WireGuard = type/receiver/counter (16) + inner packet (zero-padded to 16) + Poly1305 tag (16)
    disco Ping = magic (6) + disco key (32) + nonce (24) + box tag (16) + type/version (2)
                 + TxID (12) + node key (32) + zero padding          = 124 + padding bytes

So a probe for inner MTU ``m`` is a Ping padded to ``m + 32`` bytes, the size of the WireGuard
datagram that carries an ``m``-byte packet. Every rung is a multiple of 16 so that WireGuard's
padding never makes a full-size packet's datagram larger than its probe.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from coderstack.wire import disco

BASE_MTU = 1280  # IPv6's minimum: every path is assumed to carry it
WIREGUARD_OVERHEAD = 32  # 16-byte data header + 16-byte tag
UDP_HEADER = 8
PING_SIZE = disco.HEADER_LEN + 16 + 2 + disco.TXID_LEN + 32  # 124: an unpadded Ping with node key

# The ladder, as link MTUs. Paths come in a few classes, not a continuum, so probing these
# three (in parallel, one round trip) finds nearly all of the gain without a binary search:
#   1500   Ethernet and Wi-Fi: most LANs and most of the internet (gains only ~13% over 1280);
#   9000   jumbo frames: data-centre networks and cloud VPCs (AWS's 9001, GCP up to 8896 fit);
#   65535  loopback (MTU 65536) and anything else that takes the largest UDP datagram: two
#          nodes on one host, where per-packet cost dominates and 64 KiB packets are 2-3x faster.
# Tunnelled links a little under 1500 (PPPoE 1492, GCP's 1460) stay at 1280: 1340-1400 would
# gain under 10%, not worth a rung.
LINK_MTUS = (1500, 9000, 65535)
MAX_UDP_PAYLOAD = 65507  # 65535 - 20 (IPv4) - 8 (UDP); IPv6 allows 65527 but we keep one limit


def _floor16(n: int) -> int:
    return n - n % 16


def inner_mtu(link_mtu: int, ipv6: bool = False) -> int:
    """The inner MTU a link of ``link_mtu`` carries through WireGuard over UDP (rounded to 16)."""
    outer = min(link_mtu - (40 if ipv6 else 20) - UDP_HEADER, MAX_UDP_PAYLOAD)
    return _floor16(outer - WIREGUARD_OVERHEAD)


def probe_mtus(ipv6: bool = False) -> tuple[int, ...]:
    """The inner MTUs above :data:`BASE_MTU` probed on a direct path, smallest first."""
    return tuple(m for m in (inner_mtu(link, ipv6) for link in LINK_MTUS) if m > BASE_MTU)


MAX_MTU = max(probe_mtus(False) + probe_mtus(True))  # 65472: the most a path can be given
# What we can receive: a datagram up to the UDP maximum decrypts to at most this. The MSS we
# announce comes from it (a peer sends less if its path is smaller).
RECEIVE_MTU = MAX_MTU


def wire_size(mtu: int) -> int:
    """The WireGuard datagram for a full packet of ``mtu`` bytes."""
    return mtu + WIREGUARD_OVERHEAD


def probe_padding(mtu: int) -> int:
    """Zero bytes that make a Ping (with node key) exactly :func:`wire_size` bytes long."""
    return max(0, wire_size(mtu) - PING_SIZE)


ENV = "CODERSTACK_PMTUD"  # "0", "false", "off" or "no" turns probing off


def enabled_from_env(environ: Mapping[str, str] | None = None) -> bool:
    """Probing is on unless ``CODERSTACK_PMTUD`` says off (like Tailscale's TS_DEBUG_ENABLE_PMTUD,
    but on by default because the gain was measured: bench/bench_pmtu.py)."""
    value = (os.environ if environ is None else environ).get(ENV, "").strip().lower()
    return value not in ("0", "false", "off", "no")
