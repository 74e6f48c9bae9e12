"""The DERP mesh following the replica set: this replica's relay dials the relay of every
other alive replica of its region (``derp/mesh.py``), and this replica's own relay address.

``--derp-server-relay-url`` is the address other replicas reach this one's relay at, never the
access URL (a load balancer would hand the mesh connection to any replica, this one too). Without
the flag it is taken from the HTTP listen address when that names one host and port.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from coderstack.derp.mesh import Mesh
from coderstack.server.replicas import Replica

WILDCARD_HOSTS = ("", "0.0.0.0", "::")


class RelayURLError(ValueError):
    """The relay URL cannot be used (it names the access URL)."""


def same_url(a: str, b: str) -> bool:
    """Whether two http(s) URLs name the same place (case, default ports, trailing slash)."""
    def key(url: str) -> tuple[str, str, int | None, str]:
        p = urlsplit(url.strip())
        scheme = p.scheme.lower()
        port = p.port or {"http": 80, "https": 443}.get(scheme)
        return scheme, (p.hostname or "").lower(), port, p.path.rstrip("/")

    return key(a) == key(b)


@dataclass(frozen=True)
class RelayAddress:
    """This replica's relay URL ("" when meshing is off) and, when off, why."""

    url: str
    warning: str | None = None


def relay_address(cfg: dict[str, Any], listen: tuple[str, int] | None) -> RelayAddress:
    """This replica's relay URL from the options and the HTTP address it listens on.

    An explicit ``--derp-server-relay-url`` equal to the access URL is refused; one taken from
    the listen address that equals a given access URL turns meshing off instead (that address
    might be the load balancer's)."""
    given = cfg.get("derp-server-relay-url")
    access = cfg["access-url"]
    if given:
        if same_url(given, access):
            raise RelayURLError(
                f"--derp-server-relay-url {given} is the access URL; it must be this replica's own "
                "address (the access URL may lead to any replica), e.g. http://<this host's IP>:<port>")
        return RelayAddress(given)
    if listen is None or listen[0] in WILDCARD_HOSTS or listen[1] == 0:
        return RelayAddress("", "DERP meshing between replicas is off: set --derp-server-relay-url "
                                "to this replica's own address (its HTTP address names no one host)")
    host, port = listen
    url = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    if same_url(url, access) and not cfg.get("access-url-derived"):
        return RelayAddress("", f"DERP meshing between replicas is off: {url}, this replica's HTTP "
                                "address, is also the access URL; set --derp-server-relay-url to an "
                                "address of this replica alone")
    return RelayAddress(url)


def mesh_addresses(replicas: Sequence[Replica], me: uuid.UUID, region_id: int,
                   own: Sequence[str]) -> list[str]:
    """The relay URLs to mesh with: other replicas of this region, never our own addresses."""
    urls = []
    for r in replicas:
        if r.id == me or r.region_id != region_id or not r.relay_url:
            continue
        if any(same_url(r.relay_url, mine) for mine in own if mine):
            continue
        urls.append(r.relay_url)
    return sorted(set(urls))


class MeshFollower:
    """A replica set handler that keeps the mesh pointed at the other replicas."""

    def __init__(self, mesh: Mesh, me: uuid.UUID, region_id: int, own: Sequence[str]) -> None:
        self.mesh = mesh
        self.me = me
        self.region_id = region_id
        self.own = tuple(own)

    def replicas_changed(self, replicas: Sequence[Replica]) -> None:
        self.mesh.set_addresses(mesh_addresses(replicas, self.me, self.region_id, self.own))

    def health_changed(self, healthy: bool, error: str | None) -> None:
        pass  # the mesh links keep running; the relays they reach are still there
