"""A build directory and terraform's environment: Coder's provisioner variables, the CLI
config, the template copy and the provider mirror."""

from __future__ import annotations

from pathlib import Path

from twisted.trial import unittest

from coderstack.provider.launcher import write_provider_executable
from coderstack.provider.parameter import parameter_env_name
from coderstack.server.tferrors import TemplateError
from coderstack.server.tfworkdir import (
    META_DIR,
    WorkspaceInfo,
    cli_config_text,
    copy_template,
    prepare_work_dir,
    terraform_env,
)

WS = WorkspaceInfo(id="wid", name="dev", owner_id="oid", owner_name="alice",
                   owner_email="a@example.com", owner_full_name="Alice", owner_session_token="st",
                   owner_groups=("g1",), template_id="tid", template_name="local",
                   template_version="v3", build_id="bid")


class EnvTests(unittest.TestCase):
    def test_coder_provision_env(self):
        env = terraform_env(cli_config=Path("/rc"), access_url="http://h:1", transition="start",
                            workspace=WS, agent_scripts={"CODER_AGENT_SCRIPT_linux_amd64": "x"},
                            base_env={"PATH": "/bin", "HOME": "/root", "CODER_AGENT_TOKEN": "leak",
                                      "CODER_SESSION_TOKEN": "leak", "AWS_SECRET": "leak"})
        self.assertEqual(env["TF_CLI_CONFIG_FILE"], "/rc")
        self.assertEqual((env["CHECKPOINT_DISABLE"], env["TF_IN_AUTOMATION"]), ("1", "1"))
        self.assertEqual(env["CODER_AGENT_URL"], "http://h:1")
        self.assertEqual(env["CODER_WORKSPACE_TRANSITION"], "start")
        self.assertEqual(env["CODER_WORKSPACE_OWNER"], "alice")
        self.assertEqual(env["CODER_WORKSPACE_OWNER_NAME"], "Alice")
        self.assertEqual(env["CODER_WORKSPACE_OWNER_GROUPS"], '["g1"]')
        self.assertEqual(env["CODER_WORKSPACE_TEMPLATE_VERSION"], "v3")
        self.assertEqual(env["CODER_AGENT_SCRIPT_linux_amd64"], "x")
        self.assertEqual(env["PATH"], "/bin")
        self.assertNotIn("CODER_AGENT_TOKEN", env)
        self.assertNotIn("CODER_SESSION_TOKEN", env)
        self.assertNotIn("AWS_SECRET", env)

    def test_parameters(self):
        env = terraform_env(cli_config=Path("/rc"), access_url="http://h", transition="start",
                            workspace=None, agent_scripts={}, base_env={},
                            parameters={"region": "eu"})
        self.assertEqual(env[parameter_env_name("region")], "eu")

    def test_destroy_is_a_stop_for_the_data_source(self):
        env = terraform_env(cli_config=Path("/rc"), access_url="http://h", transition="destroy",
                            workspace=None, agent_scripts={}, base_env={})
        self.assertEqual(env["CODER_WORKSPACE_TRANSITION"], "stop")

    def test_cli_config(self):
        text = cli_config_text(Path("/m i/rror"))
        self.assertIn('path    = "/m i/rror"', text)
        self.assertIn('include = ["registry.terraform.io/coder/coder"]', text)
        self.assertIn('exclude = ["registry.terraform.io/coder/coder"]', text)


class WorkDirTests(unittest.TestCase):
    def setUp(self):
        self.root = Path(self.mktemp())
        self.root.mkdir()
        self.provider = write_provider_executable(self.root / "bin")

    def test_template_copy_replaces_old_version(self):
        v1, v2, work = self.root / "v1", self.root / "v2", self.root / "work"
        for d in (v1, v2, work):
            d.mkdir()
        (v1 / "main.tf").write_text("# v1")
        (v1 / "old.tf").write_text("# only in v1")
        (v1 / "notes.txt").write_text("not a template file")
        (v2 / "main.tf.json").write_text("{}")
        (work / META_DIR).mkdir()
        copy_template(v1, work)
        self.assertEqual(sorted(p.name for p in work.glob("*.tf")), ["main.tf", "old.tf"])
        self.assertFalse((work / "notes.txt").exists())
        (work / "terraform.tfstate").write_text("{}")
        copy_template(v2, work)
        self.assertEqual(sorted(p.name for p in work.iterdir() if p.is_file()),
                         ["main.tf.json", "terraform.tfstate"])

    def test_template_from_mapping(self):
        work = self.root / "w"
        prepare_work_dir(work, self.provider, {"main.tf": "# a", "vars.auto.tfvars": b"x = 1",
                                                "README.md": "ignored"})
        self.assertEqual((work / "main.tf").read_text(), "# a")
        self.assertTrue((work / "vars.auto.tfvars").exists())
        self.assertFalse((work / "README.md").exists())
        for bad in ("../evil.tf", "sub/x.tf", ".hidden.tf"):
            self.assertRaises(TemplateError, prepare_work_dir, work, self.provider, {bad: "", "m.tf": ""})

    def test_no_terraform_files(self):
        empty = self.root / "empty"
        empty.mkdir()
        (empty / "README").write_text("x")
        self.assertRaises(TemplateError, prepare_work_dir, self.root / "w", self.provider, empty)

    def test_mirror_and_lock(self):
        work = self.root / "w"
        rc = prepare_work_dir(work, self.provider, None)
        mirror = work / ".coderstack" / "mirror" / "registry.terraform.io" / "coder" / "coder"
        self.assertIn("terraform-provider-coder_2.999.0_linux_amd64.zip", {p.name for p in mirror.iterdir()})
        self.assertIn(str(work / ".coderstack" / "mirror"), rc.read_text())
        # An unchanged provider keeps the lock file; a changed one drops it.
        (work / ".terraform.lock.hcl").write_text("lock")
        prepare_work_dir(work, self.provider, None)
        self.assertTrue((work / ".terraform.lock.hcl").exists())
        write_provider_executable(self.root / "bin", python="/other/python")
        prepare_work_dir(work, self.provider, None)
        self.assertFalse((work / ".terraform.lock.hcl").exists())
