"""The one hook the workspace commands (ssh, ping, speedtest, port-forward) need from the tunnel.

``Connect = async (reactor, ctx, workspace_name) -> AgentConnection``: find the workspace and
its agent (one clear error line if it is missing or offline), dial it over the tailnet, and
return an object with:

* ``endpoint(port) -> IStreamClientEndpoint`` — TCP to ``port`` on the agent's tunnel address
  (1 SSH, 3 speedtest, 4 agent API, any port for port-forward);
* ``udp_dial`` — ``(port, on_datagram) -> Deferred[DatagramFlow]`` or None (see
  :mod:`coderstack.forward.datagram`);
* ``async ping() -> PingResult`` — one disco ping to the agent (raises on timeout); the result
  (``coderstack.tailnet.endpoint.PingResult``) says the latency and the path: direct (its
  ``ip:port``) or relayed (the DERP region);
* ``peer_diagnostics() -> dict`` — the dict :func:`coderstack.cli.pingfmt.peer_diagnostics` reads;
* ``derp_region_names() -> {id: name}``, ``netinfo() -> Report JSON | None`` (this side's
  netcheck), ``async await_netinfo(timeout)`` (until the first netcheck report is in, at most
  ``timeout`` seconds), ``disable_direct`` (bool), ``close()``.

Each tunnel command is written as ``run_with(reactor, options, ctx, connect)``;
:func:`coderstack.cli.tunnel.command` gives it the real ``Connect`` over the tailnet (tests hand
them one that maps agent ports to local TCP ports: ``tests/support/loopback.py``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol

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
