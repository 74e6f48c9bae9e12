"""A stand-in for the server's agent endpoints (``/api/v2/workspaceagents/me/...``) that
records what the agent sends; on 127.0.0.1:0 with twisted.web, or in memory with StubTreq."""

from __future__ import annotations

import json
from typing import Any

from twisted.web import resource, server

TOKEN = "agent-token-for-tests"


class FakeAgentAPI(resource.Resource):
    isLeaf = True

    def __init__(self, manifest: dict[str, Any], logs_limit: int = 1 << 20) -> None:
        super().__init__()
        self.manifest = manifest
        self.logs_limit = logs_limit
        self.logs_length = 0
        self.logs_overflowed = False
        self.lifecycle: list[dict[str, Any]] = []
        self.logs: list[dict[str, Any]] = []  # each PATCH body
        self.log_sources: list[dict[str, Any]] = []
        self.metadata_posts: list[list[dict[str, Any]]] = []
        self.app_health_posts: list[dict[str, str]] = []
        self.down = False  # answer 503 to the report endpoints
        self.bad_tokens = 0
        self.log_requests = 0  # PATCH logs requests, refused ones included

    # -- what the agent reported -------------------------------------------------------------

    def states(self) -> list[str]:
        return [r["state"] for r in self.lifecycle]

    def lines(self, source_id: str | None = None) -> list[str]:
        return [entry["output"] for body in self.logs
                if source_id is None or body["log_source_id"] == source_id for entry in body["logs"]]

    def metadata(self) -> dict[str, dict[str, Any]]:
        latest: dict[str, dict[str, Any]] = {}
        for post in self.metadata_posts:
            for item in post:
                latest[item["key"]] = item
        return latest

    def health(self) -> dict[str, str]:
        return self.app_health_posts[-1] if self.app_health_posts else {}

    # -- twisted.web -------------------------------------------------------------------------

    def render(self, request: Any) -> bytes:
        path = request.path.decode()
        method = request.method.decode()
        if request.getHeader("Coder-Session-Token") != TOKEN:
            self.bad_tokens += 1
            return _json(request, 401, {"message": "bad token", "detail": ""})
        base = "/api/v2/workspaceagents/me/"
        if not path.startswith(base):
            return _json(request, 404, {"message": "not found", "detail": path})
        name = path[len(base):]
        if name == "manifest" and method == "GET":
            return _json(request, 200, self.manifest)
        if self.down:
            return _json(request, 503, {"message": "unavailable", "detail": ""})
        body = json.loads(request.content.read() or b"{}")
        if name == "report-lifecycle" and method == "POST":
            self.lifecycle.append(body)
            return _json(request, 204, None)
        if name == "logs" and method == "PATCH":
            self.log_requests += 1
            size = sum(len(e["output"]) for e in body["logs"])
            if self.logs_overflowed or self.logs_length + size > self.logs_limit:
                self.logs_overflowed = True
                return _json(request, 413, {"message": "logs limit exceeded", "detail": ""})
            self.logs_length += size
            self.logs.append(body)
            return _json(request, 200, {})
        if name == "log-source" and method == "POST":
            self.log_sources.append(body)
            return _json(request, 201, body)
        if name == "metadata" and method == "POST":
            self.metadata_posts.append(body["metadata"])
            return _json(request, 204, None)
        if name == "app-health" and method == "POST":
            self.app_health_posts.append(body["healths"])
            return _json(request, 200, {})
        return _json(request, 404, {"message": "not found", "detail": path})


def _json(request: Any, code: int, body: Any) -> bytes:
    request.setResponseCode(code)
    if body is None:
        return b""
    request.setHeader(b"Content-Type", b"application/json")
    return json.dumps(body).encode()


def listen(testcase: Any, api: FakeAgentAPI) -> str:
    """Serve ``api`` on 127.0.0.1:0 until the test ends; returns its URL."""
    from twisted.internet import reactor

    port = reactor.listenTCP(0, server.Site(api), interface="127.0.0.1")
    testcase.addCleanup(port.stopListening)
    return f"http://127.0.0.1:{port.getHost().port}"
