"""``--dev``: a ready demo on one command.

On start: the first user ``admin`` (password generated once and kept in ``<data-dir>/dev-password``,
mode 0600, never logged), the CLI logged in as that user (the config dir of ``CODER_CONFIG_DIR`` or
the default), workspace ``dev`` with a fresh agent token, and a local agent process for it —
``twistd coderstack-agent`` from this installation, stopped by PID when the server stops.
"""

from __future__ import annotations

import os
import secrets
import signal
import sys
from typing import Any

from twisted.application import service
from twisted.internet import protocol
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from coderstack.cli.context import ConfigDir, default_config_dir
from coderstack.server import auth

log = Logger()

DEV_USER = "admin"
DEV_EMAIL = "admin@coderstack.local"
DEV_WORKSPACE = "dev"


class _AgentProcess(protocol.ProcessProtocol):
    def __init__(self) -> None:
        self.ended: Deferred[None] = Deferred()

    def outReceived(self, data: bytes) -> None:
        for line in data.decode("utf-8", "replace").splitlines():
            log.info("[dev agent] {line}", line=line)

    errReceived = outReceived

    def processEnded(self, reason: Any) -> None:
        log.info("dev agent exited: {why}", why=reason.getErrorMessage())
        self.ended.callback(None)


class DevDemo(service.Service):
    def __init__(self, reactor: Any, deployment: Any, api: Any, cfg: dict[str, Any]) -> None:
        self.reactor = reactor
        self.d = deployment
        self.api = api
        self.cfg = cfg
        self.process: Any = None
        self.proto: _AgentProcess | None = None
        self.ready: Deferred[None] = Deferred.fromCoroutine(self._setup())

    async def _setup(self) -> None:
        store = self.d.store
        data_dir = self.cfg["data-dir"]
        pw_file = os.path.join(data_dir, "dev-password")
        found = await store.user_by_login(DEV_USER)
        if found is None:
            password = secrets.token_urlsafe(18)
            fd = os.open(pw_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(password + "\n")
            pw_hash = await self.d.hash_password(password)
            only_first = await store.count_users() == 0
            user = await store.create_user(
                DEV_USER, DEV_EMAIL, pw_hash, roles=("owner",) if only_first else (), name="Dev Admin"
            )
            log.info("dev: created user {user} (password in {file})", user=DEV_USER, file=pw_file)
        else:
            user = found[0]

        token = await self.api.issue_session(user)
        config = ConfigDir(os.environ.get("CODER_CONFIG_DIR") or default_config_dir())
        config.write("url", self.d.access_url)
        config.write("session", token, secret=True)
        log.info("dev: CLI logged in as {user} (config in {dir})", user=DEV_USER, dir=config.path)

        agent_token, token_hash = auth.new_agent_token()
        ws = await store.workspace_by_name(user.id, DEV_WORKSPACE)
        if ws is None:
            ws = await store.create_workspace(user.id, DEV_WORKSPACE, token_hash)
            log.info("dev: created workspace {ws}", ws=DEV_WORKSPACE)
        else:
            await store.set_agent_token(ws.agents[0].id, token_hash)
        self._start_agent(agent_token, os.path.join(data_dir, "dev-agent"))
        log.info("dev: ready. Try: coderstack list ; coderstack show {ws}", ws=DEV_WORKSPACE)

    def _start_agent(self, token: str, agent_dir: str) -> None:
        os.makedirs(agent_dir, mode=0o700, exist_ok=True)
        bin_dir = self.cfg.get("agent-binary-dir") or os.path.dirname(sys.executable)
        twistd = os.path.join(bin_dir, "twistd")
        env = dict(os.environ)
        env["CODER_AGENT_TOKEN"] = token
        env["CODER_AGENT_URL"] = self.d.access_url
        env.pop("CODER_CONFIG_DIR", None)
        args = [twistd, "-n", "--pidfile=", "coderstack-agent", "--data-dir", agent_dir]
        self.proto = _AgentProcess()
        self.process = self.reactor.spawnProcess(self.proto, twistd, args, env=env, path=agent_dir)
        log.info("dev: started agent process {pid}", pid=self.process.pid)

    def stopService(self) -> Any:
        super().stopService()
        if self.process is not None and self.process.pid is not None and self.proto is not None:
            try:
                self.process.signalProcess(signal.SIGTERM)
            except Exception:  # already gone
                return None
            return self.proto.ended
        return None
