"""The ``coderstack`` CLI against a real server in this process (127.0.0.1, a kernel-picked port).

Each test runs ``coderstack.cli.main.run`` with its own config dir and captured streams, exactly
the code path of the console script minus ``sys.exit``.
"""

from __future__ import annotations

import io
import ipaddress
import json
import os
import socket
import stat
import subprocess
import sys
import uuid

from twisted.internet import reactor
from twisted.trial import unittest

from coderstack import __version__
from coderstack.agent.service import AgentService
from coderstack.cli.main import run as cli_run
from coderstack.sdk import Client, SDKError
from coderstack.wire.coordination import address_from_uuid
from tests.support.inprocess import CLI, start_server
from tests.support.waiting import wait_until

OWNER = ("--first-user-username", "alice", "--first-user-email", "alice@example.com",
         "--first-user-password", "correct horse battery")


def one_line(text: str) -> bool:
    return text.endswith("\n") and text.count("\n") == 1


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class CLITestCase(unittest.TestCase):
    async def setUp(self) -> None:
        self.server, self.url = await start_server(self)
        self.cli = CLI(self)

    async def login_owner(self) -> None:
        code, out, err = await self.cli("login", self.url, *OWNER)
        self.assertEqual(code, 0, err)

    async def agent_get(self, token: str, path: str) -> object:
        client = Client(reactor, self.url, token)
        try:
            return await client.get(path)
        finally:
            await client.close()

    async def show(self, name: str) -> dict:
        code, out, err = await self.cli("show", name, "--output", "json")
        self.assertEqual(code, 0, err)
        return json.loads(out)

    async def create(self, name: str) -> tuple[dict, str]:
        code, out, err = await self.cli("create", name)
        self.assertEqual(code, 0, err)
        tokens = [w.split("=", 1)[1] for w in out.split() if w.startswith("CODER_AGENT_TOKEN=")]
        self.assertEqual(len(tokens), 1, out)
        return await self.show(name), tokens[0]


class LoginTests(CLITestCase):
    async def test_login_creates_the_first_user(self) -> None:
        code, out, err = await self.cli("login", self.url, *OWNER)
        self.assertEqual(code, 0, err)
        self.assertIn("alice", out)
        self.assertIn("first user", err)
        self.assertEqual(self.cli.read_config("url"), self.url)
        session = self.cli.read_config("session")
        self.assertTrue(session)
        self.assertNotIn(session, out + err)
        mode = stat.S_IMODE(os.stat(os.path.join(self.cli.config_dir, "session")).st_mode)
        self.assertEqual(mode, 0o600)
        # The stored session works.
        code, out, err = await self.cli("users", "list", "--output", "json")
        self.assertEqual(code, 0, err)
        self.assertEqual([u["username"] for u in json.loads(out)], ["alice"])

    async def test_login_to_existing_server_with_password(self) -> None:
        await self.login_owner()
        other = CLI(self)
        code, out, err = await other("login", self.url, "--email", "alice@example.com",
                                     "--password", "correct horse battery")
        self.assertEqual(code, 0, err)
        self.assertNotEqual(other.read_config("session"), self.cli.read_config("session"))
        # Credentials from the environment work too.
        third = CLI(self)
        code, out, err = await third("login", self.url, CODER_EMAIL="alice", CODER_PASSWORD="correct horse battery")
        self.assertEqual(code, 0, err)

    async def test_wrong_password_is_one_line(self) -> None:
        await self.login_owner()
        other = CLI(self)
        code, out, err = await other("login", self.url, "--email", "alice@example.com", "--password", "wrong wrong")
        self.assertEqual(code, 1)
        self.assertTrue(one_line(err), err)
        self.assertIn("Incorrect email or password", err)
        self.assertIsNone(other.read_config("session"))

    async def test_first_user_needs_credentials(self) -> None:
        code, out, err = await self.cli("login", self.url)
        self.assertEqual(code, 2)
        self.assertIn("--first-user-username", err)
        self.assertIsNone(self.cli.read_config("session"))

    async def test_login_with_token_and_logout(self) -> None:
        await self.login_owner()
        token = self.cli.read_config("session")
        other = CLI(self)
        code, out, err = await other("login", self.url, "--token", token)
        self.assertEqual(code, 0, err)
        code, out, err = await other("logout")
        self.assertEqual(code, 0, err)
        self.assertIsNone(other.read_config("session"))
        # Logging out revoked the token everywhere.
        code, out, err = await self.cli("list")
        self.assertEqual(code, 1)
        self.assertIn("Invalid or expired session token", err)


class UsersTests(CLITestCase):
    async def test_users_create_and_member_login(self) -> None:
        await self.login_owner()
        code, out, err = await self.cli("users", "create", "--username", "bob", "--email", "bob@example.com",
                                        "--password", "bobs password")
        self.assertEqual(code, 0, err)
        self.assertIn("bob", out)
        code, out, err = await self.cli("users", "list", "--output", "json")
        self.assertEqual(sorted(u["username"] for u in json.loads(out)), ["alice", "bob"])
        bob = CLI(self)
        code, out, err = await bob("login", self.url, "--email", "bob", "--password", "bobs password")
        self.assertEqual(code, 0, err)
        # A member may not create users: one line, non-zero.
        code, out, err = await bob("users", "create", "--username", "eve", "--email", "eve@example.com",
                                   "--password", "eves password")
        self.assertEqual(code, 1)
        self.assertTrue(one_line(err), err)
        self.assertIn("owner", err)
        # A duplicate is refused.
        code, out, err = await self.cli("users", "create", "--username", "bob", "--email", "b2@example.com",
                                        "--password", "bobs password")
        self.assertEqual(code, 1)
        self.assertTrue(one_line(err), err)

    async def test_users_create_needs_every_flag(self) -> None:
        await self.login_owner()
        code, out, err = await self.cli("users", "create", "--username", "bob", "--password", "12345678")
        self.assertEqual(code, 2)
        self.assertIn("--email", err)


class WorkspaceTests(CLITestCase):
    async def test_create_prints_token_once_and_it_works(self) -> None:
        await self.login_owner()
        ws, token = await self.create("ws1")
        self.assertEqual(ws["name"], "ws1")
        self.assertEqual(ws["owner_name"], "alice")
        [agent] = ws["agents"]
        self.assertEqual(agent["status"], "connecting")
        # The token is shown only at creation: not by show or list.
        code, out, err = await self.cli("show", "ws1")
        self.assertEqual(code, 0, err)
        self.assertNotIn(token, out)
        self.assertIn("connecting", out)
        code, out, err = await self.cli("list", "--output", "json")
        self.assertNotIn(token, out)
        listed = json.loads(out)
        self.assertEqual([w["name"] for w in listed], ["ws1"])
        self.assertEqual(listed[0]["agents"][0]["id"], agent["id"])
        # The printed token is the agent's.
        manifest = await self.agent_get(token, "/api/v2/workspaceagents/me/manifest")
        self.assertEqual(manifest["agent_id"], agent["id"])
        self.assertEqual(manifest["workspace_name"], "ws1")
        # The agent's address is derived from its id.
        self.assertEqual(ipaddress.IPv6Address(agent["ip"]), address_from_uuid(uuid.UUID(agent["id"])))
        self.assertIn(ipaddress.IPv6Address(agent["ip"]), ipaddress.IPv6Network("fd7a:115c:a1e0::/48"))

    async def test_list_table_and_empty(self) -> None:
        await self.login_owner()
        code, out, err = await self.cli("list")
        self.assertEqual(code, 0, err)
        self.assertIn("No workspaces", err)
        await self.create("ws1")
        await self.create("ws2")
        code, out, err = await self.cli("list")
        self.assertEqual(code, 0, err)
        lines = out.splitlines()
        self.assertEqual(lines[0].split(), ["WORKSPACE", "AGENT", "STATUS", "LIFECYCLE", "HEALTHY", "LAST", "SEEN"])
        self.assertEqual(sorted(line.split()[0] for line in lines[1:]), ["ws1", "ws2"])

    async def test_duplicate_name_and_bad_name(self) -> None:
        await self.login_owner()
        await self.create("ws1")
        code, out, err = await self.cli("create", "ws1")
        self.assertEqual(code, 1)
        self.assertTrue(one_line(err), err)
        self.assertIn("already exists", err)
        code, out, err = await self.cli("create", "bad name")
        self.assertEqual(code, 1)
        self.assertTrue(one_line(err), err)

    async def test_agent_token_rotates(self) -> None:
        await self.login_owner()
        ws, old = await self.create("ws1")
        code, out, err = await self.cli("agent-token", "ws1")
        self.assertEqual(code, 0, err)
        [new] = [w.split("=", 1)[1] for w in out.split() if w.startswith("CODER_AGENT_TOKEN=")]
        self.assertNotEqual(new, old)
        manifest = await self.agent_get(new, "/api/v2/workspaceagents/me/manifest")
        self.assertEqual(manifest["agent_id"], ws["agents"][0]["id"])
        with self.assertRaises(SDKError) as caught:
            await self.agent_get(old, "/api/v2/workspaceagents/me/manifest")
        self.assertEqual(caught.exception.status, 401)

    async def test_delete(self) -> None:
        await self.login_owner()
        ws, token = await self.create("ws1")
        # Not from a terminal and without --yes: refused, nothing deleted.
        code, out, err = await self.cli("delete", "ws1")
        self.assertEqual(code, 2)
        self.assertIn("--yes", err)
        await self.show("ws1")
        code, out, err = await self.cli("delete", "ws1", "--yes")
        self.assertEqual(code, 0, err)
        self.assertIn("deleted", out)
        code, out, err = await self.cli("show", "ws1")
        self.assertEqual(code, 1)
        self.assertEqual(err, "error: workspace 'ws1' not found\n")
        # Its agent token died with it.
        with self.assertRaises(SDKError) as caught:
            await self.agent_get(token, "/api/v2/workspaceagents/me/manifest")
        self.assertEqual(caught.exception.status, 401)

    async def test_other_users_workspaces_are_invisible(self) -> None:
        await self.login_owner()
        await self.cli("users", "create", "--username", "bob", "--email", "bob@example.com",
                       "--password", "bobs password")
        await self.create("secret")
        bob = CLI(self)
        await bob("login", self.url, "--email", "bob", "--password", "bobs password")
        code, out, err = await bob("show", "secret")
        self.assertEqual((code, err), (1, "error: workspace 'secret' not found\n"))
        code, out, err = await bob("list", "--output", "json")
        self.assertEqual(json.loads(out), [])
        code, out, err = await bob("delete", "secret", "--yes")
        self.assertEqual(code, 1)
        code, out, err = await bob("show", "alice/secret")
        self.assertEqual(code, 1)
        self.assertTrue(one_line(err), err)
        await self.show("secret")


class AgentStatusTests(CLITestCase):
    async def test_agent_connects_and_disconnects(self) -> None:
        await self.login_owner()
        ws, token = await self.create("ws1")
        agent = AgentService(reactor, self.url, token, os.path.join(self.cli.home, "agent"))
        agent.startService()
        self.addCleanup(lambda: agent.stopService() if agent.running else None)
        shown = await self.wait_status("ws1", "connected")
        self.assertIsNotNone(shown["agents"][0]["first_connected_at"])
        code, out, err = await self.cli("show", "ws1")
        self.assertIn("connected, last seen now", out)
        # A graceful stop tells the coordinator: disconnected, not lost.
        proto = agent.coordination.proto
        await agent.stopService()
        # (Stopping cancels the agent's wait on the close, so watch the protocol itself.)
        await wait_until(lambda: proto.state == proto.STATE_CLOSED, "the coordination websocket to close")
        shown = await self.wait_status("ws1", "disconnected")
        self.assertIsNotNone(shown["agents"][0]["last_seen_at"])
        # ... and the server recorded when it left.
        shown = await self.wait_disconnect_recorded("ws1")
        self.assertEqual(shown["agents"][0]["last_seen_at"], shown["agents"][0]["disconnected_at"])

    async def test_rotating_the_token_disconnects_the_running_agent(self) -> None:
        await self.login_owner()
        ws, token = await self.create("ws1")
        agent = AgentService(reactor, self.url, token, os.path.join(self.cli.home, "agent"))
        agent.startService()
        self.addCleanup(lambda: agent.stopService() if agent.running else None)
        await self.wait_status("ws1", "connected")
        coordination = agent.coordination
        # Watch the agent's requests, to know when it has tried the old token again.
        refused: list[int | None] = []
        get = agent.client.get

        async def watched_get(path: str, *args: object, **kwargs: object) -> object:
            try:
                return await get(path, *args, **kwargs)
            except SDKError as err:
                refused.append(err.status)
                raise

        agent.client.get = watched_get
        code, out, err = await self.cli("agent-token", "ws1")
        self.assertEqual(code, 0, err)
        # The server closes the old token's coordination itself, as a kick.
        await coordination.closed
        self.assertEqual(coordination.proto.remoteCloseCode, 4001)
        await self.wait_status("ws1", "disconnected")
        await self.wait_disconnect_recorded("ws1")
        # The old token does not get it back in: the agent's next try is refused.
        await wait_until(lambda: refused, "the agent to try the old token again")
        self.assertEqual(refused[0], 401)
        self.assertEqual((await self.show("ws1"))["agents"][0]["status"], "disconnected")
        self.assertEqual(agent.sessions, 1)

    async def wait_status(self, name: str, status: str) -> dict:
        async def shown_with_status() -> dict | None:
            shown = await self.show(name)
            return shown if shown["agents"][0]["status"] == status else None

        return await wait_until(shown_with_status, f"{name}'s agent to be {status}", interval=0.05)

    async def wait_disconnect_recorded(self, name: str) -> dict:
        async def shown_with_disconnect() -> dict | None:
            shown = await self.show(name)
            return shown if shown["agents"][0]["disconnected_at"] is not None else None

        return await wait_until(shown_with_disconnect, f"the server to record when {name}'s agent left",
                                interval=0.05)


class ErrorTests(unittest.TestCase):
    """One-line errors, without a server where none is needed."""

    async def test_unreachable_server(self) -> None:
        cli = CLI(self)
        url = f"http://127.0.0.1:{closed_port()}"
        code, out, err = await cli("list", CODER_URL=url, CODER_SESSION_TOKEN="x" * 10 + "-" + "y" * 22)
        self.assertEqual(code, 1)
        self.assertTrue(one_line(err), err)
        self.assertIn(f"cannot reach the server at {url}", err)
        code, out, err = await cli("login", url, *OWNER)
        self.assertEqual(code, 1)
        self.assertTrue(one_line(err), err)
        self.assertIn("cannot reach", err)

    async def test_not_logged_in(self) -> None:
        code, out, err = await CLI(self)("list")
        self.assertEqual(code, 1)
        self.assertTrue(one_line(err), err)
        self.assertIn("coderstack login", err)

    async def test_bad_token(self) -> None:
        _server, url = await start_server(self)
        cli = CLI(self)
        for token in ("garbage", "x" * 10 + "-" + "y" * 22):
            code, out, err = await cli("list", CODER_URL=url, CODER_SESSION_TOKEN=token)
            self.assertEqual(code, 1)
            self.assertTrue(one_line(err), err)
            self.assertIn("Invalid or expired session token", err)
            self.assertNotIn(token, err)
        # --token and --url globals do the same as the variables.
        code, out, err = await cli("--url", url, "--token", "garbage", "show", "x")
        self.assertEqual(code, 1)
        self.assertIn("Invalid or expired session token", err)

    async def test_bad_flags_exit_2_naming_the_flag(self) -> None:
        cli = CLI(self)
        cases = [
            (("list", "--output", "yaml"), "--output"),
            (("show", "ws", "-o", "xml"), "--output"),
            (("list", "--frobnicate"), "frobnicate"),
            (("--frobnicate", "list"), "frobnicate"),
            (("login", "not-a-url"), "<url>"),
            (("users", "create", "--username", "u"), "--email"),
            (("delete",), "arguments"),
            (("nosuchcommand",), "nosuchcommand"),
            ((), "command"),
        ]
        for argv, fragment in cases:
            code, out, err = await cli(*argv)
            self.assertEqual(code, 2, (argv, err))
            self.assertIn(fragment, err.splitlines()[0], argv)
            self.assertTrue(err.startswith("error: "), err)
            self.assertEqual(out, "")
        # The usage line is the failing command's own, and the help hint names it.
        code, out, err = await cli("users", "create", "--username", "u")
        self.assertEqual(err.splitlines()[1:], [
            "usage: coderstack users create --username U --email E --password P",
            "Run 'coderstack users create --help' for details.",
        ])
        code, out, err = await cli("list", CODER_DISABLE_DIRECT_CONNECTIONS="perhaps")
        self.assertEqual(code, 2)
        self.assertIn("--disable-direct-connections", err)


class GlobalOptionOrderTests(unittest.SynchronousTestCase):
    def test_global_options_after_the_command_are_hoisted(self) -> None:
        from coderstack.cli.main import hoist_global_options

        self.assertEqual(
            hoist_global_options(["ping", "dev", "--disable-direct-connections", "--global-config", "/c"]),
            ["--disable-direct-connections", "--global-config", "/c", "ping", "dev"],
        )
        # Coder users type `coder ping -v dev`: -v is the global verbose flag.
        self.assertEqual(hoist_global_options(["ping", "-v", "dev"]), ["-v", "ping", "dev"])
        # A command's own --token, and anything after "--", stay where they are.
        self.assertEqual(hoist_global_options(["login", "http://x", "--token", "t"]),
                         ["login", "http://x", "--token", "t"])
        self.assertEqual(hoist_global_options(["ssh", "dev", "--", "--disable-direct-connections"]),
                         ["ssh", "dev", "--", "--disable-direct-connections"])


class _ClosedPipe:
    """A stdout whose reader has gone away."""

    def write(self, text: str) -> int:
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self) -> None:
        raise BrokenPipeError(32, "Broken pipe")


class BrokenPipeTests(CLITestCase):
    async def test_a_closed_stdout_ends_quietly(self) -> None:
        await self.login_owner()
        err = io.StringIO()
        code = await cli_run(reactor, ["users", "list"], environ=self.cli.environ,
                             stdout=_ClosedPipe(), stderr=err)
        self.assertEqual(code, 141)
        self.assertEqual(err.getvalue(), "")



class HelpIntoAClosedPipeTests(unittest.SynchronousTestCase):
    """No server: a synchronous test must not leave a started server's timers to the reactor."""

    def test_help_into_a_closed_pipe_prints_no_traceback(self) -> None:
        read_end, write_end = os.pipe()
        os.close(read_end)  # the reader is gone before the command writes a byte
        try:
            proc = subprocess.run(
                [sys.executable, "-c", "from coderstack.cli.main import main; main(['users', '--help'])"],
                stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=60,
            )
        finally:
            os.close(write_end)
        self.assertEqual(proc.stderr, "")
        self.assertEqual(proc.returncode, 141)


class CommandGroupTests(unittest.SynchronousTestCase):
    def test_group_help_lists_subcommands(self) -> None:
        for group in ("users", "templates"):
            proc = subprocess.run(
                [sys.executable, "-c", f"from coderstack.cli.main import main; main(['{group}', '--help'])"],
                capture_output=True, text=True, timeout=60,
            )
            self.assertEqual(proc.returncode, 0, proc.stderr)
            self.assertIn("list", proc.stdout)
            self.assertIn("alias: ls", proc.stdout)

    def test_ls_is_list(self) -> None:
        from coderstack.cli.templates import TemplatesOptions
        from coderstack.cli.users import UsersOptions

        for options_class in (UsersOptions, TemplatesOptions):
            opts = options_class()
            opts.parseOptions(["ls", "--output", "json"])
            self.assertEqual(opts.subCommand, "list")
            self.assertEqual(opts.subOptions["output"], "json")


class StartWithoutTheNetworkStackTests(unittest.SynchronousTestCase):
    """``--version``, ``--help`` and a usage error before any command import neither the reactor
    nor the SDK (treq, OpenSSL, autobahn), which is what made every invocation slow."""

    def run_main(self, *argv: str) -> tuple[int, str, str, list[str]]:
        probe = (
            "import sys\n"
            "from coderstack.cli.main import main\n"
            "try:\n"
            f"    main({list(argv)!r})\n"
            "except SystemExit as e:\n"
            "    code = e.code\n"
            "heavy = [m for m in ('twisted.internet.reactor', 'twisted.internet.task', 'treq', 'OpenSSL',\n"
            "                     'autobahn', 'coderstack.sdk') if m in sys.modules]\n"
            "sys.stderr.write('\\nLOADED ' + ','.join(heavy) + '\\n')\n"
            "sys.exit(code)\n"
        )
        proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
        err, _, loaded = proc.stderr.rpartition("\nLOADED ")
        return proc.returncode, proc.stdout, err, [m for m in loaded.strip().split(",") if m]

    def test_version_help_and_usage_errors(self) -> None:
        code, out, _err, loaded = self.run_main("--version")
        self.assertEqual((code, out, loaded), (0, f"coderstack {__version__}\n", []))
        code, out, _err, loaded = self.run_main("--help")
        self.assertEqual((code, loaded), (0, []))
        self.assertIn("port-forward", out)  # every command listed, none imported
        code, _out, err, loaded = self.run_main("--bogus")
        self.assertEqual((code, loaded), (2, []))
        self.assertIn("error: option --bogus not recognized", err)
        code, _out, err, loaded = self.run_main()
        self.assertEqual((code, loaded), (2, []))
        self.assertIn("error: missing command", err)

    def test_a_commands_version_is_ours(self) -> None:
        # usage.Options' own --version would print Twisted's.
        for argv in (("ping", "--version"), ("users", "--version"), ("netcheck", "--version")):
            code, out, _err, _loaded = self.run_main(*argv)
            self.assertEqual((code, out), (0, f"coderstack {__version__}\n"), argv)

    def test_a_command_still_gets_everything(self) -> None:
        code, _out, err, loaded = self.run_main("--url", "http://127.0.0.1:9", "--token", "x", "list")
        self.assertEqual(code, 1, err)
        self.assertIn("coderstack.sdk", loaded)
