"""``coder_app``: a shortcut to an application in the workspace (proxied URL, command or link).

Names, types and ForceNew-ness follow terraform-provider-coder; SDK defaults (``share`` owner,
``external``/``hidden`` false, ``open_in`` slim-window) are optional + computed here so they
appear in the plan (see agent.py for why).
"""

from __future__ import annotations

import re

from tf import types
from tf.iface import Config, State
from tf.schema import Attribute, Block, Schema
from tf.utils import Diagnostics

from coderstack.provider.resource import FORCE_NEW, RecordedResource, attr
from coderstack.provider.schema import SetBlock

#: A slug must be usable as a hostname label: no leading/trailing or doubled hyphens.
SLUG_RE = re.compile(r"^[a-z0-9](-?[a-z0-9])*$")
SHARE_LEVELS = ("owner", "authenticated", "public")
OPEN_IN = ("slim-window", "tab")

_FN = FORCE_NEW


def _s(name: str, desc: str, **kw) -> Attribute:
    return attr(name, types.String(), desc, **kw)


_HEALTHCHECK = SetBlock(
    "healthcheck",
    Block(
        attributes=[
            _s(
                "url",
                "HTTP address whose status (< 500) means ready.",
                required=True,
                requires_replace=True,
            ),
            Attribute(
                "interval",
                types.Number(),
                description="Seconds between checks.",
                required=True,
                requires_replace=True,
            ),
            Attribute(
                "threshold",
                types.Number(),
                description="Failures before unhealthy.",
                required=True,
                requires_replace=True,
            ),
        ]
    ),
    max_items=1,
)

APP_SCHEMA = Schema(
    version=1,
    description="Use this resource to define shortcuts to access applications in a workspace.",
    attributes=[
        Attribute(
            "id", types.String(), description="The app's UUID.", optional=True, computed=True
        ),
        _s(
            "agent_id",
            "The `id` of a `coder_agent` resource to associate with.",
            required=True,
            requires_replace=True,
        ),
        _s("command", "A command to run in a terminal opening this app.", **_FN),
        _s("icon", "A URL to an icon shown in the dashboard.", **_FN),
        _s(
            "slug",
            "A hostname-friendly name for the app, used in URLs.",
            required=True,
            requires_replace=True,
        ),
        _s("display_name", "A display name for the app. Defaults to the slug.", **_FN),
        Attribute(
            "subdomain", types.Bool(), description="Serve the app on its own subdomain.", **_FN
        ),
        _s(
            "share",
            "Sharing level: owner, authenticated or public.",
            optional=True,
            computed=True,
            requires_replace=True,
            default="owner",
        ),
        _s("url", "An external URL or a URL to proxy to inside the workspace.", **_FN),
        Attribute(
            "external",
            types.Bool(),
            description="Open `url` on the client instead of proxying.",
            optional=True,
            computed=True,
            requires_replace=True,
            default=False,
        ),
        _s("group", "The name of a group this app belongs to.", **_FN),
        Attribute("order", types.Number(), description="Position in the UI; lowest first.", **_FN),
        Attribute(
            "hidden",
            types.Bool(),
            description="Hide the app in the UI.",
            optional=True,
            computed=True,
            requires_replace=True,
            default=False,
        ),
        _s(
            "open_in",
            "Where the app opens: slim-window or tab.",
            optional=True,
            computed=True,
            requires_replace=True,
            default="slim-window",
        ),
        _s("tooltip", "Markdown shown when hovering over the app.", **_FN),
    ],
    block_types=[_HEALTHCHECK],
)


def _given(config: Config, key: str) -> bool:
    value = config.get(key)
    if key == "healthcheck":
        return bool(value)
    return value is not None and value is not False


class AppResource(RecordedResource):
    NAME = "app"
    SCHEMA = APP_SCHEMA

    def validate(self, diags: Diagnostics, type_name: str, config: Config) -> None:
        super().validate(diags, type_name, config)
        slug = config.get("slug")
        if isinstance(slug, str) and not SLUG_RE.match(slug):
            diags.add_error(
                f'invalid "coder_app" slug {slug!r}',
                "a slug must be a valid hostname label: lowercase letters, digits and single "
                "hyphens, not starting or ending with a hyphen",
                path=["slug"],
            )
        share = config.get("share")
        if isinstance(share, str) and share not in SHARE_LEVELS:
            diags.add_error(
                f"invalid app share {share!r}",
                "must be owner, authenticated or public",
                path=["share"],
            )
        open_in = config.get("open_in")
        if isinstance(open_in, str) and open_in not in OPEN_IN:
            diags.add_error(
                f"invalid open_in {open_in!r}", "must be slim-window or tab", path=["open_in"]
            )
        for key, limit in (("display_name", 64), ("group", 64), ("tooltip", 2048)):
            value = config.get(key)
            if isinstance(value, str) and len(value) > limit:
                diags.add_error(f"{key} is too long (max {limit} characters)", path=[key])
        conflicts = {
            "command": ("url", "subdomain"),
            "url": ("command",),
            "healthcheck": ("command",),
            "external": ("healthcheck", "command", "subdomain", "share"),
        }
        for key, others in conflicts.items():
            if not _given(config, key):
                continue
            for other in others:
                if _given(config, other):
                    diags.add_error(f'"{key}": conflicts with {other}', path=[key])

    def check(self, diags: Diagnostics, state: State) -> None:
        if state.get("hidden"):
            for key in ("display_name", "icon", "order"):
                if state.get(key) is not None:
                    diags.add_warning(f"`{key}` set when app is hidden")
