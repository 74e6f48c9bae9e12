"""Entry point run inside a client network namespace by tests/netlab/test_stun_nat.py.

    python -m tests.netlab.stun_probe query HOST PORT      -> {"mapped": [ip, port], "local": ...}
    python -m tests.netlab.stun_probe netcheck MAP_JSON    -> the netcheck Report JSON + "logs"

Prints one JSON line on stdout and exits.
"""

from __future__ import annotations

import json
import sys

from twisted.internet import defer, task


async def _query(reactor, host: str, port: str) -> dict:
    from coderstack.stun.client import open_stun_client

    s = open_stun_client(reactor)
    try:
        r = await s.query((host, int(port)), timeout=5)
        return {"mapped": list(r.mapped), "local": list(s.local_address())}
    finally:
        await s.close()


async def _netcheck(reactor, map_json: str) -> dict:
    from coderstack.derpmap import DERPMap
    from coderstack.tailnet.netcheck.checker import run_netcheck

    report = await run_netcheck(reactor, DERPMap.loads(map_json), have_v6=False)
    out = report.to_json()
    out["logs"] = report.logs
    out["probes"] = [[p.region_id, p.node, p.family, p.latency, p.mapped, p.error]
                     for p in report.probes]
    return out


def main(reactor, mode: str, *args: str):
    fn = {"query": _query, "netcheck": _netcheck}[mode]

    async def go() -> None:
        result = await fn(reactor, *args)
        print(json.dumps(result), flush=True)

    return defer.ensureDeferred(go())


if __name__ == "__main__":
    task.react(main, sys.argv[1:])
