"""Command-line options that also read Coder's environment variables.

``twisted.python.usage`` has no environment support, so each option is declared once in
``envParameters`` as ``(flag, env var, default, coerce, help)``; parsing leaves unset options as
None, and ``postOptions`` fills them from the environment or the default and coerces them. A
value that does not coerce is a ``UsageError`` naming the flag (and the variable it came from).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

from twisted.python import usage

Coerce = Callable[[str], Any]


class EnvOptions(usage.Options):
    # (flag, env var or None, default string or None, coerce, help)
    envParameters: list[tuple[str, str | None, str | None, Coerce, str]] = []
    optParameters: list[list[Any]]  # set on each subclass, below

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # usage.Options reads optParameters from the class, so derive them here.
        cls.optParameters = [
            [flag, None, None, f"{doc} [env {env}]" if env else doc]
            for flag, env, _default, _coerce, doc in cls.envParameters
        ]

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        self.environ = dict(os.environ if environ is None else environ)
        super().__init__()

    def parseOptions(self, options: list[str] | None = None) -> None:
        # A boolean flag may be given bare (``--tls-enable``), as Coder's CLI takes it: it means
        # true unless the next word is its value (``--tls-enable false``).
        if options is not None:
            flags = {f"--{flag}" for flag, _e, _d, coerce, _h in self.envParameters if coerce is boolean}
            out: list[str] = []
            for i, arg in enumerate(options):
                following = options[i + 1] if i + 1 < len(options) else None
                if arg in flags and (following is None or following.startswith("-")):
                    arg += "=true"
                out.append(arg)
            options = out
        super().parseOptions(options)

    def postOptions(self) -> None:
        for flag, env, default, coerce, _doc in self.envParameters:
            raw = self[flag]
            source = f"--{flag}"
            if raw is None and env and env in self.environ:
                raw, source = self.environ[env], f"--{flag} (from {env})"
            if raw is None:
                raw = default
            if raw is None:
                self[flag] = None
                continue
            try:
                self[flag] = coerce(raw)
            except ValueError as e:
                raise usage.UsageError(f"invalid value for {source}: {e}") from None


def text(value: str) -> str:
    return value


def boolean(value: str) -> bool:
    v = value.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"{value!r} is not true or false")


def port_number(value: str) -> int:
    if not value.isdigit() or not 0 <= int(value) <= 65535:
        raise ValueError(f"{value!r} is not a port number (0-65535)")
    return int(value)


_HOSTPORT = re.compile(r"^(?:\[(?P<v6>[0-9A-Fa-f:.%a-zA-Z]+)\]|(?P<host>[^:\[\]]*)):(?P<port>\d+)$")


def host_port(value: str) -> tuple[str, int] | None:
    """``host:port`` or ``[v6]:port``; an empty host means all interfaces; "" disables."""
    if value.strip() == "":
        return None
    m = _HOSTPORT.match(value.strip())
    if not m:
        raise ValueError(f"{value!r} is not host:port")
    host = m.group("v6") if m.group("v6") is not None else m.group("host")
    port = port_number(m.group("port"))
    return host, port


def url(value: str) -> str:
    """An http(s) URL with a host; the trailing slash is dropped."""
    v = value.strip()
    parts = urlsplit(v)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"{value!r} must start with http:// or https://")
    if not parts.hostname:
        raise ValueError(f"{value!r} has no host")
    try:
        _ = parts.port  # raises for a bad port
    except ValueError:
        raise ValueError(f"{value!r} has an invalid port") from None
    return v.rstrip("/")


def existing_file(value: str) -> str:
    if not os.path.isfile(value):
        raise ValueError(f"no such file: {value!r}")
    return value


def directory(value: str) -> str:
    path = os.path.abspath(os.path.expanduser(value))
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{value!r} exists and is not a directory")
    return path


def positive_int(value: str) -> int:
    if not value.strip().isdigit() or int(value) <= 0:
        raise ValueError(f"{value!r} is not a positive integer")
    return int(value)


def default_data_dir(role: str, environ: Mapping[str, str] | None = None) -> str:
    env = os.environ if environ is None else environ
    base = env.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, "coderstack", role)


def tcp_endpoint(host: str, port: int) -> str:
    """A Twisted server endpoint string for host:port (colons in IPv6 escaped)."""
    desc = f"tcp:{port}"
    if host:
        desc += ":interface=" + host.replace(":", "\\:")
    return desc
