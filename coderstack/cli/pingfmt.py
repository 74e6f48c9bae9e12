"""What ``coderstack ping`` prints, as pure functions (Coder's ``cli/ping.go`` and ``cliui/agent.go``).

Durations are printed the way Go's ``time.Duration.String`` does (``42ms``, ``1.203s``,
``5m1s``), because that is what Coder users read and scripts parse.

Inputs are plain dicts, filled from ``Conn.status()`` and the agent API:

* peer diagnostics (:func:`peer_diagnostics`)::

      {"preferred_derp": 999, "derp_region_names": {999: "Coder Embedded Relay"},
       "sent_node": True,
       "received_node": {"derp": "127.3.3.40:999", "endpoints": ["198.51.100.7:41641"]} | None,
       "last_handshake": <unix time> | None}

* connection diagnostics (:func:`conn_diagnostics`): our netcheck ``Report.to_json()`` for the
  client (``local_netinfo``), ``interfaces_report(...)`` for the client, and the agent's
  ``GET /api/v0/netcheck`` answer (``{"netinfo": Report JSON, "interfaces": ...}``).
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import dataclass
from typing import Any

RTT_LIMIT = 0.400   # seconds: Coder's documented minimum for a usable connection
LOSS_LIMIT = 0.005  # fraction


# --- Go's Duration.String --------------------------------------------------------------------


def _frac(value: int, unit: int) -> str:
    whole, rest = divmod(value, unit)
    if not rest:
        return str(whole)
    digits = str(rest).rjust(len(str(unit)) - 1, "0").rstrip("0")
    return f"{whole}.{digits}"


def go_duration_ns(ns: int) -> str:
    """Exactly Go's ``time.Duration(ns).String()``."""
    if ns == 0:
        return "0s"
    sign = "-" if ns < 0 else ""
    ns = abs(ns)
    if ns < 1_000:
        return f"{sign}{ns}ns"
    if ns < 1_000_000:
        return f"{sign}{_frac(ns, 1_000)}µs"
    if ns < 1_000_000_000:
        return f"{sign}{_frac(ns, 1_000_000)}ms"
    hours, rest = divmod(ns, 3_600_000_000_000)
    minutes, rest = divmod(rest, 60_000_000_000)
    out = f"{_frac(rest, 1_000_000_000)}s"
    if hours or minutes:
        out = f"{minutes}m" + out
    if hours:
        out = f"{hours}h" + out
    return sign + out


def _round_ns(ns: int, unit: int) -> int:
    """Go's Duration.Round: halfway values round away from zero."""
    q, r = divmod(abs(ns), unit)
    if r * 2 >= unit:
        q += 1
    return q * unit * (-1 if ns < 0 else 1)


def go_duration(seconds: float, round_to: float | None = None) -> str:
    ns = int(seconds * 1e9)
    if round_to is not None:
        ns = _round_ns(ns, int(round_to * 1e9))
    return go_duration_ns(ns)


# --- per-ping lines --------------------------------------------------------------------------


def pong_line(workspace: str, latency: float, p2p: bool, endpoint: str = "", derp_region: str = "unknown",
              timestamp: str = "") -> str:
    """``pong from WS p2p via IP:PORT in 3ms`` / ``pong from WS proxied via DERP(Name) in 42ms``."""
    via = f"p2p via {endpoint}" if p2p else f"proxied via DERP({derp_region})"
    prefix = f"[{timestamp}] " if timestamp else ""
    return f"{prefix}pong from {workspace} {via} in {go_duration(latency, 0.001)}"


def p2p_established_line(elapsed: float) -> str:
    return f"p2p connection established in {go_duration(elapsed, 0.001)}"


def timeout_line(workspace: str) -> str:
    return f"ping to {json.dumps(workspace, ensure_ascii=False)} timed out "  # trailing space: Coder's


def failed_line(workspace: str, error: str) -> str:
    return f"ping to {json.dumps(workspace, ensure_ascii=False)} failed {error}"


def is_private_endpoint(endpoint: str) -> bool:
    host = endpoint.rsplit(":", 1)[0].strip("[]")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    # Go's netip IsPrivate: RFC 1918 and fc00::/7 only.
    if ip.version == 4:
        return any(ip in ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"))
    return ip in ipaddress.ip_network("fc00::/7")


def hard_nat_reason(local_netinfo: dict[str, Any] | None, agent_netinfo: dict[str, Any] | None) -> str:
    """Which side's NAT maps per destination (netcheck's ``MappingVariesByDestIP``), as the
    reason a connection is relayed; "" when neither is known to."""
    here = (local_netinfo or {}).get("MappingVariesByDestIP") is True
    there = (agent_netinfo or {}).get("MappingVariesByDestIP") is True
    if here and there:
        return "both sides are behind hard NATs (their mappings vary by destination), so hole punching cannot work"
    if here:
        return ("this side is behind a hard NAT (its mapping varies by destination); a direct path needs "
                "the workspace's side to be reachable")
    if there:
        return ("the workspace's side is behind a hard NAT (its mapping varies by destination); a direct "
                "path needs this side to be reachable")
    return ""


def closing_lines(p2p: bool, endpoint: str, troubleshooting_url: str, relayed_why: str = "") -> str:
    """The verdict; a relayed one says why when the diagnostics know (:func:`hard_nat_reason`)."""
    if p2p:
        msg = "✔ You are connected directly (p2p)"
        if endpoint and is_private_endpoint(endpoint):
            msg += ", over a private network"
        return msg + "\n"
    why = f"   Why: {relayed_why}\n" if relayed_why else ""
    return ("❗ You are connected via a DERP relay, not directly (p2p)\n" + why +
            f"   {troubleshooting_url}#common-problems-with-direct-connections\n")


# --- diagnostics -----------------------------------------------------------------------------


def peer_diagnostics(d: dict[str, Any], now: float) -> str:
    names = {int(k): v for k, v in (d.get("derp_region_names") or {}).items()}
    out = []
    preferred = int(d.get("preferred_derp") or 0)
    if preferred > 0:
        out.append(f"✔ preferred DERP region: {preferred} ({names.get(preferred, 'unknown')})")
    else:
        out.append("✘ not connected to DERP")
    if d.get("sent_node"):
        out.append("✔ sent local data to Coder networking coordinator")
    else:
        out.append("✘ have not sent local data to Coder networking coordinator")
    node = d.get("received_node")
    if node is not None:
        derp, name = str(node.get("derp", "")), ""
        parts = derp.split(":")
        if len(parts) == 2:  # the magic address 127.3.3.40:<region>
            derp = parts[1]
            if derp.lstrip("-").isdigit():
                region = names.get(int(derp))
                name = f"({region})" if region is not None else "(unknown)"
        out.append("✔ received remote agent data from Coder networking coordinator")
        out.append(f"    preferred DERP region: {derp} {name}")
        out.append(f"    endpoints: {', '.join(node.get('endpoints') or [])}")
    else:
        out.append("✘ have not received remote agent data from Coder networking coordinator")
    handshake = d.get("last_handshake")
    if handshake:
        ago = max(0.0, now - handshake)
        symbol = "⚠" if ago > 300 else "✔"  # WireGuard re-handshakes every 2 min; 5 min is stale
        out.append(f"{symbol} Wireguard handshake {go_duration(ago, 1.0)} ago")
    else:
        out.append("✘ Wireguard is not connected")
    return "".join(line + "\n" for line in out)


@dataclass
class ConnDiags:
    troubleshooting_url: str
    ping_p2p: bool = False
    verbose: bool = False
    disable_direct: bool = False            # --disable-direct-connections here
    deployment_blocks_direct: bool = False  # connection info disable_direct_connections
    derp_map_has_stun: bool = True
    local_netinfo: dict[str, Any] | None = None     # netcheck Report.to_json()
    local_interfaces: dict[str, Any] | None = None  # interfaces_report()
    agent_netcheck: dict[str, Any] | None = None    # agent API {"netinfo", "interfaces"}
    client_ip_is_aws: bool = False
    agent_ip_is_aws: bool = False

    def split(self) -> tuple[list[str], list[str], list[str]]:
        url = self.troubleshooting_url
        general: list[str] = []
        client: list[str] = []
        agent: list[str] = []
        if self.agent_netcheck is not None:
            warnings = ((self.agent_netcheck.get("interfaces") or {}).get("warnings")) or []
            agent.extend(w["message"] for w in warnings)
            if warnings:
                agent[-1] += f"\n{url}#low-mtu"
        if self.local_interfaces is not None:
            warnings = self.local_interfaces.get("warnings") or []
            client.extend(w["message"] for w in warnings)
            if warnings:
                client[-1] += f"\n{url}#low-mtu"
        if self.ping_p2p and not self.verbose:
            return general, client, agent
        if self.disable_direct:
            general.append("❗ Direct connections are disabled locally, by `--disable-direct-connections` or "
                           "`CODER_DISABLE_DIRECT_CONNECTIONS`.\n   They may still be established over a private network.")
            if not self.verbose:
                return general, client, agent
        if self.deployment_blocks_direct:
            general.append(f"❗ Your Coder administrator has blocked direct connections\n   {url}#disabled-deployment-wide")
            if not self.verbose:
                return general, client, agent
        if not self.derp_map_has_stun:
            general.append(f"❗ The DERP map is not configured to use STUN\n   {url}#no-stun-servers")
        elif self.local_netinfo is not None and not self.local_netinfo.get("UDP"):
            client.append(f"Client could not connect to STUN over UDP\n   {url}#udp-blocked")
        if self.local_netinfo is not None and self.local_netinfo.get("MappingVariesByDestIP") is True:
            client.append("Client is potentially behind a hard NAT, as multiple endpoints were retrieved from "
                          f"different STUN servers\n  {url}#endpoint-dependent-nat-hard-nat")
        agent_ni = (self.agent_netcheck or {}).get("netinfo")
        if agent_ni is not None:
            if agent_ni.get("MappingVariesByDestIP") is True:
                agent.append("Agent is potentially behind a hard NAT, as multiple endpoints were retrieved from "
                             f"different STUN servers\n   {url}#endpoint-dependent-nat-hard-nat")
            if not agent_ni.get("UDP"):
                agent.append(f"Agent could not connect to STUN over UDP\n   {url}#udp-blocked")
        if self.client_ip_is_aws:
            client.append(f"Client IP address is within an AWS range (AWS uses hard NAT)\n   {url}#endpoint-dependent-nat-hard-nat")
        if self.agent_ip_is_aws:
            agent.append(f"Agent IP address is within an AWS range (AWS uses hard NAT)\n   {url}#endpoint-dependent-nat-hard-nat")
        return general, client, agent

    def render(self) -> str:
        general, client, agent = self.split()
        out = "\n"
        out += "".join(m + "\n" for m in general)
        if general:
            out += "\n"
        if client:
            out += "Possible client-side issues with direct connection:\n\n"
            out += "".join(f" - {m}\n\n" for m in client)
        if agent:
            out += "Possible agent-side issues with direct connections:\n\n"
            out += "".join(f" - {m}\n\n" for m in agent)
        return out


def conn_diagnostics(**kw: Any) -> str:
    return ConnDiags(**kw).render()


# --- summary ---------------------------------------------------------------------------------


class PingSummary:
    """Totals with Welford's running mean/M2; variance is the sample variance (n - 1)."""

    def __init__(self, workspace: str):
        self.workspace = workspace
        self.total = 0
        self.successful = 0
        self.min: float | None = None
        self.max: float | None = None
        self._sum = 0.0
        self._mean = 0.0
        self._m2 = 0.0

    def add(self, latency: float | None) -> None:
        """One attempt: its latency in seconds, or None when it failed or timed out."""
        self.total += 1
        if latency is None:
            return
        self.successful += 1
        self.min = latency if self.min is None or latency < self.min else self.min
        self.max = latency if self.max is None or latency > self.max else self.max
        self._sum += latency
        delta = latency - self._mean
        self._mean += delta / self.successful
        self._m2 += delta * (latency - self._mean)

    @property
    def avg(self) -> float | None:
        return self._sum / self.successful if self.successful else None

    @property
    def variance(self) -> float | None:
        """In seconds² — shown, as Coder does, as if it were a duration in seconds."""
        return self._m2 / (self.successful - 1) if self.successful > 1 else None

    @property
    def loss(self) -> float:
        return 1 - self.successful / self.total if self.total else 0.0

    @staticmethod
    def _ns(v: float | None) -> int | None:
        return None if v is None else int(v * 1e9)  # Go converts by truncation

    def table(self) -> str:
        """The dashed line, then the table (both for stdout)."""
        cells = [self.workspace, str(self.total), str(self.successful)]
        cells += ["" if v is None else go_duration_ns(v) for v in
                  (self._ns(self.min), self._ns(self.avg), self._ns(self.max), self._ns(self.variance))]
        head = ["WORKSPACE", "TOTAL", "SUCCESSFUL", "MIN", "AVG", "MAX", "VARIANCE"]
        text = render_table(head, [cells])
        width = len(text.split("\n")[0])
        return "-" * width + "\n" + text

    def json_summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"total": self.total, "successful": self.successful}
        for key, v in (("min_ms", self.min), ("avg_ms", self.avg), ("max_ms", self.max),
                       ("variance_ms", self.variance)):
            ns = self._ns(v)
            if ns is not None:
                out[key] = ns / 1e6
        return out


def render_table(head: list[str], rows: list[list[str]]) -> str:
    """Coder's CLI table: upper-case header, columns padded with two spaces, no borders."""
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = []
    for r in [head, *rows]:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    return "\n".join(lines) + "\n"


def pong_json(sequence: int, time_rfc3339: str, latency: float | None = None, direct: bool | None = None,
              derp_region: str = "", error: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {"sequence": sequence, "time": time_rfc3339}
    if latency is not None:
        out["latency_ms"] = latency * 1000.0
    if direct is not None:
        out["direct"] = direct
    if derp_region:
        out["derp_region"] = derp_region
    if error:
        out["error"] = error
    return out


def ping_json(workspace: str, pongs: list[dict[str, Any]], summary: PingSummary) -> str:
    doc = {"workspace": workspace, "pongs": pongs or None, "summary": summary.json_summary()}
    return go_json(doc)


def go_json(doc: Any) -> str:
    """Indented JSON as Go's encoder writes it (integral floats without ``.0``, trailing newline)."""
    def fix(v: Any) -> Any:
        if isinstance(v, float) and v.is_integer() and abs(v) < 1e21:
            return int(v)
        if isinstance(v, dict):
            return {k: fix(x) for k, x in v.items()}
        if isinstance(v, list):
            return [fix(x) for x in v]
        return v
    return json.dumps(fix(doc), indent=2, ensure_ascii=False) + "\n"


def quality_warnings(summary: PingSummary) -> list[str]:
    """Coder's documented minimums: under 400 ms round trip and under 0.5% random loss."""
    out = []
    avg = summary.avg
    if avg is not None and avg > RTT_LIMIT:
        out.append(f"❗ Average round-trip time {go_duration(avg, 0.001)} is above the 400ms "
                   "that a good connection to a workspace needs")
    if summary.total and summary.loss > LOSS_LIMIT:
        lost = summary.total - summary.successful
        out.append(f"❗ {lost} of {summary.total} pings were lost ({summary.loss * 100:.1f}%), "
                   "above the 0.5% that a good connection to a workspace tolerates")
    return out


_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_go_duration(text: str) -> float:
    """Go's ``time.ParseDuration`` (``5s``, ``500ms``, ``1m30s``, ``0``) -> seconds; ValueError if bad."""
    import re

    s = text.strip()
    if s in ("0", "+0", "-0"):
        return 0.0
    sign = -1.0 if s.startswith("-") else 1.0
    s = s.lstrip("+-")
    parts = re.findall(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)", s)
    if not s or "".join(a + b for a, b in parts) != s:
        raise ValueError(f'time: invalid duration "{text}"')
    return sign * sum(float(a) * _UNITS[b] for a, b in parts)
