"""Coder's health-report JSON, built from a netcheck report and the host's interfaces (pure).

``coder netcheck`` prints a ``ClientNetcheckReport``; agents serve the interfaces part too::

    {"derp": DERPHealthReport, "interfaces": InterfacesReport}

    DERPHealthReport = {"severity": "ok"|"warning"|"error", "healthy": bool, "dismissed": false,
        "warnings": [{"code": "ESTUN01"|"ESTUN02", "message": str}],
        "regions": {"<region id>": {"severity", "healthy", "warnings", "region": <DERP map region>,
            "node_reports": [{"severity", "healthy", "warnings", "error"?, "node": <DERP map node>,
                "node_info", "can_exchange_messages", "round_trip_ping": Go duration string,
                "round_trip_ping_ms": int, "uses_websocket", "client_logs", "client_errs",
                "stun": {"Enabled": bool, "CanSTUN": bool, "Error": str|null}}]}},
        "netcheck": <netcheck Report JSON>, "netcheck_logs": [str], "netcheck_err"?: str}

    InterfacesReport = {"severity", "dismissed": false, "warnings": [{"code": "EIF01", ...}],
        "interfaces": [{"name": str, "mtu": int, "addresses": ["ip/prefix", ...]}]}

A region with one node takes its node's severity; with more, one unhealthy node is a warning
and two an error.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from coderstack.derpmap import DERPMap
from coderstack.netinfo import Interface
from coderstack.tailnet.netcheck.report import ProbeResult, Report

SAFE_MTU = 1378  # gVisor 1280 + WireGuard 32 + UDP 8 + IP up to 60 (Coder's arithmetic)

CODE_STUN_NO_NODES = "ESTUN01"
CODE_STUN_MAP_VARY_DEST = "ESTUN02"
CODE_INTERFACE_SMALL_MTU = "EIF01"
_SEVERITY_RANK = {"ok": 0, "warning": 1, "error": 2}


def _worse(a: str, b: str) -> str:
    return a if _SEVERITY_RANK[a] >= _SEVERITY_RANK[b] else b


def go_duration(seconds: float) -> str:
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


@dataclass(frozen=True)
class RelayProbe:
    """A DERP client's login to one relay node and a Ping/Pong over it (``rtt`` in seconds)."""

    rtt: float | None
    websocket: bool
    error: str | None


def derp_health_report(derp_map: DERPMap, report: Report, *, error: str | None = None,
                       relay: Mapping[str, RelayProbe] | None = None) -> dict[str, Any]:
    """Coder's ``healthsdk.DERPHealthReport`` built from a netcheck report.

    Per node: STUN ``Enabled``/``CanSTUN``/``Error`` from our probes, and the latency-check round
    trip as ``round_trip_ping``. With ``relay`` (node name → a DERP client's probe, which the
    server runs), ``can_exchange_messages`` and ``round_trip_ping`` come from the DERP session
    itself and a node whose relay fails is an error; without it ``can_exchange_messages`` stays
    false and is not counted against health.
    """
    by_node: dict[str, list[ProbeResult]] = {}
    for p in report.probes:
        by_node.setdefault(p.node, []).append(p)
    regions: dict[str, Any] = {}
    overall = "ok"
    warnings: list[dict[str, str]] = []
    stun_total = stun_ok = 0
    for rid, region in sorted(derp_map.regions.items()):
        node_reports: list[dict[str, Any]] = []
        region_sev = "ok"
        unhealthy = 0
        for node in sorted(region.nodes, key=lambda n: n.name):
            probes = by_node.get(node.name, [])
            stun_probes = [p for p in probes if p.family in (4, 6)]
            http_latencies = [p.latency for p in probes if p.family == 0 and p.latency is not None]
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
            rtt = min(http_latencies, default=None)
            probe = relay.get(node.name) if relay is not None and not node.stun_only else None
            relay_err = probe.error if probe is not None else None
            if probe is not None:
                rtt = probe.rtt
                if relay_err:
                    sev = "error"
            if sev != "ok":
                unhealthy += 1
            node_reports.append({
                "healthy": sev != "error",
                "severity": sev,
                "warnings": [],
                **({"error": relay_err or stun_err} if sev == "error" else {}),
                "node": node.to_json(),
                "node_info": {"TokenBucketBytesPerSecond": 0, "TokenBucketBytesBurst": 0},
                "can_exchange_messages": probe is not None and relay_err is None,
                "round_trip_ping": go_duration(rtt) if rtt is not None else "",
                "round_trip_ping_ms": int(rtt * 1000) if rtt is not None else 0,
                "uses_websocket": probe.websocket if probe is not None else False,
                "client_logs": [],
                "client_errs": [[relay_err]] if relay_err else [],
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
