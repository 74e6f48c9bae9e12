"""coder_parameter: value from CODER_PARAMETER_<sha256(name)> or the default, and Coder's checks."""

from __future__ import annotations

import hashlib
import os

from tf.iface import ReadDataContext
from tf.utils import Diagnostics
from twisted.trial import unittest

from coderstack.provider.parameter import ParameterDataSource, parameter_env_name
from coderstack.provider.provider import CoderProvider


def config(**kw) -> dict:
    base = {a.name: None for a in ParameterDataSource.get_schema().attributes}
    base.update(option=[], validation=[])
    base.update(kw)
    return base


class ParameterTests(unittest.TestCase):
    def read(self, env: dict | None = None, **kw):
        self.patch(os, "environ", env or {})
        ctx = ReadDataContext(Diagnostics(), "coder_parameter")
        state = ParameterDataSource(CoderProvider()).read(ctx, config(**kw))
        errors = [d.summary for d in ctx.diagnostics.diagnostics if d.severity == "error"]
        return state, errors

    def test_env_name(self):
        self.assertEqual(parameter_env_name("region"),
                         "CODER_PARAMETER_" + hashlib.sha256(b"region").hexdigest())

    def test_default(self):
        state, errors = self.read(name="region", default="eu")
        self.assertEqual(errors, [])
        self.assertEqual((state["value"], state["optional"], state["type"]), ("eu", True, "string"))
        self.assertEqual((state["mutable"], state["ephemeral"]), (False, False))

    def test_value_from_env(self):
        state, _ = self.read({parameter_env_name("region"): "us"}, name="region", default="eu")
        self.assertEqual(state["value"], "us")

    def test_required_without_default(self):
        state, errors = self.read(name="region")
        self.assertEqual((state["value"], state["optional"], errors), ("", False, []))

    def test_types(self):
        self.assertEqual(self.read(name="n", type="number", default="3")[1], [])
        self.assertTrue(self.read(name="n", type="number", default="three")[1])
        self.assertTrue(self.read(name="b", type="bool", default="maybe")[1])
        self.assertEqual(self.read(name="l", type="list(string)", default='["a"]')[1], [])
        self.assertTrue(self.read(name="l", type="list(string)", default="[1]")[1])

    def test_options(self):
        opts = [{"name": "EU", "value": "eu", "description": None, "icon": None},
                {"name": "US", "value": "us", "description": None, "icon": None}]
        self.assertEqual(self.read(name="r", default="eu", option=opts)[1], [])
        self.assertIn("default value 'mars' must be defined as one of options",
                      self.read(name="r", default="mars", option=opts)[1])
        dup = opts + [{"name": "EU", "value": "eu2", "description": None, "icon": None}]
        self.assertTrue(self.read(name="r", default="eu", option=dup)[1])

    def test_validation(self):
        rule = {"min": 1, "max": 8, "monotonic": "increasing", "regex": None, "error": None}
        state, errors = self.read({parameter_env_name("cpu"): "4"}, name="cpu", type="number",
                                  validation=[rule])
        self.assertEqual(errors, [])
        self.assertEqual(state["validation"][0]["min_disabled"], False)
        _, errors = self.read({parameter_env_name("cpu"): "9"}, name="cpu", type="number",
                              validation=[rule])
        self.assertIn("value 9 is more than the maximum 8", errors)
        regex = {"min": None, "max": None, "monotonic": None, "regex": "^[a-z]+$", "error": "lowercase"}
        _, errors = self.read(name="user", default="Bob", validation=[regex])
        self.assertTrue(errors[0].startswith("lowercase"))

    def test_validate_config(self):
        diags = Diagnostics()
        ParameterDataSource(CoderProvider()).validate(diags, "coder_parameter",
                                                      {"name": "x", "type": "float"})
        self.assertTrue(diags.has_errors())
