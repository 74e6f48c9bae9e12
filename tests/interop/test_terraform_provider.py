"""Our coder/coder provider driven by the real terraform binary (plan/apply/update/destroy)."""

from __future__ import annotations

import json
import uuid

from twisted.trial import unittest

from coderstack.provider.parameter import parameter_env_name
from tests.interop.tfsupport import SKIP_NO_TERRAFORM, TerraformDir
from tests.provider import coder_reference as ref

SCRIPT = "#!/bin/sh\necho url=${ACCESS_URL} auth=${AUTH_TYPE}\n"
REQUIRED = 'terraform {\n  required_providers {\n    coder = { source = "coder/coder" }\n  }\n}\n'

LIFECYCLE = """
terraform {
  required_providers {
    coder = { source = "coder/coder" }
  }
}
provider "coder" { url = "URL" }
data "coder_workspace" "me" {}
resource "coder_agent" "main" {
  os   = "linux"
  arch = "amd64"
  env  = { GREETING = "GREET" }
}
resource "coder_app" "web" {
  agent_id = coder_agent.main.id
  slug     = "web"
  url      = "http://localhost:8080"
}
output "agent_id" { value = coder_agent.main.id }
output "token" {
  value     = coder_agent.main.token
  sensitive = true
}
output "init_script" { value = coder_agent.main.init_script }
output "access_port" { value = data.coder_workspace.me.access_port }
"""

# Written the way Coder's own templates are, unchanged but for having no Docker in it.

CODER_STYLE_BODY = """
terraform {
  required_providers {
    coder = {
      source  = "coder/coder"
      version = ">= 0.12"
    }
  }
}

locals {
  username = data.coder_workspace_owner.me.name
}

data "coder_provisioner" "me" {}
data "coder_workspace" "me" {}

data "coder_parameter" "cpu" {
  name         = "cpu"
  display_name = "CPU"
  description  = "The number of CPU cores"
  default      = "2"
  type         = "number"
  icon         = "/icon/memory.svg"
  mutable      = true
  option {
    name  = "2 Cores"
    value = "2"
  }
  option {
    name  = "4 Cores"
    value = "4"
  }
}

data "coder_parameter" "disk" {
  name    = "disk"
  type    = "number"
  default = "10"
  validation {
    min       = 1
    max       = 100
    monotonic = "increasing"
  }
}
data "coder_workspace_owner" "me" {}

resource "coder_agent" "main" {
  arch           = data.coder_provisioner.me.arch
  os             = "linux"
  startup_script = <<-EOT
    set -e
    echo "starting for ${local.username}"
  EOT

  env = {
    GIT_AUTHOR_NAME     = coalesce(data.coder_workspace_owner.me.full_name, data.coder_workspace_owner.me.name)
    GIT_AUTHOR_EMAIL    = "${data.coder_workspace_owner.me.email}"
    CPUS                = data.coder_parameter.cpu.value
    DISK_GB             = data.coder_parameter.disk.value
  }

  metadata {
    display_name = "CPU Usage"
    key          = "0_cpu_usage"
    script       = "coder stat cpu"
    interval     = 10
    timeout      = 1
  }

  metadata {
    display_name = "RAM Usage"
    key          = "1_ram_usage"
    script       = "coder stat mem"
    interval     = 10
    timeout      = 1
  }

  display_apps {
    vscode          = true
    web_terminal    = true
    ssh_helper      = false
  }
}

resource "coder_app" "code-server" {
  agent_id     = coder_agent.main.id
  slug         = "code-server"
  display_name = "code-server"
  url          = "http://localhost:13337/?folder=/home/${local.username}"
  icon         = "/icon/code.svg"
  subdomain    = false
  share        = "owner"

  healthcheck {
    url       = "http://localhost:13337/healthz"
    interval  = 5
    threshold = 6
  }
}

resource "coder_script" "dotfiles" {
  agent_id           = coder_agent.main.id
  display_name       = "Dotfiles"
  icon               = "/icon/dotfiles.svg"
  run_on_start       = true
  start_blocks_login = true
  script             = "echo installing dotfiles"
}

resource "coder_env" "editor" {
  agent_id = coder_agent.main.id
  name     = "EDITOR"
  value    = "vim"
}

resource "terraform_data" "workspace" {
  count = data.coder_workspace.me.start_count
  input = {
    name        = "coder-${data.coder_workspace_owner.me.name}-${lower(data.coder_workspace.me.name)}"
    init_script = replace(coder_agent.main.init_script, "/localhost|127\\\\.0\\\\.0\\\\.1/", "host.docker.internal")
    agent_id    = coder_agent.main.id
  }
}

output "names" { value = terraform_data.workspace[*].output.name }
output "init_script" { value = terraform_data.workspace[*].output.init_script }
"""


class ProviderLifecycleTests(unittest.TestCase):
    skip = SKIP_NO_TERRAFORM

    def setUp(self):
        self.tf = TerraformDir(self.mktemp())
        self.env = {"CODER_AGENT_SCRIPT_linux_amd64": SCRIPT}

    def configure(self, url: str = "http://127.0.0.1:3000", greeting: str = "hi") -> None:
        self.tf.write("main.tf", LIFECYCLE.replace("URL", url).replace("GREET", greeting))

    def test_plan_apply_update_destroy(self):
        self.configure()
        self.tf.tf("init", "-input=false")
        plan = self.tf.tf("plan", "-input=false", **self.env)
        self.assertIn("Plan: 2 to add, 0 to change, 0 to destroy.", plan.stdout)
        self.assertIn('auth                    = "token"', plan.stdout)
        self.assertIn("token                   = (sensitive value)", plan.stdout)

        applied = self.tf.tf("apply", "-auto-approve", "-input=false", **self.env)
        self.assertIn("Apply complete! Resources: 2 added", applied.stdout)
        out = self.tf.outputs()
        uuid.UUID(out["agent_id"])
        uuid.UUID(out["token"])
        self.assertEqual(out["init_script"], "#!/bin/sh\necho url=http://127.0.0.1:3000/ auth=token\n")
        self.assertEqual(out["access_port"], 3000)
        self.assertNotIn(out["token"], applied.stdout + applied.stderr)
        agent = self.tf.resource("coder_agent", "main")
        self.assertEqual(agent["connection_timeout"], 120)
        self.assertEqual(self.tf.resource("coder_app", "web")["agent_id"], out["agent_id"])

        # Nothing changed: an empty plan.
        again = self.tf.tf("plan", "-input=false", "-detailed-exitcode", check=False, **self.env)
        self.assertEqual(again.returncode, 0, again.stdout + again.stderr)

        # A new url override: the same agent and token, the init script follows the url.
        self.configure(url="http://192.0.2.10:8443")
        self.tf.tf("apply", "-auto-approve", "-input=false", **self.env)
        moved = self.tf.outputs()
        self.assertEqual((moved["agent_id"], moved["token"]), (out["agent_id"], out["token"]))
        self.assertIn("url=http://192.0.2.10:8443/", moved["init_script"])
        self.assertEqual(moved["access_port"], 8443)

        # Every coder_agent argument forces a new agent (and a new token), as in Coder.
        self.configure(url="http://192.0.2.10:8443", greeting="hello")
        replaced = self.tf.tf("apply", "-auto-approve", "-input=false", **self.env)
        self.assertIn("2 added, 0 changed, 2 destroyed", replaced.stdout)
        new = self.tf.outputs()
        self.assertNotEqual(new["agent_id"], out["agent_id"])
        self.assertNotEqual(new["token"], out["token"])

        destroyed = self.tf.tf("destroy", "-auto-approve", "-input=false", **self.env)
        self.assertIn("Destroy complete! Resources: 2 destroyed.", destroyed.stdout)
        self.assertEqual(self.tf.state()["resources"], [])

    def test_token_is_sensitive(self):
        self.tf.write("main.tf", REQUIRED + """
provider "coder" {}
resource "coder_agent" "main" {
  os   = "linux"
  arch = "amd64"
}
output "token" { value = coder_agent.main.token }
""")
        self.tf.tf("init", "-input=false")
        proc = self.tf.tf("plan", "-input=false", check=False)
        self.assertNotEqual(proc.returncode, 0)
        self.assertIn("Output refers to sensitive values", proc.stderr)

    def test_url_defaults_to_coder_agent_url(self):
        self.tf.write("main.tf", REQUIRED + """
resource "coder_agent" "main" {
  os   = "linux"
  arch = "amd64"
}
data "coder_workspace" "me" {}
output "script" { value = coder_agent.main.init_script }
output "url" { value = data.coder_workspace.me.access_url }
""")
        self.tf.tf("init", "-input=false")
        self.tf.tf("apply", "-auto-approve", "-input=false", CODER_AGENT_URL="http://10.9.8.7:1000",
                   **self.env)
        out = self.tf.outputs()
        self.assertEqual(out["url"], "http://10.9.8.7:1000")
        self.assertIn("url=http://10.9.8.7:1000/ auth=token", out["script"])

    def test_invalid_configuration_reported(self):
        self.tf.write("main.tf", REQUIRED + """
resource "coder_agent" "main" {
  os   = "beos"
  arch = "amd64"
}
resource "coder_app" "bad" {
  agent_id = coder_agent.main.id
  slug     = "Not--A-Slug"
}
""")
        self.tf.tf("init", "-input=false")
        proc = self.tf.tf("validate", check=False)
        self.assertNotEqual(proc.returncode, 0)
        self.assertIn("invalid os 'beos'", proc.stderr)
        self.assertIn('on main.tf line 8, in resource "coder_agent" "main"', proc.stderr)
        main = (self.tf.work / "main.tf").read_text().replace("beos", "linux")
        self.tf.write("main.tf", main)
        proc = self.tf.tf("validate", check=False)
        self.assertNotEqual(proc.returncode, 0)
        self.assertIn('invalid "coder_app" slug', proc.stderr)


class CoderStyleTemplateTests(unittest.TestCase):
    skip = SKIP_NO_TERRAFORM

    def test_builds_start_then_stop(self):
        tf = TerraformDir(self.mktemp())
        tf.write("main.tf", CODER_STYLE_BODY)
        env = {
            "CODER_AGENT_URL": "http://localhost:3000",
            **{f"CODER_AGENT_SCRIPT_linux_{arch}": SCRIPT for arch in ("amd64", "arm64", "armv7")},
            "CODER_WORKSPACE_NAME": "Dev",
            "CODER_WORKSPACE_OWNER": "alice",
            "CODER_WORKSPACE_OWNER_NAME": "Alice Liddell",
            "CODER_WORKSPACE_OWNER_EMAIL": "alice@example.com",
            parameter_env_name("cpu"): "4",
        }
        tf.tf("init", "-input=false")
        tf.tf("validate")
        tf.tf("apply", "-auto-approve", "-input=false", **env)
        out = tf.outputs()
        self.assertEqual(out["names"], ["coder-alice-dev"])
        self.assertIn("url=http://host.docker.internal:3000/", out["init_script"][0])
        agent = tf.resource("coder_agent", "main")
        self.assertEqual(agent["env"]["GIT_AUTHOR_NAME"], "Alice Liddell")
        self.assertEqual(agent["env"]["CPUS"], "4")
        self.assertEqual(agent["env"]["DISK_GB"], "10")
        self.assertEqual([m["key"] for m in agent["metadata"]], ["0_cpu_usage", "1_ram_usage"])
        self.assertEqual(agent["display_apps"][0]["ssh_helper"], False)
        app = tf.resource("coder_app", "code-server")
        self.assertEqual(app["url"], "http://localhost:13337/?folder=/home/alice")
        self.assertEqual(app["healthcheck"][0]["threshold"], 6)

        script = tf.resource("coder_script", "dotfiles")
        self.assertEqual((script["run_on_start"], script["run_on_stop"], script["timeout"]), (True, False, 0))
        self.assertEqual(tf.resource("coder_env", "editor")["merge_strategy"], "replace")

        stopped = tf.tf("apply", "-auto-approve", "-input=false", CODER_WORKSPACE_TRANSITION="stop", **env)
        self.assertIn("0 added, 0 changed, 1 destroyed", stopped.stdout)
        self.assertEqual(tf.outputs()["names"], [])


class SchemaThroughTerraformTests(unittest.TestCase):
    skip = SKIP_NO_TERRAFORM

    def test_schema_matches_reference(self):
        tf = TerraformDir(self.mktemp())
        tf.write("main.tf", REQUIRED)
        tf.tf("init", "-input=false")
        schemas = json.loads(tf.tf("providers", "schema", "-json").stdout)
        coder = schemas["provider_schemas"]["registry.terraform.io/coder/coder"]

        def check(block: dict, expected: dict) -> None:
            attrs = block["attributes"]
            self.assertEqual(set(attrs), set(expected))
            for name, (tf_type, spec) in expected.items():
                self.assertEqual(attrs[name]["type"], tf_type, name)
                self.assertEqual(ref.flags(attrs[name]), ref.expected_flags(spec), name)

        check(coder["provider"]["block"], ref.PROVIDER)
        res, data = coder["resource_schemas"], coder["data_source_schemas"]
        check(res["coder_agent"]["block"], ref.AGENT)
        check(res["coder_app"]["block"], ref.APP)
        check(data["coder_workspace"]["block"], ref.WORKSPACE)
        check(data["coder_workspace_owner"]["block"], ref.OWNER)
        check(data["coder_provisioner"]["block"], ref.PROVISIONER)
        check(data["coder_parameter"]["block"], ref.PARAMETER)
        check(res["coder_script"]["block"], ref.SCRIPT)
        check(res["coder_env"]["block"], ref.ENV)
        check(res["coder_metadata"]["block"], ref.METADATA)
        check(res["coder_agent_instance"]["block"], ref.AGENT_INSTANCE)
        for kind, blocks in ((res["coder_agent"], ref.AGENT_BLOCKS), (res["coder_app"], ref.APP_BLOCKS)):
            got = {
                name: (b["nesting_mode"], b.get("max_items"), set(b["block"].get("attributes", {})))
                for name, b in kind["block"]["block_types"].items()
            }
            self.assertEqual(got, blocks)
