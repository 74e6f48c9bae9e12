"""The web terminal's websocket: ``GET /api/v2/workspaceagents/{id}/pty`` bridged to the agent's
reconnecting PTY (tunnel port 2) over the server's own tailnet.

Browser → server: a websocket (binary or text frames), each frame one JSON object
``{"data": "...", "height": N, "width": N}`` (every field optional). Server → browser: binary
frames of raw terminal output. Server → agent: the init frame (``wire/rpty.py``: 2-byte
little-endian length, JSON ``{ID, Height, Width, Command}``) from the query's ``reconnect``,
``width``, ``height`` and ``command``, then the browser's objects unchanged; the agent's output
comes back as it is.

A frame that is not such an object closes the websocket (1003) and is counted. The agent's
output is paused while the browser's connection is backed up (the agent's tunnel connection is
the websocket transport's producer), so a ``cat`` of a big file cannot fill the server's memory.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any, cast

from autobahn.twisted.resource import WebSocketResource
from autobahn.twisted.websocket import WebSocketServerFactory, WebSocketServerProtocol
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger

from coderstack.wire.rpty import encode_init

log = Logger()

MAX_FRAME = 64 * 1024
MAX_COMMAND = 4096
#: Close codes: the agent's side ended (the session's process exited, or the tunnel dropped).
CLOSE_AGENT_GONE = 1011
CLOSE_BAD_INPUT = 1003


@dataclass(frozen=True)
class PtyRequest:
    """What the browser asked for: the session to attach (or start) and its first size."""

    reconnect: uuid.UUID
    width: int
    height: int
    command: str


@dataclass
class PtyCounters:
    opened: int = 0
    malformed: int = 0
    agent_unreachable: int = 0


def valid_input(payload: bytes) -> bool:
    """Is this a terminal input/resize object (``data`` text, ``height``/``width`` sizes)?"""
    try:
        obj = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        return False
    if not isinstance(obj, dict) or set(obj) - {"data", "height", "width"}:
        return False
    if "data" in obj and not isinstance(obj["data"], str):
        return False
    for key in ("height", "width"):
        value = obj.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 10000):
            return False
    return True


class _AgentSide(Protocol):
    """The tunnel connection to the agent's port 2: its bytes go to the browser."""

    def __init__(self, bridge: PtyBridge) -> None:
        self.bridge = bridge

    @property
    def link(self) -> Any:
        """The tunnel connection (a netstack TCP transport: writable, and a producer)."""
        return self.transport

    def dataReceived(self, data: bytes) -> None:
        self.bridge.sendMessage(data, isBinary=True)

    def connectionLost(self, reason: Any = None) -> None:
        self.bridge.agent_lost()


class PtyBridge(WebSocketServerProtocol):
    def _owner(self) -> PtyFactory:
        return cast(PtyFactory, self.factory)

    def onOpen(self) -> None:
        f = self._owner()
        f.counters.opened += 1
        self._agent: _AgentSide | None = None
        self._queued: list[bytes] = []
        self._closing = False
        Deferred.fromCoroutine(self._connect()).addErrback(
            lambda failure: log.failure("web terminal bridge", failure))
        if f.on_open is not None:
            f.on_open(self)

    async def _connect(self) -> None:
        f = self._owner()
        try:
            endpoint = await f.connect()
            agent = _AgentSide(self)
            await endpoint.connect(_OneProtocol(agent))
        except Exception as e:
            f.counters.agent_unreachable += 1
            if not self._closing:
                self.sendClose(code=CLOSE_AGENT_GONE, reason=f"cannot reach the agent: {e}"[:120])
            return
        if self._closing or self.transport is None:
            agent.link.loseConnection()
            return
        self._agent = agent
        r = f.request
        agent.link.write(encode_init(r.reconnect, r.height, r.width, r.command))
        for payload in self._queued:
            agent.link.write(payload)
        self._queued.clear()
        # The browser's connection paces the agent's output (a streaming producer). The HTTP
        # channel that carried the upgrade is still registered there; it has handed over.
        self.transport.unregisterProducer()
        self.transport.registerProducer(agent.link, True)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        if not valid_input(payload):
            self._owner().counters.malformed += 1
            self.sendClose(code=CLOSE_BAD_INPUT, reason="expected {\"data\", \"height\", \"width\"}")
            return
        if self._agent is None:
            if sum(len(p) for p in self._queued) + len(payload) > MAX_FRAME * 4:
                self.sendClose(code=CLOSE_BAD_INPUT, reason="too much input before the agent answered")
                return
            self._queued.append(payload)
            return
        self._agent.link.write(payload)

    def agent_lost(self) -> None:
        if not self._closing:
            self._closing = True
            self.sendClose(code=1000, reason="the terminal session ended")

    def onClose(self, wasClean: bool, code: int | None, reason: str | None) -> None:
        self._closing = True
        agent = getattr(self, "_agent", None)
        if agent is not None and agent.link is not None:
            if self.transport is not None:
                try:
                    self.transport.unregisterProducer()
                except Exception:  # nothing registered
                    pass
            agent.link.loseConnection()
        f = self._owner()
        if f.on_close is not None:
            f.on_close(self)

    # The server's registry of live connections (revoked token, shutdown).
    def revoked(self, reason: str) -> None:
        self.sendClose(code=4001, reason=reason[:100])

    def going_away(self) -> None:
        self.sendClose(code=1001, reason="server shutting down")


class _OneProtocol(Factory):
    def __init__(self, proto: Protocol) -> None:
        self.proto = proto

    def buildProtocol(self, addr: Any) -> Protocol:
        return self.proto


class PtyFactory(WebSocketServerFactory):
    protocol = PtyBridge

    def __init__(self, request: PtyRequest, connect: Any, counters: PtyCounters,
                 on_open: Any = None, on_close: Any = None) -> None:
        super().__init__()
        self.request, self.connect, self.counters = request, connect, counters
        self.on_open, self.on_close = on_open, on_close
        self.setProtocolOptions(maxMessagePayloadSize=MAX_FRAME, maxFramePayloadSize=MAX_FRAME,
                                autoPingInterval=30, autoPingTimeout=30, openHandshakeTimeout=10,
                                perMessageCompressionAccept=lambda offers: None)


def pty_resource(factory: PtyFactory) -> WebSocketResource:
    return WebSocketResource(factory)
