"""``coderstack login URL`` and ``coderstack logout``.

On a server with no users yet, login creates the first (owner) user, like ``coder login`` does.
Credentials come from flags, the environment (CODER_FIRST_USER_*, CODER_EMAIL/CODER_PASSWORD) or
a prompt when stdin is a terminal. The session token is stored in the config dir, mode 0600.
"""

from __future__ import annotations

import getpass
from typing import Any

from twisted.python import usage

from coderstack.cli.command import Command
from coderstack.cli.context import Context
from coderstack.envopts import url as parse_url
from coderstack.sdk import Client, SDKError


class LoginOptions(Command):
    synopsis = "coderstack login <url> [options]"
    optParameters = [
        ["email", "e", None, "Email (or username) to log in with [env CODER_EMAIL]."],
        ["password", "p", None, "Password [env CODER_PASSWORD]; prompted for when stdin is a terminal."],
        ["token", "t", None, "Use this existing session token instead of a password."],
        ["first-user-username", None, None, "Username of the first user, on a new server [env CODER_FIRST_USER_USERNAME]."],
        ["first-user-email", None, None, "Email of the first user [env CODER_FIRST_USER_EMAIL]."],
        ["first-user-password", None, None, "Password of the first user [env CODER_FIRST_USER_PASSWORD]."],
    ]

    def parseArgs(self, url: str) -> None:  # type: ignore[override]  # usage.Options passes the positional arguments to it, one parameter each
        try:
            self["url"] = parse_url(url)
        except ValueError as err:
            raise usage.UsageError(f"invalid <url>: {err}") from None


class LogoutOptions(Command):
    synopsis = "coderstack logout"


def _ask(ctx: Context, prompt: str, secret: bool = False) -> str | None:
    if not ctx.stdin.isatty():
        return None
    if secret:
        return getpass.getpass(prompt)
    ctx.stderr.write(prompt)
    ctx.stderr.flush()
    return ctx.stdin.readline().strip()


async def login(reactor: Any, opts: LoginOptions, ctx: Context) -> int:
    url = opts["url"]
    env = ctx.environ
    if opts["token"]:
        api = Client(reactor, url, opts["token"])
        try:
            me = await api.me()
        finally:
            await api.close()
        _save(ctx, url, opts["token"])
        ctx.out(f"Welcome to coderstack, {me['username']}! You are logged in to {url}.")
        return 0

    anon = Client(reactor, url)
    try:
        try:
            await anon.get("/api/v2/users/first")
            first = False
        except SDKError as err:
            if err.status != 404:
                raise
            first = True
        if first:
            username = opts["first-user-username"] or env.get("CODER_FIRST_USER_USERNAME") or _ask(ctx, "Username: ")
            email = opts["first-user-email"] or env.get("CODER_FIRST_USER_EMAIL") or _ask(ctx, "Email: ")
            password = (opts["first-user-password"] or env.get("CODER_FIRST_USER_PASSWORD")
                        or _ask(ctx, "Password: ", secret=True))
            if not (username and email and password):
                raise usage.UsageError(
                    "this server has no users yet: give --first-user-username, --first-user-email "
                    "and --first-user-password to create the first one"
                )
            await anon.post("/api/v2/users/first", {"username": username, "email": email, "password": password})
            ctx.err(f"Created the first user, {username!r} (owner).")
        else:
            email = opts["email"] or env.get("CODER_EMAIL") or _ask(ctx, "Email: ")
            password = opts["password"] or env.get("CODER_PASSWORD") or _ask(ctx, "Password: ", secret=True)
            if not (email and password):
                raise usage.UsageError("give --email and --password (or --token) to log in")
        got = await anon.post("/api/v2/users/login", {"email": email, "password": password})
    finally:
        await anon.close()
    token = got["session_token"]
    api = Client(reactor, url, token)
    try:
        me = await api.me()
    finally:
        await api.close()
    _save(ctx, url, token)
    ctx.out(f"Welcome to coderstack, {me['username']}! You are logged in to {url}.")
    return 0


def _save(ctx: Context, url: str, token: str) -> None:
    ctx.config.write("url", url)
    ctx.config.write("session", token, secret=True)


async def logout(reactor: Any, opts: LogoutOptions, ctx: Context) -> int:
    try:
        await ctx.api.post("/api/v2/users/logout")
    except SDKError as err:
        ctx.err(f"warning: the server did not confirm the logout: {err}")
    ctx.config.remove("session")
    ctx.out("You are no longer logged in.")
    return 0


COMMANDS = {"login": (LoginOptions, login), "logout": (LogoutOptions, logout)}
