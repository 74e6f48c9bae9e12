"""The port-forward spec grammar (Coder's ``port-forward`` command) and the lines printed about forwards.

Comma-separated and repeatable, for ``--tcp`` / ``-p`` and ``--udp``::

    [BIND:]LOCAL[-LOCAL_END][:REMOTE[-REMOTE_END]]      BIND = a.b.c.d | [v6]

``8000``, ``8888:9999``, ``8000-8005``, ``1-5:6-10``, ``127.0.0.1:4000:4000``,
``[::1]:8080:8081``, ``[::1]:4000-4001:5000-5001``. Ranges must have the same length, port 0
is refused, the same local (network, host, port) twice is an error. Without a bind address
the forwarder listens on 127.0.0.1 and, when the host has IPv6 loopback, on ::1 too.

Every accepted local connection dials ``127.0.0.1:<remote>`` in the workspace. Error messages
are Coder's, word for word, so scripts that read them keep working.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

SPEC_RE = re.compile(r"^((\[[0-9a-fA-F:]+]|\d+\.\d+\.\d+\.\d+):)?(\d+)(-(\d+))?(:(\d+)(-(\d+))?)?$", re.ASCII)
DIAL_HOST = "127.0.0.1"


class SpecError(ValueError):
    """A port-forward spec that does not parse; the message is Coder's."""


@dataclass(frozen=True)
class ForwardSpec:
    network: str      # "tcp" | "udp"
    listen_host: str  # "" = not given (127.0.0.1 and ::1)
    listen_port: int
    dial_port: int


def _parse_port(text: str) -> int:
    stripped = text.strip()
    if not stripped.isdigit():
        raise SpecError(f'parse port "{text}": strconv.ParseUint: parsing "{stripped}": invalid syntax')
    port = int(stripped)
    if port > 65535:
        raise SpecError(f'parse port "{text}": strconv.ParseUint: parsing "{stripped}": value out of range')
    if port == 0:
        raise SpecError("port cannot be 0")
    return port


def _parse_range(start: str, end: str | None) -> list[int]:
    try:
        first = _parse_port(start)
    except SpecError as err:
        raise SpecError(f'parse range start port from "{start}": {err}') from None
    last = first
    if end:
        try:
            last = _parse_port(end)
        except SpecError as err:
            raise SpecError(f'parse range end port from "{end}": {err}') from None
    if last < first:
        raise SpecError(f"range end port {last} is less than start port {first}")
    return list(range(first, last + 1))


def parse_spec(text: str) -> list[tuple[str, int, int]]:
    """One spec -> [(listen_host, listen_port, dial_port)]; raises :class:`SpecError`."""
    m = SPEC_RE.fullmatch(text)
    if m is None:
        raise SpecError(f'invalid port specification "{text}"')
    host = ""
    if m.group(2):
        try:
            host = str(ipaddress.ip_address(m.group(2).strip("[]")))
        except ValueError:
            raise SpecError(f'invalid IP address "{m.group(2)}"') from None
    try:
        local = _parse_range(m.group(3), m.group(5))
    except SpecError as err:
        raise SpecError(f'parse local port range from "{text}": {err}') from None
    remote = local
    if m.group(7):
        try:
            remote = _parse_range(m.group(7), m.group(9))
        except SpecError as err:
            raise SpecError(f'parse remote port range from "{text}": {err}') from None
    if len(local) != len(remote):
        raise SpecError(f"port ranges must be the same length, got {len(local)} ports forwarded to {len(remote)} ports")
    return [(host, lp, rp) for lp, rp in zip(local, remote, strict=True)]


def parse_forwards(tcp: list[str], udp: list[str]) -> list[ForwardSpec]:
    specs: list[ForwardSpec] = []
    for network, entries in (("tcp", tcp), ("udp", udp)):
        for entry in entries:
            for spec in entry.split(","):
                try:
                    mapped = parse_spec(spec.strip())
                except SpecError as err:
                    raise SpecError(
                        f'failed to parse {network.upper()} port-forward specification "{spec}": {err}') from None
                specs.extend(ForwardSpec(network, h, lp, rp) for h, lp, rp in mapped)
    seen: set[tuple[str, str, int]] = set()
    for s in specs:
        key = (s.network, s.listen_host, s.listen_port)
        if key in seen:
            shown = s.listen_host or "invalid IP"  # Go prints an unset netip.Addr so
            raise SpecError(f"local {s.network} host:{shown} port:{s.listen_port} is specified twice")
        seen.add(key)
    return specs


def format_addr(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def forwarding_line(network: str, host: str, port: int, dial_port: int) -> str:
    return (f"Forwarding '{network}://{format_addr(host, port)}' locally to "
            f"'{network}://{format_addr(DIAL_HOST, dial_port)}' in the workspace")


def dial_failed_line(network: str, dial_port: int, why: str) -> str:
    return f"Failed to dial '{network}://{format_addr(DIAL_HOST, dial_port)}' in workspace: {why}"
