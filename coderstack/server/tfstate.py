"""What a workspace build made, read from Terraform's state document (pure functions).

The state is the JSON Terraform keeps in ``terraform.tfstate`` (format version 4)::

    {"version": 4, "resources": [
        {"mode": "managed" | "data", "type": "coder_agent", "name": "main", "module": "module.x",
         "instances": [{"index_key": 0 | "key" | absent, "attributes": {...}}]}, ...]}

Managed ``coder_agent`` resources are the workspace's agents; ``coder_app``, ``coder_script``
and ``coder_env`` attach to an agent by ``agent_id``; ``coder_metadata`` describes another
resource by its ``id``.  The data sources ``coder_parameter`` and ``coder_workspace`` tell which
parameter values and which access URL the build used.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from coderstack.provider.agent import DISPLAY_APPS_DEFAULTS
from coderstack.server.tferrors import BuildError


@dataclass(frozen=True)
class Healthcheck:
    url: str
    interval: int
    threshold: int


@dataclass(frozen=True)
class App:
    id: str
    slug: str
    agent_id: str
    display_name: str | None = None
    url: str | None = None
    command: str | None = None
    icon: str | None = None
    subdomain: bool = False
    share: str = "owner"
    external: bool = False
    healthcheck: Healthcheck | None = None
    group: str | None = None
    order: int | None = None
    hidden: bool = False
    open_in: str = "slim-window"
    tooltip: str | None = None


@dataclass(frozen=True)
class MetadataItem:
    key: str
    script: str
    interval: int
    display_name: str | None = None
    timeout: int | None = None
    order: int | None = None


@dataclass(frozen=True)
class Script:
    """A ``coder_script`` of an agent."""

    id: str
    display_name: str
    script: str
    run_on_start: bool = False
    run_on_stop: bool = False
    start_blocks_login: bool = False
    cron: str | None = None
    timeout: int = 0
    log_path: str | None = None
    icon: str | None = None


@dataclass(frozen=True)
class Agent:
    """A ``coder_agent`` from the state.  ``name`` is the resource name, as in Coder.  ``env`` is
    the agent's ``env`` merged over its ``coder_env`` resources."""

    id: str
    name: str
    token: str = field(repr=False)
    os: str
    arch: str
    auth: str = "token"
    dir: str | None = None
    env: Mapping[str, str] = field(default_factory=dict)
    startup_script: str | None = None
    shutdown_script: str | None = None
    startup_script_behavior: str = "non-blocking"
    connection_timeout: int = 120
    troubleshooting_url: str | None = None
    motd_file: str | None = None
    order: int | None = None
    api_key_scope: str = "all"
    init_script: str = field(default="", repr=False)
    display_apps: Mapping[str, bool] = field(default_factory=lambda: dict(DISPLAY_APPS_DEFAULTS))
    metadata: tuple[MetadataItem, ...] = ()
    apps: tuple[App, ...] = ()
    #: ``coder_script`` resources attached to the agent (``startup_script`` stays separate).
    scripts: tuple[Script, ...] = ()



@dataclass(frozen=True)
class MetadataEntry:
    """One ``item`` of a ``coder_metadata``."""

    key: str
    value: str | None
    sensitive: bool = False

    @property
    def is_null(self) -> bool:
        return self.value is None


@dataclass(frozen=True)
class ResourceMetadata:
    """A ``coder_metadata`` resource: items about the resource whose ``id`` it names."""

    #: The described resource's address ("type.name", index appended), or its id when the
    #: state holds no resource with that id.
    resource: str
    resource_type: str
    items: tuple[MetadataEntry, ...] = ()
    hide: bool = False
    icon: str | None = None
    daily_cost: int = 0


def _int(value: Any, default: int) -> int:
    return default if value is None else int(value)


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)


def _instances(
    state: Mapping[str, Any], type_name: str, mode: str = "managed"
) -> Iterator[tuple[Mapping[str, Any], Mapping[str, Any]]]:
    """(resource, instance attributes) of every instance of ``type_name`` (a resource, or with
    ``mode="data"`` a data source)."""
    for res in state.get("resources", []):
        if res.get("mode") == mode and res.get("type") == type_name:
            for inst in res.get("instances", []):
                yield res, inst.get("attributes") or {}


def _address(res: Mapping[str, Any], attrs: Mapping[str, Any]) -> str:
    # The order coder_env resources merge in: by module, type, name, then id.
    return f"{res.get('module', '')}{res['type']}.{res['name']}/{attrs.get('id', '')}"


def _instance_address(res: Mapping[str, Any], inst: Mapping[str, Any]) -> str:
    """Terraform's address of one instance: ``module.m.type.name[index]``."""
    prefix = f"{res.get('module')}." if res.get("module") else ""
    key = inst.get("index_key")
    index = "" if key is None else f"[{json.dumps(key)}]"
    return f"{prefix}{res['type']}.{res['name']}{index}"


def _merge_env(state: Mapping[str, Any]) -> dict[str, dict[str, str]]:
    """``coder_env`` values per agent id, merged by their ``merge_strategy`` in the order of
    their resource addresses (Coder's rule: append/prepend join with ``:``)."""
    per_agent: dict[str, list[tuple[str, Mapping[str, Any]]]] = {}
    for res, a in _instances(state, "coder_env"):
        per_agent.setdefault(a["agent_id"], []).append((_address(res, a), a))
    merged: dict[str, dict[str, str]] = {}
    for agent_id, items in per_agent.items():
        env: dict[str, str] = {}
        seen: dict[str, int] = {}
        for _, a in sorted(items, key=lambda item: item[0]):
            name, value = a["name"], a.get("value") or ""
            strategy = a.get("merge_strategy") or "replace"
            seen[name] = seen.get(name, 0) + 1
            if strategy == "append" and env.get(name):
                value = f"{env[name]}:{value}"
            elif strategy == "prepend" and env.get(name):
                value = f"{value}:{env[name]}"
            env[name] = value
        for name, count in seen.items():
            strict = any(a.get("merge_strategy") == "error" for _, a in items if a["name"] == name)
            if count > 1 and strict:
                raise BuildError("apply", f"coder_env {name!r} is defined more than once")
        merged[agent_id] = env
    return merged


def _scripts(state: Mapping[str, Any]) -> dict[str, list[Script]]:
    out: dict[str, list[Script]] = {}
    for _res, a in _instances(state, "coder_script"):
        out.setdefault(a["agent_id"], []).append(
            Script(
                id=a["id"],
                display_name=a["display_name"],
                script=a["script"],
                run_on_start=bool(a.get("run_on_start")),
                run_on_stop=bool(a.get("run_on_stop")),
                start_blocks_login=bool(a.get("start_blocks_login")),
                cron=a.get("cron"),
                timeout=_int(a.get("timeout"), 0),
                log_path=a.get("log_path"),
                icon=a.get("icon"),
            )
        )
    return out


def read_agents(state: Mapping[str, Any]) -> tuple[Agent, ...]:
    """Agents (with their apps) from a Terraform state document (format version 4)."""
    apps: dict[str, list[App]] = {}
    for _res, a in _instances(state, "coder_app"):
        hc = (a.get("healthcheck") or [None])[0]
        apps.setdefault(a["agent_id"], []).append(
            App(
                id=a["id"],
                slug=a["slug"],
                agent_id=a["agent_id"],
                display_name=a.get("display_name"),
                url=a.get("url"),
                command=a.get("command"),
                icon=a.get("icon"),
                subdomain=bool(a.get("subdomain")),
                share=a.get("share") or "owner",
                external=bool(a.get("external")),
                healthcheck=Healthcheck(hc["url"], int(hc["interval"]), int(hc["threshold"]))
                if hc
                else None,
                group=a.get("group"),
                order=_opt_int(a.get("order")),
                hidden=bool(a.get("hidden")),
                open_in=a.get("open_in") or "slim-window",
                tooltip=a.get("tooltip"),
            )
        )
    env_by_agent = _merge_env(state)
    scripts = _scripts(state)
    agents = []
    for res, a in _instances(state, "coder_agent"):
        shown = dict(DISPLAY_APPS_DEFAULTS)
        for block in a.get("display_apps") or []:
            shown.update({k: bool(v) for k, v in block.items() if v is not None})
        agents.append(
            Agent(
                id=a["id"],
                name=res["name"],
                token=a["token"],
                os=a["os"],
                arch=a["arch"],
                auth=a.get("auth") or "token",
                dir=a.get("dir"),
                env={**env_by_agent.get(a["id"], {}), **(a.get("env") or {})},
                startup_script=a.get("startup_script"),
                shutdown_script=a.get("shutdown_script"),
                startup_script_behavior=a.get("startup_script_behavior") or "non-blocking",
                connection_timeout=_int(a.get("connection_timeout"), 120),
                troubleshooting_url=a.get("troubleshooting_url"),
                motd_file=a.get("motd_file"),
                order=_opt_int(a.get("order")),
                api_key_scope=a.get("api_key_scope") or "all",
                init_script=a.get("init_script") or "",
                display_apps=shown,
                metadata=tuple(
                    MetadataItem(
                        key=m["key"],
                        script=m["script"],
                        interval=int(m["interval"]),
                        display_name=m.get("display_name"),
                        timeout=_opt_int(m.get("timeout")),
                        order=_opt_int(m.get("order")),
                    )
                    for m in a.get("metadata") or []
                ),
                apps=tuple(sorted(apps.get(a["id"], []), key=lambda app: app.slug)),
                scripts=tuple(sorted(scripts.get(a["id"], []), key=lambda s: s.display_name)),
            )
        )
    names = [agent.name for agent in agents]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise BuildError("apply", f"duplicate agent name(s) in state: {', '.join(dupes)}")
    return tuple(sorted(agents, key=lambda agent: agent.name))


def read_parameters(state: Mapping[str, Any]) -> dict[str, str]:
    """``coder_parameter`` values (data sources) from a state document."""
    return {
        attrs["name"]: attrs.get("value") or ""
        for _res, attrs in _instances(state, "coder_parameter", mode="data")
        if "name" in attrs
    }


def read_agent_url(state: Mapping[str, Any]) -> str | None:
    """``access_url`` of the first ``coder_workspace`` data source in the state."""
    for _res, attrs in _instances(state, "coder_workspace", mode="data"):
        url = attrs.get("access_url")
        if url:
            return url
    return None


def read_resource_metadata(state: Mapping[str, Any]) -> tuple[ResourceMetadata, ...]:
    """``coder_metadata`` resources of a state document, each naming the resource it describes
    by that resource's address (found by ``id``)."""
    by_id: dict[str, tuple[str, str]] = {}
    for res in state.get("resources", []):
        if res.get("mode") != "managed" or res.get("type") == "coder_metadata":
            continue
        for inst in res.get("instances", []):
            rid = (inst.get("attributes") or {}).get("id")
            if isinstance(rid, str):
                by_id.setdefault(rid, (_instance_address(res, inst), res["type"]))
    out = []
    for _res, a in _instances(state, "coder_metadata"):
        rid = a.get("resource_id") or ""
        address, rtype = by_id.get(rid, (rid, ""))
        out.append(
            ResourceMetadata(
                resource=address,
                resource_type=rtype,
                items=tuple(
                    MetadataEntry(
                        key=i["key"], value=i.get("value"), sensitive=bool(i.get("sensitive"))
                    )
                    for i in a.get("item") or []
                ),
                hide=bool(a.get("hide")),
                icon=a.get("icon"),
                daily_cost=_int(a.get("daily_cost"), 0),
            )
        )
    return tuple(out)


def read_resources(state: Mapping[str, Any]) -> tuple[str, ...]:
    """The address of every managed resource instance, in state order."""
    out: list[str] = []
    for res in state.get("resources", []):
        if res.get("mode") != "managed":
            continue
        out.extend(_instance_address(res, inst) for inst in res.get("instances", []))
    return tuple(out)
