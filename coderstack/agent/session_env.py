"""The environment and working directory of everything the agent starts for the workspace.

SSH sessions (exec, shell, PTY), the web terminal, start/stop/cron scripts and metadata scripts
all get the same environment, built in this order (later entries win):

1. the agent's own process environment without its secrets (``CODER_AGENT_TOKEN`` and the like);
2. the manifest's ``environment_variables`` (the template's ``coder_env`` and ``coder_agent.env``,
   already merged by the server);
3. ``CODER=true``, ``CODER_WORKSPACE_NAME``, ``CODER_WORKSPACE_OWNER_NAME``,
   ``CODER_WORKSPACE_AGENT_NAME`` and ``CODER_AGENT_URL`` (the server's URL);
4. ``PATH`` with the agent's ``bin`` directory first, where it keeps the ``coder`` command, then
   ``CODER_SCRIPT_BIN_DIR`` (where scripts may put tools for later sessions).

Processes start in the manifest's ``directory`` (``~`` and ``$VARS`` expanded), or in ``$HOME``
when it is empty or does not exist.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from typing import Any

# Never hand the agent's own secrets to the workspace's processes.
PRIVATE_ENV = frozenset({
    "CODER_AGENT_TOKEN", "CODER_AGENT_TOKEN_FILE", "CODER_SESSION_TOKEN", "CODER_AGENT_AUTH_TOKEN",
})


def scrubbed(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` without the agent's secrets."""
    return {k: v for k, v in env.items() if k not in PRIVATE_ENV and not k.startswith("CODER_AGENT_TOKEN")}


def workspace_environment(base: Mapping[str, str], manifest: Mapping[str, Any] | None, agent_url: str,
                          bin_dir: str | None = None, script_bin_dir: str | None = None) -> dict[str, str]:
    """The environment of a workspace process (see the module docstring for the order)."""
    env = scrubbed(base)
    manifest = manifest or {}
    extra = manifest.get("environment_variables") or {}
    if isinstance(extra, Mapping):
        for k, v in extra.items():
            if isinstance(k, str) and k and "=" not in k and k not in PRIVATE_ENV:
                env[k] = str(v)
    env.update({
        "CODER": "true",
        "CODER_WORKSPACE_NAME": str(manifest.get("workspace_name") or ""),
        "CODER_WORKSPACE_OWNER_NAME": str(manifest.get("owner_name") or ""),
        "CODER_WORKSPACE_AGENT_NAME": str(manifest.get("agent_name") or ""),
        "CODER_AGENT_URL": agent_url,
    })
    first = [d for d in (bin_dir, script_bin_dir) if d]
    if first:
        env["PATH"] = os.pathsep.join([*first, env.get("PATH") or os.defpath])
    return env


def workspace_directory(manifest: Mapping[str, Any] | None, home: str) -> str:
    """Where workspace processes start: the manifest's directory, else ``home``."""
    raw = str((manifest or {}).get("directory") or "")
    if not raw:
        return home
    path = os.path.expandvars(os.path.expanduser(raw))
    return path if os.path.isdir(path) else home


def home_directory(env: Mapping[str, str] | None = None) -> str:
    import pwd

    env = os.environ if env is None else env
    home = env.get("HOME") or pwd.getpwuid(os.getuid()).pw_dir
    return home if os.path.isdir(home) else "/"


class SessionEnvironment:
    """What the agent currently knows of the workspace (the newest manifest), for sessions.

    Made before the first manifest (then it only scrubs secrets and adds the ``coder`` command);
    the agent calls :meth:`update` on every manifest.
    """

    def __init__(self, agent_url: str = "", bin_dir: str | None = None,
                 base: Mapping[str, str] | None = None, script_bin_dir: str | None = None) -> None:
        self.agent_url = agent_url
        self.bin_dir = bin_dir
        self.script_bin_dir = script_bin_dir
        self.base: Mapping[str, str] = os.environ if base is None else base
        self.manifest: Mapping[str, Any] | None = None

    def update(self, manifest: Mapping[str, Any]) -> None:
        self.manifest = manifest

    def environment(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        return workspace_environment(self.base if base is None else base, self.manifest,
                                     self.agent_url, self.bin_dir, self.script_bin_dir)

    def directory(self, home: str | None = None) -> str:
        return workspace_directory(self.manifest, home or home_directory(self.base))

    @property
    def motd_path(self) -> str:
        return str((self.manifest or {}).get("motd_path") or "")


def motd_for_login(motd_path: str, home: str) -> bytes:
    """What a login shell prints first: the motd file, unless ``~/.hushlogin`` exists (as
    OpenSSH's login and Coder's agent do). Empty when unset or unreadable."""
    if not motd_path or os.path.exists(os.path.join(home, ".hushlogin")):
        return b""
    try:
        with open(motd_path, "rb") as f:
            return f.read(64 * 1024)
    except OSError:
        return b""


def write_coder_command(bin_dir: str, python: str | None = None) -> str:
    """Write ``<bin_dir>/coder``: a tiny wrapper running our ``coder`` command (``coder stat``)
    with the agent's own interpreter. Returns its path."""
    os.makedirs(bin_dir, mode=0o755, exist_ok=True)
    path = os.path.join(bin_dir, "coder")
    interpreter = python or sys.executable
    text = f"#!/bin/sh\nexec {_sh_quote(interpreter)} -m coderstack.agent.coder_command \"$@\"\n"
    tmp = path + f".{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o755)
    os.replace(tmp, path)
    return path


def _sh_quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"
