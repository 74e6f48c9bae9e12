"""The client's address when the server runs behind a proxy or load balancer (sans-IO).

A request that came through a load balancer arrives from the load balancer's address. The
server believes a proxy's word about the client only when the operator said so:
``--proxy-trusted-origins`` lists the networks (CIDRs) its proxies connect from, and
``--proxy-trusted-headers`` the headers they set, in the order they are consulted. Only these
headers can be named::

    X-Forwarded-For: <client>, <proxy 1>, <proxy 2>
        A list: each proxy appends the address it received the request from, so the
        rightmost entries are the most recent hops. Several header lines are one list, in
        order. An entry is ``192.0.2.1``, ``2001:db8::1`` or ``[2001:db8::1]``, the first and
        the last optionally with ``:port``.
    X-Real-IP: <client>
    True-Client-IP: <client>
    CF-Connecting-IP: <client>
        One address (same forms), set by the proxy itself; exactly one header line.

The rule:

- the headers count only when the immediate peer (the TCP connection's address) is inside a
  trusted origin; otherwise the peer is the client, whatever the request says;
- the first configured header the request has decides;
- ``X-Forwarded-For`` is read from the right, passing over entries that are themselves trusted
  origins (proxies in the chain); the first untrusted entry is the client. Everything to its
  left is the client's own claim and is ignored, so a client cannot pass itself off as another
  address by sending a header of its own. When every entry is trusted, the leftmost is the
  client;
- a value that does not parse (``unknown``, an obfuscated name, a zone index, a stray port,
  more than :data:`MAX_HOPS` entries to read) means the peer is the client. Nothing here
  raises for what a request sent.

:func:`client_address` returns the client and the trusted hops between it and this server, so
the workspace-app proxy can hand the app an ``X-Forwarded-For`` that starts with the client.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address, ip_network

Address = IPv4Address | IPv6Address
Network = IPv4Network | IPv6Network

#: The headers ``--proxy-trusted-headers`` may name, as they are written.
ALLOWED_HEADERS = ("X-Forwarded-For", "X-Real-IP", "True-Client-IP", "CF-Connecting-IP")
_CANONICAL = {name.lower(): name for name in ALLOWED_HEADERS}
_LIST_HEADER = "x-forwarded-for"

#: X-Forwarded-For entries read from the right at most: a longer chain of trusted proxies is
#: not a deployment, and the walk stays cheap whatever a client sends.
MAX_HOPS = 32


def parse_headers(text: str) -> tuple[str, ...]:
    """``--proxy-trusted-headers``: comma-separated names from :data:`ALLOWED_HEADERS` (any
    case), in order, duplicates dropped. ValueError names the first unknown one."""
    names: list[str] = []
    for piece in text.split(","):
        name = piece.strip()
        if not name:
            continue
        canonical = _CANONICAL.get(name.lower())
        if canonical is None:
            raise ValueError(f"{name!r} is not a proxy header this server reads "
                             f"(one of {', '.join(ALLOWED_HEADERS)})")
        if canonical not in names:
            names.append(canonical)
    return tuple(names)


def parse_origins(text: str) -> tuple[Network, ...]:
    """``--proxy-trusted-origins``: comma-separated CIDRs (``10.0.0.0/8``, ``fd00::/8``; a bare
    address is one host). ValueError for one that is not a network, or has host bits set
    (``10.0.0.1/8`` is a typo for either a host or a network, and the server will not guess)."""
    networks: list[Network] = []
    for piece in text.split(","):
        cidr = piece.strip()
        if not cidr:
            continue
        try:
            networks.append(ip_network(cidr, strict=True))
        except ValueError as err:
            raise ValueError(f"{cidr!r} is not a CIDR: {err}") from None
    return tuple(networks)


@dataclass(frozen=True)
class TrustedProxies:
    """The two options, parsed; the default trusts no one (the peer is always the client)."""

    headers: tuple[str, ...] = ()
    origins: tuple[Network, ...] = ()

    def trusts(self, address: Address) -> bool:
        return any(address in network for network in self.origins)

    @property
    def enabled(self) -> bool:
        return bool(self.headers and self.origins)


@dataclass(frozen=True)
class ClientAddress:
    """``host``: the client's address as text; ``via``: the trusted hops from the client to
    this server, the immediate peer last (empty when the peer itself is the client)."""

    host: str
    via: tuple[str, ...] = ()

    @property
    def forwarded_for(self) -> str:
        """An ``X-Forwarded-For`` value for the next hop: the client, then each proxy."""
        return ", ".join((self.host, *self.via))


def parse_address(text: str) -> Address | None:
    """One address as a proxy header writes it (``192.0.2.1``, ``192.0.2.1:80``,
    ``2001:db8::1``, ``[2001:db8::1]``, ``[2001:db8::1]:80``); None for anything else. An
    IPv4-mapped IPv6 address is its IPv4 address."""
    value = text.strip(" \t")
    if value.startswith("["):
        inside, bracket, rest = value[1:].partition("]")
        if not bracket or (rest and not _is_port(rest)):
            return None
        value = inside
        if ":" not in value:  # brackets are for IPv6 only
            return None
    elif value.count(":") == 1:
        value, _, port = value.partition(":")
        if not _is_port(":" + port):
            return None
    if "%" in value:  # a zone index means nothing past the proxy's own link
        return None
    try:
        address = ip_address(value)
    except ValueError:
        return None
    if isinstance(address, IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _is_port(text: str) -> bool:
    """``:N`` with N a port number (ASCII digits only: ``str.isdigit`` takes others too)."""
    digits = text[1:]
    if not text.startswith(":") or not 0 < len(digits) <= 5 or not digits.isascii():
        return False
    return digits.isdigit() and int(digits) <= 65535


def _text(value: str | bytes) -> str:
    return value.decode("latin-1") if isinstance(value, bytes) else value


def client_address(peer: str, headers: Mapping[str, Sequence[str | bytes]],
                   proxies: TrustedProxies) -> ClientAddress:
    """The client of a request from ``peer`` (the connection's host) with ``headers`` (lower-case
    name to its values, in order; only the trusted ones need be there), per the module's rule."""
    if not proxies.enabled:
        return ClientAddress(peer)
    peer_address = parse_address(peer)
    if peer_address is None or not proxies.trusts(peer_address):
        return ClientAddress(peer)
    peer_text = str(peer_address)
    for name in proxies.headers:
        values = [_text(v) for v in headers.get(name.lower(), ())]
        if not any(v.strip(" \t") for v in values):
            continue
        if name.lower() == _LIST_HEADER:
            found = _from_list(values, proxies)
        else:
            found = _from_single(values)
        if found is None:
            return ClientAddress(peer)
        client, hops = found
        return ClientAddress(str(client), (*(str(h) for h in hops), peer_text))
    return ClientAddress(peer)


def _from_single(values: list[str]) -> tuple[Address, list[Address]] | None:
    if len(values) != 1:
        return None
    address = parse_address(values[0])
    return None if address is None else (address, [])


def _from_list(values: list[str], proxies: TrustedProxies) -> tuple[Address, list[Address]] | None:
    entries = [e for v in values for e in v.split(",") if e.strip(" \t")]
    hops: list[Address] = []  # trusted entries passed over, nearest the client first
    for entry in reversed(entries[-MAX_HOPS:]):
        address = parse_address(entry)
        if address is None:
            return None
        if not proxies.trusts(address):
            return address, hops
        hops.insert(0, address)
    if len(entries) > MAX_HOPS:
        return None
    # Every entry is a trusted proxy: the leftmost is the furthest one known.
    return hops[0], hops[1:]
