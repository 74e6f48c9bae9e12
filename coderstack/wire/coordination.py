"""The coordination protocol: JSON messages between peers (agents, clients) and the coordinator.

Protocol name and version: ``coderstack.tailnet.v1``. It carries the semantics of Coder's tailnet
v2 ``Coordinate`` stream (``coder.tailnet.v2``), spelled as JSON instead of protobuf over dRPC.

Framing: one JSON object per websocket *text* message, UTF-8, at most 64 KiB for a request.
The coordinator keeps each response at most 128 KiB (``MAX_RESPONSE_MESSAGE_BYTES``): a longer
list of peer updates (a reconnecting agent learning the nodes of all its tunnel peers) is split,
in order, across several responses (:func:`split_response`); a reader treats them as if they had
come in one. Readers accept up to 4 MiB. Unknown object keys are ignored so that later versions can
add fields; ``null`` is the same as an absent field.

Request, peer -> coordinator (every field optional, any combination)::

    {"update_self": {"node": NODE},          # my node changed; fan it out to my tunnel peers
     "add_tunnel": {"id": "<uuid>"},         # I want to reach peer <uuid>
     "remove_tunnel": {"id": "<uuid>"},      # I no longer want to reach it
     "ready_for_handshake": [{"id": "<uuid>"}, ...],   # (agents) I have your node: start pinging
     "disconnect": {}}                       # graceful leave; the connection ends

The coordinator processes the parts in this order: update_self, add_tunnel, remove_tunnel,
ready_for_handshake, disconnect.

Response, coordinator -> peer::

    {"peer_updates": [{"id": "<uuid>",                 # the peer this update is about
                       "kind": "NODE" | "DISCONNECTED" | "LOST" | "READY_FOR_HANDSHAKE",
                       "reason": "add tunnel",         # free text, for logs and debugging
                       "node": NODE}, ...],            # NODE: always; LOST: its last node if known
     "error": "..."}                                   # present when part of a request was refused

``peer_updates`` is always present (possibly empty); ``error`` only when non-empty.

NODE (Coder's ``tailnet.Node`` in its v1 JSON spelling)::

    {"id": 1234,                                  # int64, random tailcfg.NodeID
     "as_of": "2026-11-22T17:09:17.5Z",           # RFC 3339, when this snapshot was made
     "key": "nodekey:<64 hex>",                   # WireGuard public key (32 bytes)
     "disco": "discokey:<64 hex>",                # disco public key (32 bytes)
     "preferred_derp": 999,                       # home DERP region, 0 = none yet
     "derp_latency": {"999-v4": 0.0123},          # seconds, per region and family
     "derp_forced_websockets": {"999": "reason"}, # regions where DERP fell back to websockets
     "addresses": ["fd7a:115c:a1e0:aaaa:aaaa:1234:5678:9abc/128"],   # IPv6 /128 only
     "allowed_ips": ["fd7a:115c:a1e0:aaaa:aaaa:1234:5678:9abc/128"], # IPv6 /128 only
     "endpoints": ["192.0.2.1:41641", "[2001:db8::1]:41641"]}       # direct UDP candidates

``id``, ``as_of``, ``key`` and ``disco`` are required; the rest default to zero/empty.

Overlay addresses: a peer's /128 is its UUID with the first 6 bytes replaced by the 48-bit prefix
``fd7a:115c:a1e0::/48`` (Tailscale's service prefix, used by Coder); agents may also advertise the
same derivation in ``fd60:627a:a42b::/48`` (Coder's newer service prefix).

Anything malformed raises :class:`CoordinationError` (a ``ValueError``) and nothing else.
"""

from __future__ import annotations

import ipaddress
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from enum import StrEnum
from typing import Any
from uuid import UUID

PROTOCOL = "coderstack.tailnet.v1"

MAX_REQUEST_BYTES = 64 * 1024
MAX_RESPONSE_BYTES = 4 * 1024 * 1024
#: What the coordinator sends in one message; half the server websocket's 256 KiB limit, and
#: one peer update (a node from a request of at most 64 KiB) always fits.
MAX_RESPONSE_MESSAGE_BYTES = 128 * 1024
MAX_ENDPOINTS = 64
MAX_ADDRESSES = 16
MAX_DERP_ENTRIES = 256
MAX_READY_FOR_HANDSHAKE = 1024
MAX_SHORT_TEXT = 256  # map keys, forced-websocket reasons
MAX_REASON = 1024
MAX_ERROR = 4096

TAILSCALE_SERVICE_PREFIX = ipaddress.IPv6Network("fd7a:115c:a1e0::/48")
CODER_SERVICE_PREFIX = ipaddress.IPv6Network("fd60:627a:a42b::/48")

_INT64 = (-(2**63), 2**63 - 1)
_INT32 = (-(2**31), 2**31 - 1)

_UUID_RE = re.compile(
    r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
)
_REGION_RE = re.compile(r"-?[0-9]{1,10}")
_KEY_RE = re.compile(r"(nodekey|discokey):([0-9a-fA-F]{64})")
_RFC3339_RE = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?(?:([Zz])|([+-])(\d{2}):(\d{2}))"
)


class CoordinationError(ValueError):
    """A coordination message that cannot be used; the message says which part and why."""


# --- small field codecs -------------------------------------------------------------------------


def node_key_bytes(text: str, prefix: str | None = None) -> bytes:
    """``nodekey:<hex>`` / ``discokey:<hex>`` -> 32 raw bytes.

    With ``prefix`` ("nodekey" or "discokey") only that form is accepted.
    """
    if not isinstance(text, str):
        raise CoordinationError(f"key must be a string, not {type(text).__name__}")
    m = _KEY_RE.fullmatch(text)
    if m is None or (prefix is not None and m.group(1) != prefix):
        want = f"{prefix}:" if prefix else "nodekey: or discokey:"
        raise CoordinationError(f"key {_short(text)} is not {want} followed by 64 hex digits")
    return bytes.fromhex(m.group(2))


def node_key_text(key: bytes, prefix: str = "nodekey") -> str:
    """32 raw bytes -> ``nodekey:<64 lowercase hex>`` (or ``discokey:`` with ``prefix``)."""
    if prefix not in ("nodekey", "discokey"):
        raise CoordinationError(f"unknown key prefix {prefix!r}")
    if not isinstance(key, bytes | bytearray) or len(key) != 32:
        raise CoordinationError("a key is 32 bytes")
    return f"{prefix}:{bytes(key).hex()}"


def disco_key_bytes(text: str) -> bytes:
    return node_key_bytes(text, "discokey")


def address_from_uuid(
    peer_id: UUID, prefix: ipaddress.IPv6Network = TAILSCALE_SERVICE_PREFIX
) -> ipaddress.IPv6Address:
    """The overlay address of a peer: its UUID with the first 6 bytes replaced by the /48 prefix."""
    if prefix.prefixlen != 48:
        raise ValueError("the service prefix must be a /48")
    return ipaddress.IPv6Address(prefix.network_address.packed[:6] + peer_id.bytes[6:])


def prefix_from_uuid(
    peer_id: UUID, prefix: ipaddress.IPv6Network = TAILSCALE_SERVICE_PREFIX
) -> ipaddress.IPv6Network:
    """``address_from_uuid`` as a /128 network, the form nodes carry."""
    return ipaddress.IPv6Network((address_from_uuid(peer_id, prefix), 128))


def parse_uuid(value: Any, what: str = "id") -> UUID:
    """A canonical hyphenated UUID string -> UUID."""
    if isinstance(value, UUID):
        return value
    if not isinstance(value, str) or _UUID_RE.fullmatch(value) is None:
        raise CoordinationError(f"{what} {_short(value)} is not a UUID")
    return UUID(value)


def parse_time(text: Any) -> datetime:
    """RFC 3339 text (up to nanoseconds, which are truncated to microseconds) -> aware UTC datetime."""
    if not isinstance(text, str):
        raise CoordinationError(f"as_of must be an RFC 3339 string, not {type(text).__name__}")
    m = _RFC3339_RE.fullmatch(text)
    if m is None:
        raise CoordinationError(f"as_of {_short(text)} is not an RFC 3339 time")
    year, month, day, hour, minute, second, frac, z, sign, oh, om = m.groups()
    micro = int((frac or "").ljust(6, "0")[:6])
    try:
        if z:
            tz = UTC
        else:
            offset = timedelta(hours=int(oh), minutes=int(om))
            tz = timezone(-offset if sign == "-" else offset)
        when = datetime(
            int(year), int(month), int(day), int(hour), int(minute), int(second), micro, tzinfo=tz
        )
        return when.astimezone(UTC)
    except (ValueError, OverflowError) as e:
        raise CoordinationError(f"as_of {_short(text)} is not a valid time: {e}") from None


def format_time(when: datetime) -> str:
    """Aware datetime -> RFC 3339 in UTC with a ``Z``; fractional seconds only when non-zero."""
    when = when.astimezone(UTC)
    text = when.strftime("%Y-%m-%dT%H:%M:%S")
    if when.microsecond:
        text += ("." + f"{when.microsecond:06d}").rstrip("0")
    # strftime pads years < 1000 inconsistently across platforms; build it ourselves.
    return f"{when.year:04d}" + text[text.index("-") :] + "Z"


def parse_endpoint(text: Any) -> tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int]:
    """``"192.0.2.1:41641"`` or ``"[2001:db8::1]:41641"`` -> (address, port)."""
    if not isinstance(text, str) or len(text) > 80:
        raise CoordinationError(f"endpoint {_short(text)} is not an ip:port string")
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit() or not port_text.isascii() or len(port_text) > 5:
        raise CoordinationError(f"endpoint {_short(text)} is not ip:port")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise CoordinationError(f"endpoint {_short(text)} has port out of range")
    try:
        if host.startswith("[") and host.endswith("]"):
            addr: ipaddress.IPv4Address | ipaddress.IPv6Address = ipaddress.IPv6Address(host[1:-1])
        else:
            addr = ipaddress.IPv4Address(host)
    except ValueError:
        raise CoordinationError(f"endpoint {_short(text)} has a bad IP address") from None
    return addr, port


def format_endpoint(addr: ipaddress.IPv4Address | ipaddress.IPv6Address, port: int) -> str:
    return f"[{addr}]:{port}" if addr.version == 6 else f"{addr}:{port}"


def _parse_prefix(value: Any, what: str) -> ipaddress.IPv6Network:
    if isinstance(value, ipaddress.IPv6Network):
        net = value
    elif isinstance(value, ipaddress.IPv6Address):
        net = ipaddress.IPv6Network((value, 128))
    elif isinstance(value, str) and len(value) <= 64:
        try:
            net = ipaddress.IPv6Network(value, strict=True)
        except ValueError:
            raise CoordinationError(f"{what} {_short(value)} is not an IPv6 prefix") from None
        if "/" not in value:
            raise CoordinationError(f"{what} {_short(value)} has no prefix length (want /128)")
    else:
        raise CoordinationError(f"{what} {_short(value)} is not an IPv6 /128 string")
    if net.prefixlen != 128:
        raise CoordinationError(f"{what} {net} is not a /128")
    return net


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _int(value: Any, what: str, bounds: tuple[int, int]) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise CoordinationError(f"{what} must be an integer, not {type(value).__name__}")
    if not bounds[0] <= value <= bounds[1]:
        raise CoordinationError(f"{what} {value} is out of range")
    return value


def _text(value: Any, what: str, limit: int) -> str:
    if not isinstance(value, str):
        raise CoordinationError(f"{what} must be a string, not {type(value).__name__}")
    if len(value) > limit:
        raise CoordinationError(f"{what} is longer than {limit} characters")
    return value


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise CoordinationError(f"{what} must be a JSON object, not {_json_type(value)}")
    return value


def _list(value: Any, what: str, limit: int) -> list[Any]:
    if not isinstance(value, list):
        raise CoordinationError(f"{what} must be a JSON array, not {_json_type(value)}")
    if len(value) > limit:
        raise CoordinationError(f"{what} has {len(value)} entries; at most {limit} are allowed")
    return value


def _json_type(value: Any) -> str:
    return {
        dict: "an object",
        list: "an array",
        str: "a string",
        bool: "a boolean",
        int: "a number",
        float: "a number",
        type(None): "null",
    }.get(type(value), type(value).__name__)


def _get(obj: dict[str, Any], key: str, default: Any = None) -> Any:
    """A field; ``null`` counts as absent."""
    value = obj.get(key)
    return default if value is None else value


# --- Node ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Node:
    """One snapshot of a peer's networking state, as coordinated between peers.

    The constructor validates and normalizes: keys may be given as bytes or in their text form,
    ``as_of`` as an aware datetime or RFC 3339 text (kept in UTC), addresses as strings or
    ``IPv6Network``/``IPv6Address`` (kept as ``IPv6Network`` /128), endpoints as strings (kept in
    canonical ``ip:port`` form). Invalid values raise :class:`CoordinationError`. Treat the
    mappings as read-only.
    """

    id: int
    as_of: datetime
    key: bytes
    disco: bytes
    preferred_derp: int = 0
    derp_latency: Mapping[str, float] = field(default_factory=dict)
    derp_forced_websockets: Mapping[int, str] = field(default_factory=dict)
    addresses: tuple[ipaddress.IPv6Network, ...] = ()
    allowed_ips: tuple[ipaddress.IPv6Network, ...] = ()
    endpoints: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        _int(self.id, "node id", _INT64)
        if isinstance(self.as_of, str):
            put("as_of", parse_time(self.as_of))
        elif isinstance(self.as_of, datetime):
            if self.as_of.tzinfo is None or self.as_of.utcoffset() is None:
                raise CoordinationError("as_of must be timezone-aware")
            put("as_of", self.as_of.astimezone(UTC))
        else:
            raise CoordinationError("as_of must be a datetime or RFC 3339 string")
        for name, prefix in (("key", "nodekey"), ("disco", "discokey")):
            value = getattr(self, name)
            if isinstance(value, str):
                put(name, node_key_bytes(value, prefix))
            elif isinstance(value, bytes | bytearray) and len(value) == 32:
                put(name, bytes(value))
            else:
                raise CoordinationError(f"{name} must be 32 bytes or {prefix}:<64 hex>")
        _int(self.preferred_derp, "preferred_derp", _INT32)

        if not isinstance(self.derp_latency, Mapping):
            raise CoordinationError("derp_latency must be a mapping")
        if len(self.derp_latency) > MAX_DERP_ENTRIES:
            raise CoordinationError(f"derp_latency has more than {MAX_DERP_ENTRIES} entries")
        latency: dict[str, float] = {}
        for k, v in self.derp_latency.items():
            _text(k, "derp_latency key", MAX_SHORT_TEXT)
            if isinstance(v, bool) or not isinstance(v, int | float):
                raise CoordinationError(f"derp_latency[{_short(k)}] must be a number")
            v = float(v)
            if not math.isfinite(v) or v < 0:
                raise CoordinationError(f"derp_latency[{_short(k)}] must be finite and >= 0")
            latency[k] = v
        put("derp_latency", latency)

        if not isinstance(self.derp_forced_websockets, Mapping):
            raise CoordinationError("derp_forced_websockets must be a mapping")
        if len(self.derp_forced_websockets) > MAX_DERP_ENTRIES:
            raise CoordinationError(
                f"derp_forced_websockets has more than {MAX_DERP_ENTRIES} entries"
            )
        forced: dict[int, str] = {}
        for region, reason in self.derp_forced_websockets.items():
            forced[_int(region, "derp_forced_websockets region", _INT32)] = _text(
                reason, "derp_forced_websockets reason", MAX_SHORT_TEXT
            )
        put("derp_forced_websockets", forced)

        for name in ("addresses", "allowed_ips"):
            values = getattr(self, name)
            if isinstance(values, str) or not isinstance(values, Iterable):
                raise CoordinationError(f"{name} must be a list")
            values = list(values)
            if len(values) > MAX_ADDRESSES:
                raise CoordinationError(f"{name} has more than {MAX_ADDRESSES} entries")
            put(
                name,
                tuple(
                    _parse_prefix(v, name[:-1] if name == "addresses" else "allowed ip")
                    for v in values
                ),
            )

        if isinstance(self.endpoints, str) or not isinstance(self.endpoints, Iterable):
            raise CoordinationError("endpoints must be a list")
        endpoints = list(self.endpoints)
        if len(endpoints) > MAX_ENDPOINTS:
            raise CoordinationError(
                f"endpoints has {len(endpoints)} entries; at most {MAX_ENDPOINTS} are allowed"
            )
        put("endpoints", tuple(format_endpoint(*parse_endpoint(e)) for e in endpoints))

    @property
    def key_text(self) -> str:
        return node_key_text(self.key, "nodekey")

    @property
    def disco_text(self) -> str:
        return node_key_text(self.disco, "discokey")

    def to_json(self) -> dict[str, Any]:
        """A fresh JSON-able dict (callers may change it)."""
        obj = self._shared_json()
        return {
            **obj,
            "derp_latency": dict(obj["derp_latency"]),
            "derp_forced_websockets": dict(obj["derp_forced_websockets"]),
            "addresses": list(obj["addresses"]),
            "allowed_ips": list(obj["allowed_ips"]),
            "endpoints": list(obj["endpoints"]),
        }

    def _shared_json(self) -> dict[str, Any]:
        # Built once per node: a fan-out or a resume encodes the same node many times, and
        # formatting addresses and keys dominates the cost. Never mutate the result.
        cached = self.__dict__.get("_json")
        if cached is None:
            cached = self._build_json()
            object.__setattr__(self, "_json", cached)
        return cached

    def _build_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "as_of": format_time(self.as_of),
            "key": self.key_text,
            "disco": self.disco_text,
            "preferred_derp": self.preferred_derp,
            "derp_latency": dict(self.derp_latency),
            "derp_forced_websockets": {str(k): v for k, v in self.derp_forced_websockets.items()},
            "addresses": [str(a) for a in self.addresses],
            "allowed_ips": [str(a) for a in self.allowed_ips],
            "endpoints": list(self.endpoints),
        }

    @classmethod
    def from_json(cls, obj: Any) -> Node:
        obj = _object(obj, "node")
        for required in ("id", "as_of", "key", "disco"):
            if _get(obj, required) is None:
                raise CoordinationError(f"node has no {required}")
        latency = _get(obj, "derp_latency", {})
        _object(latency, "derp_latency")
        forced_raw = _object(_get(obj, "derp_forced_websockets", {}), "derp_forced_websockets")
        if len(forced_raw) > MAX_DERP_ENTRIES:
            raise CoordinationError(
                f"derp_forced_websockets has more than {MAX_DERP_ENTRIES} entries"
            )
        forced: dict[int, Any] = {}
        for k, v in forced_raw.items():
            if _REGION_RE.fullmatch(k) is None:
                raise CoordinationError(
                    f"derp_forced_websockets key {_short(k)} is not a region number"
                )
            forced[int(k)] = v
        # Converted here in the order the constructor checks them, so the first problem named
        # is the same either way.
        node_id = _int(obj["id"], "node id", _INT64)
        as_of = parse_time(_text(obj["as_of"], "as_of", 64))
        key = node_key_bytes(_text(obj["key"], "key", 80), "nodekey")
        disco = node_key_bytes(_text(obj["disco"], "disco", 80), "discokey")
        return cls(
            id=node_id,
            as_of=as_of,
            key=key,
            disco=disco,
            preferred_derp=_get(obj, "preferred_derp", 0),
            derp_latency=latency,
            derp_forced_websockets=forced,
            addresses=tuple(_list(_get(obj, "addresses", []), "addresses", MAX_ADDRESSES)),
            allowed_ips=tuple(_list(_get(obj, "allowed_ips", []), "allowed_ips", MAX_ADDRESSES)),
            endpoints=tuple(_list(_get(obj, "endpoints", []), "endpoints", MAX_ENDPOINTS)),
        )


# --- requests -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class CoordinateRequest:
    """One request from a peer. Every part is optional; see the module docstring for the order."""

    update_self: Node | None = None
    add_tunnel: UUID | None = None
    remove_tunnel: UUID | None = None
    ready_for_handshake: tuple[UUID, ...] = ()
    disconnect: bool = False

    def __post_init__(self) -> None:
        # Accept UUID text too, so a hand-built request compares equal to a parsed one.
        if self.update_self is not None and not isinstance(self.update_self, Node):
            raise CoordinationError("update_self must be a Node")
        for name in ("add_tunnel", "remove_tunnel"):
            if (value := getattr(self, name)) is not None:
                object.__setattr__(self, name, parse_uuid(value, f"{name} id"))
        ready = tuple(parse_uuid(v, "ready_for_handshake id") for v in self.ready_for_handshake)
        object.__setattr__(self, "ready_for_handshake", ready)
        object.__setattr__(self, "disconnect", bool(self.disconnect))

    def to_json(self) -> dict[str, Any]:
        obj: dict[str, Any] = {}
        if self.update_self is not None:
            obj["update_self"] = {"node": self.update_self.to_json()}
        if self.add_tunnel is not None:
            obj["add_tunnel"] = {"id": str(self.add_tunnel)}
        if self.remove_tunnel is not None:
            obj["remove_tunnel"] = {"id": str(self.remove_tunnel)}
        if self.ready_for_handshake:
            obj["ready_for_handshake"] = [{"id": str(i)} for i in self.ready_for_handshake]
        if self.disconnect:
            obj["disconnect"] = {}
        return obj

    def to_text(self) -> str:
        return _dumps(self.to_json())

    @classmethod
    def from_json(cls, obj: Any) -> CoordinateRequest:
        obj = _object(obj, "request")
        update_self = None
        if (part := _get(obj, "update_self")) is not None:
            part = _object(part, "update_self")
            if _get(part, "node") is None:
                raise CoordinationError("update_self has no node")
            update_self = Node.from_json(part["node"])

        def tunnel(name: str) -> UUID | None:
            part = _get(obj, name)
            if part is None:
                return None
            return parse_uuid(_object(part, name).get("id"), f"{name}.id")

        ready: list[UUID] = []
        if (part := _get(obj, "ready_for_handshake")) is not None:
            for entry in _list(part, "ready_for_handshake", MAX_READY_FOR_HANDSHAKE):
                ready.append(
                    parse_uuid(
                        _object(entry, "ready_for_handshake entry").get("id"),
                        "ready_for_handshake id",
                    )
                )
        disconnect = False
        if (part := _get(obj, "disconnect")) is not None:
            _object(part, "disconnect")
            disconnect = True
        return cls(
            update_self=update_self,
            add_tunnel=tunnel("add_tunnel"),
            remove_tunnel=tunnel("remove_tunnel"),
            ready_for_handshake=tuple(ready),
            disconnect=disconnect,
        )


# --- responses ----------------------------------------------------------------------------------


class PeerUpdateKind(StrEnum):
    NODE = "NODE"
    DISCONNECTED = "DISCONNECTED"
    LOST = "LOST"
    READY_FOR_HANDSHAKE = "READY_FOR_HANDSHAKE"


@dataclass(frozen=True)
class PeerUpdate:
    """News about one peer. ``kind`` compares equal to its plain string ("NODE", ...)."""

    id: UUID
    kind: PeerUpdateKind
    reason: str = ""
    node: Node | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "id", parse_uuid(self.id, "peer update id"))
        if self.node is not None and not isinstance(self.node, Node):
            raise CoordinationError("a peer update's node must be a Node")
        try:
            object.__setattr__(self, "kind", PeerUpdateKind(self.kind))
        except ValueError:
            raise CoordinationError(f"unknown peer update kind {_short(self.kind)}") from None
        if self.kind is PeerUpdateKind.NODE and self.node is None:
            raise CoordinationError("a NODE peer update needs a node")

    def to_json(self) -> dict[str, Any]:
        obj: dict[str, Any] = {"id": str(self.id), "kind": str(self.kind), "reason": self.reason}
        if self.node is not None:
            obj["node"] = self.node._shared_json()
        return obj

    @classmethod
    def from_json(cls, obj: Any) -> PeerUpdate:
        obj = _object(obj, "peer update")
        node = _get(obj, "node")
        kind = _get(obj, "kind")
        if not isinstance(kind, str):
            raise CoordinationError(f"peer update kind {_short(kind)} is not a string")
        return cls(
            id=parse_uuid(_get(obj, "id"), "peer update id"),
            kind=kind,  # type: ignore[arg-type]  # validated in __post_init__
            reason=_text(_get(obj, "reason", ""), "reason", MAX_REASON),
            node=None if node is None else Node.from_json(node),
        )


@dataclass(frozen=True)
class CoordinateResponse:
    """What the coordinator sends a peer: a batch of peer updates and/or an error.

    One instance may be sent to many recipients; :meth:`to_text` caches its encoding so a fan-out
    encodes once.
    """

    peer_updates: tuple[PeerUpdate, ...] = ()
    error: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "peer_updates", tuple(self.peer_updates))

    def to_json(self) -> dict[str, Any]:
        obj: dict[str, Any] = {"peer_updates": [u.to_json() for u in self.peer_updates]}
        if self.error:
            obj["error"] = self.error
        return obj

    def to_text(self) -> str:
        cached = self.__dict__.get("_text")
        if cached is None:
            cached = _dumps(self.to_json())
            object.__setattr__(self, "_text", cached)
        return cached

    @classmethod
    def from_json(cls, obj: Any) -> CoordinateResponse:
        obj = _object(obj, "response")
        updates = _list(_get(obj, "peer_updates", []), "peer_updates", 1 << 20)
        return cls(
            peer_updates=tuple(PeerUpdate.from_json(u) for u in updates),
            error=_text(_get(obj, "error", ""), "error", MAX_ERROR),
        )


def split_response(response: CoordinateResponse, max_bytes: int) -> list[CoordinateResponse]:
    """``response`` as one or more responses whose text is at most ``max_bytes`` each.

    The updates keep their order and are cut into contiguous runs; the error (if any) rides in
    the first part. An update that alone is larger than ``max_bytes`` goes in a part of its own.
    """
    if len(response.to_text()) <= max_bytes or len(response.peer_updates) < 2:
        return [response]
    empty = len(_dumps({"peer_updates": []}))
    # What the error adds to the first part (nothing when there is none: it is left out).
    error_len = len(CoordinateResponse((), response.error).to_text()) - empty
    parts: list[CoordinateResponse] = []
    run: list[PeerUpdate] = []
    size = empty + error_len
    for update in response.peer_updates:
        n = len(_dumps(update.to_json()))
        grown = size + n + (1 if run else 0)
        if run and grown > max_bytes:
            parts.append(CoordinateResponse(tuple(run), "" if parts else response.error))
            run, size = [], empty
            grown = size + n
        run.append(update)
        size = grown
    parts.append(CoordinateResponse(tuple(run), "" if parts else response.error))
    return parts


# --- whole messages -----------------------------------------------------------------------------


def _dumps(obj: Any) -> str:
    # ASCII output: peers may send lone surrogates (JSON allows a \\ud800 escape), which could
    # not be sent on as UTF-8 websocket text.
    return json.dumps(obj, separators=(",", ":"), allow_nan=False)


def _reject_constant(name: str) -> Any:
    raise CoordinationError(f"{name} is not valid JSON")


def _loads(data: str | bytes, limit: int) -> Any:
    if isinstance(data, bytes | bytearray | memoryview):
        raw = bytes(data)
        if len(raw) > limit:
            raise CoordinationError(f"message is {len(raw)} bytes; at most {limit} are allowed")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise CoordinationError("message is not UTF-8") from None
    elif isinstance(data, str):
        text = data
        if len(text) > limit or len(text.encode("utf-8", "surrogatepass")) > limit:
            raise CoordinationError(f"message is larger than {limit} bytes")
    else:
        raise CoordinationError(f"message must be text or bytes, not {type(data).__name__}")
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except CoordinationError:
        raise
    except RecursionError:
        raise CoordinationError("message is nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, and int() refusing a huge number
        raise CoordinationError(f"message is not valid JSON: {e}") from None


def _guard(parse: Any, obj: Any) -> Any:
    try:
        return parse(obj)
    except CoordinationError:
        raise
    except RecursionError:
        raise CoordinationError("message is nested too deeply") from None


def parse_request(data: str | bytes) -> CoordinateRequest:
    """One websocket message from a peer -> CoordinateRequest, or CoordinationError."""
    return _guard(CoordinateRequest.from_json, _loads(data, MAX_REQUEST_BYTES))


def parse_response(data: str | bytes) -> CoordinateResponse:
    """One websocket message from the coordinator -> CoordinateResponse, or CoordinationError."""
    return _guard(CoordinateResponse.from_json, _loads(data, MAX_RESPONSE_BYTES))
