"""The agent's services on its tunnel address, as factories keyed by port (Coder's numbering).

The lead listens each factory on the netstack's server endpoint for the agent's address::

    for port, factory in tunnel_services(data_dir, netcheck).items():
        await netstack_endpoint(port).listen(factory)

1 and 22: SSH (conch) · 3: speedtest · 4: HTTP API. (2, the reconnecting PTY, is not here.)
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from coderstack.agent.api import agent_api_site
from coderstack.agent.speedtest import SpeedtestServerFactory
from coderstack.agent.ssh import ssh_factory

SSH_PORTS = (1, 22)
SPEEDTEST_PORT = 3
API_PORT = 4


def tunnel_services(data_dir: str, netcheck: Callable[[], Awaitable[dict[str, Any] | None]],
                    env: dict[str, str] | None = None, reactor: Any = None) -> dict[int, Any]:
    ssh = ssh_factory(data_dir, reactor=reactor, env=env)
    services: dict[int, Any] = {port: ssh for port in SSH_PORTS}
    services[SPEEDTEST_PORT] = SpeedtestServerFactory(reactor)
    services[API_PORT] = agent_api_site(netcheck)
    return services
