"""Workspace builds in the server: templates in the store, terraform runs, agents from the state.

A build is one :class:`~coderstack.server.provisioner.TerraformRunner` run (start, stop or
destroy) of a workspace's template in the workspace's own build directory,
``<data-dir>/builds/<workspace id>``, which keeps ``terraform.tfstate`` between builds.  The
:class:`Builder` records the build (``workspace_builds``), keeps its log in memory while it runs
(and for a while after) so the API can stream it to the CLI, and when terraform is done:

- success (start/stop): the workspace's agents become exactly those in the state, each with the
  SHA-256 of its token and the URL the template gave it (the provider ``url``);
- success (destroy): the workspace's records and its build directory are removed;
- failure: the build is marked failed with terraform's message and the workspace keeps no
  agents, so no token from a half-made build works.

The log a client follows is newline-delimited JSON, one object per line::

    {"output": "<one line of terraform output>"}        (any number)
    {"build": {...build json...}}                      (last line: final status and error)
"""

from __future__ import annotations

import os
import shutil
import site
import sys
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.internet.threads import deferToThread
from twisted.logger import Logger

import coderstack
from coderstack.provider.bootstrap import agent_script_env
from coderstack.provider.launcher import write_provider_executable
from coderstack.server import auth
from coderstack.server.agentspec import agent_spec, resource_metadata_json
from coderstack.server.provisioner import BuildResult, TerraformRunner
from coderstack.server.records import AgentRecord, Build, User, Workspace
from coderstack.server.store import Store
from coderstack.server.tferrors import BuildError, TemplateError
from coderstack.server.tfworkdir import WorkspaceInfo, template_files

log = Logger()

#: Lines of a build's log kept in the database (the tail; terraform's own error is separate).
STORED_LOG_LINES = 2000
#: Finished builds whose logs stay in memory for late followers.
KEPT_FINISHED = 64

__all__ = ["Builder", "BuildLog", "TemplateError", "make_builder"]


class BuildLog:
    """A running (or recently finished) build's output, with followers."""

    def __init__(self, build: Build, owner_id: uuid.UUID) -> None:
        self.build = build
        self.owner_id = owner_id
        self.lines: list[str] = []
        self._followers: list[tuple[Callable[[str], None], Callable[[Build], None]]] = []

    @property
    def done(self) -> bool:
        return self.build.done

    def append(self, line: str) -> None:
        self.lines.append(line)
        for on_line, _ in list(self._followers):
            on_line(line)

    def finish(self, build: Build) -> None:
        self.build = build
        followers, self._followers = self._followers, []
        for _, on_done in followers:
            on_done(build)

    def follow(
        self, on_line: Callable[[str], None], on_done: Callable[[Build], None]
    ) -> Callable[[], None]:
        """Replay the lines so far, then deliver new ones; ``on_done`` once at the end.
        Returns a function that stops following."""
        for line in list(self.lines):
            on_line(line)
        if self.done:
            on_done(self.build)
            return lambda: None
        entry = (on_line, on_done)
        self._followers.append(entry)

        def stop() -> None:
            if entry in self._followers:
                self._followers.remove(entry)

        return stop


class Builder:
    """Runs workspace builds for the API.  ``agents_revoked`` is called with the id of every
    agent whose record or token a build removed (the deployment closes its connection)."""

    def __init__(
        self,
        store: Store,
        runner: TerraformRunner,
        data_dir: str | os.PathLike[str],
        access_url: str | Callable[[], str],
        agents_revoked: Callable[[uuid.UUID], None] = lambda _id: None,
    ) -> None:
        self.store = store
        self.runner = runner
        self.data_dir = Path(data_dir)
        # A callable follows the deployment's URL (derived from an ephemeral port at start-up).
        self._access_url = access_url
        self.agents_revoked = agents_revoked
        self._logs: OrderedDict[uuid.UUID, BuildLog] = OrderedDict()
        self._validate_lock = defer.DeferredLock()
        #: Deferreds of running builds (tests and shutdown wait on them).
        self.running: dict[uuid.UUID, defer.Deferred[None]] = {}

    @property
    def access_url(self) -> str:
        return self._access_url() if callable(self._access_url) else self._access_url

    def work_dir(self, workspace_id: uuid.UUID) -> Path:
        return self.data_dir / "builds" / str(workspace_id)

    # -- templates -----------------------------------------------------------------------

    async def validate(self, files: Mapping[str, bytes]) -> dict[str, bytes]:
        """The template's Terraform files, after ``terraform validate`` accepted them; raises
        :class:`TemplateError` with terraform's message."""
        kept = template_files(files)
        scratch = self.data_dir / "validate"
        # One scratch directory, one validation at a time: its provider mirror and
        # .terraform stay, so a push costs one init + validate, not a provider repack.
        await self._validate_lock.acquire()
        try:
            await self.runner.validate(kept, scratch_dir=scratch)
        finally:
            self._validate_lock.release()
        return kept

    # -- builds --------------------------------------------------------------------------

    def live_log(self, build_id: uuid.UUID) -> BuildLog | None:
        return self._logs.get(build_id)

    async def start(self, ws: Workspace, transition: str, user: User) -> Build:
        """Record and start a build; returns at once (follow it with :meth:`live_log`).
        Raises ``store.Conflict`` if one is running, ``LookupError`` if the template is gone."""
        if ws.template_id is None:
            raise ValueError("the workspace has no template")
        template = await self.store.template(ws.template_id)
        if template is None or template.active_version is None:
            raise LookupError("the workspace's template no longer exists")
        version_id = template.active_version.id
        # stop and destroy act on what the last build made, with the template it used
        last = ws.latest_build
        if transition != "start" and last is not None and last.template_version_id is not None:
            version_id = last.template_version_id
        version = await self.store.template_version_files(version_id)
        if version is None or version.files is None:
            raise LookupError("the workspace's template version no longer exists")
        build = await self.store.start_build(ws.id, transition, version.id, user.id)
        blog = BuildLog(build, ws.owner_id)
        self._logs[build.id] = blog
        info = WorkspaceInfo(
            id=str(ws.id),
            name=ws.name,
            owner_id=str(ws.owner_id),
            owner_name=ws.owner_name,
            owner_email=user.email if user.id == ws.owner_id else "",
            owner_full_name=user.name if user.id == ws.owner_id else "",
            template_id=str(template.id),
            template_name=template.name,
            template_version=str(version.number),
            build_id=str(build.id),
        )
        d = defer.Deferred.fromCoroutine(self._run(ws, build, version.files, info, blog))
        self.running[build.id] = d

        def ended(result: Any) -> Any:
            self.running.pop(build.id, None)  # (not returned: it is ``d`` itself)
            return result

        d.addBoth(ended)
        d.addErrback(lambda f: log.failure("recording build {id} failed", f, id=build.id))
        return build

    async def _run(
        self,
        ws: Workspace,
        build: Build,
        files: Mapping[str, bytes],
        info: WorkspaceInfo,
        blog: BuildLog,
    ) -> None:
        status, error = "failed", ""
        work = self.work_dir(ws.id)
        where = f"{ws.owner_name}/{ws.name}"
        log.info("build #{n} ({transition}) of {ws} started in {dir}", n=build.number,
                 transition=build.transition, ws=where, dir=str(work))
        try:
            result = await self.runner.build(
                files, work, build.transition, self.access_url, info, log=blog.append
            )
            await self._record(ws, build, result)
            status = "succeeded"
        except BuildError as err:
            error = err.message
            blog.append(f"terraform {err.command} failed: {err.message}")
        except defer.CancelledError:
            error = "the server stopped during the build (terraform was interrupted)"
            blog.append(error)
        except Exception as err:  # a bug or the store: the build still ends, as failed
            log.failure("workspace build {build_id} failed", build_id=build.id)
            error = f"internal error: {err}"
        if status == "failed":
            await self._revoke(await self.store.sync_agents(ws.id, []))
        tail = "\n".join(blog.lines[-STORED_LOG_LINES:])
        await self.store.finish_build(build.id, status, error, tail)
        found = await self.store.build(build.id)
        if found is not None:
            final = found[0]
        else:  # a destroy removed the workspace and its builds with it
            final = Build(
                id=build.id, workspace_id=build.workspace_id, number=build.number,
                transition=build.transition, status=status,
                template_version_id=build.template_version_id, created_at=build.created_at,
                completed_at=build.created_at, error=error,
            )
        log.info("build #{n} ({transition}) of {ws}: {status}", n=build.number,
                 transition=build.transition, ws=where, status=status)
        blog.finish(final)
        self._forget_old()

    async def _record(self, ws: Workspace, build: Build, result: BuildResult) -> None:
        if build.transition == "destroy":
            await self.store.delete_workspace(ws.id)
            await self._revoke([a.id for a in ws.agents])
            await deferToThread(shutil.rmtree, self.work_dir(ws.id), True)
            return
        url = result.agent_url or self.access_url
        records = [
            AgentRecord(
                id=uuid.UUID(a.id),
                name=a.name,
                token_hash=auth.hash_agent_token(a.token),
                os=a.os,
                arch=a.arch,
                directory=a.dir or "",
                access_url=url,
                spec=agent_spec(a),
            )
            for a in result.agents
        ]
        await self._revoke(await self.store.sync_agents(
            ws.id, records, fresh_start=build.transition == "start",
            resource_items=resource_metadata_json(result.resource_metadata),
        ))

    async def _revoke(self, agent_ids: list[uuid.UUID]) -> None:
        for agent_id in agent_ids:
            self.agents_revoked(agent_id)

    def _forget_old(self) -> None:
        finished = [k for k, v in self._logs.items() if v.done]
        for key in finished[: max(0, len(finished) - KEPT_FINISHED)]:
            del self._logs[key]

    async def remove_build_dir(self, workspace_id: uuid.UUID) -> None:
        await deferToThread(shutil.rmtree, self.work_dir(workspace_id), True)

    def wait(self) -> defer.Deferred[Any]:
        """Fires when every running build has ended."""
        return defer.DeferredList(list(self.running.values()))

    def stop(self) -> defer.Deferred[Any]:
        """Server shutdown: interrupt running builds (terraform gets SIGINT and saves its
        state); each is recorded as failed.  Fires when they have ended."""
        running = list(self.running.values())
        for d in running:
            d.cancel()
        return defer.DeferredList(running)


def agent_twistd(binary_dir: str | None = None) -> tuple[str, dict[str, str]]:
    """The ``twistd`` local agents start with, and the environment it needs: ``PYTHONPATH``
    naming this coderstack when it is a source checkout rather than an installed package."""
    twistd = os.path.join(binary_dir or os.path.dirname(sys.executable), "twistd")
    root = str(Path(coderstack.__file__).resolve().parent.parent)
    installed = {str(Path(p).resolve()) for p in site.getsitepackages()}
    env = {} if root in installed else {"PYTHONPATH": root}
    return twistd, env


async def make_builder(reactor: Any, store: Store, deployment: Any, cfg: Mapping[str, Any]) -> Builder | None:
    """The server's builder (None, with a warning, when terraform is not installed)."""
    data_dir = Path(cfg["data-dir"])
    provider = write_provider_executable(data_dir / "bin")
    twistd, extra_env = agent_twistd(cfg.get("agent-binary-dir"))
    try:
        runner = TerraformRunner(
            provider,
            reactor=reactor,
            terraform=cfg.get("terraform-path") or "terraform",
            agent_scripts=agent_script_env(twistd, extra_env),
        )
    except FileNotFoundError as err:
        log.warn("workspace builds are disabled: {why}", why=str(err))
        return None
    failed = await store.fail_unfinished_builds("the server restarted during the build")
    if failed:
        log.warn("{n} unfinished build(s) from before a restart marked failed", n=failed)
    return Builder(store, runner, data_dir, lambda: deployment.access_url, deployment.agent_removed)
