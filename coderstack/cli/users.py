"""``coderstack users create|list|suspend|activate|delete``."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

from twisted.python import usage

from coderstack.cli.command import Command, CommandGroup
from coderstack.cli.context import Context
from coderstack.cli.output import OutputOption, table


class CreateOptions(Command):
    synopsis = "coderstack users create --username U --email E --password P"
    optParameters = [
        ["username", "u", None, "Username."],
        ["email", "e", None, "Email."],
        ["password", "p", None, "Password (at least 8 characters)."],
        ["full-name", "n", "", "Full name."],
    ]

    def postOptions(self) -> None:
        for flag in ("username", "email", "password"):
            if not self[flag]:
                raise usage.UsageError(f"--{flag} is required")


class ListOptions(OutputOption, Command):
    synopsis = "coderstack users list [--output table|json]"


class _NamedUser(Command):
    """A verb on one user, named by username."""

    verb = ""

    def parseArgs(self, name: str | None = None) -> None:
        if not name:
            raise usage.UsageError(f"missing USERNAME: coderstack users {self.verb} USERNAME")
        self["name"] = name


class SuspendOptions(_NamedUser):
    synopsis = "coderstack users suspend USERNAME"
    verb = "suspend"


class ActivateOptions(_NamedUser):
    synopsis = "coderstack users activate USERNAME"
    verb = "activate"


class DeleteOptions(_NamedUser):
    synopsis = "coderstack users delete USERNAME"
    verb = "delete"


class UsersOptions(CommandGroup):
    aliases = {"ls": "list"}
    synopsis = "coderstack users <create|list|suspend|activate|delete>"
    subCommands = [
        ["create", None, CreateOptions, "Create a user (owners only)."],
        ["list", None, ListOptions, "List users (owners only) (alias: ls)."],
        ["suspend", None, SuspendOptions, "Suspend a user: no login, its sessions end (owners only)."],
        ["activate", None, ActivateOptions, "Activate a suspended user (owners only)."],
        ["delete", None, DeleteOptions, "Delete a user without workspaces (owners only)."],
    ]


async def run(reactor: Any, opts: UsersOptions, ctx: Context) -> int:
    sub = opts.subOptions
    if opts.subCommand == "create":
        user = await ctx.api.post("/api/v2/users", {
            "username": sub["username"], "email": sub["email"], "password": sub["password"],
            "name": sub["full-name"],
        })
        ctx.out(f"User {user['username']!r} created ({user['email']}).")
        return 0
    if opts.subCommand in ("suspend", "activate"):
        name = sub["name"]
        user = await ctx.api.request("PUT", f"/api/v2/users/{quote(name, safe='')}/status/{opts.subCommand}")
        ctx.out(f"User {user['username']!r} is now {user['status']}.")
        return 0
    if opts.subCommand == "delete":
        got = await ctx.api.delete(f"/api/v2/users/{quote(sub['name'], safe='')}")
        ctx.out(got["message"])
        return 0
    got = await ctx.api.get("/api/v2/users")
    if sub["output"] == "json":
        ctx.out(json.dumps(got["users"], indent=2))
        return 0
    rows = [[u["username"], u["email"], ",".join(r["name"] for r in u["roles"]) or "member",
             u.get("status", "active"), u["created_at"][:19]]
            for u in got["users"]]
    ctx.out(table(["USERNAME", "EMAIL", "ROLES", "STATUS", "CREATED"], rows))
    return 0


Options = UsersOptions
