"""``coder_script`` and ``coder_env``: things attached to an agent by its ``agent_id``.

Both only record their arguments (plus a UUID ``id``); the server hands them to the agent.
Every argument forces replacement, and SDK defaults are optional + computed (see agent.py).
"""

from __future__ import annotations

import re
import uuid
from typing import Any

from tf import types
from tf.iface import (
    Config,
    CreateContext,
    DeleteContext,
    ReadContext,
    Resource,
    State,
    UpdateContext,
)
from tf.schema import Attribute, Schema
from tf.utils import Diagnostics

from coderstack.cron import CronError, parse
from coderstack.provider.context import ProviderContext

ENV_NAME_RE = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
MERGE_STRATEGIES = ("replace", "append", "prepend", "error")
_FN = {"optional": True, "requires_replace": True}


def _attr(name: str, t: types.TfType, desc: str, **kw: Any) -> Attribute:
    return Attribute(name, t, description=desc, **kw)


def _agent_id() -> Attribute:
    return _attr("agent_id", types.String(), "The `id` of a `coder_agent` resource to associate with.",
                 required=True, requires_replace=True)


def _id() -> Attribute:
    return _attr("id", types.String(), "A UUID.", optional=True, computed=True)


class _Attached(Resource):
    """Create assigns a UUID and fills defaults; nothing else happens anywhere."""

    SCHEMA: Schema

    def __init__(self, provider: ProviderContext):
        self.provider = provider

    @classmethod
    def get_schema(cls) -> Schema:
        return cls.SCHEMA

    def check(self, diags: Diagnostics, state: State) -> None:
        """Checks that need the planned values (defaults filled in)."""

    def create(self, ctx: CreateContext, planned: State) -> State:
        state = dict(planned)
        state["id"] = str(uuid.uuid4())
        for attr in self.SCHEMA.attributes:
            if state.get(attr.name) is types.Unknown:
                state[attr.name] = attr.default if attr.default is not types.Unknown else None
        self.check(ctx.diagnostics, state)
        return state

    def read(self, ctx: ReadContext, current: State) -> State:
        return dict(current)

    def update(self, ctx: UpdateContext, current: State, planned: State) -> State:
        return dict(planned, id=current["id"])

    def delete(self, ctx: DeleteContext, current: State) -> None:
        return None


class ScriptResource(_Attached):
    SCHEMA = Schema(
        version=1,
        description="Use this resource to run a script from an agent.",
        attributes=[
            _id(),
            _agent_id(),
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

    @classmethod
    def get_name(cls) -> str:
        return "script"

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


class EnvResource(_Attached):
    SCHEMA = Schema(
        version=1,
        description="Use this resource to set an environment variable in a workspace.",
        attributes=[
            _id(),
            _agent_id(),
            _attr("name", types.String(), "The name of the environment variable.", required=True,
                  requires_replace=True),
            _attr("value", types.String(), "The value of the environment variable.", **_FN),
            _attr("merge_strategy", types.String(), "replace, append, prepend or error.",
                  computed=True, default="replace", **_FN),
        ],
    )

    @classmethod
    def get_name(cls) -> str:
        return "env"

    def validate(self, diags: Diagnostics, type_name: str, config: Config) -> None:
        super().validate(diags, type_name, config)
        name = config.get("name")
        if isinstance(name, str) and not ENV_NAME_RE.match(name):
            diags.add_error("must be a valid environment variable name", path=["name"])
        strategy = config.get("merge_strategy")
        if isinstance(strategy, str) and strategy not in MERGE_STRATEGIES:
            diags.add_error(f"invalid merge_strategy {strategy!r}", path=["merge_strategy"])
