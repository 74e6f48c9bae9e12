"""The build log reaches a follower line by line while the build runs (real HTTP on loopback)."""

from __future__ import annotations

import uuid
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.trial import unittest
from twisted.web.server import Site

from coderstack.sdk import Client, SDKError
from coderstack.server.api import API
from coderstack.server.builds import BuildLog
from coderstack.server.records import Build, now
from tests.support.api import Caller, make_deployment
from tests.support.waiting import wait_until


def running_build() -> Build:
    return Build(id=uuid.uuid4(), workspace_id=uuid.uuid4(), number=1, transition="start",
                 status="running", template_version_id=None, created_at=now(),
                 completed_at=None, error="")


class FakeBuilder:
    def __init__(self, blog: BuildLog) -> None:
        self.blog = blog

    def live_log(self, build_id: uuid.UUID) -> BuildLog | None:
        return self.blog if build_id == self.blog.build.id else None


class BuildLogTests(unittest.TestCase):
    def test_follow_replays_then_streams_then_ends_once(self) -> None:
        blog = BuildLog(running_build(), uuid.uuid4())
        blog.append("one")
        lines: list[str] = []
        ended: list[Build] = []
        stop = blog.follow(lines.append, ended.append)
        blog.append("two")
        self.assertEqual((lines, ended), (["one", "two"], []))
        final = Build(**{**blog.build.__dict__, "status": "failed", "error": "boom"})
        blog.finish(final)
        blog.append("late")  # nobody follows any more
        self.assertEqual((lines, [b.status for b in ended]), (["one", "two"], ["failed"]))
        stop()  # harmless after the end
        again: list[Build] = []
        blog.follow(lambda _line: None, again.append)
        self.assertEqual([b.error for b in again], ["boom"])

    def test_unfollow_stops_delivery(self) -> None:
        blog = BuildLog(running_build(), uuid.uuid4())
        lines: list[str] = []
        stop = blog.follow(lines.append, lambda _b: None)
        stop()
        blog.append("unseen")
        self.assertEqual(lines, [])


class StreamTests(unittest.TestCase):
    async def setUp(self) -> None:
        self.d, plain = await make_deployment(self)
        self.token = await Caller(plain).owner()
        _code, me = await Caller(plain).call("GET", "/api/v2/users/me", token=self.token)
        self.blog = BuildLog(running_build(), uuid.UUID(me["id"]))
        api = API(self.d, builder=FakeBuilder(self.blog))  # type: ignore[arg-type]
        port = reactor.listenTCP(0, Site(api.app.resource()), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.client = Client(reactor, f"http://127.0.0.1:{port.getHost().port}", self.token)
        self.addCleanup(self.client.close)

    async def test_lines_arrive_while_the_build_runs(self) -> None:
        self.blog.append("Initializing the backend...")
        got: list[dict[str, Any]] = []
        path = f"/api/v2/workspacebuilds/{self.blog.build.id}/logs?follow=true"
        streaming = self.client.stream_json_lines(path, got.append)
        done = ensureDeferred(streaming)
        await wait_until(lambda: len(got) == 1, "the first line")
        self.assertEqual(got, [{"output": "Initializing the backend..."}])
        self.blog.append("coder_agent.main: Creating...")
        await wait_until(lambda: len(got) == 2, "the second line")
        self.assertFalse(done.called, "the stream ended before the build did")
        self.blog.finish(Build(**{**self.blog.build.__dict__, "status": "succeeded"}))
        await done
        self.assertEqual(got[1], {"output": "coder_agent.main: Creating..."})
        self.assertEqual(got[2]["build"]["status"], "succeeded")
        self.assertEqual(len(got), 3)

    async def test_unknown_build_is_404(self) -> None:
        with self.assertRaises(SDKError) as caught:
            await self.client.stream_json_lines(
                f"/api/v2/workspacebuilds/{uuid.uuid4()}/logs?follow=true", lambda _o: None)
        self.assertEqual(caught.exception.status, 404)
