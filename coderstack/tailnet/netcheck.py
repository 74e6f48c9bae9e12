"""netcheck: what the network lets this node do, measured against a DERP map.

The report answers: does UDP work (a STUN round trip completed), over IPv4 and/or IPv6; what
are our global addresses as STUN servers see them; does our NAT give a different mapping per
destination (``MappingVariesByDestIP``: hard NAT, hole punching unlikely); how far is each DERP
region; which region should be home; is a captive portal intercepting HTTP.

Layout: pure functions first (probe plan, home-region choice with Tailscale's hysteresis, report
assembly, Coder's JSON shapes, the interfaces/MTU report), then :class:`Netchecker`, the thin
driver that sends the probes (STUN through a socket-less :class:`STUNClient`, HTTP(S) through
treq) on an injected clock.

Latency sources, in order (Tailscale's netcheck, with Coder's fork's one change):
1. STUN round trips to the region's STUN nodes (3 probes per region at 0/100/200 ms on a full
   report, rotating through the nodes; Tailscale's incremental plan afterwards).
2. ``GET <node>/derp/latency-check`` over HTTPS (HTTP for ``ForceHTTP`` nodes) for relay regions
   that still have no latency: all of them when UDP is blocked, and always for relay regions
   without STUN (Coder's embedded region advertises ``STUNPort: -1``). Those without STUN start
   at once; the others after the STUN phase (at most 3 s).
Only regions with relay (non-STUN-only) nodes can become home; ``NoMeasureNoHome`` regions are
never probed.
"""

from __future__ import annotations

import fcntl
import ipaddress
import math
import os
import socket
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime

from coderstack.derpmap import DERPMap, DERPNode, DERPRegion

# Timing (seconds), from Tailscale's netcheck.
REPORT_TIMEOUT = 5.0
STUN_PROBE_TIMEOUT = 3.0
INITIAL_PROBE_DELAYS = (0.0, 0.1, 0.2)
DEFAULT_ACTIVE_RETRANSMIT = 0.2
CAPTIVE_PORTAL_DELAY = 0.2
CAPTIVE_PORTAL_TIMEOUT = 3.0
CAPTIVE_PORTAL_MAX_CONCURRENT = 5
ENOUGH_REGIONS = 3
NUM_INCREMENTAL_REGIONS = 3
FULL_REPORT_INTERVAL = 300.0

# Home-region hysteresis.
HISTORY_MAX_AGE = 300.0 + 5.0
HYSTERESIS_ABSOLUTE = 0.010
HYSTERESIS_RATIO = 2 / 3
PREFERRED_FRAME_RECENT = 8.0
KEEP_HOME_NO_MEASURE = 120.0  # 2 x DERP keep-alive

SAFE_MTU = 1378  # gVisor 1280 + WireGuard 32 + UDP 8 + IP up to 60 (Coder's arithmetic)


# --- probe plan (pure) -----------------------------------------------------------------------


@dataclass(frozen=True)
class Probe:
    region_id: int
    node: str  # DERPNode.name
    family: int  # 4 or 6
    delay: float  # seconds after the report starts


def node_might4(node: DERPNode) -> bool:
    if not node.ipv4:
        return True
    try:
        return ipaddress.ip_address(node.ipv4).version == 4
    except ValueError:
        return False  # "none" and other non-IP strings disable the family


def node_might6(node: DERPNode) -> bool:
    if not node.ipv6:
        return True
    try:
        return ipaddress.ip_address(node.ipv6).version == 6
    except ValueError:
        return False


def probed_regions(derp_map: DERPMap) -> list[DERPRegion]:
    return [r for _, r in sorted(derp_map.regions.items())
            if not r.no_measure_no_home and r.stun_nodes]


def make_probe_plan(
    derp_map: DERPMap,
    *,
    have_v4: bool = True,
    have_v6: bool = False,
    last: Report | None = None,
) -> dict[str, list[Probe]]:
    """Tailscale's plan: keys ``region-<id>-v4``/``-v6``; each list is one probe set."""
    if last is None or not last.region_latency:
        return _initial_plan(derp_map, have_v4, have_v6)
    plan: dict[str, list[Probe]] = {}
    if not have_v4 and not have_v6:
        return plan
    had4 = bool(last.region_v4_latency)
    had6 = bool(last.region_v6_latency)
    had_both = have_v6 and had4 and had6
    regions = probed_regions(derp_map)
    regions = [r for r in regions if not r.avoid or r.region_id == last.preferred_derp]

    def sort_key(r: DERPRegion):
        if r.region_id == last.preferred_derp:
            return (0, 0.0)
        lat = last.region_latency.get(r.region_id)
        return (1, lat) if lat else (2, 0.0)

    regions.sort(key=sort_key)
    n = 0
    for reg in regions:
        if n == NUM_INCREMENTAL_REGIONS:
            break
        do4, do6 = have_v4, have_v6
        fastest_two = n < 2
        tries = 2 if fastest_two else 1
        if not fastest_two and had_both:
            do4, do6 = (True, False) if n % 2 == 0 else (False, True)
        if not fastest_two and not had6:
            do6 = False
        if reg.region_id == last.preferred_derp:
            tries = 4
        nodes = reg.stun_nodes
        p4: list[Probe] = []
        p6: list[Probe] = []
        prev = last.region_latency.get(reg.region_id, 0.0) * 1.2 or DEFAULT_ACTIVE_RETRANSMIT
        for attempt in range(tries):
            if attempt and not had6:
                do6 = False
            node = nodes[attempt % len(nodes)]
            delay = attempt * prev + (attempt * 0.05 if attempt > 1 else 0.0)
            if do4 and node_might4(node):
                p4.append(Probe(reg.region_id, node.name, 4, delay))
            if do6 and node_might6(node):
                p6.append(Probe(reg.region_id, node.name, 6, delay))
        if p4:
            plan[f"region-{reg.region_id}-v4"] = p4
        if p6:
            plan[f"region-{reg.region_id}-v6"] = p6
        if p4 or p6:
            n += 1
    return plan


def _initial_plan(derp_map: DERPMap, have_v4: bool, have_v6: bool) -> dict[str, list[Probe]]:
    plan: dict[str, list[Probe]] = {}
    for reg in probed_regions(derp_map):
        nodes = reg.stun_nodes
        p4, p6 = [], []
        for attempt, delay in enumerate(INITIAL_PROBE_DELAYS):
            node = nodes[attempt % len(nodes)]
            if have_v4 and node_might4(node):
                p4.append(Probe(reg.region_id, node.name, 4, delay))
            if have_v6 and node_might6(node):
                p6.append(Probe(reg.region_id, node.name, 6, delay))
        if p4:
            plan[f"region-{reg.region_id}-v4"] = p4
        if p6:
            plan[f"region-{reg.region_id}-v6"] = p6
    return plan


# --- results, history, home region (pure) ----------------------------------------------------


@dataclass(frozen=True)
class ProbeResult:
    """One finished probe. ``family`` is 4 or 6 for STUN, 0 for HTTP(S)."""

    region_id: int
    node: str
    family: int
    latency: float | None = None
    mapped: tuple[str, int] | None = None  # STUN only
    server: tuple[str, int] | None = None  # the STUN server's ip:port
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.latency is not None


class ReportHistory:
    """Region latencies of recent reports (time -> {region: seconds}), for hysteresis."""

    def __init__(self, max_age: float = HISTORY_MAX_AGE) -> None:
        self.max_age = max_age
        self.entries: list[tuple[float, dict[int, float]]] = []

    def add(self, now: float, region_latency: Mapping[int, float]) -> None:
        self.entries.append((now, dict(region_latency)))
        self.prune(now)

    def prune(self, now: float) -> None:
        self.entries = [(t, lat) for t, lat in self.entries if now - t <= self.max_age]

    def best_recent(self) -> dict[int, float]:
        best: dict[int, float] = {}
        for _, lat in self.entries:
            for rid, d in lat.items():
                if rid not in best or d < best[rid]:
                    best[rid] = d
        return best


def home_candidates(derp_map: DERPMap) -> set[int]:
    return {rid for rid, r in derp_map.regions.items() if r.derp_nodes and not r.no_measure_no_home}


def select_preferred_derp(
    derp_map: DERPMap,
    current_latency: Mapping[int, float],
    best_recent: Mapping[int, float],
    *,
    previous: int = 0,
    now: float = 0.0,
    report_start: float | None = None,
    derp_frame_times: Mapping[int, float] | None = None,
    force_preferred: int = 0,
) -> int:
    """The home region (0 when none), with Tailscale's hysteresis.

    ``best_recent`` is the minimum latency per region over the history (including this report);
    it is multiplied by ``HomeParams.RegionScore``. ``derp_frame_times`` is when a DERP frame last
    arrived from each region (liveness beyond probes).
    """
    frames = derp_frame_times or {}
    start = now if report_start is None else report_start
    candidates = home_candidates(derp_map)

    def heard_recently(rid: int, within: float) -> bool:
        t = frames.get(rid)
        return t is not None and (t >= start or now - t <= within)

    if force_preferred and force_preferred in derp_map.regions and (
        force_preferred in current_latency or heard_recently(force_preferred, PREFERRED_FRAME_RECENT)
    ):
        return force_preferred

    def score(rid: int) -> float:
        return best_recent.get(rid, current_latency.get(rid, math.inf)) * derp_map.region_score.get(rid, 1.0)

    measured = [rid for rid in current_latency if rid in candidates]
    measured = [rid for rid in measured
                if not derp_map.regions[rid].avoid or rid == previous]
    if not measured:
        if previous and heard_recently(previous, KEEP_HOME_NO_MEASURE):
            return previous
        return 0
    best = min(measured, key=lambda rid: (score(rid), rid))
    if previous and previous != best and previous in candidates:
        accessible = previous in current_latency or heard_recently(previous, PREFERRED_FRAME_RECENT)
        if accessible:
            old = score(previous)
            new = score(best)
            if math.isinf(old):
                return previous  # alive (frames) but unmeasured: do not move on no evidence
            if old - new < HYSTERESIS_ABSOLUTE or new > old * HYSTERESIS_RATIO:
                return previous
    return best


# --- the report (pure assembly) --------------------------------------------------------------


def _join(addr: tuple[str, int]) -> str:
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass
class Report:
    """Tailscale's ``netcheck.Report``; latencies in seconds, ``None`` for an unset opt.Bool."""

    udp: bool = False
    ipv6: bool = False
    ipv4: bool = False
    ipv6_can_send: bool = False
    ipv4_can_send: bool = False
    os_has_ipv6: bool = False
    icmpv4: bool = False
    mapping_varies_by_dest_ip: bool | None = None
    hair_pinning: bool | None = None
    upnp: bool | None = None
    pmp: bool | None = None
    pcp: bool | None = None
    preferred_derp: int = 0
    region_latency: dict[int, float] = field(default_factory=dict)
    region_v4_latency: dict[int, float] = field(default_factory=dict)
    region_v6_latency: dict[int, float] = field(default_factory=dict)
    global_v4: str = ""
    global_v6: str = ""
    captive_portal: bool | None = None
    # Not in Tailscale's JSON: what was done, for diagnostics.
    probes: list[ProbeResult] = field(default_factory=list)
    logs: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """Exactly the JSON of Go's ``netcheck.Report`` (durations in integer nanoseconds)."""

        def ns(m: dict[int, float]) -> dict[str, int]:
            return {str(k): round(v * 1e9) for k, v in sorted(m.items())}

        return {
            "UDP": self.udp,
            "IPv6": self.ipv6,
            "IPv4": self.ipv4,
            "IPv6CanSend": self.ipv6_can_send,
            "IPv4CanSend": self.ipv4_can_send,
            "OSHasIPv6": self.os_has_ipv6,
            "ICMPv4": self.icmpv4,
            "MappingVariesByDestIP": self.mapping_varies_by_dest_ip,
            "HairPinning": self.hair_pinning,
            "UPnP": self.upnp,
            "PMP": self.pmp,
            "PCP": self.pcp,
            "PreferredDERP": self.preferred_derp,
            "RegionLatency": ns(self.region_latency),
            "RegionV4Latency": ns(self.region_v4_latency),
            "RegionV6Latency": ns(self.region_v6_latency),
            "GlobalV4": self.global_v4,
            "GlobalV6": self.global_v6,
            "CaptivePortal": self.captive_portal,
        }


def assemble_report(
    derp_map: DERPMap,
    results: Iterable[ProbeResult],
    *,
    history: ReportHistory | None = None,
    now: float = 0.0,
    report_start: float | None = None,
    previous_preferred: int = 0,
    derp_frame_times: Mapping[int, float] | None = None,
    force_preferred: int = 0,
    os_has_ipv6: bool = False,
    ipv4_can_send: bool | None = None,
    ipv6_can_send: bool | None = None,
    captive_portal: bool | None = None,
) -> Report:
    """Fold probe results into a report and choose home; adds this report to ``history``."""
    results = list(results)
    r = Report(os_has_ipv6=os_has_ipv6, captive_portal=captive_portal, probes=results)

    def best(m: dict[int, float], rid: int, d: float) -> None:
        if rid not in m or d < m[rid]:
            m[rid] = d

    v4_by_server: dict[tuple[str, int], set[tuple[str, int]]] = {}
    fastest4: tuple[float, tuple[str, int]] | None = None
    fastest6: tuple[float, tuple[str, int]] | None = None
    for p in results:
        if p.family == 4 and p.error != "send failed":
            r.ipv4_can_send = True
        if p.family == 6 and p.error != "send failed":
            r.ipv6_can_send = True
        if p.latency is None:
            continue
        best(r.region_latency, p.region_id, p.latency)
        if p.family == 0:
            continue
        r.udp = True
        if p.family == 4:
            r.ipv4 = True
            best(r.region_v4_latency, p.region_id, p.latency)
            if p.mapped is not None:
                if p.server is not None:
                    v4_by_server.setdefault(p.server, set()).add(p.mapped)
                if fastest4 is None or p.latency < fastest4[0]:
                    fastest4 = (p.latency, p.mapped)
        else:
            r.ipv6 = True
            best(r.region_v6_latency, p.region_id, p.latency)
            if p.mapped is not None and (fastest6 is None or p.latency < fastest6[0]):
                fastest6 = (p.latency, p.mapped)
    if ipv4_can_send is not None:
        r.ipv4_can_send = ipv4_can_send
    if ipv6_can_send is not None:
        r.ipv6_can_send = ipv6_can_send
    if fastest4:
        r.global_v4 = _join(fastest4[1])
    if fastest6:
        r.global_v6 = _join(fastest6[1])
    # Hard NAT: two different STUN servers saw different ip:port for the same socket.
    if len(v4_by_server) >= 2:
        seen = set().union(*v4_by_server.values())
        r.mapping_varies_by_dest_ip = len(seen) > 1
    hist = history if history is not None else ReportHistory()
    hist.add(now, r.region_latency)
    r.preferred_derp = select_preferred_derp(
        derp_map, r.region_latency, hist.best_recent(),
        previous=previous_preferred, now=now, report_start=report_start,
        derp_frame_times=derp_frame_times, force_preferred=force_preferred,
    )
    return r


# --- Coder's JSON shapes: ClientNetcheckReport{derp, interfaces} -----------------------------

CODE_STUN_NO_NODES = "ESTUN01"
CODE_STUN_MAP_VARY_DEST = "ESTUN02"
CODE_INTERFACE_SMALL_MTU = "EIF01"
_SEVERITY_RANK = {"ok": 0, "warning": 1, "error": 2}


def _worse(a: str, b: str) -> str:
    return a if _SEVERITY_RANK[a] >= _SEVERITY_RANK[b] else b


def _ms_string(seconds: float) -> str:
    """Go's time.Duration.String() for the usual ranges (e.g. "1.234ms", "2.5s")."""
    ns = round(seconds * 1e9)
    if ns == 0:
        return "0s"
    if ns < 1000:
        return f"{ns}ns"
    if ns < 1_000_000:
        return f"{ns / 1e3:g}µs"
    if ns < 1_000_000_000:
        return f"{ns / 1e6:g}ms"
    return f"{ns / 1e9:g}s"


def derp_health_report(derp_map: DERPMap, report: Report, *, error: str | None = None) -> dict[str, Any]:
    """Coder's ``healthsdk.DERPHealthReport`` built from a netcheck report.

    Per node: STUN ``Enabled``/``CanSTUN``/``Error`` from our probes, and the latency-check round
    trip as ``round_trip_ping``. The DERP message exchange Coder also does per node needs the DERP
    client: ``can_exchange_messages`` stays false and is not counted against health here.
    """
    by_node: dict[str, list[ProbeResult]] = {}
    for p in report.probes:
        by_node.setdefault(p.node, []).append(p)
    regions: dict[str, Any] = {}
    overall = "ok"
    warnings: list[dict[str, str]] = []
    stun_total = stun_ok = 0
    for rid, region in sorted(derp_map.regions.items()):
        node_reports = []
        region_sev = "ok"
        unhealthy = 0
        for node in sorted(region.nodes, key=lambda n: n.name):
            probes = by_node.get(node.name, [])
            stun_probes = [p for p in probes if p.family in (4, 6)]
            http_ok = [p for p in probes if p.family == 0 and p.ok]
            enabled = node.effective_stun_port is not None and not region.no_measure_no_home
            can_stun = any(p.ok for p in stun_probes)
            stun_err = None
            if enabled:
                stun_total += 1
                if can_stun:
                    stun_ok += 1
                elif stun_probes:
                    stun_err = next((p.error for p in stun_probes if p.error), "no STUN answer")
            sev = "error" if stun_err and report.udp else "ok"
            rtt = min((p.latency for p in http_ok), default=None)
            if sev != "ok":
                unhealthy += 1
            node_reports.append({
                "healthy": sev != "error",
                "severity": sev,
                "warnings": [],
                **({"error": stun_err} if sev == "error" else {}),
                "node": node.to_json(),
                "node_info": {"TokenBucketBytesPerSecond": 0, "TokenBucketBytesBurst": 0},
                "can_exchange_messages": False,
                "round_trip_ping": _ms_string(rtt) if rtt is not None else "",
                "round_trip_ping_ms": int(rtt * 1000) if rtt is not None else 0,
                "uses_websocket": False,
                "client_logs": [],
                "client_errs": [],
                "stun": {"Enabled": enabled, "CanSTUN": can_stun, "Error": stun_err},
            })
        if len(region.nodes) == 1 and node_reports:
            region_sev = node_reports[0]["severity"]
        elif unhealthy == 1:
            region_sev = "warning"
        elif unhealthy > 1:
            region_sev = "error"
        overall = _worse(overall, region_sev)
        regions[str(rid)] = {
            "healthy": region_sev != "error",
            "severity": region_sev,
            "warnings": [],
            "region": region.to_json(),
            "node_reports": node_reports,
        }
    if report.mapping_varies_by_dest_ip:
        warnings.append({"code": CODE_STUN_MAP_VARY_DEST,
                         "message": "STUN returned different addresses; you may be behind a hard NAT."})
    if stun_total and not stun_ok:
        overall = _worse(overall, "warning")
        warnings.append({"code": CODE_STUN_NO_NODES, "message": "No STUN servers are available."})
    out: dict[str, Any] = {
        "severity": overall,
        "warnings": warnings,
        "dismissed": False,
        "healthy": overall != "error",
        "regions": regions,
        "netcheck": report.to_json(),
        "netcheck_logs": list(report.logs),
    }
    if error:
        out["netcheck_err"] = error
    return out


@dataclass(frozen=True)
class Interface:
    name: str
    mtu: int
    addresses: tuple[str, ...]  # CIDR strings, e.g. "192.0.2.5/24"
    up: bool = True


def interfaces_report(interfaces: Iterable[Interface]) -> dict[str, Any]:
    """Coder's ``healthsdk.InterfacesReport``: up interfaces with a non-link-local address, and a
    warning for each MTU below 1378 (direct connections hang rather than slow down, PR #17468)."""
    sev = "ok"
    warnings = []
    listed = []
    for iface in sorted(interfaces, key=lambda i: i.name):
        if not iface.up or not iface.addresses:
            continue
        usable = False
        for a in iface.addresses:
            ip = ipaddress.ip_interface(a).ip
            if not ip.is_link_local:
                usable = True
        if not usable:
            continue
        listed.append({"name": iface.name, "mtu": iface.mtu, "addresses": list(iface.addresses)})
        if 0 < iface.mtu < SAFE_MTU:
            sev = "warning"
            warnings.append({
                "code": CODE_INTERFACE_SMALL_MTU,
                "message": f"Network interface {iface.name} has MTU {iface.mtu} (less than "
                           f"{SAFE_MTU}), which may degrade the quality of direct connections "
                           "or render them unusable.",
            })
    return {"severity": sev, "warnings": warnings, "dismissed": False, "interfaces": listed}


def client_netcheck_report(derp: dict[str, Any], interfaces: dict[str, Any]) -> dict[str, Any]:
    """Coder's ``ClientNetcheckReport`` (what ``coder netcheck`` prints)."""
    return {"derp": derp, "interfaces": interfaces}


# --- reading the host's interfaces (small blocking reads of /sys and /proc) -------------------

_SIOCGIFADDR = 0x8915
_SIOCGIFNETMASK = 0x891B
_IFF_UP = 0x1


def gather_interfaces(sys_class_net: str = "/sys/class/net",
                      if_inet6: str = "/proc/net/if_inet6") -> list[Interface]:
    """Linux: names, MTU and flags from /sys, IPv4 by ioctl, IPv6 from /proc/net/if_inet6."""
    v6: dict[str, list[str]] = {}
    try:
        with open(if_inet6) as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 6:
                    addr = ipaddress.IPv6Address(bytes.fromhex(parts[0]))
                    v6.setdefault(parts[5], []).append(f"{addr}/{int(parts[2], 16)}")
    except OSError:
        pass
    out = []
    try:
        names = sorted(os.listdir(sys_class_net))
    except OSError:
        names = [n for _, n in socket.if_nameindex()]
    for name in names:
        try:
            with open(os.path.join(sys_class_net, name, "mtu")) as f:
                mtu = int(f.read().strip())
            with open(os.path.join(sys_class_net, name, "flags")) as f:
                up = bool(int(f.read().strip(), 16) & _IFF_UP)
        except (OSError, ValueError):
            continue
        addrs = []
        v4 = _ipv4_of(name)
        if v4:
            addrs.append(v4)
        addrs.extend(v6.get(name, []))
        out.append(Interface(name, mtu, tuple(addrs), up))
    return out


def _ipv4_of(name: str) -> str | None:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        req = struct.pack("256s", name.encode()[:15])
        addr = socket.inet_ntoa(fcntl.ioctl(s.fileno(), _SIOCGIFADDR, req)[20:24])
        mask = socket.inet_ntoa(fcntl.ioctl(s.fileno(), _SIOCGIFNETMASK, req)[20:24])
        prefix = ipaddress.IPv4Network(f"0.0.0.0/{mask}").prefixlen
        return f"{addr}/{prefix}"
    except OSError:
        return None
    finally:
        s.close()


def os_has_ipv6() -> bool:
    """Can we bind a UDP socket to [::1]? (Tailscale's OSHasIPv6.)"""
    try:
        s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    except OSError:
        return False
    try:
        s.bind(("::1", 0))
        return True
    except OSError:
        return False
    finally:
        s.close()


def have_global_v6() -> bool:
    """Is there a global-unicast IPv6 address on an up interface (worth sending v6 probes)?"""
    for iface in gather_interfaces():
        if not iface.up:
            continue
        for a in iface.addresses:
            ip = ipaddress.ip_interface(a).ip
            if ip.version == 6 and ip.is_global:
                return True
    return False


# --- the driver ------------------------------------------------------------------------------

HTTPGet = Callable[..., "defer.Deferred[tuple[int, dict[str, str]]]"]
Resolve = Callable[[str, int], "defer.Deferred[str | None]"]


def latency_check_url(node: DERPNode) -> str:
    return node.derp_url() + "/latency-check"


def captive_portal_url(node: DERPNode) -> str | None:
    """``/generate_204`` on port 80 for ``CanPort80`` nodes (by IPv4 when known, as Tailscale
    does, since DNS is unreliable behind portals), or on the node's own HTTP URL for ForceHTTP."""
    if node.can_port80:
        host = node.ipv4 if node_might4(node) and node.ipv4 else node.host_name
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}/generate_204"
    if node.force_http:
        return node.derp_url()[: -len("/derp")] + "/generate_204"
    return None


class Netchecker:
    """Runs netcheck reports; keeps the history that home-region hysteresis needs.

    ``stun`` is a :class:`coderstack.stun.client.STUNClient` (or anything with its ``query``),
    normally fed by the tunnel's socket; ``http_get(url, headers=, timeout=, insecure=,
    follow_redirects=)`` returns a Deferred of ``(status, lower-case headers)``;
    ``resolve(host, family)`` a Deferred of an IP literal or None.
    """

    def __init__(
        self,
        clock: IReactorTime,
        stun,
        http_get: HTTPGet,
        *,
        resolve: Resolve | None = None,
        have_v4: bool = True,
        have_v6: bool | None = None,
        os_has_ipv6: bool | None = None,
        enough_regions: int = ENOUGH_REGIONS,
        captive_portal_check: bool = True,
        derp_frame_times: Callable[[], Mapping[int, float]] | None = None,
        stun_probe_timeout: float = STUN_PROBE_TIMEOUT,
        report_timeout: float = REPORT_TIMEOUT,
    ) -> None:
        self.clock = clock
        self.stun_probe_timeout = stun_probe_timeout
        self.report_timeout = report_timeout
        self.stun = stun
        self.http_get = http_get
        self.resolve = resolve or _resolve_in_thread
        self.have_v4 = have_v4
        self._have_v6 = have_v6
        self._os_has_ipv6 = os_has_ipv6
        self.enough_regions = enough_regions
        self.captive_portal_check = captive_portal_check
        self.derp_frame_times = derp_frame_times
        self.history = ReportHistory()
        self.last: Report | None = None
        self.last_full: float | None = None
        self.force_preferred = 0
        self._running = False

    def get_report(self, derp_map: DERPMap, *, full: bool | None = None) -> defer.Deferred[Report]:
        """One report (full: every region; else Tailscale's incremental plan, decided like
        Tailscale when ``full`` is None). Not re-entrant: one report at a time."""
        if self._running:
            return defer.fail(RuntimeError("a netcheck report is already running"))
        self._running = True
        d = defer.ensureDeferred(self._get_report(derp_map, full))

        def done(result):
            self._running = False
            return result

        return d.addBoth(done)

    async def _get_report(self, derp_map: DERPMap, full: bool | None) -> Report:
        clock = self.clock
        start = clock.seconds()
        if full is None:
            full = (self.last is None or self.last_full is None
                    or start - self.last_full > FULL_REPORT_INTERVAL
                    or (not self.last.udp and self.last.captive_portal is True))
        if full:
            self.last_full = start
        have_v6 = self._have_v6 if self._have_v6 is not None else have_global_v6()
        os6 = self._os_has_ipv6 if self._os_has_ipv6 is not None else os_has_ipv6()
        plan = make_probe_plan(derp_map, have_v4=self.have_v4, have_v6=have_v6,
                               last=None if full else self.last)
        logs: list[str] = []
        if not plan:
            logs.append("empty probe plan; do we have STUN regions?")
        run = _ReportRun(self, derp_map, start, logs)
        deadline = start + self.report_timeout

        # Relay regions without any STUN node: HTTP(S) latency from the start.
        no_stun = [r for _, r in sorted(derp_map.regions.items())
                   if r.derp_nodes and not r.stun_nodes and not r.no_measure_no_home]
        http_early = [defer.ensureDeferred(run.http_latency(r, deadline)) for r in no_stun]

        captive: defer.Deferred | None = None
        captive_call = None
        if full and self.captive_portal_check:

            def start_captive() -> None:
                nonlocal captive
                if run.udp_seen:
                    return
                captive = defer.ensureDeferred(run.check_captive_portal())

            captive_call = clock.callLater(CAPTIVE_PORTAL_DELAY, start_captive)

        await run.run_stun(plan, min(self.stun_probe_timeout, deadline - start), full)
        if captive_call is not None and captive_call.active():
            captive_call.cancel()

        need = [r for _, r in sorted(derp_map.regions.items())
                if r.derp_nodes and r.stun_nodes and not r.no_measure_no_home
                and r.region_id not in run.regions_with_latency()]
        if need and not run.udp_seen:
            logs.append("UDP is blocked, trying HTTPS")
        http_late = [defer.ensureDeferred(run.http_latency(r, deadline)) for r in need]
        waits = http_early + http_late + ([captive] if captive is not None else [])
        if waits:
            await _with_deadline(clock, defer.DeferredList(waits, consumeErrors=True),
                                 deadline - clock.seconds())
        run.stop()

        now = clock.seconds()
        frames = dict(self.derp_frame_times()) if self.derp_frame_times else {}
        report = assemble_report(
            derp_map, run.results, history=self.history, now=now, report_start=start,
            previous_preferred=self.last.preferred_derp if self.last else 0,
            derp_frame_times=frames, force_preferred=self.force_preferred,
            os_has_ipv6=os6,
            captive_portal=run.captive_portal,
        )
        report.logs = logs
        self.last = report
        return report


async def _with_deadline(clock: IReactorTime, d: defer.Deferred, timeout: float):
    if timeout <= 0:
        d.cancel()
        return None
    timer = clock.callLater(timeout, d.cancel)
    try:
        return await d
    except defer.CancelledError:
        return None
    finally:
        if timer.active():
            timer.cancel()


def _resolve_in_thread(host: str, family: int) -> defer.Deferred[str | None]:
    from twisted.internet import threads

    fam = socket.AF_INET6 if family == 6 else socket.AF_INET

    def lookup() -> str | None:
        try:
            infos = socket.getaddrinfo(host, None, fam, socket.SOCK_DGRAM)
        except OSError:
            return None
        return infos[0][4][0] if infos else None

    return threads.deferToThread(lookup)


class _ReportRun:
    """State of one report in progress."""

    def __init__(self, owner: Netchecker, derp_map: DERPMap, start: float, logs: list[str]) -> None:
        self.owner = owner
        self.derp_map = derp_map
        self.start = start
        self.logs = logs
        self.results: list[ProbeResult] = []
        self.udp_seen = False
        self.captive_portal: bool | None = None
        self._pending: list[defer.Deferred] = []
        self._timers: list = []
        self._nodes = {n.name: n for r in derp_map.regions.values() for n in r.nodes}
        self._resolved: dict[tuple[str, int], str | None] = {}
        self._waiters: dict[tuple[str, int], list[defer.Deferred]] = {}

    def regions_with_latency(self) -> set[int]:
        return {p.region_id for p in self.results if p.ok}

    def stop(self) -> None:
        for t in self._timers:
            if t.active():
                t.cancel()
        for d in list(self._pending):
            d.cancel()

    def _address(self, node: DERPNode, family: int) -> defer.Deferred[str | None]:
        """The node's IP for ``family`` (4/6): a literal from the map, else DNS (once per run)."""
        key = (node.name, family)
        if key in self._resolved:
            return defer.succeed(self._resolved[key])
        d: defer.Deferred = defer.Deferred()
        if key in self._waiters:
            self._waiters[key].append(d)
            return d
        self._waiters[key] = [d]

        def done(value: str | None) -> None:
            self._resolved[key] = value
            for w in self._waiters.pop(key):
                w.callback(value)

        literal = node.stun_test_ip or (node.ipv4 if family == 4 else node.ipv6) or None
        if literal is None:
            try:
                ipaddress.ip_address(node.host_name)
                literal = node.host_name
            except ValueError:
                pass
        if literal is not None:
            try:
                ok = ipaddress.ip_address(literal).version == family
            except ValueError:
                ok = False  # "none" disables the family
            done(literal if ok else None)
        else:
            self.owner.resolve(node.host_name, family).addCallbacks(done, lambda _f: done(None))
        return d

    async def run_stun(self, plan: dict[str, list[Probe]], timeout: float, full: bool = True) -> None:
        """Run the probe plan; returns at the STUN deadline, when every set is done, or when
        enough regions answered (plus the slowest latency, doubled)."""
        clock = self.owner.clock
        if not plan:
            return
        finished = defer.Deferred()
        answered: dict[str, bool] = {k: False for k in plan}
        unfired: dict[str, list[Probe]] = {k: list(probes) for k, probes in plan.items()}
        inflight: dict[str, list[Probe]] = {k: [] for k in plan}
        enough_timer = []

        def set_finished(key: str) -> bool:
            if answered[key]:
                # A set stops at its first answer unless a probe still to come (or under way)
                # would tell whether the mapping varies by destination.
                return not any(self._would_help(p) for p in unfired[key] + inflight[key])
            return not unfired[key] and not inflight[key]

        def maybe_finish() -> None:
            if not finished.called and all(set_finished(k) for k in plan):
                finished.callback(None)

        def on_region_latency() -> None:
            lat = {}
            for p in self.results:
                if p.ok and p.family in (4, 6):
                    lat[p.region_id] = min(p.latency, lat.get(p.region_id, math.inf))
            if len(lat) == self.owner.enough_regions and not enough_timer:
                wait = max(lat.values()) * (2 if full else 1)  # a full report waits longer
                enough_timer.append(clock.callLater(
                    wait, lambda: finished.callback(None) if not finished.called else None))
                self._timers.append(enough_timer[0])

        for key, probes in plan.items():
            for probe in probes:
                def fire(probe=probe, key=key) -> None:
                    unfired[key].remove(probe)
                    if finished.called or (answered[key] and not self._would_help(probe)):
                        maybe_finish()
                        return
                    inflight[key].append(probe)
                    d = defer.ensureDeferred(self._stun_probe(probe, timeout - (clock.seconds() - self.start)))

                    def got(ok: bool, key=key, probe=probe) -> None:
                        inflight[key].remove(probe)
                        if ok and not answered[key]:
                            answered[key] = True
                            on_region_latency()
                        maybe_finish()

                    d.addCallback(got)
                    d.addErrback(lambda f, got=got: got(False))

                self._timers.append(clock.callLater(probe.delay, fire))

        await _with_deadline(clock, finished, timeout)

    def _would_help(self, probe: Probe) -> bool:
        """Would this probe, in a set that already answered, tell us something? Only whether
        the IPv4 mapping varies by destination: that needs answers from two STUN servers, so a
        probe to another one helps until two answered (Tailscale probes on while the question is
        open too). The embedded region's second STUN port makes this work with one server."""
        if probe.family != 4:
            return False
        answered = {p.node for p in self.results if p.ok and p.family == 4}
        return len(answered) < 2 and probe.node not in answered

    async def _stun_probe(self, probe: Probe, timeout: float) -> bool:
        node = self._nodes[probe.node]
        port = node.effective_stun_port
        if port is None or timeout <= 0:
            return False
        ip = await self._address(node, probe.family)
        if ip is None:
            self.results.append(ProbeResult(probe.region_id, node.name, probe.family,
                                            error="no address"))
            return False
        d = self.owner.stun.query((ip, port), max_transmissions=1, timeout=timeout)
        self._pending.append(d)
        try:
            res = await d
        except OSError as e:
            self.results.append(ProbeResult(probe.region_id, node.name, probe.family,
                                            server=(ip, port), error="send failed"))
            self.logs.append(f"STUN to {_join((ip, port))}: {e}")
            return False
        except Exception as e:  # timeout, error response, cancelled
            self.results.append(ProbeResult(probe.region_id, node.name, probe.family,
                                            server=(ip, port), error=type(e).__name__))
            return False
        finally:
            if d in self._pending:
                self._pending.remove(d)
        self.udp_seen = True
        self.results.append(ProbeResult(probe.region_id, node.name, probe.family,
                                        latency=res.rtt, mapped=res.mapped, server=(ip, port)))
        return True

    async def http_latency(self, region: DERPRegion, deadline: float) -> None:
        """Two GETs of ``/derp/latency-check`` on one connection; the second one's time is the
        latency (the first pays for TCP and TLS set-up)."""
        clock = self.owner.clock
        node = region.derp_nodes[0]
        url = latency_check_url(node)
        best = None
        err = None
        for _ in range(2):
            remaining = deadline - clock.seconds()
            if remaining <= 0:
                break
            t0 = clock.seconds()
            d = self.owner.http_get(url, headers={}, timeout=remaining,
                                    insecure=node.insecure_for_tests, follow_redirects=False)
            self._pending.append(d)
            try:
                status, _headers = await d
            except Exception as e:
                err = f"{type(e).__name__}: {e}"
                break
            finally:
                if d in self._pending:
                    self._pending.remove(d)
            if status != 200:
                err = f"HTTP {status}"
                break
            best = clock.seconds() - t0
        if best is not None:
            self.results.append(ProbeResult(region.region_id, node.name, 0, latency=best))
        else:
            self.results.append(ProbeResult(region.region_id, node.name, 0, error=err or "timeout"))
            self.logs.append(f"latency check {url}: {err or 'timeout'}")

    async def check_captive_portal(self) -> None:
        """GET /generate_204 with the challenge; a portal when no node gives 204 + the echo."""
        preferred = self.owner.last.preferred_derp if self.owner.last else 0
        order = sorted(self.derp_map.regions.values(),
                       key=lambda r: (r.region_id != preferred, r.region_id))
        urls = []
        for region in order:
            for node in region.derp_nodes:
                u = captive_portal_url(node)
                if u:
                    urls.append((node, u))
        if not urls:
            return
        urls = urls[:CAPTIVE_PORTAL_MAX_CONCURRENT]
        now = int(self.start)

        async def one(node: DERPNode, url: str) -> bool | None:
            challenge = "ts_" + node.host_name
            d = self.owner.http_get(f"{url}?t={now}", headers={"X-Tailscale-Challenge": challenge},
                                    timeout=CAPTIVE_PORTAL_TIMEOUT, insecure=False,
                                    follow_redirects=False)
            self._pending.append(d)
            try:
                status, headers = await d
            except Exception:
                return None  # unreachable is not evidence of a portal
            finally:
                if d in self._pending:
                    self._pending.remove(d)
            return not (status == 204 and headers.get("x-tailscale-response") == f"response {challenge}")

        results = await defer.DeferredList(
            [defer.ensureDeferred(one(n, u)) for n, u in urls], consumeErrors=True)
        verdicts = [v for ok, v in results if ok and v is not None]
        if verdicts:
            # One clean answer is enough to say there is no portal.
            self.captive_portal = all(verdicts)


# --- standalone plumbing: treq for HTTP(S), a private STUN socket ------------------------------


class _InsecureTLSPolicy:
    """``InsecureForTests`` nodes: TLS without certificate verification."""

    def creatorForNetloc(self, hostname: bytes, port: int):
        from twisted.internet.ssl import CertificateOptions

        return CertificateOptions(verify=False)


class TreqHTTP:
    """``http_get`` for :class:`Netchecker` on treq with one persistent pool (so the second
    latency-check request reuses the first one's connection)."""

    def __init__(self, reactor) -> None:
        from twisted.web.client import Agent, HTTPConnectionPool
        from twisted.web.iweb import IPolicyForHTTPS
        from zope.interface import directlyProvides

        self.reactor = reactor
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool.retryAutomatically = False
        policy = _InsecureTLSPolicy()
        directlyProvides(policy, IPolicyForHTTPS)
        self._agent = Agent(reactor, pool=self.pool, connectTimeout=REPORT_TIMEOUT)
        self._insecure = Agent(reactor, contextFactory=policy, pool=self.pool,
                               connectTimeout=REPORT_TIMEOUT)

    def __call__(self, url: str, *, headers: Mapping[str, str], timeout: float,
                 insecure: bool = False, follow_redirects: bool = False):
        from treq.client import HTTPClient

        client = HTTPClient(self._insecure if insecure else self._agent)
        return defer.ensureDeferred(self._get(client, url, headers, timeout, follow_redirects))

    async def _get(self, client, url, headers, timeout, follow_redirects):
        resp = await client.get(url, headers=dict(headers), timeout=timeout,
                                allow_redirects=follow_redirects)
        await resp.content()  # drain, so the connection goes back to the pool
        hdrs = {k.decode().lower(): v[-1].decode("latin-1")
                for k, v in resp.headers.getAllRawHeaders()}
        return resp.code, hdrs

    def close(self) -> defer.Deferred:
        return self.pool.closeCachedConnections()


async def run_netcheck(reactor, derp_map: DERPMap, **netchecker_kw) -> Report:
    """One full report with a private STUN socket and treq; everything is closed afterwards."""
    from coderstack.stun.client import open_stun_client

    sock = open_stun_client(reactor)
    http = TreqHTTP(reactor)
    try:
        checker = Netchecker(reactor, sock.client, http, **netchecker_kw)
        return await checker.get_report(derp_map, full=True)
    finally:
        await sock.close()
        await http.close()
