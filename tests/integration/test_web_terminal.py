"""The web terminal's websocket against a real agent process: through the server's tailnet to
the agent's reconnecting PTY, typed into, resized, dropped and re-attached; refused to another
member and to another site."""

from __future__ import annotations

import json
import uuid
from typing import Any
from urllib.parse import urlsplit

import treq
from autobahn.twisted.websocket import WebSocketClientFactory, WebSocketClientProtocol, connectWS
from twisted.internet import defer
from twisted.trial import unittest

from tests.integration.tunnel_support import workspace
from tests.support.waiting import wait_until


class _Terminal(WebSocketClientProtocol):
    def onOpen(self) -> None:
        self.factory.proto = self
        if not self.factory.opened.called:
            self.factory.opened.callback(self)

    def onMessage(self, payload: bytes, isBinary: bool) -> None:
        self.factory.output += payload

    def onClose(self, wasClean: bool, code: Any, reason: Any) -> None:
        if not self.factory.opened.called:
            self.factory.opened.errback(ConnectionError(f"refused: {code} {reason}"))
        if not self.factory.closed.called:
            self.factory.closed.callback((code, reason))

    def type(self, **fields: Any) -> None:
        self.sendMessage(json.dumps(fields).encode(), isBinary=False)


class TerminalFactory(WebSocketClientFactory):
    protocol = _Terminal

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.output = b""
        self.proto: Any = None
        self.opened: defer.Deferred[_Terminal] = defer.Deferred()
        self.closed: defer.Deferred[Any] = defer.Deferred()


class WebTerminalTests(unittest.TestCase):
    timeout = 180

    async def open(self, reconnect: uuid.UUID, headers: dict[str, str], **query: Any) -> TerminalFactory:
        # /bin/sh rather than the account's login shell: this machine's root bash profile runs
        # pyenv, whose rehash lock a killed shell can leave behind for the next one to wait on.
        query = {"reconnect": reconnect, "width": 80, "height": 24, "command": "/bin/sh", **query}
        q = "&".join(f"{k}={v}" for k, v in query.items())
        url = self.d.url.replace("http://", "ws://") + f"/api/v2/workspaceagents/{self.agent_id}/pty?{q}"
        f = TerminalFactory(url, headers=headers)
        connectWS(f)
        self.addCleanup(lambda: f.proto.dropConnection() if f.proto and f.proto.state != f.proto.STATE_CLOSED else None)
        await f.opened
        return f

    async def test_type_resize_drop_and_reattach(self) -> None:
        self.d, alice, _agent = await workspace(self)
        self.agent_id = (await alice.show("box"))["agents"][0]["id"]
        token = {"Coder-Session-Token": alice.session_token()}
        session = uuid.uuid4()
        t = await self.open(session, token)
        t.proto.type(data="echo hi-$((6*7)) $$\r")
        await wait_until(lambda: b"hi-42" in t.output, "the echoed command's output", timeout=30)
        pid = t.output.split(b"hi-42 ", 1)[1].split()[0]
        t.proto.type(height=40, width=100)
        t.proto.type(data="stty size\r")
        await wait_until(lambda: b"40 100" in t.output, "stty size to follow the resize", timeout=30)

        # The connection drops; the same session comes back with its scrollback and its shell.
        t.proto.dropConnection()
        await t.closed
        again = await self.open(session, token)
        await wait_until(lambda: b"hi-42" in again.output, "the scrollback on re-attach", timeout=30)
        again.proto.type(data="echo pid-$$\r")
        await wait_until(lambda: b"pid-" + pid in again.output, "the same shell after re-attaching", timeout=30)

        # The owner sees how the server reaches the agent (loopback: direct).
        resp = await treq.get(f"{self.d.url}/api/v2/workspaceagents/{self.agent_id}", headers=token,
                              persistent=False)
        path = json.loads(await resp.content())["server_path"]
        self.assertEqual((path["path"], path["reachable"]), ("p2p", True), path)

        # Another session id is another shell.
        other = await self.open(uuid.uuid4(), token)
        other.proto.type(data="echo pid-$$\r")
        await wait_until(lambda: b"pid-" in other.output and b"pid-" + pid not in other.output,
                         "a second shell", timeout=30)

    async def test_refused_to_others_and_other_sites(self) -> None:
        self.d, alice, _agent = await workspace(self)
        self.agent_id = (await alice.show("box"))["agents"][0]["id"]
        await alice.ok("users", "create", "--username", "bob", "--email", "bob@example.com", "--password",
                       "bob password")
        bob = self.d.user("bob")
        await bob.login("bob")
        with self.assertRaises(ConnectionError):
            await self.open(uuid.uuid4(), {"Coder-Session-Token": bob.session_token()})
        with self.assertRaises(ConnectionError):
            await self.open(uuid.uuid4(), {})
        # The owner's own cookie, sent by a page of another site, is refused; from the access URL it works.
        cookie = {"Cookie": f"coder_session_token={alice.session_token()}"}
        with self.assertRaises(ConnectionError):
            await self.open(uuid.uuid4(), {**cookie, "Origin": "http://evil.example"})
        origin = f"http://{urlsplit(self.d.url).netloc}"
        t = await self.open(uuid.uuid4(), {**cookie, "Origin": origin})
        t.proto.type(data="echo ok-$((1+1))\r")
        await wait_until(lambda: b"ok-2" in t.output, "the cookie-authenticated terminal", timeout=30)
