"""The one hook the workspace commands (ssh, ping, speedtest, port-forward) need from the tunnel.

``Connect = async (reactor, ctx, workspace_name) -> AgentConnection``: find the workspace and
its agent (one clear error line if it is missing or offline), dial it over the tailnet, and
return an object with:

* ``endpoint(port) -> IStreamClientEndpoint`` — TCP to ``port`` on the agent's tunnel address
  (1 SSH, 3 speedtest, 4 agent API, any port for port-forward);
* ``udp_dial`` — ``(port, on_datagram) -> Deferred[DatagramFlow]`` or None (see
  :mod:`coderstack.cli.portforward`);
* ``async ping() -> PingResult`` — one disco/TSMP ping to the agent (raises on timeout);
* ``peer_diagnostics() -> dict`` — the dict :func:`coderstack.cli.pingfmt.peer_diagnostics` reads;
* ``derp_region_names() -> {id: name}``, ``netinfo() -> Report JSON | None`` (this side's
  netcheck), ``async await_netinfo(timeout)`` (until the first netcheck report is in, at most
  ``timeout`` seconds), ``disable_direct`` (bool), ``close()``.

Each tunnel command is written as ``run_with(reactor, options, ctx, connect)``;
:func:`coderstack.cli.tunnel.command` gives it the real ``Connect`` over the tailnet.
:func:`loopback_connect` maps agent ports to local TCP ports instead (for tests).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.interfaces import IStreamClientEndpoint


@dataclass(frozen=True)
class PingResult:
    latency: float            # seconds
    p2p: bool
    endpoint: str = ""        # "IP:PORT" when p2p
    derp_region: int = 0      # region id when relayed (0: unknown)
    derp_name: str = ""       # region name when relayed, if the path said it

    @classmethod
    def from_path(cls, latency: float, path: str) -> PingResult:
        """From ``Conn.ping``'s path string: ``"p2p 192.0.2.1:41641"`` or ``"DERP(<region>)"``."""
        if path.startswith("p2p"):
            return cls(latency, True, path[3:].strip())
        name = path[5:-1] if path.startswith("DERP(") and path.endswith(")") else path
        if name.isdigit():
            return cls(latency, False, derp_region=int(name))
        return cls(latency, False, derp_name=name)


class AgentConnection(Protocol):
    udp_dial: Any
    disable_direct: bool

    def endpoint(self, port: int) -> IStreamClientEndpoint: ...
    async def ping(self) -> PingResult: ...
    def peer_diagnostics(self) -> dict[str, Any]: ...
    def derp_region_names(self) -> dict[int, str]: ...
    def netinfo(self) -> dict[str, Any] | None: ...
    async def await_netinfo(self, timeout: float) -> None: ...
    def close(self) -> Any: ...


Connect = Callable[[Any, Any, str], Awaitable[AgentConnection]]


@dataclass
class LoopbackConnection:
    """An "agent" whose ports are local TCP ports (tests, and benchmarks without a tunnel)."""

    reactor: Any
    ports: dict[int, int]
    pings: list[PingResult | None] = field(default_factory=list)
    udp_dial: Any = None
    disable_direct: bool = False
    diagnostics: dict[str, Any] = field(default_factory=dict)
    regions: dict[int, str] = field(default_factory=dict)
    report: dict[str, Any] | None = None     # what netinfo() returns once await_netinfo ran
    closed: bool = False
    _netinfo: dict[str, Any] | None = None

    def endpoint(self, port: int) -> IStreamClientEndpoint:
        return TCP4ClientEndpoint(self.reactor, "127.0.0.1", self.ports.get(port, port))

    async def ping(self) -> PingResult:
        result = self.pings.pop(0) if self.pings else PingResult(0.001, True, "127.0.0.1:41641")
        if result is None:
            raise TimeoutError("ping timed out")
        return result

    def peer_diagnostics(self) -> dict[str, Any]:
        return self.diagnostics

    def derp_region_names(self) -> dict[int, str]:
        return self.regions

    def netinfo(self) -> dict[str, Any] | None:
        return self._netinfo

    async def await_netinfo(self, timeout: float) -> None:
        # A report that is only there for whoever waits for it, like a netcheck still running.
        self._netinfo = self.report

    def close(self) -> None:
        self.closed = True


def loopback_connect(conn: LoopbackConnection, expect: str | None = None) -> Connect:
    async def connect(reactor: Any, ctx: Any, workspace: str) -> AgentConnection:
        if expect is not None and workspace != expect:
            from coderstack.sdk import SDKError
            raise SDKError(f"workspace {workspace!r} not found", 404)
        return conn
    return connect
