"""``coderstack config-ssh``: Coder's managed block in ``~/.ssh/config``.

The block (byte for byte the layout ``coder config-ssh`` writes, so either tool recognises it):

    # ------------START-CODER-----------
    # This section is managed by coder. DO NOT EDIT.
    #
    # You should not hand-edit this section unless you are removing it, all
    # changes will be lost when running "coder config-ssh".
    #
    # Last config-ssh options:          <- only when options were given
    # :ssh-option=ForwardAgent=yes
    #
    Host coder.*
    \tConnectTimeout=0
    \t...
    \tProxyCommand <python> -m coderstack --global-config <dir> ssh --stdio --ssh-host-prefix coder. %h
    # ------------END-CODER------------

Everything outside the markers is the user's and is kept as it is; a file without a block gets
one appended (after a blank line). Options: user ``-o`` first, then the deployment's
``ssh_config_options``, then the defaults; the first occurrence of a keyword wins and an empty
value removes the keyword. The pure part (:func:`render`, :func:`split_section`, ...) is
separate from the command so it can be tested on strings.
"""

from __future__ import annotations

import difflib
import os
import sys
from dataclasses import dataclass, field
from typing import Any

from twisted.python import usage

from coderstack.cli.command import Command
from coderstack.sdk import SDKError

START = "# ------------START-CODER-----------"
END = "# ------------END-CODER------------"
SECTION_HEADER = "# This section is managed by coder. DO NOT EDIT."
DOCS_HEADER = ('\n#\n# You should not hand-edit this section unless you are removing it, all\n'
               '# changes will be lost when running "coder config-ssh".\n')
OPTIONS_HEADER = "#\n# Last config-ssh options:\n"
DEFAULT_FILE = "~/.ssh/config"
DEFAULT_OPTIONS = ["ConnectTimeout=0", "StrictHostKeyChecking=no", "UserKnownHostsFile=/dev/null", "LogLevel ERROR"]


class ConfigSSHError(Exception):
    """A malformed config file or option."""


@dataclass
class BlockOptions:
    """What is remembered in the block's ``# :key=value`` lines."""

    ssh_options: list[str] = field(default_factory=list)
    host_prefix: str = ""
    hostname_suffix: str = ""
    wait: str = "auto"
    disable_autostart: bool = False

    def as_lines(self) -> list[str]:
        lines = []
        if self.wait != "auto":
            lines.append(f"# :wait={self.wait}")
        if self.host_prefix:
            lines.append(f"# :ssh-host-prefix={self.host_prefix}")
        if self.hostname_suffix:
            lines.append(f"# :ssh-hostname-suffix={self.hostname_suffix}")
        if self.disable_autostart:
            lines.append("# :disable-autostart=true")
        lines.extend(f"# :ssh-option={o}" for o in self.ssh_options)
        return lines

    def same_as(self, other: BlockOptions) -> bool:
        return (sorted(self.ssh_options) == sorted(other.ssh_options) and self.host_prefix == other.host_prefix
                and self.hostname_suffix == other.hostname_suffix and self.wait == other.wait
                and self.disable_autostart == other.disable_autostart)

    def describe(self) -> list[str]:
        return [line[3:].replace("=", ": ", 1) for line in self.as_lines()]


def parse_option(option: str) -> tuple[str, str]:
    """``Key=value`` or ``Key value`` -> (key, value); the separator is whichever comes first."""
    cut = [i for i in (option.find("="), option.find(" "), option.find("\t")) if i >= 0]
    if not cut:
        raise ConfigSSHError(f'invalid config-ssh option "{option}"')
    i = min(cut)
    key, value = option[:i], option[i + 1:].strip()
    if not key:
        raise ConfigSSHError(f'invalid config-ssh option "{option}"')
    return key, value


def merge_options(*groups: list[str]) -> list[str]:
    """First occurrence of a keyword (case-insensitive) wins; an empty value removes it."""
    seen: set[str] = set()
    out: list[str] = []
    for group in groups:
        for option in group:
            key, value = parse_option(option)
            low = key.lower()
            if low in seen:
                continue
            seen.add(low)
            if value:
                out.append(option)
    return out


def split_section(text: str) -> tuple[str, str, str]:
    """(before, block, after); the block takes the newline before it and the one after it."""
    if text.count(START) > 1 or text.count(END) > 1:
        raise ConfigSSHError("Malformed config: ssh config has multiple coder sections, please remove all but one")
    s, e = text.find(START), text.find(END)
    if s < 0 and e >= 0:
        raise ConfigSSHError("Malformed config: ssh config has end header, but missing start header")
    if s >= 0 and e < 0:
        raise ConfigSSHError("Malformed config: ssh config has start header, but missing end header")
    if s < 0:
        return text, "", ""
    if s > e:
        raise ConfigSSHError("Malformed config: ssh config has coder section, but it is malformed "
                             "and the END header is before the START header")
    start = s - 1 if s > 0 else s
    end = e + len(END)
    if end < len(text):
        end += 1
    return text[:start], text[start:end], text[end:]


def parse_last_options(block: str) -> BlockOptions:
    o = BlockOptions()
    for line in block.splitlines():
        if not line.startswith("# :") or "=" not in line:
            continue
        key, value = line[3:].split("=", 1)
        if key == "wait":
            o.wait = value
        elif key == "ssh-host-prefix":
            o.host_prefix = value
        elif key == "ssh-hostname-suffix":
            o.hostname_suffix = value
        elif key == "ssh-option":
            o.ssh_options.append(value)
        elif key == "disable-autostart":
            o.disable_autostart = value.lower() in ("1", "t", "true")
    return o


def exec_escape(path: str) -> str:
    """Quote a path for ssh_config's ProxyCommand (run through the user's shell)."""
    if "\n" in path:
        raise ConfigSSHError(f"invalid path: {path}")
    path = path.replace('"', '\\"')
    if " " in path or "\t" in path:
        path = f'"{path}"'
    return path


def proxy_command(binary: str, global_config: str, opts: BlockOptions, prefix: str, suffix: str) -> str:
    flags = ""
    if opts.wait != "auto":
        flags += f" --wait={opts.wait}"
    if opts.disable_autostart:
        flags += " --disable-autostart=true"
    host_flag = f" --ssh-hostname-suffix {suffix}" if suffix else f" --ssh-host-prefix {prefix}"
    return f"ProxyCommand {binary} --global-config {exec_escape(global_config)} ssh --stdio{flags}{host_flag} %h"


def render(before: str, after: str, opts: BlockOptions, deployment: dict[str, Any], binary: str,
           global_config: str, skip_proxy_command: bool = False) -> str:
    """The whole new file: ``before`` + the block + ``after``."""
    prefix = opts.host_prefix or deployment.get("hostname_prefix") or "coder."
    suffix = opts.hostname_suffix or deployment.get("hostname_suffix") or ""
    defaults = list(DEFAULT_OPTIONS)
    if not skip_proxy_command:
        defaults.append(proxy_command(binary, global_config, opts, prefix, suffix))
    deployment_opts = [f"{k} {v}" for k, v in sorted((deployment.get("ssh_config_options") or {}).items())]
    merged = merge_options(opts.ssh_options, deployment_opts, defaults)
    parts = [("\n" if before else "") + START + "\n", SECTION_HEADER, DOCS_HEADER]
    lines = opts.as_lines()
    if lines:
        parts.append(OPTIONS_HEADER + "".join(line + "\n" for line in lines))
    parts.append("#\n")
    host = f"Host *.{suffix}" if suffix else f"Host {prefix}*"
    parts.append("\n".join([host, *("\t" + o for o in merged)]) + "\n")
    parts.append(END + "\n")
    return before + "".join(parts) + after


def unified_diff(name: str, old: str, new: str) -> str:
    lines = difflib.unified_diff(old.splitlines(keepends=True), new.splitlines(keepends=True),
                                 fromfile=name, tofile=name)
    out = "".join(line if line.endswith("\n") else line + "\n\\ No newline at end of file\n" for line in lines)
    return out


def default_binary() -> str:
    """How OpenSSH should start this CLI: the absolute interpreter path and ``-m coderstack``."""
    return f"{exec_escape(os.path.abspath(sys.executable))} -m coderstack"


# --- the command ---------------------------------------------------------------------------------


class Options(Command):
    synopsis = "coderstack config-ssh [-o Option=value]... [--dry-run] [--yes]"
    longdesc = 'Add an SSH Host entry for your workspaces "ssh coder.workspace".'
    optParameters = [
        ["ssh-config-file", None, None, f"Path to the SSH config [env CODER_SSH_CONFIG_FILE] (default {DEFAULT_FILE})."],
        ["coder-binary-path", None, None,
         "Absolute path of the command ProxyCommand runs [env CODER_SSH_CONFIG_BINARY_PATH] "
         "(default: this Python with -m coderstack)."],
        ["ssh-host-prefix", None, None, "Override the host prefix [env CODER_CONFIGSSH_SSH_HOST_PREFIX]."],
        ["ssh-hostname-suffix", None, None, "Use Host *.SUFFIX instead of a prefix [env CODER_CONFIGSSH_SSH_HOSTNAME_SUFFIX]."],
        ["wait", None, None, "yes|no|auto: wait for the startup script [env CODER_CONFIGSSH_WAIT] (default auto)."],
    ]
    optFlags = [
        ["dry-run", "n", "Show the changes as a diff and change nothing [env CODER_SSH_DRY_RUN]."],
        ["yes", "y", "Bypass prompts."],
        ["use-previous-options", None, "Keep the options of the previous run [env CODER_SSH_USE_PREVIOUS_OPTIONS]."],
        ["skip-proxy-command", None, "Leave out ProxyCommand (for tests) [env CODER_SSH_SKIP_PROXY_COMMAND]."],
        ["disable-autostart", None, "Do not start the workspace when connecting [env CODER_CONFIGSSH_DISABLE_AUTOSTART]."],
    ]

    def __init__(self) -> None:
        super().__init__()
        self["ssh-option"] = []

    def opt_ssh_option(self, value: str) -> None:
        """An SSH option for the Host block, e.g. ForwardAgent=yes (repeatable) [env CODER_SSH_CONFIG_OPTS]."""
        self["ssh-option"].append(value)

    opt_o = opt_ssh_option

    def parseArgs(self) -> None:
        pass


def _env_flag(environ: dict[str, str], name: str) -> bool:
    return environ.get(name, "").lower() in ("1", "t", "true", "yes")


def _prompt(ctx: Any, question: str) -> bool:
    ctx.stderr.write(f"> {question} (yes/no) ")
    ctx.stderr.flush()
    answer = ctx.stdin.readline().strip().lower()
    return answer in ("y", "yes")


async def run(reactor: Any, options: Options, ctx: Any) -> int:
    env = ctx.environ
    dry_run = bool(options["dry-run"]) or _env_flag(env, "CODER_SSH_DRY_RUN")
    yes = bool(options["yes"])
    out = ctx.stderr if dry_run else ctx.stdout  # Coder: a dry run keeps stdout for the diff

    def say(text: str) -> None:
        out.write(text)
        out.flush()

    path = options["ssh-config-file"] or env.get("CODER_SSH_CONFIG_FILE") or DEFAULT_FILE
    path = os.path.expanduser(path)
    ssh_options = list(options["ssh-option"])
    if not ssh_options and env.get("CODER_SSH_CONFIG_OPTS"):
        ssh_options = [o for o in env["CODER_SSH_CONFIG_OPTS"].split(",") if o]
    wait = options["wait"] or env.get("CODER_CONFIGSSH_WAIT") or "auto"
    if wait not in ("yes", "no", "auto"):
        raise usage.UsageError("--wait must be yes, no or auto")
    skip_proxy = bool(options["skip-proxy-command"]) or _env_flag(env, "CODER_SSH_SKIP_PROXY_COMMAND")
    if skip_proxy and wait != "auto":
        raise usage.UsageError("cannot specify both --skip-proxy-command and --wait")
    binary_path = options["coder-binary-path"] or env.get("CODER_SSH_CONFIG_BINARY_PATH")
    if binary_path and not os.path.isabs(binary_path):
        raise usage.UsageError("coder cli path must be an absolute path")
    binary = exec_escape(binary_path) if binary_path else default_binary()
    wanted = BlockOptions(
        ssh_options=ssh_options,
        host_prefix=options["ssh-host-prefix"] or env.get("CODER_CONFIGSSH_SSH_HOST_PREFIX", ""),
        hostname_suffix=options["ssh-hostname-suffix"] or env.get("CODER_CONFIGSSH_SSH_HOSTNAME_SUFFIX", ""),
        wait=wait,
        disable_autostart=bool(options["disable-autostart"]) or _env_flag(env, "CODER_CONFIGSSH_DISABLE_AUTOSTART"),
    )
    try:
        for option in wanted.ssh_options:
            parse_option(option)
        try:
            with open(path, encoding="utf-8") as f:
                raw = f.read()
        except FileNotFoundError:
            raw = ""
        before, block, after = split_section(raw)
    except ConfigSSHError as err:
        ctx.err(f"error: {err}")
        return 1
    except OSError as err:
        ctx.err(f"error: read ssh config failed: {err}")
        return 1

    changes: list[str] = []
    if block:
        last = parse_last_options(block)
        if options["use-previous-options"] or _env_flag(env, "CODER_SSH_USE_PREVIOUS_OPTIONS"):
            wanted = last
        elif not wanted.same_as(last):
            new = wanted.describe()
            old = last.describe()
            new_msg = "\n\n  New options:\n    * " + "\n    * ".join(new) if new else "\n\n  New options: none"
            old_msg = ("\n\n  Previous options:\n    * " + "\n    * ".join(old)) if old else "\n\n  Previous options: none"
            question = f"New options differ from previous options:{new_msg}{old_msg}\n\n  Use new options?"
            if yes or dry_run or _prompt(ctx, question):
                changes.append("Use new options")
            else:
                wanted = last

    try:
        deployment = await ctx.api.get("/api/v2/deployment/ssh")
    except SDKError as err:
        if err.status != 404:
            raise
        deployment = {"hostname_prefix": "coder."}

    try:
        new_text = render(before, after, wanted, deployment, binary, ctx.config.path, skip_proxy)
    except ConfigSSHError as err:
        ctx.err(f"error: {err}")
        return 1
    if new_text != raw:
        changes.append(f"Update the coder section in {path}")
    if not changes:
        say("No changes to make.\n")
        return 0
    if dry_run:
        say("Dry run, the following changes would be made to your SSH configuration:\n\n  * "
            + "\n  * ".join(changes) + "\n\n")
        diff = unified_diff(path, raw, new_text)
        if diff:
            ctx.stdout.write(diff)
            ctx.stdout.flush()
        return 0
    if not yes:
        question = ("The following changes will be made to your SSH configuration:\n\n    * "
                    + "\n    * ".join(changes) + "\n\n  Continue?")
        if not _prompt(ctx, question):
            return 0
        say("\n")
    if new_text != raw:
        _atomic_write(path, new_text)
        say(f'Updated "{path}"\n')
    got = await ctx.api.get("/api/v2/workspaces")
    workspaces = got.get("workspaces") or []
    if workspaces:
        name = workspaces[0]["name"]
        suffix = wanted.hostname_suffix or deployment.get("hostname_suffix") or ""
        prefix = wanted.host_prefix or deployment.get("hostname_prefix") or "coder."
        example = f"$ ssh {name}.{suffix}" if suffix else f"$ ssh {prefix}{name}"
        say(f"You should now be able to ssh into your workspace.\nFor example, try running:\n\n\t{example}\n")
    else:
        say("You don't have any workspaces yet, try creating one with:\n\n\t$ coderstack create <workspace>\n")
    return 0


def _atomic_write(path: str, text: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, mode=0o700, exist_ok=True)
    try:
        mode = os.stat(path).st_mode & 0o777
    except FileNotFoundError:
        mode = 0o600
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)
