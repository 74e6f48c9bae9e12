"""``coderstack replicas``: the server replicas alive on this deployment's database (owners)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from coderstack.cli.command import Command
from coderstack.cli.context import Context
from coderstack.cli.output import OutputOption, table


class ReplicasOptions(OutputOption, Command):
    synopsis = "coderstack replicas [--output table|json]"


def age(iso: str, now: datetime | None = None) -> str:
    """How long ago ``iso`` was, in its largest unit: ``45s``, ``12m``, ``3h``, ``2d``."""
    then = datetime.fromisoformat(iso)
    if then.tzinfo is None:
        then = then.replace(tzinfo=UTC)
    seconds = max(0, int(((now or datetime.now(UTC)) - then).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def rows(replicas: list[dict[str, Any]], now: datetime | None = None) -> list[list[str]]:
    return [[r["id"], r["hostname"], str(r["region_id"]), r["relay_address"] or "-",
             f"{r['database_latency_ms']:.1f}ms", age(r["created_at"], now), r["error"] or "-"]
            for r in replicas]


async def run(reactor: Any, opts: ReplicasOptions, ctx: Context) -> int:
    got = await ctx.api.get("/api/v2/replicas")
    if opts["output"] == "json":
        ctx.out(json.dumps(got, indent=2))
        return 0
    ctx.out(table(["ID", "HOSTNAME", "REGION", "RELAY", "LATENCY", "AGE", "ERROR"], rows(got)))
    return 0


Options = ReplicasOptions
