"""Workspace app addresses: the two ways a browser names an app, parsed and built.

Path-based, on the access URL::

    /@{user}/{workspace}[.{agent}]/apps/{slug}/{rest}      (also /%40{user}/... as some IDEs send)

``@me`` is not accepted (an app's address must say whose it is, since it may be shared), and
ports are not: a port is only opened on its own subdomain.

Subdomain, under the wildcard host (``--wildcard-access-url``, e.g. ``*.apps.example.com``)::

    [{prefix}---]{slug | port[s]}--{agent}--{workspace}--{user}.{base}[:{port}]

A label of digits is a port (from 9 up; a trailing ``s`` means the app speaks HTTPS), anything
else an app slug; the prefix (``---``-separated) is for apps that need several hostnames and is
ignored. A DNS label is at most 63 characters, which bounds the whole name.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from urllib.parse import unquote

_NAME = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,62})$", re.IGNORECASE)
_PORT = re.compile(r"^(\d{1,5})(s?)$")
MAX_LABEL = 63


class AppURLError(ValueError):
    """An address that looks like an app's but names none; the message says what is wrong."""


@dataclass(frozen=True)
class AppTarget:
    """Whose app, in which workspace and agent (None: the workspace's only agent), which app."""

    username: str
    workspace: str
    agent: str | None
    slug: str | None
    port: int | None = None
    https: bool = False

    @property
    def app_label(self) -> str:
        if self.port is not None:
            return f"{self.port}{'s' if self.https else ''}"
        assert self.slug is not None
        return self.slug


@dataclass(frozen=True)
class WildcardHost:
    """``*.{base}[:port]``: the hosts subdomain apps live under."""

    base: str          # lower case, no leading dot
    port: int | None   # the port in the browser's URL (None: the scheme's default)

    @classmethod
    def parse(cls, pattern: str, access_port: int | None = None) -> WildcardHost:
        """``*.apps.example.com`` or ``*.apps.localhost:3000`` (without a port, the access URL's)."""
        text = pattern.strip()
        for scheme in ("http://", "https://"):
            if text.lower().startswith(scheme):
                text = text[len(scheme):]
        text = text.rstrip("/")
        if not text.startswith("*."):
            raise ValueError(f"the wildcard access URL must start with '*.' (got {pattern!r})")
        host, _, port_text = text[2:].partition(":")
        if not host or "*" in host or "/" in host:
            raise ValueError(f"the wildcard access URL {pattern!r} is not '*.' and a host name")
        port = access_port
        if port_text:
            if not port_text.isdigit() or not 0 < int(port_text) < 65536:
                raise ValueError(f"the wildcard access URL {pattern!r} has a bad port")
            port = int(port_text)
        return cls(host.lower().rstrip("."), port)

    def match(self, host: str) -> str | None:
        """The app label of a Host header under this wildcard (None: not an app's host)."""
        name = host.strip().lower()
        if name.startswith("["):
            return None  # an IPv6 literal is never an app's host
        name = name.rsplit(":", 1)[0] if ":" in name else name
        name = name.rstrip(".")
        suffix = "." + self.base
        if not name.endswith(suffix):
            return None
        label = name[: -len(suffix)]
        if not label or "." in label:
            return None
        return label

    def host_for(self, label: str) -> str:
        return f"{label}.{self.base}" + (f":{self.port}" if self.port is not None else "")


# Pure, and asked for the same few hosts on every request of an app: remembered.
@functools.lru_cache(maxsize=1024)
def parse_subdomain_label(label: str) -> AppTarget:
    """The target a subdomain label names (raises :class:`AppURLError`)."""
    if len(label) > MAX_LABEL:
        raise AppURLError(f"the host name label is longer than {MAX_LABEL} characters")
    label = label.lower()
    if "---" in label:
        label = label.rsplit("---", 1)[1]
    parts = label.split("--")
    if len(parts) != 4 or not all(parts):
        raise AppURLError("an app's host is {app or port}--{agent}--{workspace}--{user} under the "
                          "wildcard domain")
    app, agent, workspace, user = parts
    for what, value in (("agent", agent), ("workspace", workspace), ("user", user)):
        if not _NAME.match(value):
            raise AppURLError(f"{value!r} is not a valid {what} name")
    port_match = _PORT.match(app)
    if port_match:
        port = int(port_match.group(1))
        if not 0 < port < 65536:
            raise AppURLError(f"port {port} is out of range")
        return AppTarget(user, workspace, agent, None, port, bool(port_match.group(2)))
    if not _NAME.match(app):
        raise AppURLError(f"{app!r} is not a valid app slug")
    return AppTarget(user, workspace, agent, app)


def parse_path_app(path: str) -> tuple[AppTarget, str | None] | None:
    """``(target, rest)`` for a path-based app's request path; None when the path is not one.

    ``rest`` is the path the app sees (starting with ``/``), or None when the app's own address
    lacks its trailing slash (the caller redirects). Raises :class:`AppURLError` for an app path
    that names nothing valid.
    """
    if path.startswith("/%40"):
        path = "/@" + path[4:]
    if not path.startswith("/@"):
        return None
    segments = path[2:].split("/", 4)
    if len(segments) < 4 or segments[2] != "apps":
        return None
    user, ws_agent, _apps, slug = (unquote(s) for s in segments[:4])
    if user.lower() == "me":
        raise AppURLError("app addresses name their owner: use the username instead of @me")
    if not _NAME.match(user):
        raise AppURLError(f"{user!r} is not a valid user name")
    workspace, _, agent = ws_agent.partition(".")
    if not _NAME.match(workspace) or (agent and not _NAME.match(agent)):
        raise AppURLError(f"{ws_agent!r} is not a workspace (or workspace.agent) name")
    if _PORT.match(slug):
        raise AppURLError("ports are opened on subdomains, not under a path")
    if not _NAME.match(slug):
        raise AppURLError(f"{slug!r} is not a valid app slug")
    target = AppTarget(user.lower(), workspace.lower(), agent.lower() or None, slug.lower())
    if len(segments) == 4:
        return target, None
    return target, "/" + segments[4]


def path_app_url(access_url: str, target: AppTarget) -> str:
    agent = f".{target.agent}" if target.agent else ""
    return f"{access_url.rstrip('/')}/@{target.username}/{target.workspace}{agent}/apps/{target.slug}/"


def subdomain_label(target: AppTarget) -> str:
    if target.agent is None:
        raise ValueError("a subdomain app's address names its agent")
    return f"{target.app_label}--{target.agent}--{target.workspace}--{target.username}"


def subdomain_app_url(scheme: str, wildcard: WildcardHost, target: AppTarget) -> str:
    return f"{scheme}://{wildcard.host_for(subdomain_label(target))}/"
