"""The provider's schemas against terraform-provider-coder's (tests/provider/coder_reference.py)."""

from __future__ import annotations

import base64
import json

from google.protobuf.json_format import MessageToDict
from twisted.trial import unittest

from coderstack.provider.provider import CoderProvider
from tests.provider import coder_reference as ref


def _schema_dict(schema) -> dict:
    """A schema in the shape of ``terraform providers schema -json``."""
    block = MessageToDict(schema.to_pb(), preserving_proto_field_name=True)["block"]
    attrs = {}
    for a in block.get("attributes", []):
        a = dict(a)
        a["type"] = json.loads(base64.b64decode(a["type"]))
        attrs[a["name"]] = a
    blocks = {}
    for b in block.get("block_types", []):
        blocks[b["type_name"]] = (
            b["nesting"].lower(),
            int(b["max_items"]) if "max_items" in b else None,
            {a["name"] for a in b["block"].get("attributes", [])},
        )
    return {"attributes": attrs, "blocks": blocks}


class SchemaTests(unittest.TestCase):
    def setUp(self):
        self.provider = CoderProvider()
        self.resources = {"coder_" + r.get_name(): r for r in self.provider.get_resources()}
        self.data = {"coder_" + d.get_name(): d for d in self.provider.get_data_sources()}

    def assertAttributes(self, schema, expected: dict) -> dict:
        got = _schema_dict(schema)
        self.assertEqual(set(got["attributes"]), set(expected))
        for name, (tf_type, spec) in expected.items():
            attr = got["attributes"][name]
            self.assertEqual(attr["type"], tf_type, name)
            self.assertEqual(ref.flags(attr), ref.expected_flags(spec), name)
        return got

    def test_provider(self):
        from tf.utils import Diagnostics

        self.assertAttributes(self.provider.get_provider_schema(Diagnostics()), ref.PROVIDER)
        self.assertEqual(self.provider.full_name(), "registry.terraform.io/coder/coder")

    def test_names(self):
        self.assertEqual(set(self.resources), {"coder_agent", "coder_app", "coder_script", "coder_env",
                                                  "coder_metadata", "coder_agent_instance"})
        self.assertEqual(set(self.data), {"coder_workspace", "coder_workspace_owner", "coder_provisioner",
                          "coder_parameter"})

    def test_agent(self):
        got = self.assertAttributes(self.resources["coder_agent"].get_schema(), ref.AGENT)
        self.assertEqual(got["blocks"], ref.AGENT_BLOCKS)

    def test_agent_defaults(self):
        attrs = {a.name: a for a in self.resources["coder_agent"].get_schema().attributes}
        self.assertEqual(attrs["auth"].default, "token")
        self.assertEqual(attrs["connection_timeout"].default, 120)
        self.assertEqual(attrs["startup_script_behavior"].default, "non-blocking")
        self.assertEqual(attrs["api_key_scope"].default, "all")

    def test_agent_force_new(self):
        # Every argument of coder_agent replaces the agent when changed, as in the SDK.
        for attr in self.resources["coder_agent"].get_schema().attributes:
            if attr.optional or attr.required:
                if attr.name != "id":
                    self.assertTrue(attr.requires_replace, attr.name)

    def test_monitoring_nested(self):
        schema = self.resources["coder_agent"].get_schema()
        mon = next(b for b in schema.block_types if b.type_name == "resources_monitoring")
        inner = {b.type_name: b.max_items for b in mon.block.block_types}
        self.assertEqual(inner, {"memory": 1, "volume": None})

    def test_app(self):
        got = self.assertAttributes(self.resources["coder_app"].get_schema(), ref.APP)
        self.assertEqual(got["blocks"], ref.APP_BLOCKS)

    def test_workspace(self):
        self.assertAttributes(self.data["coder_workspace"].get_schema(), ref.WORKSPACE)

    def test_owner(self):
        self.assertAttributes(self.data["coder_workspace_owner"].get_schema(), ref.OWNER)

    def test_provisioner(self):
        self.assertAttributes(self.data["coder_provisioner"].get_schema(), ref.PROVISIONER)

    def test_parameter(self):
        got = self.assertAttributes(self.data["coder_parameter"].get_schema(), ref.PARAMETER)
        self.assertEqual(got["blocks"], ref.PARAMETER_BLOCKS)

    def test_script(self):
        self.assertAttributes(self.resources["coder_script"].get_schema(), ref.SCRIPT)

    def test_env(self):
        self.assertAttributes(self.resources["coder_env"].get_schema(), ref.ENV)

    def test_metadata(self):
        got = self.assertAttributes(self.resources["coder_metadata"].get_schema(), ref.METADATA)
        self.assertEqual(got["blocks"], ref.METADATA_BLOCKS)

    def test_agent_instance(self):
        self.assertAttributes(self.resources["coder_agent_instance"].get_schema(), ref.AGENT_INSTANCE)
