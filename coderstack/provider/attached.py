"""``coder_script`` and ``coder_env``: things attached to an agent by its ``agent_id``.

Both only record their arguments (plus a UUID ``id``); the server hands them to the agent.
Every argument forces replacement, and SDK defaults are optional + computed (see agent.py).
"""

from __future__ import annotations

import re

from tf import types
from tf.iface import Config, State
from tf.schema import Attribute, Schema
from tf.utils import Diagnostics

from coderstack.cron import CronError, parse
from coderstack.provider.resource import FORCE_NEW as _FN
from coderstack.provider.resource import RecordedResource
from coderstack.provider.resource import attr as _attr

ENV_NAME_RE = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
MERGE_STRATEGIES = ("replace", "append", "prepend", "error")


def agent_id_attribute() -> Attribute:
    return _attr("agent_id", types.String(), "The `id` of a `coder_agent` resource to associate with.",
                 required=True, requires_replace=True)


def uuid_attribute() -> Attribute:
    return _attr("id", types.String(), "A UUID.", optional=True, computed=True)


class ScriptResource(RecordedResource):
    NAME = "script"
    SCHEMA = Schema(
        version=1,
        description="Use this resource to run a script from an agent.",
        attributes=[
            uuid_attribute(),
            agent_id_attribute(),
            _attr("display_name", types.String(), "The name shown with the script's logs.",
                  required=True, requires_replace=True),
            _attr("log_path", types.String(), "A file the logs go to (relative: in tmp).", **_FN),
            _attr("icon", types.String(), "A URL to an icon shown in the dashboard.", **_FN),
            _attr("script", types.String(), "The content of the script.", required=True,
                  requires_replace=True),
            _attr("cron", types.String(), "A cron schedule (with seconds) to run the script on.", **_FN),
            _attr("start_blocks_login", types.Bool(), "Users wait for the script before logging in.",
                  computed=True, default=False, **_FN),
            _attr("run_on_start", types.Bool(), "Run when the agent starts.", computed=True,
                  default=False, **_FN),
            _attr("run_on_stop", types.Bool(), "Run when the agent stops.", computed=True,
                  default=False, **_FN),
            _attr("timeout", types.Number(), "Seconds the script may run; 0 is no limit.",
                  computed=True, default=0, **_FN),
        ],
    )

    def validate(self, diags: Diagnostics, type_name: str, config: Config) -> None:
        super().validate(diags, type_name, config)
        cron = config.get("cron")
        if isinstance(cron, str) and cron:
            try:
                parse(cron)
            except CronError as err:
                name = config.get("display_name")
                which = f"coder_script {name!r}" if isinstance(name, str) else "coder_script"
                diags.add_error(f"{which}: {cron!r} is not a valid cron expression", str(err),
                                path=["cron"])
        timeout = config.get("timeout")
        if isinstance(timeout, int | float) and timeout < 1:
            diags.add_error("timeout must be at least 1", path=["timeout"])

    def check(self, diags: Diagnostics, state: State) -> None:
        if not state.get("run_on_start") and not state.get("run_on_stop") and not state.get("cron"):
            diags.add_error("at least one of `run_on_start`, `run_on_stop`, or `cron` must be set")
        if state.get("start_blocks_login") and not state.get("run_on_start"):
            diags.add_error("start_blocks_login can only be set if `run_on_start` is true")


class EnvResource(RecordedResource):
    NAME = "env"
    SCHEMA = Schema(
        version=1,
        description="Use this resource to set an environment variable in a workspace.",
        attributes=[
            uuid_attribute(),
            agent_id_attribute(),
            _attr("name", types.String(), "The name of the environment variable.", required=True,
                  requires_replace=True),
            _attr("value", types.String(), "The value of the environment variable.", **_FN),
            _attr("merge_strategy", types.String(), "replace, append, prepend or error.",
                  computed=True, default="replace", **_FN),
        ],
    )

    def validate(self, diags: Diagnostics, type_name: str, config: Config) -> None:
        super().validate(diags, type_name, config)
        name = config.get("name")
        if isinstance(name, str) and not ENV_NAME_RE.match(name):
            diags.add_error("must be a valid environment variable name", path=["name"])
        strategy = config.get("merge_strategy")
        if isinstance(strategy, str) and strategy not in MERGE_STRATEGIES:
            diags.add_error(f"invalid merge_strategy {strategy!r}", path=["merge_strategy"])
