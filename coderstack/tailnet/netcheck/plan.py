"""The probe plan: which STUN nodes to ask, over which family, when; and the HTTP(S) URLs of the
latency and captive-portal checks. Pure: a DERP map (and the last report) in, probes out.

A full report probes every region that has STUN nodes and is not ``NoMeasureNoHome``: three
probes per family at 0, 100 and 200 ms, rotating through the region's STUN nodes. An
incremental one (Tailscale's plan) probes three regions, home first and then by last latency:
home four times, the others of the first two twice, the third once (on one family, alternating,
when both worked last time); attempts are spaced by 1.2x the region's last latency. Plan keys are
``region-<id>-v4`` / ``region-<id>-v6``; each list is one probe set.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import TYPE_CHECKING

from coderstack.derpmap import DERPMap, DERPNode, DERPRegion

if TYPE_CHECKING:
    from coderstack.tailnet.netcheck.report import Report

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
    preferred = last.preferred_derp
    latency = last.region_latency
    regions = probed_regions(derp_map)
    regions = [r for r in regions if not r.avoid or r.region_id == preferred]

    def sort_key(r: DERPRegion) -> tuple[int, float]:
        if r.region_id == preferred:
            return (0, 0.0)
        lat = latency.get(r.region_id)
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
        if reg.region_id == preferred:
            tries = 4
        nodes = reg.stun_nodes
        p4: list[Probe] = []
        p6: list[Probe] = []
        prev = latency.get(reg.region_id, 0.0) * 1.2 or DEFAULT_ACTIVE_RETRANSMIT
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
        p4: list[Probe] = []
        p6: list[Probe] = []
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
