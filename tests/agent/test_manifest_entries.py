"""The manifest's scripts, metadata and apps: any JSON is either used or skipped with a message,
never an exception that would stop the agent."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial import unittest

from coderstack.agent.apphealth import HealthCheck
from coderstack.agent.metadata import MetadataItem
from coderstack.agent.scripts import Script
from coderstack.agent.workspace import parse_entries

scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=10))
json_values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)), max_leaves=10)
keys = st.sampled_from(["log_source_id", "display_name", "script", "cron", "run_on_start", "timeout_seconds",
                        "log_path", "key", "interval", "timeout", "id", "healthcheck", "url", "threshold"])
entries = st.dictionaries(keys, json_values, max_size=8)


class ManifestEntriesTests(unittest.TestCase):
    @settings(max_examples=300, deadline=None)
    @given(st.one_of(json_values, st.lists(entries, max_size=4)))
    def test_any_json_is_used_or_skipped(self, raw) -> None:
        for parse in (Script.from_json, MetadataItem.from_json, HealthCheck.from_app):
            told: list[tuple[str, str]] = []
            got = parse_entries(raw, parse, "thing", lambda what, why, told=told: told.append((what, why)))
            if isinstance(raw, list):
                self.assertEqual(len(got) + len(told), len(raw))
            else:
                self.assertEqual(got, [])
                self.assertEqual(len(told), 0 if raw is None else 1)
            for item in got:
                if isinstance(item, MetadataItem):
                    self.assertTrue(1 <= item.interval <= 86400 and 0 < item.timeout <= 86400, item)
                if isinstance(item, Script):
                    self.assertGreaterEqual(item.timeout_seconds, 0)

    def test_good_entries(self) -> None:
        told: list = []
        got = parse_entries([{"key": "cpu", "script": "coder stat cpu", "interval": 10, "timeout": 1},
                             {"key": "x", "interval": "soon"}, "junk"],
                            MetadataItem.from_json, "metadata item", lambda what, why: told.append(what))
        self.assertEqual(got, [MetadataItem("cpu", "coder stat cpu", 10.0, 1.0)])
        self.assertEqual(told, ["metadata item", "metadata item"])
