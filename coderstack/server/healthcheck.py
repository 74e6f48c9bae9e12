"""Running the health report's checks from the server process (see :mod:`coderstack.server.health`
for what each one means and the report's shape)."""

from __future__ import annotations

import secrets
from typing import Any

import treq
from twisted.internet import defer
from twisted.web.client import HTTPConnectionPool

from coderstack import __version__
from coderstack.server import health, healthws, relayprobe
from coderstack.tailnet.netcheck.checker import run_netcheck
from coderstack.tailnet.netcheck.health import derp_health_report
from coderstack.tailnet.netcheck.report import Report


async def _access_url(reactor: Any, access_url: str) -> dict[str, Any]:
    # A fresh connection each time (no pool): the check is of reaching the server, not reuse.
    pool = HTTPConnectionPool(reactor, persistent=False)
    try:
        resp = await treq.get(access_url.rstrip("/") + "/healthz", timeout=health.CHECK_TIMEOUT,
                              allow_redirects=False, reactor=reactor, pool=pool)
        body = (await resp.content()).decode("utf-8", "replace").strip()
        got = health.Fetched(resp.code, body, None)
    except Exception as err:  # the failure is the answer
        got = health.Fetched(None, "", health.why(err))
    return health.access_url_section(access_url, got)


async def _database(reactor: Any, store: Any) -> dict[str, Any]:
    latency, error = await health.timed(
        lambda: store.ping().addTimeout(health.CHECK_TIMEOUT, reactor), reactor.seconds)
    return health.database_section(latency, error)


async def _websocket(reactor: Any, access_url: str, token: str) -> dict[str, Any]:
    message = "health " + secrets.token_hex(8)
    try:
        echoed = await healthws.echo_through(reactor, access_url, token, message, health.CHECK_TIMEOUT)
    except Exception as err:  # the failure is the answer
        return health.websocket_section(None, message, health.why(err))
    return health.websocket_section(echoed, message, None)


async def _derp(reactor: Any, d: Any, token: str) -> dict[str, Any]:
    derp_map = d.derp_map
    # Browser-only deployments refuse users at the relay: there is no client path to check.
    relays = (None if d.browser_only else defer.ensureDeferred(
        relayprobe.probe_relays(reactor, derp_map, token, force_websockets=bool(d.derp_force_websockets))))
    try:
        found = await run_netcheck(reactor, derp_map, captive_portal_check=False)
        error = None
    except Exception as err:  # the failure is the answer
        found, error = Report(), health.why(err)
    probes = await relays if relays is not None else None
    return derp_health_report(derp_map, found, error=error, relay=probes)


async def run(reactor: Any, d: Any, token: str) -> dict[str, Any]:
    """Every check at once; ``token`` is the asking owner's session (the websocket check's)."""
    sections = await defer.gatherResults([
        defer.ensureDeferred(_access_url(reactor, d.access_url)),
        defer.ensureDeferred(_database(reactor, d.store)),
        defer.ensureDeferred(_websocket(reactor, d.access_url, token)),
        defer.ensureDeferred(_derp(reactor, d, token)),
    ])
    access, database, websocket, derp = sections
    return health.report(version=__version__, access_url=access, database=database,
                         websocket=websocket, derp=derp)
