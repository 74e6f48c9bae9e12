"""The CDKTF constructs and the example template's synthesized JSON."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

from twisted.trial import unittest

from coderstack.provider.bootstrap import linux_stop_script

# coderstack.cdk needs cdktf and constructs (the 'terraform' extra, which the 'test' extra does not
# pull in), and cdktf runs every construct in node through jsii. No terraform binary is involved.
if importlib.util.find_spec("cdktf") is None or importlib.util.find_spec("constructs") is None:
    SKIP_NO_CDKTF: str | None = "cdktf is not installed (it is in the 'terraform' extra: pip install '.[terraform]')"
elif shutil.which("node") is None:
    SKIP_NO_CDKTF = "node is not on PATH (cdktf runs the constructs in node, through jsii)"
else:
    SKIP_NO_CDKTF = None
    from coderstack.cdk import terraform_escape
    from coderstack.cdk.synth import synth_document

EXAMPLE = Path(__file__).resolve().parents[2] / "terraform" / "templates" / "local"


def load_example():
    spec = importlib.util.spec_from_file_location("example_local_template", EXAMPLE / "main.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_cache: dict = {}


class ExampleTemplateTests(unittest.TestCase):
    skip = SKIP_NO_CDKTF

    def setUp(self):
        # One synthesis (a Node process round trip) shared by the tests of this class.
        if not _cache:
            _cache["example"] = load_example()
            _cache["doc"] = synth_document(_cache["example"].build)
        self.example = _cache["example"]
        self.doc = json.loads(json.dumps(_cache["doc"]))

    def test_deterministic_and_committed(self):
        again = synth_document(self.example.build)
        self.assertEqual(json.dumps(self.doc, sort_keys=True), json.dumps(again, sort_keys=True))
        committed = json.loads((EXAMPLE / "cdk.tf.json").read_text())
        self.assertEqual(committed, self.doc, "cdk.tf.json is stale: regenerate it (terraform/README.md)")
        self.assertEqual((EXAMPLE / "cdk.tf.json").read_text(),
                         json.dumps(self.doc, indent=2, sort_keys=True) + "\n")

    def test_no_backend_no_absolute_paths(self):
        self.assertNotIn("backend", self.doc["terraform"])
        text = json.dumps(self.doc)
        self.assertNotIn(str(Path.home()), text)
        self.assertNotIn("/tmp/", text)
        self.assertNotIn(str(EXAMPLE), text)

    def test_provider_source(self):
        self.assertEqual(self.doc["terraform"]["required_providers"]["coder"]["source"], "coder/coder")

    def test_url_override_goes_to_the_provider(self):
        (provider,) = self.doc["provider"]["coder"]
        self.assertEqual(provider["url"],
                         '${var.access_url_override == "" ? null : var.access_url_override}')
        self.assertEqual(self.doc["variable"]["access_url_override"]["default"], "")
        baked = synth_document(lambda stack: self.example.build(stack, "http://192.0.2.7:3001"))
        self.assertEqual(baked["variable"]["access_url_override"]["default"], "http://192.0.2.7:3001")

    def test_bootstrap_runs_the_agent_init_script(self):
        proc = self.doc["resource"]["terraform_data"]["agent_process"]
        self.assertEqual(proc["count"], "${data.coder_workspace.me.start_count}")
        create, destroy = (p["local-exec"] for p in proc["provisioner"])
        self.assertEqual(create["command"], "${coder_agent.main.init_script}")
        self.assertNotIn("when", create)
        self.assertEqual(create["environment"]["CODER_AGENT_TOKEN"], "${coder_agent.main.token}")
        self.assertEqual(create["environment"]["CODERSTACK_AGENT_DIR"], "${self.input.agent_dir}")
        self.assertEqual(destroy["when"], "destroy")
        self.assertEqual(destroy["command"], terraform_escape(linux_stop_script()))
        self.assertEqual(destroy["environment"]["CODERSTACK_AGENT_DIR"], "${self.output.agent_dir}")
        self.assertIn("${sha256(coder_agent.main.init_script)}", proc["triggers_replace"])
        self.assertNotIn("token", json.dumps(proc["input"]))

    def test_agent_and_app(self):
        agent = self.doc["resource"]["coder_agent"]["main"]
        self.assertEqual((agent["os"], agent["arch"]), ("linux", "amd64"))
        app = self.doc["resource"]["coder_app"]["hello"]
        self.assertEqual(app["agent_id"], "${coder_agent.main.id}")
        self.assertEqual(app["healthcheck"][0]["threshold"], 6)


class ConstructTests(unittest.TestCase):
    skip = SKIP_NO_CDKTF

    def test_escape(self):
        self.assertEqual(terraform_escape("a ${b} %{c} $d"), "a $${b} %%{c} $d")

    def test_provider_without_url(self):
        from coderstack.cdk import CoderAgent, CoderProvider

        def build(stack):
            CoderProvider(stack, "coder")
            CoderAgent(stack, "dev", os="linux", arch="arm64", env={"A": "b"},
                       display_apps={"vscode": False}, connection_timeout=0)

        doc = synth_document(build)
        self.assertEqual(doc["provider"]["coder"], [{}])
        agent = doc["resource"]["coder_agent"]["dev"]
        self.assertEqual(agent["display_apps"], [{"vscode": False}])
        self.assertEqual(agent["connection_timeout"], 0)
        self.assertEqual(agent["env"], {"A": "b"})
        self.assertNotIn("auth", agent)
