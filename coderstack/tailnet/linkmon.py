"""Link monitor: notice that the host's network changed (roaming, DHCP renumbering, a new uplink,
waking from sleep) so the tunnel re-discovers its paths at once instead of after timeouts.

Two sans-IO parts and a thin poller:

- :class:`LinkState` is what we compare: the set of ``(interface, ip)`` of up, non-loopback
  interfaces (link-local IPv6, our own overlay prefixes and tunnel interfaces left out: they are
  ours, or appear on every veth that comes up), and the source address the kernel would pick
  for the IPv4 and IPv6 default routes. Two snapshots that differ are a *major* change; an
  interface that comes and goes without addresses never shows up in a snapshot at all.
- :class:`WakeDetector`: between two polls, wall-clock time that advanced much further than
  monotonic time means the host was suspended (Linux's CLOCK_MONOTONIC stops while asleep).
  A busy reactor that polls late advances both alike, so it is no wake-up.
- :class:`LinkMonitor` polls every ``POLL_INTERVAL`` seconds on an injected IReactorTime and calls
  ``on_change(LinkChange)``. A poll is cheap: /sys reads and one ioctl per interface (see
  ``netinfo.gather_interfaces``) and two connected-but-silent UDP sockets (a ``connect()`` on
  UDP only looks up the route; no packet is sent).

:func:`monitor_conn` wires one to a :class:`coderstack.tailnet.conn.Conn`: each change calls
``Conn.network_changed`` (re-STUN, re-probe every peer) and reconnects the DERP connections whose
local address is gone (all of them after a wake-up). ``CODERSTACK_LINK_MONITOR=0`` turns it off.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from twisted.internet import task
from twisted.logger import Logger

from coderstack.netinfo import Interface, gather_interfaces
from coderstack.twistedtypes import Clock, reactor_time
from coderstack.wire.coordination import CODER_SERVICE_PREFIX, TAILSCALE_SERVICE_PREFIX

_log = Logger()

POLL_INTERVAL = 2.0
# Wall clock ahead of monotonic by more than this between two polls: the host slept.
WAKE_THRESHOLD = 10.0
ENV_SWITCH = "CODERSTACK_LINK_MONITOR"

# Addresses that are ours (the overlay) say nothing about the underlying network.
OVERLAY_PREFIXES = (TAILSCALE_SERVICE_PREFIX, CODER_SERVICE_PREFIX)
# Tunnel interfaces of Tailscale/Coder on the same host ride on the network we watch.
TUNNEL_NAME_PREFIXES = ("tailscale", "coder")
# Route lookups only: connect() on a UDP socket sends nothing.
_ROUTE_PROBE_V4 = "1.1.1.1"
_ROUTE_PROBE_V6 = "2606:4700:4700::1111"


@dataclass(frozen=True)
class LinkState:
    addresses: frozenset[tuple[str, str]] = frozenset()  # (interface name, ip)
    default_v4: str | None = None  # source address of the IPv4 default route
    default_v6: str | None = None

    def ips(self) -> frozenset[str]:
        return frozenset(ip for _name, ip in self.addresses)


@dataclass(frozen=True)
class LinkChange:
    old: LinkState
    new: LinkState
    woke: bool = False  # a wake-up from sleep (possibly with no address change)

    def vanished(self) -> frozenset[str]:
        """IPs that were ours and are not any more (connections bound to them are dead)."""
        return self.old.ips() - self.new.ips()

    def stale(self, local_ip: str | None) -> bool:
        """Should a connection from ``local_ip`` (None: not connected) be made again? Yes after
        a wake-up, if the address vanished, or if its family's default route now leaves from
        another address; a connection that is down redials now rather than after its backoff.
        Loopback and other uninteresting addresses never go stale by a link change."""
        if self.woke or local_ip is None:
            return True
        if not interesting_ip(local_ip):
            return False
        if local_ip in self.vanished():
            return True
        family = ipaddress.ip_address(local_ip).version
        old, new = ((self.old.default_v4, self.new.default_v4) if family == 4
                    else (self.old.default_v6, self.new.default_v6))
        return old != new and local_ip != new

    def describe(self) -> str:
        parts = []
        if self.woke:
            parts.append("woke from sleep")
        added = sorted(self.new.addresses - self.old.addresses)
        removed = sorted(self.old.addresses - self.new.addresses)
        parts += [f"+{ip} on {name}" for name, ip in added]
        parts += [f"-{ip} on {name}" for name, ip in removed]
        for fam, a, b in (("v4", self.old.default_v4, self.new.default_v4),
                          ("v6", self.old.default_v6, self.new.default_v6)):
            if a != b:
                parts.append(f"default route {fam} source {a or 'none'} -> {b or 'none'}")
        return ", ".join(parts) or "no change"


def interesting_ip(text: str) -> bool:
    """An address that says where we are on the network (not loopback/link-local/overlay)."""
    try:
        ip = ipaddress.ip_interface(text).ip
    except ValueError:
        return False
    if ip.is_loopback or ip.is_link_local or ip.is_unspecified or ip.is_multicast:
        return False
    return not (ip.version == 6 and any(ip in p for p in OVERLAY_PREFIXES))


def link_state(interfaces: Iterable[Interface], default_v4: str | None = None,
               default_v6: str | None = None) -> LinkState:
    """The comparable snapshot of ``interfaces`` (see the module docstring for what counts)."""
    addrs = set()
    for iface in interfaces:
        if not iface.up or iface.name == "lo" or iface.name.startswith(TUNNEL_NAME_PREFIXES):
            continue
        for text in iface.addresses:
            if interesting_ip(text):
                addrs.add((iface.name, str(ipaddress.ip_interface(text).ip)))
    v4 = default_v4 if default_v4 and interesting_ip(default_v4) else None
    v6 = default_v6 if default_v6 and interesting_ip(default_v6) else None
    return LinkState(frozenset(addrs), v4, v6)


def default_route_source(family: int) -> str | None:
    """The source address the kernel picks for the default route of ``family``, or None."""
    target = _ROUTE_PROBE_V4 if family == socket.AF_INET else _ROUTE_PROBE_V6
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect((target, 9))
            return str(s.getsockname()[0])
    except OSError:
        return None


def read_link_state() -> LinkState:
    """This host's :class:`LinkState` (Linux: /sys, ioctls, route lookups; no packets)."""
    return link_state(gather_interfaces(), default_route_source(socket.AF_INET),
                      default_route_source(socket.AF_INET6))


class WakeDetector:
    """Feed it (wall, monotonic) at each poll; true when wall time ran ahead: the host slept."""

    def __init__(self, threshold: float = WAKE_THRESHOLD) -> None:
        self.threshold = threshold
        self._last: tuple[float, float] | None = None

    def observe(self, wall: float, mono: float) -> bool:
        last, self._last = self._last, (wall, mono)
        if last is None:
            return False
        return (wall - last[0]) - (mono - last[1]) > self.threshold


class LinkMonitor:
    """Polls ``read_state()`` every ``interval`` seconds on ``clock``; calls ``on_change`` once
    per change. Wall time is ``clock.seconds()``; ``monotonic`` is the suspend-blind clock."""

    def __init__(
        self,
        clock: Clock,
        on_change: Callable[[LinkChange], object],
        *,
        read_state: Callable[[], LinkState] = read_link_state,
        monotonic: Callable[[], float] = time.monotonic,
        interval: float = POLL_INTERVAL,
        wake_threshold: float = WAKE_THRESHOLD,
    ) -> None:
        self.clock = clock
        self.on_change = on_change
        self.read_state = read_state
        self.monotonic = monotonic
        self.interval = interval
        self.wake = WakeDetector(wake_threshold)
        self.state: LinkState | None = None
        self.changes = 0
        self.errors = 0
        self._loop = task.LoopingCall(self.poll)
        self._loop.clock = reactor_time(clock)

    def start(self) -> None:
        """Take the first snapshot now (no callback for it) and start polling."""
        if not self._loop.running:
            self._loop.start(self.interval, now=True)

    def stop(self) -> None:
        if self._loop.running:
            self._loop.stop()

    def poll(self) -> None:
        """One poll: compare with the previous snapshot and report a change."""
        try:
            woke = self.wake.observe(self.clock.seconds(), self.monotonic())
            new = self.read_state()
        except Exception as err:  # a failed read must not stop the monitor
            self.errors += 1
            _log.info("link monitor: cannot read the interfaces: {why}", why=str(err))
        else:
            old, self.state = self.state, new
            if old is not None and (woke or old != new):
                change = LinkChange(old, new, woke)
                self.changes += 1
                _log.info("network changed: {what}", what=change.describe())
                try:
                    self.on_change(change)
                except Exception:
                    _log.failure("link change handler failed")


def enabled_from_env(env: Mapping[str, str] | None = None) -> bool:
    """On unless ``CODERSTACK_LINK_MONITOR`` is 0/false/no/off."""
    value = (os.environ if env is None else env).get(ENV_SWITCH, "1").strip().lower()
    return value not in ("0", "false", "no", "off")


def apply_change(conn: Any, change: LinkChange) -> None:
    """What a Conn does on a change: stale DERP connections (:meth:`LinkChange.stale`)
    reconnect, then re-STUN and re-probe every peer."""
    conn.network_changed(derp_stale=change.stale)


def monitor_conn(clock: Any, conn: Any, *, env: Mapping[str, str] | None = None,
                 **monitor_kw: Any) -> LinkMonitor | None:
    """Start a :class:`LinkMonitor` for ``conn`` (stopped when the Conn closes); None if the
    environment turned it off."""
    if not enabled_from_env(env):
        return None
    monitor = LinkMonitor(clock, lambda change: apply_change(conn, change), **monitor_kw)
    conn.add_close_hook(monitor.stop)
    conn.link_monitor = monitor
    monitor.start()
    return monitor
