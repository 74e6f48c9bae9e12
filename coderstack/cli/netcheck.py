"""``coderstack netcheck``: a network report against the deployment's DERP map, as JSON.

Like ``coder netcheck``: the DERP map comes from ``/api/v2/workspaceagents/connection``; the
report is Coder's ``ClientNetcheckReport`` (``{"derp": DERPHealthReport, "interfaces":
InterfacesReport}``) on stdout, indented; progress goes to stderr.
"""

from __future__ import annotations

import json
from typing import Any

from coderstack.cli.command import Command
from coderstack.derpmap import DERPMap, DERPMapError
from coderstack.netinfo import gather_interfaces
from coderstack.tailnet.netcheck.checker import run_netcheck
from coderstack.tailnet.netcheck.health import (
    client_netcheck_report,
    derp_health_report,
    interfaces_report,
)


class Options(Command):
    synopsis = "coderstack netcheck [--no-captive-portal]"
    longdesc = ("Print a network check report: UDP reachability, NAT type, relay latencies and "
                "interfaces with a small MTU.")
    optFlags = [
        ["no-captive-portal", None, "Skip the captive-portal check (/generate_204)."],
    ]


async def run(reactor: Any, options: Options, ctx: Any) -> int:
    ctx.stderr.write("Gathering a network report. This may take a few seconds...\n")
    ctx.stderr.flush()
    info = await ctx.api.connection_info()
    try:
        derp_map = DERPMap.from_json(info.get("derp_map"))
    except DERPMapError as e:
        ctx.stderr.write(f"error: the server sent an unusable DERP map: {e}\n")
        return 1
    report = await run_netcheck(reactor, derp_map,
                                captive_portal_check=not options["no-captive-portal"])
    derp = derp_health_report(derp_map, report)
    ifaces = interfaces_report(gather_interfaces())
    json.dump(client_netcheck_report(derp, ifaces), ctx.stdout, indent=2)
    ctx.stdout.write("\n")
    return 0
