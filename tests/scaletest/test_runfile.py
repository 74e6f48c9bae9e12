"""The run file: owner-only, round-trips, and says what is wrong with a bad one."""

from __future__ import annotations

import json
import os
import stat
import uuid

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial import unittest

from coderstack.scaletest import runfile
from coderstack.scaletest.runfile import AgentEntry, RunFile, RunFileError


def entry(i: int) -> AgentEntry:
    return AgentEntry(f"scaletest-abcdef-{i}", str(uuid.uuid4()), str(uuid.uuid4()), f"token-{i}")


class RunFileTests(unittest.TestCase):
    def test_round_trip_owner_only(self) -> None:
        path = os.path.join(self.mktemp(), "run.json")
        os.makedirs(os.path.dirname(path))
        run = RunFile("http://127.0.0.1:1", "scaletest-abcdef", (entry(0), entry(1)))
        runfile.write(path, run)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        self.assertEqual(runfile.read(path), run)

    def test_errors_say_what_is_wrong(self) -> None:
        good = RunFile("u", "p", (entry(0),)).to_json()
        cases = {
            "a run file is a JSON object": [],
            "unknown run file version": dict(good, version=9),
            "needs url and prefix": dict(good, url=3),
            "agents[0] has no token": dict(good, agents=[{k: v for k, v in good["agents"][0].items() if k != "token"}]),
            "agents[0].agent_id is not a UUID": dict(good, agents=[dict(good["agents"][0], agent_id="x")]),
            "agents[0]'s fields must be strings": dict(good, agents=[dict(good["agents"][0], token=5)]),
            "agents[0] is not an object": dict(good, agents=["x"]),
        }
        for message, obj in cases.items():
            with self.assertRaises(RunFileError) as caught:
                RunFile.from_json(obj)
            self.assertIn(message, str(caught.exception))

    def test_missing_and_unreadable(self) -> None:
        base = self.mktemp()
        os.makedirs(base)
        with self.assertRaises(RunFileError) as caught:
            runfile.read(os.path.join(base, "none.json"))
        self.assertIn("create-workspaces", str(caught.exception))
        bad = os.path.join(base, "bad.json")
        with open(bad, "w") as f:
            f.write("{not json")
        self.assertRaises(RunFileError, runfile.read, bad)

    @given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(),
                        lambda c: st.lists(c) | st.dictionaries(st.text(), c), max_leaves=20))
    def test_any_json_is_a_run_file_or_a_clear_error(self, obj) -> None:
        try:
            RunFile.from_json(json.loads(json.dumps(obj)))
        except RunFileError:
            pass
