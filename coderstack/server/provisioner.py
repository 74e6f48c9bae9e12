"""Workspace builds: run the real ``terraform`` on a template, with our ``coder/coder`` provider.

A build is what Coder's Terraform provisioner does, on one machine:

1. prepare the workspace's build directory: the template's files, our provider as a
   filesystem mirror, the CLI config naming it (:mod:`coderstack.server.tfworkdir`);
2. ``terraform init`` and ``terraform apply -auto-approve`` (``apply -destroy`` for destroy), in
   Coder's provisioner environment (:func:`~coderstack.server.tfworkdir.terraform_env`);
3. read the agents (and their apps) from the resulting state
   (:mod:`coderstack.server.tfstate`).

Terraform runs as a child process (``spawnProcess``); every output line goes to the caller's
``log`` callback as it arrives.  A failing command raises :class:`BuildError` carrying
Terraform's own message; cancelling a build interrupts terraform.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from twisted.internet import defer, error, protocol
from twisted.python.failure import Failure

from coderstack.provider.bootstrap import agent_script_env
from coderstack.server.tferrors import BuildError, TemplateError
from coderstack.server.tfstate import (
    Agent,
    ResourceMetadata,
    read_agent_url,
    read_agents,
    read_parameters,
    read_resource_metadata,
    read_resources,
)
from coderstack.server.tfworkdir import (
    TemplateSource,
    WorkspaceInfo,
    prepare_work_dir,
    terraform_env,
)

TRANSITIONS = ("start", "stop", "destroy")

LogCallback = Callable[[str], None]


class ProcessSpawner(Protocol):
    """The part of ``IReactorProcess`` a build uses."""

    def spawnProcess(
        self,
        processProtocol: protocol.ProcessProtocol,
        executable: str,
        args: Sequence[str],
        env: Mapping[str, str] | None = None,
        path: str | None = None,
    ) -> object: ...


class _Signallable(Protocol):
    def signalProcess(self, signalID: str | int) -> None: ...


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


def default_twistd() -> list[str]:
    """This installation's ``twistd``: the script next to the interpreter, or the module."""
    script = Path(sys.executable).parent / "twistd"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]


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

    def _interrupt(self, _d: defer.Deferred[int | None]) -> None:
        child: _Signallable | None = self.transport
        if child is not None:
            try:
                child.signalProcess("INT")
            except error.ProcessExitedAlready:
                pass

    def processEnded(self, reason: Failure) -> None:
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
        reactor: ProcessSpawner | None = None,
        terraform: str = "terraform",
        agent_scripts: Mapping[str, str] | None = None,
        base_env: Mapping[str, str] | None = None,
    ):
        if reactor is None:
            from twisted.internet import reactor as _reactor

            reactor = _reactor
        self.reactor: ProcessSpawner = reactor
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
        self,
        template: TemplateSource,
        log: LogCallback | None,
        scratch_dir: str | os.PathLike[str] | None,
    ) -> None:
        own = scratch_dir is None
        work = Path(scratch_dir) if scratch_dir is not None else Path(tempfile.mkdtemp(prefix="coderstack-validate-"))
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
