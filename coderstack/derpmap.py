"""The DERP map: which relay regions exist, their nodes, and where STUN is served.

Wire format: Tailscale's ``tailcfg.DERPMap`` JSON, as served by
``/derpmap/default`` and read by ``--derp-config-path`` / ``--derp-config-url``::

    {"HomeParams": {"RegionScore": {"1": 1.5}},          # optional
     "Regions": {"999": {"RegionID": 999, "RegionCode": "coder",
                         "RegionName": "Coder Embedded Relay",
                         "EmbeddedRelay": true,            # Coder's fork; always written
                         "Nodes": [{"Name": "999b", "RegionID": 999,
                                    "HostName": "coder.example.com",
                                    "DERPPort": 443, "STUNPort": -1}]}},
     "omitDefaultRegions": true}                           # note the lowercase key

Node fields other than Name, RegionID and HostName are omitted when zero/false/empty.
STUNPort 0 means 3478 and -1 means "no STUN"; DERPPort 0 means 443.

This module is the model only: parsing, writing and small queries. Building the server's map
(embedded region, STUN-only regions, merging, validation) lives beside it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any


class DERPMapError(ValueError):
    """A DERP map that cannot be used; the message says which region or node and why."""


@dataclass(frozen=True)
class DERPNode:
    name: str
    region_id: int
    host_name: str
    cert_name: str = ""
    ipv4: str = ""
    ipv6: str = ""
    stun_port: int = 0
    stun_only: bool = False
    derp_port: int = 0
    insecure_for_tests: bool = False
    stun_test_ip: str = ""
    can_port80: bool = False
    force_http: bool = False

    # JSON key <-> attribute, in Tailscale's field order.
    _FIELDS = (
        ("Name", "name", str),
        ("RegionID", "region_id", int),
        ("HostName", "host_name", str),
        ("CertName", "cert_name", str),
        ("IPv4", "ipv4", str),
        ("IPv6", "ipv6", str),
        ("STUNPort", "stun_port", int),
        ("STUNOnly", "stun_only", bool),
        ("DERPPort", "derp_port", int),
        ("InsecureForTests", "insecure_for_tests", bool),
        ("STUNTestIP", "stun_test_ip", str),
        ("CanPort80", "can_port80", bool),
        ("ForceHTTP", "force_http", bool),
    )
    _ALWAYS = frozenset({"Name", "RegionID", "HostName"})

    @property
    def effective_stun_port(self) -> int | None:
        """The UDP port STUN is served on, or None when this node has no STUN."""
        if self.stun_port < 0:
            return None
        return self.stun_port or 3478

    @property
    def effective_derp_port(self) -> int:
        return self.derp_port or 443

    def derp_url(self) -> str:
        """The ``/derp`` URL of this node (http only when ForceHTTP is set)."""
        scheme = "http" if self.force_http else "https"
        host = self.host_name
        if ":" in host and not host.startswith("["):
            host = f"[{host}]"
        default = 80 if self.force_http else 443
        port = self.derp_port or default
        netloc = host if port == default else f"{host}:{port}"
        return f"{scheme}://{netloc}/derp"

    @classmethod
    def from_json(cls, obj: Any, where: str = "node") -> DERPNode:
        if not isinstance(obj, dict):
            raise DERPMapError(f"{where}: expected an object, got {type(obj).__name__}")
        kwargs: dict[str, Any] = {}
        for key, attr, typ in cls._FIELDS:
            if key not in obj or obj[key] is None:
                continue
            value = obj[key]
            if typ is int and (isinstance(value, bool) or not isinstance(value, int)):
                if isinstance(value, float) and value.is_integer():
                    value = int(value)
                else:
                    raise DERPMapError(f"{where}: {key} must be an integer, got {value!r}")
            elif typ is bool and not isinstance(value, bool):
                raise DERPMapError(f"{where}: {key} must be true or false, got {value!r}")
            elif typ is str and not isinstance(value, str):
                raise DERPMapError(f"{where}: {key} must be a string, got {value!r}")
            kwargs[attr] = value
        if not kwargs.get("host_name"):
            raise DERPMapError(f"{where}: HostName is required")
        kwargs.setdefault("name", "")
        kwargs.setdefault("region_id", 0)
        return cls(**kwargs)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, attr, _typ in self._FIELDS:
            value = getattr(self, attr)
            if key in self._ALWAYS or value:
                out[key] = value
        return out


@dataclass(frozen=True)
class DERPRegion:
    region_id: int
    region_code: str
    region_name: str
    nodes: tuple[DERPNode, ...] = ()
    latitude: float = 0.0
    longitude: float = 0.0
    avoid: bool = False
    no_measure_no_home: bool = False
    embedded_relay: bool = False

    @property
    def derp_nodes(self) -> tuple[DERPNode, ...]:
        """Nodes that relay (not STUN-only), in priority order."""
        return tuple(n for n in self.nodes if not n.stun_only)

    @property
    def stun_nodes(self) -> tuple[DERPNode, ...]:
        """Nodes that answer STUN, in priority order."""
        return tuple(n for n in self.nodes if n.effective_stun_port is not None)

    @classmethod
    def from_json(cls, obj: Any, key: str | None = None) -> DERPRegion:
        where = f"region {key}" if key is not None else "region"
        if not isinstance(obj, dict):
            raise DERPMapError(f"{where}: expected an object, got {type(obj).__name__}")
        rid = obj.get("RegionID")
        if isinstance(rid, float) and rid.is_integer():
            rid = int(rid)
        if isinstance(rid, bool) or not isinstance(rid, int) or rid <= 0 or rid > 2**53 - 1:
            raise DERPMapError(f"{where}: RegionID must be a positive integer, got {rid!r}")
        if key is not None and str(rid) != str(key):
            raise DERPMapError(f"{where}: RegionID {rid} does not match its key {key!r}")
        where = f"region {rid}"
        nodes_obj = obj.get("Nodes") or []
        if not isinstance(nodes_obj, list):
            raise DERPMapError(f"{where}: Nodes must be a list")
        nodes = []
        for i, n in enumerate(nodes_obj):
            node = DERPNode.from_json(n, f"{where} node {i}")
            if node.region_id == 0:
                # Tailscale silently breaks on this (issue 9526); we fill it in.
                node = _replace(node, region_id=rid)
            elif node.region_id != rid:
                raise DERPMapError(
                    f"{where} node {node.name or i}: RegionID {node.region_id} does not match"
                )
            nodes.append(node)
        for name, typ in (("RegionCode", str), ("RegionName", str)):
            if name in obj and obj[name] is not None and not isinstance(obj[name], typ):
                raise DERPMapError(f"{where}: {name} must be a string")
        for name in ("Avoid", "NoMeasureNoHome", "EmbeddedRelay"):
            if name in obj and obj[name] is not None and not isinstance(obj[name], bool):
                raise DERPMapError(f"{where}: {name} must be true or false")
        for name in ("Latitude", "Longitude"):
            v = obj.get(name)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise DERPMapError(f"{where}: {name} must be a number")
        return cls(
            region_id=rid,
            region_code=obj.get("RegionCode") or "",
            region_name=obj.get("RegionName") or "",
            nodes=tuple(nodes),
            latitude=float(obj.get("Latitude") or 0.0),
            longitude=float(obj.get("Longitude") or 0.0),
            avoid=bool(obj.get("Avoid")),
            no_measure_no_home=bool(obj.get("NoMeasureNoHome")),
            embedded_relay=bool(obj.get("EmbeddedRelay")),
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "RegionID": self.region_id,
            "RegionCode": self.region_code,
            "RegionName": self.region_name,
        }
        if self.latitude:
            out["Latitude"] = self.latitude
        if self.longitude:
            out["Longitude"] = self.longitude
        if self.avoid:
            out["Avoid"] = True
        if self.no_measure_no_home:
            out["NoMeasureNoHome"] = True
        out["EmbeddedRelay"] = self.embedded_relay
        out["Nodes"] = [n.to_json() for n in self.nodes]
        return out


@dataclass(frozen=True)
class DERPMap:
    regions: dict[int, DERPRegion] = field(default_factory=dict)
    omit_default_regions: bool = False
    region_score: dict[int, float] = field(default_factory=dict)

    def region(self, region_id: int) -> DERPRegion | None:
        return self.regions.get(region_id)

    def region_ids(self) -> list[int]:
        return sorted(self.regions)

    def has_relay(self) -> bool:
        return any(r.derp_nodes for r in self.regions.values())

    @classmethod
    def from_json(cls, obj: Any) -> DERPMap:
        if not isinstance(obj, dict):
            raise DERPMapError(f"DERP map: expected a JSON object, got {type(obj).__name__}")
        regions_obj = obj.get("Regions") or {}
        if not isinstance(regions_obj, dict):
            raise DERPMapError("DERP map: Regions must be an object keyed by region ID")
        regions: dict[int, DERPRegion] = {}
        for key, robj in regions_obj.items():
            if robj is None:  # a policy file may delete a region with null
                continue
            region = DERPRegion.from_json(robj, key)
            regions[region.region_id] = region
        scores: dict[int, float] = {}
        home = obj.get("HomeParams")
        if home is not None:
            if not isinstance(home, dict):
                raise DERPMapError("DERP map: HomeParams must be an object")
            rs = home.get("RegionScore") or {}
            if not isinstance(rs, dict):
                raise DERPMapError("DERP map: HomeParams.RegionScore must be an object")
            for k, v in rs.items():
                try:
                    rid = int(k)
                except ValueError:
                    raise DERPMapError(
                        f"DERP map: RegionScore key {k!r} is not a region ID"
                    ) from None
                if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                    raise DERPMapError(
                        f"DERP map: RegionScore for {rid} must be a non-negative number"
                    )
                scores[rid] = float(v)
        omit = obj.get("omitDefaultRegions", False)
        if not isinstance(omit, bool):
            raise DERPMapError("DERP map: omitDefaultRegions must be true or false")
        return cls(regions=regions, omit_default_regions=omit, region_score=scores)

    @classmethod
    def loads(cls, text: str | bytes) -> DERPMap:
        try:
            obj = json.loads(text)
        except (ValueError, UnicodeDecodeError) as e:
            raise DERPMapError(f"DERP map: not valid JSON: {e}") from None
        return cls.from_json(obj)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.region_score:
            out["HomeParams"] = {
                "RegionScore": {str(k): v for k, v in sorted(self.region_score.items())}
            }
        out["Regions"] = {str(rid): self.regions[rid].to_json() for rid in sorted(self.regions)}
        if self.omit_default_regions:
            out["omitDefaultRegions"] = True
        return out

    def dumps(self) -> str:
        return json.dumps(self.to_json(), sort_keys=False)


def _replace(node: DERPNode, **changes: Any) -> DERPNode:
    from dataclasses import replace

    return replace(node, **changes)


# --- building the server's map (Coder's rules) ---------------------------------------------------

EMBEDDED_REGION_ID = 999
EMBEDDED_REGION_CODE = "coder"
EMBEDDED_REGION_NAME = "Coder Embedded Relay"


def _access_host_port(access_url: str) -> tuple[str, int, bool]:
    """(host, port, is_http) of an access URL; the port defaults from the scheme."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(access_url)
        port = parts.port
    except ValueError as e:
        raise DERPMapError(f"access URL {access_url!r}: {e}") from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        raise DERPMapError(f"access URL {access_url!r} must be an http:// or https:// URL with a host")
    is_http = scheme == "http"
    return parts.hostname, port or (80 if is_http else 443), is_http


def embedded_region(
    access_url: str,
    *,
    region_id: int = EMBEDDED_REGION_ID,
    region_code: str = EMBEDDED_REGION_CODE,
    region_name: str = EMBEDDED_REGION_NAME,
    stun_port: int = -1,
    alt_stun_ports: tuple[int, ...] = (),
) -> DERPRegion:
    """The server's own relay region: one node ``<id>b`` at the access URL's host and port.

    ``stun_port`` is the port of the server's embedded STUN listener, or -1 when it has none.
    Each of ``alt_stun_ports`` (the listener's other ports) adds a STUN-only node
    ``<id>stun<n>`` on the same host: netcheck probes every STUN node of a region, so it sees
    the mapping from two destinations and can tell a NAT that maps per destination.
    """
    if region_id <= 0:
        raise DERPMapError(f"--derp-server-region-id must be a positive integer, got {region_id}")
    host, port, is_http = _access_host_port(access_url)
    node = DERPNode(
        name=f"{region_id}b", region_id=region_id, host_name=host, derp_port=port,
        stun_port=stun_port, force_http=is_http,
    )
    alts = tuple(DERPNode(name=f"{region_id}stun{i + 1}", region_id=region_id, host_name=host,
                          stun_port=p, stun_only=True) for i, p in enumerate(alt_stun_ports))
    return DERPRegion(region_id, region_code, region_name, (node, *alts), embedded_relay=True)


def _split_host_port(addr: str) -> tuple[str, int]:
    addr = addr.strip()
    if addr.startswith("["):
        host, sep, rest = addr[1:].partition("]")
        port_s = rest[1:] if rest.startswith(":") else ""
        if not sep:
            raise DERPMapError(f"STUN address {addr!r}: missing ']'")
    else:
        host, sep, port_s = addr.rpartition(":")
        if not sep or ":" in host:
            raise DERPMapError(f"STUN address {addr!r} must be host:port")
    try:
        port = int(port_s)
    except ValueError:
        raise DERPMapError(f"STUN address {addr!r}: port must be a number") from None
    if not host or not 0 < port < 65536:
        raise DERPMapError(f"STUN address {addr!r} must be host:port with a port in 1-65535")
    return host, port


def stun_regions(stun_addresses: list[str] | tuple[str, ...], base_region_id: int) -> list[DERPRegion]:
    """One STUN-only region per address (netcheck asks one STUN server per region).

    IDs follow the embedded region: base+1, base+2, ...; ``["disable"]`` gives none.
    """
    addrs = [a for a in stun_addresses if a.strip()]
    if [a.strip().lower() for a in addrs] == ["disable"]:
        return []
    out = []
    for i, addr in enumerate(addrs):
        host, port = _split_host_port(addr)
        rid = base_region_id + i + 1
        node = DERPNode(name=f"{rid}stun0", region_id=rid, host_name=host, stun_port=port, stun_only=True)
        out.append(DERPRegion(rid, f"coder_stun_{rid}", f"Coder STUN {rid}", (node,)))
    return out


def merge_maps(*parts: tuple[str, DERPMap]) -> DERPMap:
    """Merge named maps; a region ID used by two of them is an error naming both."""
    regions: dict[int, DERPRegion] = {}
    owner: dict[int, str] = {}
    scores: dict[int, float] = {}
    omit = False
    for name, m in parts:
        for rid, region in m.regions.items():
            if rid in regions:
                raise DERPMapError(
                    f"DERP region ID {rid} is used by both {owner[rid]} and {name}; "
                    "change --derp-server-region-id or renumber that region"
                )
            regions[rid] = region
            owner[rid] = name
        scores.update(m.region_score)
        omit = omit or m.omit_default_regions
    return DERPMap(regions=regions, omit_default_regions=omit, region_score=scores)


def validate_map(m: DERPMap) -> None:
    """Start-up checks: at least one relay node, node names unique across the map."""
    seen: dict[str, int] = {}
    for rid in m.region_ids():
        for node in m.regions[rid].nodes:
            if node.name and node.name in seen:
                raise DERPMapError(
                    f"DERP node name {node.name!r} appears in regions {seen[node.name]} and {rid}; "
                    "node names must be unique"
                )
            seen[node.name] = rid
    if not m.has_relay():
        raise DERPMapError(
            "the DERP map has no relay node (only STUN-only nodes, or no regions): enable the "
            "embedded relay (--derp-server-enable) or give --derp-config-url/--derp-config-path "
            "a map with at least one node that is not STUNOnly"
        )


def strip_stun(m: DERPMap) -> DERPMap:
    """``--block-direct-connections``: no STUN anywhere (STUNPort -1, STUN-only nodes dropped)."""
    from dataclasses import replace

    regions: dict[int, DERPRegion] = {}
    for rid, region in m.regions.items():
        nodes = tuple(replace(n, stun_port=-1) for n in region.nodes if not n.stun_only)
        if nodes:
            regions[rid] = replace(region, nodes=nodes)
    return replace(m, regions=regions)


def check_config_sources(config_url: str, config_path: str) -> None:
    if config_url and config_path:
        raise DERPMapError(
            "--derp-config-url and --derp-config-path cannot both be set; choose one source for "
            "the extra DERP regions"
        )


def load_map_file(path: str) -> DERPMap:
    """A DERP map from ``--derp-config-path``; errors name the file."""
    try:
        with open(path, "rb") as f:
            text = f.read()
    except OSError as e:
        raise DERPMapError(f"--derp-config-path {path}: {e.strerror or e}") from None
    try:
        return DERPMap.loads(text)
    except DERPMapError as e:
        raise DERPMapError(f"--derp-config-path {path}: {e}") from None


def build_server_map(
    access_url: str,
    *,
    derp_server_enable: bool = True,
    region_id: int = EMBEDDED_REGION_ID,
    region_code: str = EMBEDDED_REGION_CODE,
    region_name: str = EMBEDDED_REGION_NAME,
    embedded_stun_port: int | None = None,
    embedded_stun_alt_ports: tuple[int, ...] = (),
    stun_addresses: list[str] | tuple[str, ...] = (),
    config_map: DERPMap | None = None,
    config_source: str = "the --derp-config map",
    block_direct: bool = False,
) -> DERPMap:
    """The map the server hands to clients and agents (Coder's construction).

    The embedded region (when the relay is enabled), one STUN-only region per STUN address
    (IDs after ``region_id``), and the regions of ``config_map`` (from --derp-config-url/-path),
    merged without ID conflicts; then STUN stripped for ``block_direct``; then validated.
    """
    if not derp_server_enable and config_map is None:
        raise DERPMapError(
            "--derp-server-enable=false needs another relay: set --derp-config-url or "
            "--derp-config-path to a DERP map with at least one relay node"
        )
    parts: list[tuple[str, DERPMap]] = []
    if derp_server_enable:
        region = embedded_region(
            access_url, region_id=region_id, region_code=region_code, region_name=region_name,
            stun_port=embedded_stun_port if embedded_stun_port is not None else -1,
            alt_stun_ports=tuple(embedded_stun_alt_ports) if embedded_stun_port is not None else (),
        )
        parts.append((f"the embedded relay region ({region_code})", DERPMap({region_id: region})))
    for r in stun_regions(tuple(stun_addresses), region_id):
        parts.append((f"STUN region {r.region_code}", DERPMap({r.region_id: r})))
    if config_map is not None:
        parts.append((config_source, config_map))
    merged = merge_maps(*parts)
    if block_direct:
        merged = strip_stun(merged)
    validate_map(merged)
    return merged


def rewrite_embedded(m: DERPMap, access_url: str) -> DERPMap:
    """Point the embedded relay's nodes at ``access_url`` (an agent's or client's own URL).

    A template's provider ``url`` can differ from the server's access URL; the DERP hostname must
    follow it (Coder's RewriteDERPMap).
    """
    from dataclasses import replace

    host, port, is_http = _access_host_port(access_url)
    regions = dict(m.regions)
    for rid, region in m.regions.items():
        if region.embedded_relay:
            nodes = tuple(
                replace(n, host_name=host) if n.stun_only
                else replace(n, host_name=host, derp_port=port, force_http=is_http) for n in region.nodes
            )
            regions[rid] = replace(region, nodes=nodes)
    return replace(m, regions=regions)
