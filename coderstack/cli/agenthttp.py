"""A tiny HTTP/1.0 GET over any stream endpoint: how the CLI asks the agent's API (port 4)
for its netcheck over the tunnel without a DNS name or TLS. The answer is read until the
agent closes the connection (HTTP/1.0), at most 1 MiB."""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import defer, protocol
from twisted.internet.interfaces import IStreamClientEndpoint

MAX_RESPONSE = 1 << 20


class AgentHTTPError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class _Get(protocol.Protocol):
    def __init__(self, path: str):
        self.path = path
        self.buf = b""
        self.done: defer.Deferred[bytes] = defer.Deferred()

    def connectionMade(self) -> None:  # noqa: N802
        self.transport.write(f"GET {self.path} HTTP/1.0\r\nHost: agent\r\nAccept: application/json\r\n\r\n".encode())

    def dataReceived(self, data: bytes) -> None:  # noqa: N802
        self.buf += data
        if len(self.buf) > MAX_RESPONSE:
            self.transport.abortConnection()

    def connectionLost(self, reason: Any = None) -> None:  # noqa: N802
        if not self.done.called:
            self.done.callback(self.buf)


async def get_json(endpoint: IStreamClientEndpoint, path: str) -> Any:
    from twisted.internet.endpoints import connectProtocol

    proto = _Get(path)
    await connectProtocol(endpoint, proto)
    raw = await proto.done
    head, sep, body = raw.partition(b"\r\n\r\n")
    status_line = head.split(b"\r\n", 1)[0].split()
    if not sep or len(status_line) < 2 or not status_line[1].isdigit():
        raise AgentHTTPError(0, "malformed response from the agent")
    status = int(status_line[1])
    try:
        doc = json.loads(body)
    except ValueError:
        raise AgentHTTPError(status, "malformed JSON from the agent") from None
    if status != 200:
        raise AgentHTTPError(status, str(doc.get("message", "")) if isinstance(doc, dict) else "")
    return doc
