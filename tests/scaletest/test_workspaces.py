"""create-workspaces and cleanup against a fake API: names, concurrency, and that cleanup never
touches a workspace a scale test did not make."""

from __future__ import annotations

import uuid

from twisted.internet import defer, task
from twisted.trial import unittest

from coderstack.scaletest import workspaces
from coderstack.sdk import SDKError


class FakeAPI:
    url = "http://server"

    def __init__(self, clock: task.Clock, existing: list[str] = ()) -> None:
        self.clock = clock
        self.workspaces = {str(uuid.uuid4()): n for n in existing}
        self.in_flight = self.most_in_flight = 0

    async def post(self, path: str, body: dict) -> dict:
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        await task.deferLater(self.clock, 1, lambda: None)
        self.in_flight -= 1
        if body["name"].endswith("-3"):
            raise SDKError("Workspace exists.", 409)
        ws_id = str(uuid.uuid4())
        self.workspaces[ws_id] = body["name"]
        return {"id": ws_id, "name": body["name"], "agents": [{"id": str(uuid.uuid4())}], "agent_token": "t"}

    async def get(self, path: str) -> dict:
        return {"workspaces": [{"id": i, "name": n} for i, n in self.workspaces.items()]}

    async def delete(self, path: str) -> None:
        del self.workspaces[path.rsplit("/", 1)[1]]


class WorkspacesTests(unittest.TestCase):
    def test_create_bounded_and_failures_reported(self) -> None:
        clock = task.Clock()
        api = FakeAPI(clock)
        d = defer.Deferred.fromCoroutine(workspaces.create_workspaces(api, 10, concurrency=3))
        clock.pump([1] * 10)
        run, errors = self.successResultOf(d)
        self.assertEqual(api.most_in_flight, 3)
        self.assertEqual(len(run.agents), 9)
        self.assertRegex(run.prefix, r"^scaletest-[0-9a-f]{6}$")
        self.assertEqual([a.workspace for a in run.agents][:3], [f"{run.prefix}-{i}" for i in range(3)])
        self.assertEqual(len(errors), 1)
        self.assertIn(f"{run.prefix}-3: Workspace exists.", errors[0])

    def test_cleanup_removes_only_scale_test_workspaces(self) -> None:
        keep = ["dev", "scaletest", "scaletest-abcdef", "scaletest-ABCDEF-1", "my-scaletest-abcdef-1"]
        api = FakeAPI(task.Clock(), keep + ["scaletest-abcdef-0", "scaletest-abcdef-1", "scaletest-123456-0"])
        deleted, errors = self.successResultOf(defer.Deferred.fromCoroutine(
            workspaces.cleanup(api, "scaletest-abcdef")))
        self.assertEqual((sorted(deleted), errors), (["scaletest-abcdef-0", "scaletest-abcdef-1"], []))
        deleted, _ = self.successResultOf(defer.Deferred.fromCoroutine(workspaces.cleanup(api)))
        self.assertEqual(deleted, ["scaletest-123456-0"])
        self.assertEqual(sorted(api.workspaces.values()), sorted(keep))
