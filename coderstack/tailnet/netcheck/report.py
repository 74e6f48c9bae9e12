"""The netcheck report in Tailscale's shape, and its assembly from probe results (pure).

JSON (:meth:`Report.to_json`), exactly what Go's ``netcheck.Report`` marshals to; Coder embeds
it as ``netcheck`` in its DERP health report, and agents serve it as ``netinfo``::

    {"UDP": bool, "IPv6": bool, "IPv4": bool, "IPv6CanSend": bool, "IPv4CanSend": bool,
     "OSHasIPv6": bool, "ICMPv4": bool,
     "MappingVariesByDestIP": bool|null, "HairPinning": bool|null,     (null: not measured)
     "UPnP": bool|null, "PMP": bool|null, "PCP": bool|null,
     "PreferredDERP": int,                                             (0: none)
     "RegionLatency": {"<region id>": nanoseconds (int), ...},         (best of any method)
     "RegionV4Latency": {...}, "RegionV6Latency": {...},               (STUN only)
     "GlobalV4": "ip:port", "GlobalV6": "[ip]:port",                   ("" when unknown)
     "CaptivePortal": bool|null}

``MappingVariesByDestIP`` is true when two STUN servers saw different ip:port for the same
socket (a hard NAT: hole punching is unlikely); ``GlobalV4``/``GlobalV6`` are the mappings of
the fastest answers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from coderstack.derpmap import DERPMap
from coderstack.tailnet.netcheck.home import ReportHistory, select_preferred_derp


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


def join_host_port(addr: tuple[str, int]) -> str:
    """``host:port``, brackets around an IPv6 host."""
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
        r.global_v4 = join_host_port(fastest4[1])
    if fastest6:
        r.global_v6 = join_host_port(fastest6[1])
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
