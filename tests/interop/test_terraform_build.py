"""Workspace builds of the example template through TerraformRunner and the real terraform.

The bootstrap runs a stand-in for twistd (tests/interop/fake_twistd.py) that daemonizes, writes
the pidfile and logs the agent environment it was given, so the whole path (provider url ->
init_script -> local-exec -> daemon with CODER_AGENT_URL/TOKEN -> destroy-time stop by pidfile)
is exercised without a server.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from twisted.trial import unittest

from coderstack.provider.bootstrap import agent_script_env
from coderstack.provider.launcher import write_provider_executable
from coderstack.server.provisioner import TerraformRunner
from coderstack.server.tferrors import BuildError, TemplateError
from coderstack.server.tfworkdir import WorkspaceInfo
from tests.interop.tfsupport import (
    EXAMPLE_TEMPLATE,
    SKIP_NO_TERRAFORM,
    alive,
    fake_twistd_argv,
    kill_pidfiles,
)

WS = WorkspaceInfo(id="3f1e6c1e-0000-4000-8000-000000000001", name="dev",
                   owner_id="3f1e6c1e-0000-4000-8000-000000000002", owner_name="alice",
                   template_name="local", template_version="v1")
ACCESS_URL = "http://127.0.0.1:7080"


class BuildTests(unittest.TestCase):
    skip = SKIP_NO_TERRAFORM

    def setUp(self):
        self.root = Path(self.mktemp()).resolve()
        self.root.mkdir(parents=True)
        self.addCleanup(kill_pidfiles, self.root)
        self.provider = write_provider_executable(self.root / "bin")
        self.runner = TerraformRunner(self.provider, agent_scripts=agent_script_env(fake_twistd_argv()))
        self.work = self.root / "workspace"
        self.log: list[str] = []

    def agent_dir(self, agent_id: str) -> Path:
        return self.work / ".coderstack" / "agents" / agent_id

    def agent_pid(self, agent_id: str) -> int:
        return int((self.agent_dir(agent_id) / "agent.pid").read_text())

    def agent_log(self, agent_id: str) -> str:
        return (self.agent_dir(agent_id) / "agent.log").read_text()

    async def build(self, transition: str, template: Path = EXAMPLE_TEMPLATE):
        self.last = await self.runner.build(template, self.work, transition, ACCESS_URL, WS,
                                            self.log.append)
        return self.last

    async def test_lifecycle(self):
        started = await self.build("start")
        (agent,) = started.agents
        self.assertEqual((agent.name, agent.os, agent.arch, agent.auth), ("main", "linux", "amd64", "token"))
        self.assertRegex(agent.token, r"^[0-9a-f-]{36}$")
        self.assertEqual([a.slug for a in agent.apps], ["hello"])
        self.assertEqual(agent.apps[0].healthcheck.url, "http://localhost:8000/")
        self.assertIn("terraform_data.agent_process[0]", started.resources)
        self.assertEqual(started.agent_url, ACCESS_URL)
        self.assertIn("Apply complete! Resources: 3 added, 0 changed, 0 destroyed.", self.log)
        self.assertFalse(any(agent.token in line for line in self.log), "token leaked to the log")

        # The bootstrap started the (fake) agent with the access URL and the agent's token.
        pid = self.agent_pid(agent.id)
        self.assertTrue(alive(pid))
        log = self.agent_log(agent.id)
        self.assertIn(f"CODER_AGENT_URL={ACCESS_URL}/\n", log)
        self.assertIn(f"CODER_AGENT_TOKEN={agent.token}\n", log)
        self.assertIn("service=coderstack-agent\n", log)
        # The provisioner's variables (the owner's session token among them) are not inherited.
        self.assertIn("provisioner_env=\n", log)

        # Stop: the process goes, the agent (and its token) stay, as in Coder's templates.
        stopped = await self.build("stop")
        self.assertEqual([(a.id, a.token) for a in stopped.agents], [(agent.id, agent.token)])
        self.assertFalse(alive(pid))
        self.assertNotIn("terraform_data.agent_process[0]", stopped.resources)

        # Start again reuses the state: same agent, a new process.
        again = await self.build("start")
        self.assertEqual(again.agents[0].id, agent.id)
        pid2 = self.agent_pid(agent.id)
        self.assertNotEqual(pid2, pid)
        self.assertTrue(alive(pid2))

        # Destroy stops it by its pidfile and empties the state.
        destroyed = await self.build("destroy")
        self.assertEqual((destroyed.agents, destroyed.resources), ((), ()))
        self.assertFalse(alive(pid2))
        self.assertFalse((self.agent_dir(agent.id) / "agent.pid").exists())
        self.assertIn(f"coderstack stop: agent {pid2} stopped",
                      " ".join(self.log))


    async def test_url_override(self):
        template = self.root / "template"
        shutil.copytree(EXAMPLE_TEMPLATE, template)
        override = "http://127.0.0.2:7443"
        (template / "terraform.tfvars.json").write_text(json.dumps({"access_url_override": override}))
        (agent,) = (await self.build("start", template)).agents
        self.assertIn(f"CODER_AGENT_URL={override}/\n", self.agent_log(agent.id))
        self.assertEqual(self.last.agent_url, override)
        self.assertIn(f'CODER_AGENT_URL="{override}/"', agent.init_script)
        # Dropping the override (a new template version) restarts the agent on the access URL.
        (template / "terraform.tfvars.json").unlink()
        old_pid = self.agent_pid(agent.id)
        (again,) = (await self.build("start", template)).agents
        self.assertEqual(again.id, agent.id)
        self.assertFalse(alive(old_pid))
        self.assertTrue(alive(self.agent_pid(agent.id)))
        self.assertTrue(self.agent_log(agent.id).endswith(
            f"CODER_AGENT_URL={ACCESS_URL}/\nCODER_AGENT_AUTH=token\n"
            f"CODER_AGENT_TOKEN={agent.token}\n"
            f"CODER_AGENT_DATA_DIR={self.agent_dir(agent.id) / 'data'}\n"
            "provisioner_env=\nservice=coderstack-agent\n"))


    async def test_broken_template_shows_terraform_error(self):
        template = self.root / "broken"
        template.mkdir()
        (template / "main.tf").write_text(
            'resource "terraform_data" "x" {\n  input = coder_agent.missing.token\n}\n')
        with self.assertRaises(BuildError) as caught:
            await self.build("start", template)
        self.assertIn("Reference to undeclared resource", caught.exception.message)
        self.assertIn("main.tf line 2", caught.exception.message)


    async def test_failing_bootstrap_fails_the_build(self):
        runner = TerraformRunner(self.provider, agent_scripts={
            "CODER_AGENT_SCRIPT_linux_amd64": "echo bootstrap cannot start >&2; exit 3"})
        with self.assertRaises(BuildError) as caught:
            await runner.build(EXAMPLE_TEMPLATE, self.work, "start", ACCESS_URL, WS)
        self.assertEqual(caught.exception.command, "apply")
        self.assertIn("local-exec provisioner error", caught.exception.message)
        await runner.build(EXAMPLE_TEMPLATE, self.work, "destroy", ACCESS_URL, WS)




class ValidateTests(unittest.TestCase):
    skip = SKIP_NO_TERRAFORM

    def setUp(self):
        root = Path(self.mktemp()).resolve()
        root.mkdir(parents=True)
        self.root = root
        self.runner = TerraformRunner(write_provider_executable(root / "bin"), agent_scripts={})

    def test_example_validates(self):
        return self.runner.validate(EXAMPLE_TEMPLATE)

    def test_template_given_as_files(self):
        files = {p.name: p.read_text() for p in EXAMPLE_TEMPLATE.iterdir() if p.is_file()}
        return self.runner.validate(files)

    async def test_invalid_template(self):
        template = self.root / "bad"
        template.mkdir()
        (template / "main.tf").write_text(
            'terraform {\n  required_providers {\n    coder = { source = "coder/coder" }\n  }\n}\n'
            'resource "coder_agent" "main" {\n  os = "linux"\n  arch = "amd64"\n  colour = "red"\n}\n')
        with self.assertRaises(TemplateError) as caught:
            await self.runner.validate(template)
        self.assertIn("Unsupported argument", caught.exception.message)
        self.assertIn('An argument named "colour" is not expected here.', caught.exception.message)


    async def test_unsatisfiable_version(self):
        template = self.root / "pinned"
        template.mkdir()
        (template / "main.tf").write_text(
            'terraform {\n  required_providers {\n    coder = { source = "coder/coder", version = "= 2.4.1" }\n  }\n}\n')
        with self.assertRaises(TemplateError) as caught:
            await self.runner.validate(template)
        self.assertEqual(caught.exception.command, "init")
        self.assertIn("coder/coder", caught.exception.message)

