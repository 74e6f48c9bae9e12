"""Template push and workspace build routes, over StubTreq, with the real terraform.

The templates here start no process (a ``coder_agent`` and, for failures, a ``terraform_data``
whose local-exec fails), so each build is one quick init + apply.
"""

from __future__ import annotations

import base64
import json
import uuid
from pathlib import Path

from twisted.trial import unittest

from coderstack.provider.launcher import write_provider_executable
from coderstack.server import auth
from coderstack.server.api import API
from coderstack.server.builds import Builder
from coderstack.server.provisioner import TerraformRunner
from tests.interop.tfsupport import SKIP_NO_TERRAFORM
from tests.support.api import Caller, make_deployment

OVERRIDE_URL = "http://127.0.0.1:7999"

AGENT_ONLY = """
terraform {
  required_providers {
    coder = { source = "coder/coder" }
  }
}
provider "coder" { url = "@URL@" }
data "coder_workspace" "me" {}
resource "coder_agent" "main" {
  os   = "linux"
  arch = "amd64"
  dir  = "/srv/work"
}
""".replace("@URL@", OVERRIDE_URL)

FAILING = AGENT_ONLY + """
resource "terraform_data" "boom" {
  provisioner "local-exec" {
    command = "echo building-then-failing; exit 3"
  }
}
"""

INVALID = """
terraform {
  required_providers {
    coder = { source = "coder/coder" }
  }
}
resource "coder_agent" "main" {
  os = "linux"
}
"""


def files(**named: str) -> dict[str, str]:
    return {name.replace("_", "."): base64.b64encode(text.encode()).decode() for name, text in named.items()}


class BuildRoutesTests(unittest.TestCase):
    skip = SKIP_NO_TERRAFORM

    async def setUp(self) -> None:
        self.d, _plain = await make_deployment(self)
        root = Path(self.mktemp()).resolve()
        root.mkdir(parents=True)
        self.root = root
        provider = write_provider_executable(root / "bin")
        runner = TerraformRunner(provider, agent_scripts={})
        self.revoked: list[uuid.UUID] = []

        def revoked(agent_id: uuid.UUID) -> None:
            self.revoked.append(agent_id)
            self.d.agent_removed(agent_id)

        self.builder = Builder(self.d.store, runner, root / "data", self.d.access_url, revoked)
        self.api = API(self.d, builder=self.builder)
        self.c = Caller(self.api)
        self.owner = await self.c.owner()

    async def member(self) -> str:
        code, _ = await self.c.call("POST", "/api/v2/users", {
            "username": "bob", "email": "bob@example.com", "password": "hunter2hunter2"},
            token=self.owner)
        self.assertEqual(code, 201)
        code, got = await self.c.call("POST", "/api/v2/users/login",
                                      {"email": "bob@example.com", "password": "hunter2hunter2"})
        return got["session_token"]

    async def push(self, name: str, token: str | None = None, **named: str):
        return await self.c.call("POST", "/api/v2/templates",
                                 {"name": name, "files": files(**named)}, token=token or self.owner)

    async def follow(self, build_id: str, token: str | None = None):
        code, raw = await self.c.call(
            "GET", f"/api/v2/workspacebuilds/{build_id}/logs?follow=true", token=token or self.owner)
        self.assertEqual(code, 200)
        text = raw if isinstance(raw, str) else (raw.decode() if isinstance(raw, bytes) else json.dumps(raw))
        lines = [json.loads(x) for x in text.splitlines() if x.strip()]
        self.assertIn("build", lines[-1])
        return [x["output"] for x in lines[:-1]], lines[-1]["build"]

    # -- templates ---------------------------------------------------------------------------

    async def test_push_invalid_template_is_400_with_terraforms_message(self) -> None:
        code, got = await self.push("bad", main_tf=INVALID)
        self.assertEqual(code, 400)
        self.assertIn("rejected the template", got["message"])
        self.assertIn('The argument "arch" is required', got["detail"])
        code, got = await self.c.call("GET", "/api/v2/templates", token=self.owner)
        self.assertEqual(got["count"], 0)

    async def test_push_without_terraform_files_is_400(self) -> None:
        code, got = await self.push("bad", README_md="# nothing")
        self.assertEqual(code, 400)
        self.assertIn("no *.tf", got["detail"])

    async def test_non_owner_push_is_403(self) -> None:
        member = await self.member()
        code, got = await self.push("mine", token=member, main_tf=AGENT_ONLY)
        self.assertEqual(code, 403)
        self.assertEqual(got["message"], "Only an owner can do this.")

    async def test_push_again_makes_a_new_version(self) -> None:
        code, first = await self.push("docker", main_tf=AGENT_ONLY)
        self.assertEqual(code, 201, first)
        self.assertEqual((first["active_version"], first["files"]), (1, ["main.tf"]))
        code, second = await self.push("docker", main_tf=AGENT_ONLY, extra_tf="# more\n")
        self.assertEqual(code, 201, second)
        self.assertEqual((second["id"], second["active_version"]), (first["id"], 2))
        member = await self.member()
        code, got = await self.c.call("GET", "/api/v2/templates", token=member)
        self.assertEqual([(t["name"], t["active_version"]) for t in got["templates"]], [("docker", 2)])

    # -- builds ------------------------------------------------------------------------------

    async def test_create_by_template_id(self) -> None:
        code, pushed = await self.push("plain", main_tf=AGENT_ONLY)
        code, ws = await self.c.call("POST", "/api/v2/users/me/workspaces",
                                     {"name": "dev", "template_id": pushed["id"]}, token=self.owner)
        self.assertEqual((code, ws["template_name"]), (201, "plain"))
        _, build = await self.follow(ws["latest_build"]["id"])
        self.assertEqual(build["status"], "succeeded")

    async def test_create_with_unknown_template_is_404(self) -> None:
        code, got = await self.c.call("POST", "/api/v2/users/me/workspaces",
                                      {"name": "dev", "template_name": "nope"}, token=self.owner)
        self.assertEqual(code, 404)
        self.assertEqual(got["message"], "Template 'nope' not found.")
        code, got = await self.c.call("GET", "/api/v2/workspaces", token=self.owner)
        self.assertEqual(got["count"], 0)

    async def test_failed_build_leaves_no_agent(self) -> None:
        code, _ = await self.push("flaky", main_tf=FAILING)
        self.assertEqual(code, 201)
        code, ws = await self.c.call("POST", "/api/v2/users/me/workspaces",
                                     {"name": "dev", "template_name": "flaky"}, token=self.owner)
        self.assertEqual(code, 201, ws)
        self.assertNotIn("agent_token", ws)
        output, build = await self.follow(ws["latest_build"]["id"])
        self.assertEqual(build["status"], "failed")
        self.assertIn("exit status 3", build["error"])
        self.assertIn("building-then-failing", "\n".join(output))
        code, ws = await self.c.call("GET", "/api/v2/users/me/workspace/dev", token=self.owner)
        self.assertEqual((ws["agents"], ws["latest_build"]["status"]), ([], "failed"))
        # The agent terraform made does exist in the state, but its token opens nothing.
        state = json.loads((self.builder.work_dir(uuid.UUID(ws["id"])) / "terraform.tfstate").read_text())
        (token,) = [r["instances"][0]["attributes"]["token"] for r in state["resources"]
                    if r["type"] == "coder_agent"]
        self.assertIsNone(await self.d.store.agent_by_token_hash(auth.hash_agent_token(token)))
        code, _ = await self.c.call("GET", "/api/v2/workspaceagents/me/manifest", token=token)
        self.assertEqual(code, 401)
        # --orphan forgets it without terraform: records and build directory go.
        work = self.builder.work_dir(uuid.UUID(ws["id"]))
        self.assertTrue(work.exists())
        code, _ = await self.c.call("DELETE", f"/api/v2/workspaces/{ws['id']}?orphan=true",
                                    token=self.owner)
        self.assertEqual(code, 200)
        self.assertFalse(work.exists())
        code, _ = await self.c.call("GET", "/api/v2/users/me/workspace/dev", token=self.owner)
        self.assertEqual(code, 404)

    async def test_lifecycle_records_agents_with_their_url_and_destroy_removes_all(self) -> None:
        await self.push("plain", main_tf=AGENT_ONLY)
        code, ws = await self.c.call("POST", "/api/v2/users/me/workspaces",
                                     {"name": "dev", "template_name": "plain"}, token=self.owner)
        self.assertEqual(code, 201, ws)
        self.assertEqual((ws["template_name"], ws["latest_build"]["transition"]), ("plain", "start"))
        output, build = await self.follow(ws["latest_build"]["id"])
        self.assertEqual(build["status"], "succeeded", build)
        self.assertTrue(any(x.startswith("Apply complete!") for x in output), output)

        code, ws = await self.c.call("GET", "/api/v2/users/me/workspace/dev", token=self.owner)
        (agent,) = ws["agents"]
        self.assertEqual((agent["name"], agent["directory"], agent["access_url"]),
                         ("main", "/srv/work", OVERRIDE_URL))
        work = self.builder.work_dir(uuid.UUID(ws["id"]))
        state = json.loads((work / "terraform.tfstate").read_text())
        (token,) = [r["instances"][0]["attributes"]["token"] for r in state["resources"]
                    if r["type"] == "coder_agent"]
        code, manifest = await self.c.call("GET", "/api/v2/workspaceagents/me/manifest", token=token)
        self.assertEqual((code, manifest["agent_id"]), (200, agent["id"]))
        # The manifest's access_url is the deployment's; the agent was given the override.
        self.assertEqual(manifest["access_url"], self.d.access_url)

        # Its agent tokens are terraform's: no hand-made ones.
        code, got = await self.c.call("POST", f"/api/v2/workspaces/{ws['id']}/agent-token",
                                      token=self.owner)
        self.assertEqual(code, 409)
        # A templated workspace is not deleted behind terraform's back.
        code, got = await self.c.call("DELETE", f"/api/v2/workspaces/{ws['id']}", token=self.owner)
        self.assertEqual(code, 409)

        code, stop = await self.c.call("POST", f"/api/v2/workspaces/{ws['id']}/builds",
                                       {"transition": "stop"}, token=self.owner)
        self.assertEqual((code, stop["build_number"]), (201, 2))
        _, build = await self.follow(stop["id"])
        self.assertEqual(build["status"], "succeeded")
        code, ws = await self.c.call("GET", "/api/v2/users/me/workspace/dev", token=self.owner)
        self.assertEqual([a["id"] for a in ws["agents"]], [agent["id"]])

        code, destroy = await self.c.call("POST", f"/api/v2/workspaces/{ws['id']}/builds",
                                          {"transition": "destroy"}, token=self.owner)
        self.assertEqual(code, 201)
        output, build = await self.follow(destroy["id"])
        self.assertEqual(build["status"], "succeeded")
        self.assertIn("Apply complete! Resources: 0 added, 0 changed, 1 destroyed.", output)
        code, _ = await self.c.call("GET", "/api/v2/users/me/workspace/dev", token=self.owner)
        self.assertEqual(code, 404)
        self.assertFalse(work.exists())
        self.assertIsNone(await self.d.store.agent_by_token_hash(auth.hash_agent_token(token)))
        self.assertIn(uuid.UUID(agent["id"]), self.revoked)

    async def test_build_of_untemplated_workspace_is_409(self) -> None:
        code, ws = await self.c.call("POST", "/api/v2/users/me/workspaces", {"name": "hand"},
                                     token=self.owner)
        self.assertEqual(code, 201)
        code, got = await self.c.call("POST", f"/api/v2/workspaces/{ws['id']}/builds",
                                      {"transition": "stop"}, token=self.owner)
        self.assertEqual(code, 409)
        self.assertIn("no template", got["message"])

    async def test_other_users_cannot_read_a_build(self) -> None:
        await self.push("plain", main_tf=AGENT_ONLY)
        code, ws = await self.c.call("POST", "/api/v2/users/me/workspaces",
                                     {"name": "dev", "template_name": "plain"}, token=self.owner)
        member = await self.member()
        code, _ = await self.c.call("GET", f"/api/v2/workspacebuilds/{ws['latest_build']['id']}",
                                    token=member)
        self.assertEqual(code, 404)
        await self.follow(ws["latest_build"]["id"])
