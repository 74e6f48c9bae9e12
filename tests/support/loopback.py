"""A workspace "agent" whose ports are local TCP ports: the ``Connect`` hook of the tunnel
commands (``coderstack.cli.dialing``) without a tunnel, for their tests."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from twisted.internet.endpoints import TCP4ClientEndpoint

from coderstack.cli.dialing import AgentConnection, Connect
from coderstack.sdk import SDKError
from coderstack.tailnet.endpoint import PingResult


@dataclass
class LoopbackConnection:
    """An "agent" whose ports are local TCP ports (tests of the tunnel commands)."""

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

    def endpoint(self, port: int) -> TCP4ClientEndpoint:
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
            raise SDKError(f"workspace {workspace!r} not found", 404)
        return conn
    return connect
