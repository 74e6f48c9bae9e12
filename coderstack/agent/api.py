"""The agent's HTTP API on tunnel port 4 (Klein), used by ``coderstack ping -v`` and port listings.

Only tunnel peers can reach it (like the SSH server); it is read-only. JSON over HTTP/1.1:

``GET /api/v0/listening-ports`` -> ``{"ports": [{"process_name": str, "network": "tcp",
    "port": int}, ...]}`` — TCP sockets in LISTEN state (``/proc/net/tcp`` and ``tcp6``),
    ports below 9 left out (Coder's ``AgentMinimumListeningPort``: the agent's own services
    live there), one entry per (network, port), sorted by port. ``process_name`` is the
    command name when this user may read the owning process's fds, else ``""``.
``GET /api/v0/netcheck`` -> Coder's ``AgentNetcheckReport``: ``{"severity", "warnings",
    "dismissed", "netinfo": <netcheck Report JSON>, "interfaces": <interfaces report>}``.
    The netcheck itself is a hook (the agent runs it against its current DERP map).
Errors are ``{"message", "detail"}`` with a 4xx/5xx status, as on the server.

``/proc/net/tcp`` line: ``sl local rem st ... uid timeout inode``; ``local`` is
``HEXIP:HEXPORT`` with the IPv4 address as a little-endian 32-bit word (IPv6: four of them);
state ``0A`` is LISTEN.
"""

from __future__ import annotations

import json
import os
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from klein import Klein
from twisted.logger import Logger
from twisted.web.server import Request, Site

from coderstack.netinfo import gather_interfaces
from coderstack.tailnet.netcheck.health import interfaces_report
from coderstack.wire.ports import MIN_FORWARDED_PORT

log = Logger()

TCP_LISTEN = "0A"


def parse_proc_net_tcp(text: str) -> list[tuple[int, int]]:
    """[(port, inode)] of LISTEN sockets in a /proc/net/tcp{,6} file; bad lines are skipped."""
    out = []
    for line in text.splitlines()[1:]:
        parts = line.split()
        if len(parts) < 10 or parts[3] != TCP_LISTEN or ":" not in parts[1]:
            continue
        try:
            port = int(parts[1].rsplit(":", 1)[1], 16)
            inode = int(parts[9])
        except ValueError:
            continue
        out.append((port, inode))
    return out


def socket_owners(proc: str = "/proc") -> dict[int, str]:
    """socket inode -> command name, for the processes whose fds we may read."""
    owners: dict[int, str] = {}
    try:
        pids = [p for p in os.listdir(proc) if p.isdigit()]
    except OSError:
        return owners
    for pid in pids:
        fd_dir = os.path.join(proc, pid, "fd")
        try:
            fds = os.listdir(fd_dir)
            with open(os.path.join(proc, pid, "comm")) as f:
                name = f.read().strip()
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(os.path.join(fd_dir, fd))
            except OSError:
                continue
            if target.startswith("socket:["):
                try:
                    owners[int(target[8:-1])] = name
                except ValueError:
                    pass
    return owners


def listening_ports(proc: str = "/proc", owners: Callable[[], dict[int, str]] | None = None) -> list[dict[str, Any]]:
    found: dict[int, int] = {}
    for name in ("tcp", "tcp6"):
        try:
            with open(os.path.join(proc, "net", name)) as f:
                text = f.read()
        except OSError:
            continue
        for port, inode in parse_proc_net_tcp(text):
            if port >= MIN_FORWARDED_PORT:
                found.setdefault(port, inode)
    names = (owners or (lambda: socket_owners(proc)))() if found else {}
    return [{"process_name": names.get(inode, ""), "network": "tcp", "port": port}
            for port, inode in sorted(found.items())]


def agent_netcheck_report(netinfo: dict[str, Any] | None, interfaces: dict[str, Any]) -> dict[str, Any]:
    severity = interfaces.get("severity", "ok")
    return {"severity": severity, "warnings": list(interfaces.get("warnings", [])), "dismissed": False,
            "netinfo": netinfo, "interfaces": interfaces}


class AgentAPI:
    """``netcheck()`` returns the agent's netcheck ``Report.to_json()`` (or None if unknown)."""

    app = Klein()

    def __init__(self, netcheck: Callable[[], Awaitable[dict[str, Any] | None]],
                 ports: Callable[[], list[dict[str, Any]]] = listening_ports,
                 interfaces: Callable[[], Iterable[Any]] = gather_interfaces):
        self.netcheck, self.ports, self.interfaces = netcheck, ports, interfaces

    @staticmethod
    def _json(request: Request, obj: Any, code: int = 200) -> bytes:
        request.setResponseCode(code)
        request.setHeader(b"Content-Type", b"application/json")
        request.setHeader(b"Cache-Control", b"no-store")
        return json.dumps(obj).encode() + b"\n"

    @app.route("/api/v0/listening-ports", methods=["GET"])
    def listening_ports_route(self, request: Request) -> bytes:
        return self._json(request, {"ports": self.ports()})

    @app.route("/api/v0/netcheck", methods=["GET"])
    async def netcheck_route(self, request: Request) -> bytes:
        try:
            netinfo = await self.netcheck()
        except Exception:  # reported to the caller (without its text), not raised
            log.failure("network check failed")
            return self._json(request, {"message": "Failed to run a network check.",
                                        "detail": "the agent logged the cause"}, 500)
        return self._json(request, agent_netcheck_report(netinfo, interfaces_report(self.interfaces())))

    @app.handle_errors(Exception)
    def errors(self, request: Request, failure: Any) -> bytes:
        code = getattr(failure.value, "code", 500)
        code = code if isinstance(code, int) and 400 <= code < 600 else 500
        message = "Not found." if code == 404 else ("Method not allowed." if code == 405 else "Internal error.")
        return self._json(request, {"message": message, "detail": ""}, code)

    def resource(self) -> Any:
        return self.app.resource()


def agent_api_site(netcheck: Callable[[], Awaitable[dict[str, Any] | None]], **kw: Any) -> Site:
    """A Site to listen on the tunnel's port 4."""
    return Site(AgentAPI(netcheck, **kw).resource())
