"""``coder_agent``: one workspace agent, with its token and the script that starts it.

Attribute names, types and ForceNew-ness follow terraform-provider-coder.  Two deliberate
differences, both forced by the plugin protocol (we do not claim the legacy SDK type system):

* attributes with an SDK ``Default`` (``auth``, ``connection_timeout``, ``startup_script_behavior``,
  ``api_key_scope``) are *optional + computed*, so the default can appear in the plan;
* defaults inside nested blocks (``display_apps``) are not filled in: an unset flag stays null and
  the consumer applies Coder's default (vscode, web_terminal, ssh_helper and
  port_forwarding_helper on; vscode_insiders off).

The token is a fresh UUID per agent and stays stable while the agent resource lives; the
``init_script`` is re-derived from the provider ``url`` on every read, so a changed URL override
shows up (and replaces whatever consumes the script) on the next build.
"""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import urljoin

from tf import types
from tf.iface import Config, State
from tf.schema import Attribute, Block, Schema
from tf.utils import Diagnostics

from coderstack.provider.resource import (
    FORCE_NEW,
    RecordedResource,
    attr,
    check_choice,
    check_unique_keys,
)
from coderstack.provider.schema import ListBlock, SetBlock

OPERATING_SYSTEMS = ("linux", "darwin", "windows")
ARCHITECTURES = ("amd64", "armv7", "arm64")
AUTH_TYPES = (
    "token",
    "google-instance-identity",
    "aws-instance-identity",
    "azure-instance-identity",
)
STARTUP_BEHAVIORS = ("blocking", "non-blocking")
API_KEY_SCOPES = ("all", "no_user_data")

#: Coder's defaults for the ``display_apps`` flags when the block or a flag is absent.
DISPLAY_APPS_DEFAULTS = {
    "vscode": True,
    "vscode_insiders": False,
    "web_terminal": True,
    "ssh_helper": True,
    "port_forwarding_helper": True,
}


def agent_script_env_name(os_name: str, arch: str) -> str:
    """The environment variable the provisioner fills with the bootstrap for ``os``/``arch``."""
    return f"CODER_AGENT_SCRIPT_{os_name}_{arch}"


def render_init_script(url: str, os_name: str, arch: str, auth: str, environ: Any = None) -> str:
    """Coder's rule: take ``CODER_AGENT_SCRIPT_<os>_<arch>``, put the access URL (the provider
    ``url`` with its path replaced by ``/``) in place of ``${ACCESS_URL}`` and ``auth`` in place
    of ``${AUTH_TYPE}``.  No script in the environment gives an empty string."""
    env = os.environ if environ is None else environ
    script = env.get(agent_script_env_name(os_name, arch), "")
    if not script:
        return ""
    access_url = urljoin(url, "/")
    return script.replace("${ACCESS_URL}", access_url).replace("${AUTH_TYPE}", auth)


def _s(name: str, desc: str, **kw: Any) -> Attribute:
    return attr(name, types.String(), desc, **kw)


def _n(name: str, desc: str, **kw: Any) -> Attribute:
    return attr(name, types.Number(), desc, **kw)


def _b(name: str, desc: str, **kw: Any) -> Attribute:
    return attr(name, types.Bool(), desc, **kw)


_FN = FORCE_NEW

_METADATA = ListBlock(
    "metadata",
    Block(
        attributes=[
            _s("key", "The key of this metadata item.", required=True, requires_replace=True),
            _s("display_name", "The user-facing name of this value.", **_FN),
            _s(
                "script",
                "The script that retrieves the value.",
                required=True,
                requires_replace=True,
            ),
            _n("timeout", "Maximum run time of the script in seconds.", **_FN),
            _n("interval", "Refresh interval in seconds.", required=True, requires_replace=True),
            _n("order", "Position in the UI; lowest first.", **_FN),
        ]
    ),
)

_DISPLAY_APPS = SetBlock(
    "display_apps",
    Block(
        attributes=[
            _b("vscode", "Display the VS Code Desktop app.", **_FN),
            _b("vscode_insiders", "Display the VS Code Insiders app.", **_FN),
            _b("web_terminal", "Display the web terminal app.", **_FN),
            _b("port_forwarding_helper", "Display the port-forwarding helper.", **_FN),
            _b("ssh_helper", "Display the SSH helper.", **_FN),
        ]
    ),
    max_items=1,
)


def _threshold_block(name: str, with_path: bool) -> SetBlock:
    attrs = [
        _b("enabled", f"Enable {name} monitoring.", required=True, requires_replace=True),
        _n(
            "threshold", "Usage threshold in percent (0-100).", required=True, requires_replace=True
        ),
    ]
    if with_path:
        attrs.insert(
            0, _s("path", "Absolute path of the volume.", required=True, requires_replace=True)
        )
    return SetBlock(name, Block(attributes=attrs), max_items=None if with_path else 1)


_RESOURCES_MONITORING = SetBlock(
    "resources_monitoring",
    Block(block_types=[_threshold_block("memory", False), _threshold_block("volume", True)]),
    max_items=1,
)

AGENT_SCHEMA = Schema(
    version=1,
    description="Use this resource to associate an agent.",
    attributes=[
        Attribute(
            "id", types.String(), description="The agent's UUID.", optional=True, computed=True
        ),
        _s(
            "api_key_scope",
            "Which API routes the agent token may use: all or no_user_data.",
            optional=True,
            computed=True,
            requires_replace=True,
            default="all",
        ),
        _s(
            "init_script",
            "Run this script on startup of an instance to initialize the agent.",
            computed=True,
        ),
        _s(
            "arch",
            "The agent's architecture: amd64, armv7 or arm64.",
            required=True,
            requires_replace=True,
        ),
        _s(
            "auth",
            "How the agent authenticates: token or a cloud instance identity.",
            optional=True,
            computed=True,
            requires_replace=True,
            default="token",
        ),
        _s("dir", "The starting directory of shell sessions (deprecated).", **_FN),
        Attribute(
            "env",
            types.Map(types.String()),
            description="Environment variables to set in the workspace.",
            **_FN,
        ),
        _s(
            "os",
            "The agent's operating system: linux, darwin or windows.",
            required=True,
            requires_replace=True,
        ),
        _s("startup_script", "A script to run after the agent starts.", **_FN),
        _s("shutdown_script", "A script to run before the agent stops.", **_FN),
        _s(
            "token",
            "Set the environment variable `CODER_AGENT_TOKEN` with this token to "
            "authenticate an agent.",
            computed=True,
            sensitive=True,
        ),
        _n(
            "connection_timeout",
            "Seconds until an agent that never connected is marked timed out.",
            optional=True,
            computed=True,
            requires_replace=True,
            default=120,
        ),
        _s("troubleshooting_url", "A document on troubleshooting the agent.", **_FN),
        _s("motd_file", "A file shown to users when they log in by SSH.", **_FN),
        _s(
            "startup_script_behavior",
            "blocking or non-blocking.",
            optional=True,
            computed=True,
            requires_replace=True,
            default="non-blocking",
        ),
        _n("order", "Position of the agent in the UI; lowest first.", **_FN),
    ],
    block_types=[_METADATA, _DISPLAY_APPS, _RESOURCES_MONITORING],
)


class AgentResource(RecordedResource):
    NAME = "agent"
    SCHEMA = AGENT_SCHEMA
    MINTED = ("id", "token")

    def validate(self, diags: Diagnostics, type_name: str, config: Config) -> None:
        super().validate(diags, type_name, config)
        check_choice(diags, config, "os", OPERATING_SYSTEMS)
        check_choice(diags, config, "arch", ARCHITECTURES)
        check_choice(diags, config, "auth", AUTH_TYPES)
        check_choice(diags, config, "startup_script_behavior", STARTUP_BEHAVIORS)
        check_choice(diags, config, "api_key_scope", API_KEY_SCOPES)
        timeout = config.get("connection_timeout")
        if isinstance(timeout, int | float) and timeout < 0:
            diags.add_error("connection_timeout must be at least 0", path=["connection_timeout"])
        check_unique_keys(diags, config.get("metadata"), "metadata", "agent metadata")
        monitoring = config.get("resources_monitoring")
        if isinstance(monitoring, list):
            for mon in monitoring:
                for item in (mon or {}).get("volume") or []:
                    path = item.get("path")
                    if isinstance(path, str) and not path.startswith("/"):
                        diags.add_error(
                            "volume path must be an absolute path", path=["resources_monitoring"]
                        )

    def derive(self, state: State) -> State:
        state["init_script"] = render_init_script(
            self.provider.url, state["os"], state["arch"], state.get("auth") or "token"
        )
        return state
