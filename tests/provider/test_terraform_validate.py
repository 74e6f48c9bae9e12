"""A real ``terraform validate`` through the server's runner: what a template push runs."""

from __future__ import annotations

import os

from twisted.trial import unittest

from coderstack.provider.launcher import write_provider_executable
from coderstack.server.provisioner import TerraformRunner
from coderstack.server.tferrors import TemplateError
from tests.interop.tfsupport import SKIP_NO_TERRAFORM

HEAD = """
terraform {
  required_providers {
    coder = { source = "coder/coder" }
  }
}
resource "coder_agent" "main" {
  os   = "linux"
  arch = "amd64"
}
resource "terraform_data" "box" {}
resource "coder_metadata" "box" {
  resource_id = terraform_data.box.id
  daily_cost  = 2
  item {
    key   = "region"
    value = "local"
  }
  item {
    key       = "secret"
    value     = "x"
    sensitive = true
  }
}
resource "coder_agent_instance" "main" {
  agent_id    = coder_agent.main.id
  instance_id = "i-1"
}
"""

SCRIPT = """
resource "coder_script" "backup" {
  agent_id     = coder_agent.main.id
  display_name = "Nightly backup"
  script       = "echo backup"
  cron         = "CRON"
}
"""


class TerraformValidateTests(unittest.TestCase):
    skip = SKIP_NO_TERRAFORM

    def setUp(self):
        root = os.path.abspath(self.mktemp())
        self.runner = TerraformRunner(write_provider_executable(f"{root}/bin"), agent_scripts={})
        self.scratch = f"{root}/validate"

    def validate(self, cron: str):
        files = {"main.tf": HEAD + SCRIPT.replace("CRON", cron)}
        return self.runner.validate(files, scratch_dir=self.scratch)

    async def test_valid_cron_and_metadata_pass(self):
        await self.validate("0 */5 * * * *")

    async def test_invalid_cron_names_the_script(self):
        with self.assertRaises(TemplateError) as caught:
            await self.validate("0 0 25 * * *")
        msg = caught.exception.message
        self.assertIn("coder_script 'Nightly backup'", msg)
        self.assertIn("is not a valid cron expression", msg)
        self.assertIn('in resource "coder_script" "backup"', msg)
