"""``coderstack``: the command line.

Each command lives in its own module as ``Options`` (a ``usage.Options``) and
``async def run(reactor, options, ctx) -> int``; this module parses the global flags, picks the
command, and turns errors into one line on stderr with a non-zero exit status:
2 for usage errors (naming the flag), 1 for everything else.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import IO, TYPE_CHECKING, Any

from twisted.python import usage

from coderstack import __version__
from coderstack.envopts import boolean

if TYPE_CHECKING:
    from coderstack.cli.context import Context

# The reactor, the SDK (treq, OpenSSL, autobahn) and each command's module are imported only
# when a command runs: `coderstack --version` and `--help` answer without them (in about a
# third of the time).

# name -> (module, one-line description). Modules are imported only when their command runs.
COMMANDS: dict[str, tuple[str, str]] = {
    "login": ("coderstack.cli.login", "Log in to a coderstack server (creates the first user on a new one)."),
    "logout": ("coderstack.cli.login", "Forget the session token."),
    "users": ("coderstack.cli.users", "Manage users: create, list, suspend, activate, delete."),
    "replicas": ("coderstack.cli.replicas", "List the server replicas sharing this deployment's database (owners only)."),
    "templates": ("coderstack.cli.templates", "Manage templates: push, list."),
    "create": ("coderstack.cli.workspaces", "Create a workspace (from a template, or print its agent token once)."),
    "list": ("coderstack.cli.workspaces", "List your workspaces and their agents."),
    "show": ("coderstack.cli.workspaces", "Show a workspace and its agent."),
    "start": ("coderstack.cli.workspaces", "Start a template workspace (a start build)."),
    "stop": ("coderstack.cli.workspaces", "Stop a template workspace (a stop build)."),
    "delete": ("coderstack.cli.workspaces", "Delete a workspace (a template one is destroyed first)."),
    "agent-token": ("coderstack.cli.workspaces", "Make a new agent token for a workspace (the old one stops working)."),
    "netcheck": ("coderstack.cli.netcheck", "Print a network report (STUN, relays, MTU) as JSON."),
    "ping": ("coderstack.cli.ping", "Ping a workspace over its tunnel; says whether the path is direct or relayed, and why."),
    "port-forward": ("coderstack.cli.portforward", "Forward local TCP/UDP ports to a workspace over its tunnel."),
    "speedtest": ("coderstack.cli.speedtest", "Measure throughput to a workspace over its tunnel."),
    "logs": ("coderstack.cli.agentlogs", "Print the logs of a workspace's startup and other scripts (--follow)."),
    "ssh": ("coderstack.cli.ssh", "SSH into a workspace (or --stdio for OpenSSH's ProxyCommand)."),
    "open": ("coderstack.cli.openapp", "Print (and --open) the URL of a workspace app served through the server."),
    "port-share": ("coderstack.cli.portshare", "Share a workspace's ports with other users through the server."),
    "config-ssh": ("coderstack.cli.config_ssh", "Add an SSH Host entry for your workspaces (ssh coder.WS)."),
    "scaletest": ("coderstack.cli.scaletest", "Load-test a deployment: simulated agents, clients and traffic."),
}


def _load(name: str) -> Any:
    module = importlib.import_module(COMMANDS[name][0])
    per_command = getattr(module, "COMMANDS", None)
    if per_command is not None:
        return per_command[name]
    return module.Options, module.run


def _subcommands() -> list[list[Any]]:
    out = []
    for name, (_module, doc) in COMMANDS.items():
        out.append([name, None, lambda n=name: _load(n)[0](), doc])
    return out


class GlobalOptions(usage.Options):
    synopsis = "coderstack [global options] <command> [options]"
    longdesc = "Reach and manage coderstack workspaces."
    optParameters = [
        ["global-config", None, None, "Config directory (url, session) [env CODER_CONFIG_DIR]."],
        ["url", None, None, "Server URL, overriding the logged-in one [env CODER_URL]."],
        ["token", None, None, "Session token, overriding the stored one [env CODER_SESSION_TOKEN]."],
    ]
    optFlags = [
        ["disable-direct-connections", None,
         "Never connect to workspaces directly; always use the relay [env CODER_DISABLE_DIRECT_CONNECTIONS]."],
        ["verbose", "v", "Print debug logs [env CODER_VERBOSE]."],
        ["version", None, "Print the version and exit."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self.subCommands = _subcommands()

    def opt_version(self) -> None:
        print(f"coderstack {__version__}")
        sys.exit(0)

    def postOptions(self) -> None:
        if self.subCommand is None:
            raise usage.UsageError("missing command")


def make_context(reactor: Any, opts: GlobalOptions, environ: dict[str, str], **streams: Any) -> Context:
    from coderstack.cli.context import ConfigDir, Context, default_config_dir

    disable = bool(opts["disable-direct-connections"])
    if not disable and environ.get("CODER_DISABLE_DIRECT_CONNECTIONS"):
        try:
            disable = boolean(environ["CODER_DISABLE_DIRECT_CONNECTIONS"])
        except ValueError:
            raise usage.UsageError(
                "invalid value for --disable-direct-connections (from CODER_DISABLE_DIRECT_CONNECTIONS)"
            ) from None
    verbose = bool(opts["verbose"]) or environ.get("CODER_VERBOSE", "").lower() in ("1", "true")
    return Context(
        reactor=reactor,
        config=ConfigDir(opts["global-config"] or default_config_dir(environ)),
        environ=environ,
        url_override=opts["url"],
        token_override=opts["token"],
        disable_direct=disable,
        verbose=verbose,
        **streams,
    )


GLOBAL_FLAGS = {"--disable-direct-connections", "-v", "--verbose"}
# Only names no command uses for itself (login has its own --token and takes a URL).
GLOBAL_PARAMETERS = {"--global-config"}


def hoist_global_options(argv: list[str]) -> list[str]:
    """Global options may follow the command (``coderstack ping dev --disable-direct-connections``),
    as with Coder's CLI: move them in front of it. Everything after ``--`` is left alone."""
    front: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            rest += argv[i:]
            break
        name = arg.split("=", 1)[0]
        if arg in GLOBAL_FLAGS:
            front.append(arg)
        elif name in GLOBAL_PARAMETERS and rest:
            if "=" in arg:
                front.append(arg)
            elif i + 1 < len(argv):
                front += [arg, argv[i + 1]]
                i += 1
            else:
                rest.append(arg)
        else:
            rest.append(arg)
        i += 1
    return front + rest


def usage_error(opts: GlobalOptions, err: usage.UsageError, stderr: IO[str]) -> int:
    """One line naming the problem, the synopsis of the innermost command parsed so far (it
    already reads "coderstack <cmd> ..."; getSynopsis() would prepend every parent's), where to
    read more; exit status 2."""
    inner: Any = opts  # then each level's subOptions: whichever command class parsed it
    words: list[str] = []
    while getattr(inner, "subOptions", None) is not None:
        words.append(str(inner.subCommand))
        inner = inner.subOptions
    stderr.write(f"error: {err}\n")
    stderr.write(f"usage: {inner.synopsis}\n")
    stderr.write(f"Run 'coderstack {''.join(w + ' ' for w in words)}--help' for details.\n")
    return 2


async def run(reactor: Any, argv: list[str], environ: dict[str, str] | None = None, **streams: Any) -> int:
    env = dict(os.environ if environ is None else environ)
    argv = hoist_global_options(list(argv))
    opts = GlobalOptions()
    stderr: IO[str] = streams["stderr"] if "stderr" in streams else sys.stderr
    try:
        opts.parseOptions(argv)
        ctx = make_context(reactor, opts, env, **streams)
    except usage.UsageError as err:
        return usage_error(opts, err, stderr)
    from twisted.internet.defer import Deferred

    from coderstack.sdk import SDKError

    assert opts.subCommand is not None  # postOptions refuses a missing command
    _options_class, command = _load(opts.subCommand)
    if ctx.verbose:
        from twisted.logger import ILogObserver, globalLogBeginner, textFileLogObserver

        from coderstack.twistedtypes import provides

        observer = provides(ILogObserver, textFileLogObserver(ctx.stderr))
        globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)
    try:
        return await command(reactor, opts.subOptions, ctx)
    except BrokenPipeError:
        # The reader went away (``coderstack netcheck | head``): stop quietly, as Unix tools do.
        return EXIT_BROKEN_PIPE
    except SDKError as err:
        ctx.err(f"error: {err}")
        return 1
    except usage.UsageError as err:
        ctx.err(f"error: {err}")
        return 2
    finally:
        closing = ctx.close()
        if isinstance(closing, Deferred):
            await closing


#: 128 + SIGPIPE, the status a Unix tool killed by a closed pipe has.
EXIT_BROKEN_PIPE = 141


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def _without_a_command(args: list[str]) -> int:
    """``--version``, ``--help`` or a usage error before any command: no reactor needed."""
    opts = GlobalOptions()
    try:
        opts.parseOptions(hoist_global_options(args))
    except SystemExit as exit_:  # --help and --version print, then exit from inside the parser
        return exit_.code if isinstance(exit_.code, int) else 0
    except BrokenPipeError:
        return EXIT_BROKEN_PIPE
    except usage.UsageError as err:
        return usage_error(opts, err, sys.stderr)
    return 2  # not reached: postOptions refuses a missing command


def _exit(code: Any) -> None:
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        code = EXIT_BROKEN_PIPE
    if code == EXIT_BROKEN_PIPE:
        _silence_stdout()
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if not any(arg in COMMANDS for arg in args):
        _exit(_without_a_command(args))
    from twisted.internet import task
    from twisted.internet.defer import Deferred

    codes: list[int] = []

    async def _main(reactor: Any) -> None:
        try:
            codes.append(await run(reactor, args))
        except BrokenPipeError:  # printing --help into a closed pipe
            codes.append(EXIT_BROKEN_PIPE)

    code: Any
    try:
        task.react(lambda reactor: Deferred.fromCoroutine(_main(reactor)))
    except SystemExit as exit_:
        # react() always exits; --help and --version exit from inside the parser.
        code = codes[0] if codes and exit_.code in (0, None) else exit_.code
    else:
        code = codes[0] if codes else 1
    _exit(code)

if __name__ == "__main__":
    main()
