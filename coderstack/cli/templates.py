"""``coderstack templates push|list``: Terraform templates (owners push, everyone lists).

``push DIR`` uploads the directory's Terraform files (top level: ``*.tf``, ``*.tf.json``,
``*.tfvars[.json]`` and the scripts/templates they may read); the server runs ``terraform
validate`` on them and keeps them as the template's next version.
"""

from __future__ import annotations

import base64
import json
import os
from typing import Any

from twisted.python import usage

from coderstack.cli.command import Command, CommandGroup
from coderstack.cli.context import Context
from coderstack.cli.output import OutputOption, ago, table
from coderstack.sdk import SDKError

#: What a push uploads (the server keeps the same set; see server/tfworkdir.py).
TEMPLATE_SUFFIXES = (".tf", ".tf.json", ".tfvars", ".tfvars.json", ".tftpl", ".tpl", ".sh", ".ps1")


class PushOptions(Command):
    synopsis = "coderstack templates push <dir> [--name NAME]"
    optParameters = [["name", "n", None, "Template name (default: the directory's name)."]]

    def parseArgs(self, directory: str) -> None:  # type: ignore[override]  # usage.Options passes the positional arguments to it, one parameter each
        self["directory"] = directory


class ListOptions(OutputOption, Command):
    synopsis = "coderstack templates list [--output table|json]"


class TemplatesOptions(CommandGroup):
    aliases = {"ls": "list"}
    synopsis = "coderstack templates <push|list>"
    subCommands = [
        ["push", None, PushOptions, "Upload a template directory (a new version if it exists)."],
        ["list", None, ListOptions, "List templates (alias: ls)."],
    ]


def read_template_dir(directory: str) -> dict[str, bytes]:
    if not os.path.isdir(directory):
        raise usage.UsageError(f"not a directory: {directory}")
    files = {}
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if os.path.isfile(path) and name.endswith(TEMPLATE_SUFFIXES) and not name.startswith("."):
            with open(path, "rb") as f:
                files[name] = f.read()
    if not any(n.endswith((".tf", ".tf.json")) for n in files):
        raise usage.UsageError(f"no *.tf or *.tf.json files in {directory}")
    return files


async def push(opts: PushOptions, ctx: Context) -> int:
    directory = opts["directory"]
    name = opts["name"] or os.path.basename(os.path.abspath(directory))
    files = read_template_dir(directory)
    ctx.err(f"Validating {len(files)} file(s) with terraform: {', '.join(files)}")
    body = {"name": name, "files": {n: base64.b64encode(c).decode() for n, c in files.items()}}
    try:
        got = await ctx.api.post("/api/v2/templates", body)
    except SDKError as err:
        if err.status != 400 or not err.detail:
            raise
        ctx.err(f"error: {err.message}")
        for line in err.detail.splitlines():
            ctx.err(f"  {line}")
        return 1
    ctx.out(f"Template {got['name']!r} version {got['active_version']} pushed.")
    return 0


async def list_(opts: ListOptions, ctx: Context) -> int:
    got = await ctx.api.get("/api/v2/templates")
    if opts["output"] == "json":
        ctx.out(json.dumps(got["templates"], indent=2))
        return 0
    if not got["templates"]:
        ctx.err("No templates yet. Push one with: coderstack templates push <dir>")
        return 0
    rows = [[t["name"], str(t["active_version"]), ago(t["updated_at"])] for t in got["templates"]]
    ctx.out(table(["NAME", "VERSION", "UPDATED"], rows))
    return 0


async def run(reactor: Any, opts: TemplatesOptions, ctx: Context) -> int:
    if opts.subCommand == "push":
        return await push(opts.subOptions, ctx)
    return await list_(opts.subOptions, ctx)


Options = TemplatesOptions
