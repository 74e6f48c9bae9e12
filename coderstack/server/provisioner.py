"""Workspace builds: run the real ``terraform`` on a template, with our ``coder/coder`` provider.

A build is what Coder's Terraform provisioner does, on one machine:

1. copy the template's files into the workspace's build directory (which keeps
   ``terraform.tfstate`` from build to build, so stop/destroy act on what start made);
2. write a CLI config (``TF_CLI_CONFIG_FILE``) whose ``filesystem_mirror`` holds our provider,
   packed by ``tf.runner.install_provider``, so a plain ``terraform init`` installs it and the
   unreachable registry is never asked for ``coder/coder``;
3. ``terraform init`` and ``terraform apply -auto-approve`` (``apply -destroy`` for destroy), with
   Coder's provisioner environment: ``CODER_AGENT_URL`` (the access URL), ``CODER_WORKSPACE_*``,
   ``CODER_WORKSPACE_OWNER_*`` and the agent bootstraps ``CODER_AGENT_SCRIPT_<os>_<arch>``;
4. read the agents (and their apps) from the resulting state.

Terraform runs as a child process (``reactor.spawnProcess``); every output line goes to the
caller's ``log`` callback as it arrives.  A failing command raises :class:`BuildError` carrying
Terraform's own message.

Why a filesystem mirror and not ``dev_overrides``: with overrides Terraform warns that
``terraform init`` "may error unexpectedly", and it does: init still asks the registry for
``coder/coder`` versions and fails offline, so a template that needs init for anything else (a
module, a backend) could not build.  The mirror goes through the normal install path.  Because a
mirror must satisfy the template's ``version`` constraint, the same executable is published as
0.999.0, 1.999.0 and 2.999.0: any ``>=``, ``~> N`` or ``~> N.M`` constraint on a 0.x, 1.x or 2.x
release (what Coder templates write) is met.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.internet import defer, error, protocol
from twisted.internet.interfaces import IReactorProcess

from coderstack.provider.agent import DISPLAY_APPS_DEFAULTS
from coderstack.provider.bootstrap import agent_script_env
from coderstack.provider.launcher import EXECUTABLE_NAME
from coderstack.provider.parameter import parameter_env_name

TRANSITIONS = ("start", "stop", "destroy")
PROVIDER_ADDRESS = "registry.terraform.io/coder/coder"
MIRROR_VERSIONS = ("0.999.0", "1.999.0", "2.999.0")
#: Our own files inside a build directory.
META_DIR = ".coderstack"
TEMPLATE_SUFFIXES = (".tf", ".tf.json", ".tfvars", ".tfvars.json", ".tftpl", ".tpl", ".sh", ".ps1")
#: Parent environment variables Terraform may inherit (Coder's safeEnviron drops CODER_*).
SAFE_ENV = (
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "SHELL",
    "LANG",
    "LC_ALL",
    "LC_CTYPE",
    "TZ",
    "TMPDIR",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
)

LogCallback = Callable[[str], None]


# --------------------------------------------------------------------------------------------
# results


@dataclass(frozen=True)
class WorkspaceInfo:
    """What Coder's provisioner tells the provider about the build (``CODER_WORKSPACE_*``)."""

    id: str
    name: str
    owner_id: str
    owner_name: str  # the username
    owner_email: str = ""
    owner_full_name: str = ""
    owner_session_token: str = field(default="", repr=False)
    owner_groups: tuple[str, ...] = ()
    owner_login_type: str = ""
    template_id: str = ""
    template_name: str = ""
    template_version: str = ""
    build_id: str = ""


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
class BuildResult:
    transition: str
    agents: tuple[Agent, ...]
    #: Every managed resource in the state after the build, as "type.name" (index appended).
    resources: tuple[str, ...]
    state_path: Path
    #: ``coder_parameter`` values the build used, by parameter name.
    parameters: Mapping[str, str] = field(default_factory=dict)
    #: The provider ``url`` the template's agents were given (the per-template access-URL
    #: override, else the access URL), as ``data.coder_workspace.*.access_url`` saw it; None
    #: when the template reads no ``coder_workspace``.
    agent_url: str | None = None
    #: ``coder_metadata`` resources, in state order.
    resource_metadata: tuple[ResourceMetadata, ...] = ()


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


class BuildError(Exception):
    """A terraform command failed.  ``message`` is terraform's error text (its stderr, or the
    tail of its output); ``command`` is the subcommand that failed (init/apply/validate)."""

    def __init__(self, command: str, message: str, exit_code: int | None = None):
        super().__init__(f"terraform {command} failed: {message}")
        self.command = command
        self.message = message
        self.exit_code = exit_code


class TemplateError(BuildError):
    """``terraform validate`` (or the init before it) rejected a template."""


# --------------------------------------------------------------------------------------------
# the pieces that do not run anything


def default_twistd() -> list[str]:
    """This installation's ``twistd``: the script next to the interpreter, or the module."""
    script = Path(sys.executable).parent / "twistd"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


def cli_config_text(mirror_dir: Path) -> str:
    quoted = json.dumps(str(mirror_dir))
    addr = json.dumps(PROVIDER_ADDRESS)
    return (
        "# Written by coderstack for one workspace build.\n"
        "provider_installation {\n"
        f"  filesystem_mirror {{\n    path    = {quoted}\n    include = [{addr}]\n  }}\n"
        f"  direct {{\n    exclude = [{addr}]\n  }}\n"
        "}\n"
    )


def install_provider_mirror(mirror_dir: Path, provider_path: Path) -> None:
    """Pack ``provider_path`` (named terraform-provider-coder) into ``mirror_dir``."""
    from tf.runner import install_provider

    if provider_path.name != EXECUTABLE_NAME:
        raise ValueError(f"the provider executable must be named {EXECUTABLE_NAME}")
    if mirror_dir.exists():
        shutil.rmtree(mirror_dir)
    for version in MIRROR_VERSIONS:
        install_provider(
            "registry.terraform.io", "coder", "coder", version, mirror_dir, provider_path
        )


def prepare_work_dir(work_dir: Path, provider_path: Path, template: TemplateSource | None) -> Path:
    """Create the build directory, refresh its copy of the template (dropping files of a
    previous version) and its provider mirror; return the CLI config path."""
    meta = work_dir / META_DIR
    meta.mkdir(parents=True, exist_ok=True)
    if template is not None:
        copy_template(template, work_dir)
    # Repack the mirror only when the provider executable changed; then the old lock file
    # (which pins the old package's hash) must go too, or init would refuse the new one.
    stamp = meta / "provider.sha256"
    digest = hashlib.sha256(provider_path.read_bytes() + repr(MIRROR_VERSIONS).encode()).hexdigest()
    if not stamp.exists() or stamp.read_text() != digest or not (meta / "mirror").exists():
        install_provider_mirror(meta / "mirror", provider_path)
        (work_dir / ".terraform.lock.hcl").unlink(missing_ok=True)
        stamp.write_text(digest)
    rc = meta / "terraformrc"
    rc.write_text(cli_config_text(meta / "mirror"))
    return rc


#: A template: a directory, or its files as {file name: content} (e.g. as pushed to the API).
TemplateSource = str | os.PathLike[str] | Mapping[str, str | bytes]


def template_files(template: TemplateSource) -> dict[str, bytes]:
    """The template's files (top level, Terraform-related suffixes) by name.

    Raises :class:`TemplateError` when there is no ``*.tf``/``*.tf.json`` or a name is not a
    plain file name."""
    if isinstance(template, Mapping):
        files = {}
        for name, content in template.items():
            if "/" in name or "\\" in name or name.startswith(".") or not name:
                raise TemplateError("validate", f"not a plain file name: {name!r}")
            if name.endswith(TEMPLATE_SUFFIXES):
                files[name] = content.encode() if isinstance(content, str) else bytes(content)
        where = "the template"
    else:
        where = str(template)
        files = {
            p.name: p.read_bytes()
            for p in Path(template).iterdir()
            if p.is_file() and p.name.endswith(TEMPLATE_SUFFIXES)
        }
    if not any(name.endswith((".tf", ".tf.json")) for name in files):
        raise TemplateError("validate", f"no *.tf or *.tf.json files in {where}")
    return dict(sorted(files.items()))


def copy_template(template: TemplateSource, work_dir: Path) -> None:
    """Put the template's files in ``work_dir``, removing those of the previous version."""
    files = template_files(template)
    manifest = work_dir / META_DIR / "template-files.json"
    if manifest.exists():
        for name in json.loads(manifest.read_text()):
            (work_dir / name).unlink(missing_ok=True)
    for name, content in files.items():
        (work_dir / name).write_bytes(content)
    manifest.write_text(json.dumps(list(files)))


def terraform_env(
    *,
    cli_config: Path,
    access_url: str,
    transition: str,
    workspace: WorkspaceInfo | None,
    agent_scripts: Mapping[str, str],
    base_env: Mapping[str, str] | None = None,
    parameters: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The environment of a terraform run, as Coder's ``provisionEnv`` builds it; ``parameters``
    are the workspace's ``coder_parameter`` values by name."""
    parent = os.environ if base_env is None else base_env
    env = {k: parent[k] for k in SAFE_ENV if k in parent}
    env.setdefault("PATH", os.defpath)
    env.update(
        TF_CLI_CONFIG_FILE=str(cli_config),
        CHECKPOINT_DISABLE="1",
        TF_IN_AUTOMATION="1",
        TF_INPUT="0",
        CODER_AGENT_URL=access_url,
        # Coder's data source knows start and stop; a destroy runs with the stop transition.
        CODER_WORKSPACE_TRANSITION="stop" if transition == "destroy" else transition,
    )
    if workspace is not None:
        env.update(
            CODER_WORKSPACE_ID=workspace.id,
            CODER_WORKSPACE_NAME=workspace.name,
            CODER_WORKSPACE_OWNER=workspace.owner_name,
            CODER_WORKSPACE_OWNER_ID=workspace.owner_id,
            CODER_WORKSPACE_OWNER_EMAIL=workspace.owner_email,
            CODER_WORKSPACE_OWNER_NAME=workspace.owner_full_name,
            CODER_WORKSPACE_OWNER_SESSION_TOKEN=workspace.owner_session_token,
            CODER_WORKSPACE_OWNER_GROUPS=json.dumps(list(workspace.owner_groups)),
            CODER_WORKSPACE_OWNER_LOGIN_TYPE=workspace.owner_login_type,
            CODER_WORKSPACE_TEMPLATE_ID=workspace.template_id,
            CODER_WORKSPACE_TEMPLATE_NAME=workspace.template_name,
            CODER_WORKSPACE_TEMPLATE_VERSION=workspace.template_version,
            CODER_WORKSPACE_BUILD_ID=workspace.build_id,
        )
    env.update(agent_scripts)
    for name, value in (parameters or {}).items():
        env[parameter_env_name(name)] = value
    return env


def _int(value: Any, default: int | None = None) -> int | None:
    return default if value is None else int(value)


def _instances(state: Mapping[str, Any], type_name: str):
    for res in state.get("resources", []):
        if res.get("mode") == "managed" and res.get("type") == type_name:
            for inst in res.get("instances", []):
                yield res, inst.get("attributes") or {}


def _address(res: Mapping[str, Any], attrs: Mapping[str, Any]) -> str:
    return f"{res.get('module', '')}{res['type']}.{res['name']}/{attrs.get('id', '')}"


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
                order=_int(a.get("order")),
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
                order=_int(a.get("order")),
                api_key_scope=a.get("api_key_scope") or "all",
                init_script=a.get("init_script") or "",
                display_apps=shown,
                metadata=tuple(
                    MetadataItem(
                        key=m["key"],
                        script=m["script"],
                        interval=int(m["interval"]),
                        display_name=m.get("display_name"),
                        timeout=_int(m.get("timeout")),
                        order=_int(m.get("order")),
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
    out = {}
    for res in state.get("resources", []):
        if res.get("mode") == "data" and res.get("type") == "coder_parameter":
            for inst in res.get("instances", []):
                attrs = inst.get("attributes") or {}
                if "name" in attrs:
                    out[attrs["name"]] = attrs.get("value") or ""
    return out


def read_agent_url(state: Mapping[str, Any]) -> str | None:
    """``access_url`` of the first ``coder_workspace`` data source in the state."""
    for res in state.get("resources", []):
        if res.get("mode") == "data" and res.get("type") == "coder_workspace":
            for inst in res.get("instances", []):
                url = (inst.get("attributes") or {}).get("access_url")
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
        prefix = f"{res.get('module')}." if res.get("module") else ""
        for inst in res.get("instances", []):
            rid = (inst.get("attributes") or {}).get("id")
            key = inst.get("index_key")
            index = "" if key is None else f"[{json.dumps(key)}]"
            if isinstance(rid, str):
                by_id.setdefault(rid, (f"{prefix}{res['type']}.{res['name']}{index}", res["type"]))
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
    out = []
    for res in state.get("resources", []):
        if res.get("mode") != "managed":
            continue
        prefix = f"{res.get('module')}." if res.get("module") else ""
        for inst in res.get("instances", []):
            key = inst.get("index_key")
            index = "" if key is None else f"[{json.dumps(key)}]"
            out.append(f"{prefix}{res['type']}.{res['name']}{index}")
    return tuple(out)


# --------------------------------------------------------------------------------------------
# running terraform


class _TerraformProcess(protocol.ProcessProtocol):
    """Splits a terraform child's output into lines for the log; keeps the tails for errors."""

    def __init__(self, log: LogCallback | None):
        self.log = log
        # Cancelling the build interrupts terraform (SIGINT: it stops cleanly and saves state).
        self.done: defer.Deferred[int | None] = defer.Deferred(canceller=self._interrupt)
        self.stderr: deque[str] = deque(maxlen=200)
        self.stdout: deque[str] = deque(maxlen=60)
        self._partial = {1: b"", 2: b""}

    def childDataReceived(self, fd: int, data: bytes) -> None:
        if fd not in self._partial:
            return
        buf = self._partial[fd] + data
        *lines, self._partial[fd] = buf.split(b"\n")
        for raw in lines:
            self._line(fd, raw)

    def _line(self, fd: int, raw: bytes) -> None:
        line = raw.decode("utf-8", "replace").rstrip("\r")
        (self.stderr if fd == 2 else self.stdout).append(line)
        if self.log is not None:
            try:
                self.log(line)
            except Exception:  # a broken log consumer must not break the build
                pass

    def _interrupt(self, _d: defer.Deferred) -> None:
        if self.transport is not None:
            try:
                self.transport.signalProcess("INT")
            except error.ProcessExitedAlready:
                pass

    def processEnded(self, reason) -> None:
        for fd, rest in self._partial.items():
            if rest:
                self._line(fd, rest)
        self._partial = {1: b"", 2: b""}
        code = reason.value.exitCode if isinstance(reason.value, error.ProcessTerminated) else 0
        if isinstance(reason.value, error.ProcessTerminated) and code is None:
            code = -(reason.value.signal or 1)
        if not self.done.called:  # already errbacked if the build was cancelled
            self.done.callback(code)

    def error_text(self) -> str:
        text = "\n".join(self.stderr).strip() or "\n".join(self.stdout).strip()
        return text or "(no output)"


class TerraformRunner:
    """Runs workspace builds and template validation.

    ``provider_path`` is a ``terraform-provider-coder`` executable (see
    :func:`coderstack.provider.launcher.write_provider_executable`).  ``agent_scripts`` are the
    ``CODER_AGENT_SCRIPT_*`` variables; the default starts this installation's twistd."""

    def __init__(
        self,
        provider_path: str | os.PathLike[str],
        *,
        reactor: IReactorProcess | None = None,
        terraform: str = "terraform",
        agent_scripts: Mapping[str, str] | None = None,
        base_env: Mapping[str, str] | None = None,
    ):
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor  # type: ignore[assignment]
        self.reactor = reactor
        self.provider_path = Path(provider_path)
        found = shutil.which(terraform)
        if found is None:
            raise FileNotFoundError(f"terraform executable not found: {terraform!r}")
        self.terraform = found
        self.agent_scripts = (
            dict(agent_scripts) if agent_scripts is not None else agent_script_env(default_twistd())
        )
        self.base_env = base_env
        self._locks: dict[Path, defer.DeferredLock] = {}

    def _lock(self, work_dir: Path) -> defer.DeferredLock:
        return self._locks.setdefault(work_dir.resolve(), defer.DeferredLock())

    async def _run(
        self,
        command: str,
        args: Sequence[str],
        cwd: Path,
        env: Mapping[str, str],
        log: LogCallback | None,
        error_type: type[BuildError] = BuildError,
    ) -> None:
        proto = _TerraformProcess(log)
        argv = [self.terraform, command, *args]
        self.reactor.spawnProcess(proto, self.terraform, argv, env=dict(env), path=str(cwd))
        code = await proto.done
        if code != 0:
            raise error_type(command, proto.error_text(), code)

    def build(
        self,
        template: TemplateSource,
        work_dir: str | os.PathLike[str],
        transition: str,
        access_url: str,
        workspace: WorkspaceInfo | None = None,
        log: LogCallback | None = None,
        parameters: Mapping[str, str] | None = None,
    ) -> defer.Deferred[BuildResult]:
        """Run one build; fires with a :class:`BuildResult` or fails with :class:`BuildError`.

        ``template`` (a directory or ``{name: content}``) is copied into ``work_dir``, the
        workspace's own directory, which keeps the state.  ``parameters`` are
        ``coder_parameter`` values by name.  Builds of one ``work_dir`` are serialized."""
        if transition not in TRANSITIONS:
            raise ValueError(f"transition must be one of {TRANSITIONS}, not {transition!r}")
        work = Path(work_dir)
        lock = self._lock(work)
        return lock.run(
            lambda: defer.Deferred.fromCoroutine(
                self._build(template, work, transition, access_url, workspace, log, parameters)
            )
        )

    async def _build(
        self,
        template: TemplateSource,
        work: Path,
        transition: str,
        access_url: str,
        workspace: WorkspaceInfo | None,
        log: LogCallback | None,
        parameters: Mapping[str, str] | None = None,
    ) -> BuildResult:
        rc = prepare_work_dir(work, self.provider_path, template)
        env = terraform_env(
            cli_config=rc,
            access_url=access_url,
            transition=transition,
            workspace=workspace,
            agent_scripts=self.agent_scripts,
            base_env=self.base_env,
            parameters=parameters,
        )
        await self._run("init", ["-input=false", "-no-color"], work, env, log)
        apply_args = ["-auto-approve", "-input=false", "-no-color"]
        if transition == "destroy":
            apply_args.insert(0, "-destroy")
        await self._run("apply", apply_args, work, env, log)
        state_path = work / "terraform.tfstate"
        state = json.loads(state_path.read_text()) if state_path.exists() else {}
        return BuildResult(
            transition=transition,
            agents=read_agents(state),
            resources=read_resources(state),
            state_path=state_path,
            parameters=read_parameters(state),
            agent_url=read_agent_url(state),
            resource_metadata=read_resource_metadata(state),
        )

    def validate(
        self,
        template: TemplateSource,
        log: LogCallback | None = None,
        scratch_dir: str | os.PathLike[str] | None = None,
    ) -> defer.Deferred[None]:
        """``terraform init`` + ``terraform validate`` on a copy of the template in a scratch
        directory (a fresh temporary one unless given; removed afterwards).  Fails with
        :class:`TemplateError` carrying terraform's diagnostics."""
        return defer.Deferred.fromCoroutine(self._validate(template, log, scratch_dir))

    async def _validate(
        self, template: TemplateSource, log: LogCallback | None, scratch_dir
    ) -> None:
        import tempfile

        own = scratch_dir is None
        work = Path(tempfile.mkdtemp(prefix="coderstack-validate-")) if own else Path(scratch_dir)
        try:
            rc = prepare_work_dir(work, self.provider_path, template)
            env = terraform_env(
                cli_config=rc,
                access_url="https://validate.invalid",
                transition="start",
                workspace=None,
                agent_scripts=self.agent_scripts,
                base_env=self.base_env,
            )
            await self._run(
                "init",
                ["-input=false", "-no-color", "-backend=false"],
                work,
                env,
                log,
                TemplateError,
            )
            await self._run("validate", ["-no-color"], work, env, log, TemplateError)
        finally:
            if own:
                shutil.rmtree(work, ignore_errors=True)


def build(
    template: TemplateSource,
    work_dir: str | os.PathLike[str],
    transition: str,
    access_url: str,
    workspace: WorkspaceInfo | None,
    provider_path: str | os.PathLike[str],
    *,
    log: LogCallback | None = None,
    reactor: IReactorProcess | None = None,
    agent_scripts: Mapping[str, str] | None = None,
    terraform: str = "terraform",
    parameters: Mapping[str, str] | None = None,
) -> defer.Deferred[BuildResult]:
    """One-shot form of :meth:`TerraformRunner.build`."""
    runner = TerraformRunner(
        provider_path, reactor=reactor, terraform=terraform, agent_scripts=agent_scripts
    )
    return runner.build(template, work_dir, transition, access_url, workspace, log, parameters)


def validate_template(
    template: TemplateSource,
    provider_path: str | os.PathLike[str],
    *,
    log: LogCallback | None = None,
    reactor: IReactorProcess | None = None,
    terraform: str = "terraform",
) -> defer.Deferred[None]:
    """One-shot form of :meth:`TerraformRunner.validate`."""
    return TerraformRunner(
        provider_path, reactor=reactor, terraform=terraform, agent_scripts={}
    ).validate(template, log)
