"""Data source ``coder_parameter``: a workspace setting the user picks (Coder's rich parameters).

The chosen value reaches Terraform as ``CODER_PARAMETER_<hex sha256 of the name>``; without one
the ``default`` is used.  The value is checked against ``type``, the ``option`` values and the
``validation`` block as terraform-provider-coder checks it; ``optional`` says whether a default
exists.  Defaults (``type`` string, ``mutable``/``ephemeral`` false) are optional + computed here
(see agent.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
from typing import Any

from tf import types
from tf.iface import Config, ReadDataContext, State
from tf.schema import Attribute, Block, Schema
from tf.utils import Diagnostics

from coderstack.provider.resource import ProviderDataSource
from coderstack.provider.schema import ListBlock

PARAMETER_TYPES = ("number", "string", "bool", "list(string)")


def parameter_env_name(name: str) -> str:
    """The environment variable that carries the value of parameter ``name``."""
    return "CODER_PARAMETER_" + hashlib.sha256(name.encode()).hexdigest()


def _s(name: str, desc: str, **kw: Any) -> Attribute:
    return Attribute(name, types.String(), description=desc, **kw)


_OPTION = ListBlock(
    "option",
    Block(
        attributes=[
            _s("name", "The display name of this value in the UI.", required=True),
            _s("description", "What selecting this value does.", optional=True),
            _s("value", "The value of the parameter if this option is selected.", required=True),
            _s("icon", "A URL to an icon shown in the dashboard.", optional=True),
        ]
    ),
    max_items=64,
)

_VALIDATION = ListBlock(
    "validation",
    Block(
        attributes=[
            Attribute(
                "min", types.Number(), description="Minimum of a number parameter.", optional=True
            ),
            Attribute(
                "min_disabled", types.Bool(), description="True when min is not set.", computed=True
            ),
            Attribute(
                "max", types.Number(), description="Maximum of a number parameter.", optional=True
            ),
            Attribute(
                "max_disabled", types.Bool(), description="True when max is not set.", computed=True
            ),
            _s("monotonic", "Number monotonicity: increasing or decreasing.", optional=True),
            _s("regex", "A regex the value must match.", optional=True),
            _s("error", "The message shown when the regex does not match.", optional=True),
        ]
    ),
    max_items=1,
)

PARAMETER_SCHEMA = Schema(
    description="Use this data source to configure editable options for workspaces.",
    attributes=[
        _s("id", "A random UUID.", computed=True),
        _s("value", "The output value of the parameter.", computed=True),
        _s("name", "The name of the parameter.", required=True),
        _s("display_name", "The name shown in the interface.", optional=True),
        _s("description", "What this parameter does.", optional=True),
        _s("type", "number, string, bool or list(string).", optional=True, computed=True),
        Attribute(
            "mutable",
            types.Bool(),
            description="Whether the value may change after creation.",
            optional=True,
            computed=True,
        ),
        Attribute(
            "ephemeral",
            types.Bool(),
            description="Whether the value lasts for one build only.",
            optional=True,
            computed=True,
        ),
        _s("default", "A default value for the parameter.", optional=True),
        _s("icon", "A URL to an icon shown in the dashboard.", optional=True),
        Attribute(
            "order", types.Number(), description="Position in the UI; lowest first.", optional=True
        ),
        Attribute(
            "optional", types.Bool(), description="Whether this value is optional.", computed=True
        ),
    ],
    block_types=[_OPTION, _VALIDATION],
)


def check_type(typ: str, value: str) -> str | None:
    """None if ``value`` is a valid ``typ``, else the problem."""
    if typ == "number":
        try:
            float(value)
        except ValueError:
            return f"{value!r} is not a number"
    elif typ == "bool":
        if value.lower() not in ("true", "false", "1", "0", "t", "f"):
            return f"{value!r} is not a bool"
    elif typ == "list(string)":
        try:
            items = json.loads(value)
        except ValueError:
            items = None
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            return f"{value!r} is not an array of strings"
    elif typ != "string":
        return f"invalid type {typ!r}"
    return None


def check_validation(rule: dict, typ: str, value: str) -> str | None:
    """Coder's rules for a ``validation`` block against ``value``."""
    if typ != "number":
        if rule.get("min") is not None:
            return f"a min cannot be specified for a {typ} type"
        if rule.get("max") is not None:
            return f"a max cannot be specified for a {typ} type"
    if typ != "string" and rule.get("regex"):
        return f"a regex cannot be specified for a {typ} type"
    if typ == "bool" and value not in ("true", "false"):
        return 'boolean value can be either "true" or "false"'
    if typ == "string" and rule.get("regex"):
        if not rule.get("error"):
            return "an error must be specified with a regex validation"
        try:
            matched = re.search(rule["regex"], value)
        except re.error as exc:
            return f"compile regex {rule['regex']!r}: {exc}"
        if not matched:
            return f"{rule['error']} (value {value!r} does not match {rule['regex']!r})"
    if typ == "number":
        try:
            num = int(value)
        except ValueError:
            return f"value {value!r} is not a number"
        if rule.get("min") is not None and num < rule["min"]:
            return f"value {num} is less than the minimum {rule['min']}"
        if rule.get("max") is not None and num > rule["max"]:
            return f"value {num} is more than the maximum {rule['max']}"
        if rule.get("monotonic") not in (None, "", "increasing", "decreasing"):
            return 'number monotonicity can be either "increasing" or "decreasing"'
    return None


class ParameterDataSource(ProviderDataSource):
    NAME = "parameter"
    SCHEMA = PARAMETER_SCHEMA

    def validate(self, diags: Diagnostics, type_name: str, config: Config) -> None:
        super().validate(diags, type_name, config)
        typ = config.get("type")
        if isinstance(typ, str) and typ not in PARAMETER_TYPES:
            diags.add_error(
                f"invalid type {typ!r}",
                f"must be one of: {', '.join(PARAMETER_TYPES)}",
                path=["type"],
            )
        if config.get("option") and config.get("validation"):
            diags.add_error('"option": conflicts with validation', path=["option"])

    def read(self, ctx: ReadDataContext, config: Config) -> State:
        state = {a.name: config.get(a.name) for a in PARAMETER_SCHEMA.attributes}
        typ = state["type"] = config.get("type") or "string"
        state["mutable"] = bool(config.get("mutable"))
        state["ephemeral"] = bool(config.get("ephemeral"))
        state["id"] = str(uuid.uuid4())
        default = config.get("default")
        state["optional"] = default is not None
        options = list(config.get("option") or [])
        rules = [dict(r) for r in config.get("validation") or []]
        for rule in rules:
            rule["min_disabled"] = rule.get("min") is None
            rule["max_disabled"] = rule.get("max") is None
        state["option"], state["validation"] = options, rules

        def fail(message: str) -> State:
            ctx.diagnostics.add_error(message, f"coder_parameter {config.get('name')!r}")
            return state

        value = ""
        if default:
            problem = check_type(typ, default)
            if problem:
                return fail(problem)
            value = default
        value = os.environ.get(parameter_env_name(config["name"]), value)
        state["value"] = value
        if rules:
            problem = check_validation(rules[0], typ, value)
            if problem:
                return fail(problem)
        if options:
            names = [o["name"] for o in options]
            values = [o["value"] for o in options]
            for label, seen in (("name", names), ("value", values)):
                dupes = sorted({x for x in seen if seen.count(x) > 1})
                if dupes:
                    return fail(f"multiple options cannot have the same {label} {dupes[0]!r}")
            for v in values:
                problem = check_type(typ, v)
                if problem:
                    return fail(problem)
            if default and default not in values:
                return fail(f"default value {default!r} must be defined as one of options")
        return state
