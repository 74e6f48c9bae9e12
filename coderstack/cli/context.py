"""What every CLI command gets: output streams, the config dir, and a logged-in API client.

The config dir (``--global-config`` / ``CODER_CONFIG_DIR``, default ``~/.config/coderstack``) holds
``url`` and ``session`` like Coder's; ``session`` is written with mode 0600 and never printed.
``CODER_URL`` and ``CODER_SESSION_TOKEN`` override the files.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import IO, Any

from coderstack.sdk import Client, SDKError


def default_config_dir(environ: dict[str, str] | None = None) -> str:
    env = os.environ if environ is None else environ
    if env.get("CODER_CONFIG_DIR"):
        return env["CODER_CONFIG_DIR"]
    base = env.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(base, "coderstack")


class ConfigDir:
    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(os.path.expanduser(path))

    def read(self, name: str) -> str | None:
        try:
            with open(os.path.join(self.path, name)) as f:
                return f.read().strip() or None
        except FileNotFoundError:
            return None

    def write(self, name: str, value: str, secret: bool = False) -> None:
        os.makedirs(self.path, mode=0o700, exist_ok=True)
        target = os.path.join(self.path, name)
        fd = os.open(target + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if secret else 0o644)
        with os.fdopen(fd, "w") as f:
            f.write(value + "\n")
        os.replace(target + ".tmp", target)

    def remove(self, name: str) -> None:
        try:
            os.remove(os.path.join(self.path, name))
        except FileNotFoundError:
            pass


@dataclass
class Context:
    reactor: Any
    config: ConfigDir
    environ: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    stdout: IO[str] = field(default_factory=lambda: sys.stdout)
    stderr: IO[str] = field(default_factory=lambda: sys.stderr)
    stdin: IO[str] = field(default_factory=lambda: sys.stdin)
    url_override: str | None = None
    token_override: str | None = None
    disable_direct: bool = False
    verbose: bool = False
    _api: Client | None = None

    def server_url(self) -> str:
        url = self.url_override or self.environ.get("CODER_URL") or self.config.read("url")
        if not url:
            raise SDKError("You are not logged in. Try: coderstack login <url>")
        return url.rstrip("/")

    def session_token(self) -> str:
        token = self.token_override or self.environ.get("CODER_SESSION_TOKEN") or self.config.read("session")
        if not token:
            raise SDKError("You are not logged in. Try: coderstack login <url>")
        return token

    @property
    def api(self) -> Client:
        if self._api is None:
            self._api = Client(self.reactor, self.server_url(), self.session_token())
        return self._api

    def close(self) -> Any:
        if self._api is not None:
            return self._api.close()
        return None

    def out(self, line: str = "") -> None:
        self.stdout.write(line + "\n")
        self.stdout.flush()

    def err(self, line: str = "") -> None:
        self.stderr.write(line + "\n")
        self.stderr.flush()
