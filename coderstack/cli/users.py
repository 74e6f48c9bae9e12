"""``coderstack users create|list``."""

from __future__ import annotations

import json
from typing import Any

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


class UsersOptions(CommandGroup):
    aliases = {"ls": "list"}
    synopsis = "coderstack users <create|list>"
    subCommands = [
        ["create", None, CreateOptions, "Create a user (owners only)."],
        ["list", None, ListOptions, "List users (owners only) (alias: ls)."],
    ]

    def postOptions(self) -> None:
        if self.subCommand is None:
            raise usage.UsageError("missing subcommand: create or list")


async def run(reactor: Any, opts: UsersOptions, ctx: Context) -> int:
    sub = opts.subOptions
    if opts.subCommand == "create":
        user = await ctx.api.post("/api/v2/users", {
            "username": sub["username"], "email": sub["email"], "password": sub["password"],
            "name": sub["full-name"],
        })
        ctx.out(f"User {user['username']!r} created ({user['email']}).")
        return 0
    got = await ctx.api.get("/api/v2/users")
    if sub["output"] == "json":
        ctx.out(json.dumps(got["users"], indent=2))
        return 0
    rows = [[u["username"], u["email"], ",".join(r["name"] for r in u["roles"]) or "member", u["created_at"][:19]]
            for u in got["users"]]
    ctx.out(table(["USERNAME", "EMAIL", "ROLES", "CREATED"], rows))
    return 0


Options = UsersOptions
