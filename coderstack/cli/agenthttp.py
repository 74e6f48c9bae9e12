"""GET JSON from the agent's HTTP API (tunnel port 4) over any stream endpoint.

twisted.web's Agent does the HTTP; its endpoint factory hands it the tunnel endpoint, so no DNS
name or TLS is involved (the tunnel already authenticates and encrypts). Answers over 1 MiB are
refused.
"""

from __future__ import annotations

import json
from typing import Any

from twisted.internet import protocol
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.python.failure import Failure
from twisted.web.client import Agent, ResponseDone
from twisted.web.http import PotentialDataLoss

from coderstack.twistedtypes import stream_transport

MAX_RESPONSE = 1 << 20


class AgentHTTPError(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class _OneEndpoint:
    def __init__(self, endpoint: IStreamClientEndpoint) -> None:
        self.endpoint = endpoint

    def endpointForURI(self, uri: Any) -> IStreamClientEndpoint:
        return self.endpoint


async def get_json(endpoint: IStreamClientEndpoint, path: str, reactor: Any = None) -> Any:
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    agent = Agent.usingEndpointFactory(reactor, _OneEndpoint(endpoint))
    resp = await agent.request(b"GET", b"http://agent" + path.encode())
    length = resp.length if isinstance(resp.length, int) else 0
    if length > MAX_RESPONSE:
        raise AgentHTTPError(resp.code, "the agent's answer is too large")
    # The agent's answers have no Content-Length, so the cap is enforced while reading.
    collector = _CappedBody(MAX_RESPONSE, resp.code)
    resp.deliverBody(collector)
    body = await collector.done
    try:
        doc = json.loads(body)
    except ValueError:
        raise AgentHTTPError(resp.code, "malformed JSON from the agent") from None
    if resp.code != 200:
        raise AgentHTTPError(resp.code, str(doc.get("message", "")) if isinstance(doc, dict) else "")
    return doc


class _CappedBody(protocol.Protocol):
    """Collects a response body and aborts the connection once it passes ``limit`` bytes."""

    def __init__(self, limit: int, code: int) -> None:
        self.limit = limit
        self.code = code
        self.parts: list[bytes] = []
        self.size = 0
        self.done: Deferred[bytes] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        self.size += len(data)
        if self.size > self.limit:
            self.done.errback(AgentHTTPError(self.code, "the agent's answer is too large"))
            stream_transport(self).stopProducing()
            return
        self.parts.append(data)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(b"".join(self.parts))
        else:
            self.done.errback(reason)
