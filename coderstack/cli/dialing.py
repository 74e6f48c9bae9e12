"""The one hook the workspace commands (ssh, ping, speedtest, port-forward) need from the tunnel.

``Connect = async (reactor, ctx, workspace_name) -> AgentConnection``: find the workspace and
its agent (one clear error line if it is missing or offline), dial it over the tailnet, and
return an object with:

* ``endpoint(port) -> IStreamClientEndpoint`` — TCP to ``port`` on the agent's tunnel address
  (1 SSH, 3 speedtest, 4 agent API, any port for port-forward);
* ``udp_dial`` — ``(port, on_datagram) -> Deferred[DatagramFlow]`` or None (see
  :mod:`coderstack.cli.portforward`);
* ``async ping() -> PingResult`` — one disco ping to the agent (raises on timeout); the result
  (``coderstack.tailnet.endpoint.PingResult``) says the latency and the path: direct (its
  ``ip:port``) or relayed (the DERP region);
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

from coderstack.tailnet.endpoint import PingResult


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
        result = self.pings.pop(0) if self.pings else PingResult.direct(0.001, "127.0.0.1:41641")
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
