"""Parsing the STUN address options: ``--stun-address`` and ``--derp-server-stun-addresses``.

Accepted forms (pure, no DNS):

- ``host:port``, ``[v6 literal]:port``, ``:port`` (``--stun-address`` only: the HTTP address's host)
- ``disable`` turns the feature off (the value must then be alone)
- ``--stun-address`` and ``--derp-server-stun-addresses`` take a comma-separated list

The embedded server listens on two ports by default, 3478 and 3479: netcheck calls a NAT hard
(``MappingVariesByDestIP``) when two STUN servers saw different mappings of one socket, and two
ports of one server are two destinations to a NAT that maps per destination port
(``MASQUERADE --random-fully``, most cloud and carrier-grade NATs), so one server is enough to
tell. A NAT that maps per destination IP but keeps the mapping across ports needs a STUN server
on a second address (``--derp-server-stun-addresses``).

Errors are :class:`STUNAddressError` with a message meant for the operator.
"""

from __future__ import annotations

import ipaddress

DEFAULT_STUN_PORT = 3478
DEFAULT_STUN_PORTS = (DEFAULT_STUN_PORT, DEFAULT_STUN_PORT + 1)


class STUNAddressError(ValueError):
    pass


def parse_host_port(text: str, *, allow_empty_host: bool = False, allow_port_zero: bool = False,
                    what: str = "address") -> tuple[str, int]:
    """``"host:port"`` or ``"[v6]:port"`` to ``(host, port)``; IPv6 hosts come back unbracketed."""
    s = text.strip()
    if not s:
        raise STUNAddressError(f"{what}: empty value")
    if s.startswith("["):
        close = s.find("]")
        if close < 0 or not s[close + 1 :].startswith(":"):
            raise STUNAddressError(f"{what} {text!r}: expected [IPv6]:port")
        host, port_s = s[1:close], s[close + 2 :]
        try:
            if ipaddress.ip_address(host.split("%", 1)[0]).version != 6:
                raise ValueError
        except ValueError:
            raise STUNAddressError(f"{what} {text!r}: {host!r} is not an IPv6 address") from None
    else:
        host, sep, port_s = s.rpartition(":")
        if not sep:
            raise STUNAddressError(f"{what} {text!r}: expected host:port")
        if ":" in host:
            raise STUNAddressError(f"{what} {text!r}: put IPv6 addresses in brackets, [addr]:port")
    if not host and not allow_empty_host:
        raise STUNAddressError(f"{what} {text!r}: missing host")
    if not port_s.isdigit():
        raise STUNAddressError(f"{what} {text!r}: port {port_s!r} is not a number")
    port = int(port_s)
    low = 0 if allow_port_zero else 1
    if not low <= port <= 65535:
        raise STUNAddressError(f"{what} {text!r}: port {port} is out of range {low}-65535")
    if host and not _valid_host(host):
        raise STUNAddressError(f"{what} {text!r}: {host!r} is not a valid host name or address")
    return host, port


def _valid_host(host: str) -> bool:
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
        return True
    except ValueError:
        pass
    if len(host) > 253:
        return False
    labels = host.rstrip(".").split(".")
    return all(
        0 < len(lab) <= 63 and lab[0] != "-" and lab[-1] != "-"
        and all(c.isalnum() or c in "-_" for c in lab) and lab.isascii()
        for lab in labels
    )


def parse_stun_listen_address(value: str | None, http_address: str) -> tuple[str, int] | None:
    """The embedded STUN server's bind address, or None when ``disable``d.

    An empty value means port 3478 on the HTTP address's host; ``:port`` keeps that host.
    Port 0 is allowed (an ephemeral port, for tests).
    """
    http_host = ""
    if http_address:
        try:
            http_host, _ = parse_host_port(http_address, allow_empty_host=True,
                                           allow_port_zero=True, what="HTTP address")
        except STUNAddressError:
            http_host = ""
    v = (value or "").strip()
    if v.lower() == "disable":
        return None
    if not v:
        return http_host, DEFAULT_STUN_PORT
    host, port = parse_host_port(v, allow_empty_host=True, allow_port_zero=True,
                                 what="--stun-address")
    if host:
        try:
            ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            raise STUNAddressError(
                f"--stun-address {value!r}: the host must be an IP address to listen on"
            ) from None
    return (host or http_host), port


def parse_stun_listen_addresses(value: str | None, http_address: str) -> list[tuple[str, int]]:
    """The embedded STUN server's bind addresses: ``--stun-address`` as a comma list of what
    :func:`parse_stun_listen_address` takes; empty means ports 3478 and 3479 on the HTTP
    address's host, ``disable`` none. Each address must be different."""
    v = (value or "").strip()
    if not v:
        host = (parse_stun_listen_address("", http_address) or ("", 0))[0]
        return [(host, port) for port in DEFAULT_STUN_PORTS]
    items = [item.strip() for item in v.split(",")]
    if len(items) == 1:
        one = parse_stun_listen_address(items[0], http_address)
        return [] if one is None else [one]
    out: list[tuple[str, int]] = []
    for item in items:
        if not item:
            raise STUNAddressError(f"--stun-address {value!r}: empty list item")
        if item.lower() == "disable":
            raise STUNAddressError("--stun-address: 'disable' cannot be combined with addresses")
        addr = parse_stun_listen_address(item, http_address)
        assert addr is not None
        if addr in out and addr[1] != 0:
            raise STUNAddressError(f"--stun-address {value!r}: {item} is listed twice")
        out.append(addr)
    return out


def parse_stun_server_list(value: str | None) -> list[tuple[str, int]]:
    """``--derp-server-stun-addresses``: a comma list of ``host:port``; ``disable`` or empty → []."""
    v = (value or "").strip()
    if not v or v.lower() == "disable":
        return []
    out = []
    for item in v.split(","):
        item = item.strip()
        if not item:
            raise STUNAddressError(f"--derp-server-stun-addresses {value!r}: empty list item")
        if item.lower() == "disable":
            raise STUNAddressError(
                "--derp-server-stun-addresses: 'disable' cannot be combined with addresses"
            )
        out.append(parse_host_port(item, what="--derp-server-stun-addresses item"))
    return out
