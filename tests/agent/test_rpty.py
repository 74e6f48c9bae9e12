"""Reconnecting PTY sessions with real processes in real PTYs, over loopback TCP.

Every process a test starts is killed by its pid at cleanup, whether or not the test passed.
"""

from __future__ import annotations

import os
import signal
import uuid
from typing import Any

from twisted.internet import defer, protocol, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from coderstack.agent.rpty import EXIT_GRACE, PTYSession, ReconnectingPTYServer, Scrollback
from coderstack.agent.session_env import SessionEnvironment
from coderstack.wire.rpty import encode_init, encode_request
from tests.support.tempdirs import made_dir
from tests.support.waiting import wait_until


class Terminal(protocol.Protocol):
    """A client of port 2: what it received, and whether the agent closed it."""

    def __init__(self) -> None:
        self.received = b""
        self.closed = False
        self.lost: defer.Deferred[None] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Any = None) -> None:
        self.closed = True
        self.lost.callback(None)

    def type(self, data: str) -> None:
        self.transport.write(encode_request(data))

    def resize(self, height: int, width: int) -> None:
        self.transport.write(encode_request(height=height, width=width))

    async def expect(self, marker: bytes, count: int = 1) -> None:
        await wait_until(lambda: self.received.count(marker) >= count,
                         lambda: f"{marker!r} in the terminal; it shows {self.received[-400:]!r}")


class FillingTransport(StringTransport):
    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit

    def write(self, data: bytes) -> None:
        super().write(data)
        if self.producer is not None and len(self.value()) > self.limit:
            self.producer.pauseProducing()


class SessionTests(unittest.TestCase):
    def make(self, **kw: Any) -> ReconnectingPTYServer:
        server = ReconnectingPTYServer(reactor, env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
                                       shell="/bin/sh", **kw)
        pids: list[int] = []
        server.on_session = lambda session: pids.append(session.pid)

        def kill_all() -> None:
            for pid in pids:
                try:
                    os.killpg(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
        # Cleanups run last-in first-out: the server ends its sessions (and waits for them),
        # then anything still alive is killed by pid.
        self.addCleanup(kill_all)
        self.addCleanup(lambda: server.close())
        port = reactor.listenTCP(0, server, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.port = port.getHost().port
        return server

    async def connect(self, session_id: uuid.UUID, command: str = "", height: int = 24, width: int = 80,
                      raw: bytes | None = None) -> Terminal:
        term = Terminal()
        await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.port), term)
        self.addCleanup(lambda: term.transport.abortConnection() if not term.closed else None)
        term.transport.write(raw if raw is not None else encode_init(session_id, height, width, command))
        return term

    async def session(self, server: ReconnectingPTYServer, session_id: uuid.UUID) -> PTYSession:
        return await wait_until(lambda: server.sessions.get(session_id), "the session")

    async def hang_up(self, term: Terminal, session: PTYSession) -> None:
        term.transport.loseConnection()
        await term.lost
        await wait_until(lambda: not session.connections, "the agent to see the connection close")

    async def test_input_echoes(self) -> None:
        self.make()
        term = await self.connect(uuid.uuid4(), "cat")
        term.type("hello-rpty\r")
        # Once echoed by the terminal, once printed by cat.
        await term.expect(b"hello-rpty", 2)

    async def test_init_size_and_resize(self) -> None:
        self.make()
        sid = uuid.uuid4()
        term = await self.connect(sid, "", height=30, width=90)
        term.type("stty size\r")
        await term.expect(b"30 90")
        term.resize(33, 101)
        term.type("stty size\r")
        await term.expect(b"33 101")
        # Data and a resize in one object.
        term.transport.write(encode_request("stty size\r", height=41, width=123))
        await term.expect(b"41 123")

    async def test_reattach_replays_and_continues_the_same_process(self) -> None:
        server = self.make()
        sid = uuid.uuid4()
        first = await self.connect(sid)
        session = await self.session(server, sid)
        # The arithmetic shows only in the shell's output, not in the echo of what was typed.
        first.type("echo pid-$((6*7))-$$\r")
        await first.expect(b"pid-42-%d" % session.pid)
        await self.hang_up(first, session)
        self.assertIn(sid, server.sessions)

        second = await self.connect(sid)
        await second.expect(b"pid-42-%d" % session.pid)  # the scrollback
        second.type("echo again-$((5*5))-$$\r")
        await second.expect(b"again-25-%d" % session.pid)
        self.assertIs(server.sessions[sid], session)
        self.assertEqual(len(server.sessions), 1)

    async def test_two_connections_both_get_output(self) -> None:
        server = self.make()
        sid = uuid.uuid4()
        one = await self.connect(sid)
        session = await self.session(server, sid)
        two = await self.connect(sid)
        await wait_until(lambda: len(session.connections) == 2, "both attached")
        two.type("echo both-$((3*3))\r")
        await one.expect(b"both-9")
        await two.expect(b"both-9")

    async def test_two_ids_are_two_processes(self) -> None:
        server = self.make()
        a, b = uuid.uuid4(), uuid.uuid4()
        ta = await self.connect(a)
        tb = await self.connect(b)
        sa, sb = await self.session(server, a), await self.session(server, b)
        self.assertNotEqual(sa.pid, sb.pid)
        ta.type("echo me-$$\r")
        tb.type("echo me-$$\r")
        await ta.expect(b"me-%d" % sa.pid)
        await tb.expect(b"me-%d" % sb.pid)
        self.assertNotIn(b"me-%d" % sb.pid, ta.received)

    async def test_idle_timeout_ends_a_detached_session(self) -> None:
        clock = task.Clock()
        server = self.make(clock=clock, idle_timeout=60)
        sid = uuid.uuid4()
        term = await self.connect(sid, "cat")
        session = await self.session(server, sid)
        await self.hang_up(term, session)
        # Reattaching before the timeout keeps it.
        clock.advance(59)
        again = await self.connect(sid)
        await wait_until(lambda: session.connections, "the reattach")
        clock.advance(120)
        self.assertFalse(session.is_ended)
        self.assertIs(server.sessions.get(sid), session)
        await self.hang_up(again, session)
        clock.advance(60)
        await session.when_ended()
        self.assertNotIn(sid, server.sessions)
        self.assertRaises(ProcessLookupError, os.kill, session.pid, 0)

    async def test_process_exit_closes_connections(self) -> None:
        server = self.make()
        sid = uuid.uuid4()
        term = await self.connect(sid, "cat")
        session = await self.session(server, sid)
        other = await self.connect(sid)
        await wait_until(lambda: len(session.connections) == 2, "both attached")
        os.kill(session.pid, signal.SIGTERM)
        await term.lost
        await other.lost
        self.assertNotIn(sid, server.sessions)
        # A new connection with the same ID starts a new process.
        third = await self.connect(sid, "echo fresh-$((1+2)); cat")
        await third.expect(b"fresh-3")
        self.assertNotEqual(server.sessions[sid].pid, session.pid)

    async def test_remaining_output_arrives_before_the_close(self) -> None:
        server = self.make()
        sid = uuid.uuid4()
        term = await self.connect(sid, "i=0; while [ $i -lt 2000 ]; do echo line-$i; i=$((i+1)); done; echo end-$((4*4))")
        await term.lost
        self.assertIn(b"line-1999\r\nend-16", term.received)
        self.assertEqual(server.sessions, {})

    async def test_malformed_request_closes_and_is_counted(self) -> None:
        server = self.make()
        sid = uuid.uuid4()
        term = await self.connect(sid, "cat")
        session = await self.session(server, sid)
        term.transport.write(b'{"data": 5}')
        await term.lost
        self.assertEqual((server.malformed, server.bad_inits), (1, 0))
        # The session outlives the connection (it is detached, not ended).
        await wait_until(lambda: not session.connections, "the detach")
        self.assertFalse(session.is_ended)

    async def test_bad_init_closes_and_is_counted(self) -> None:
        server = self.make()
        term = await self.connect(uuid.uuid4(), raw=b"\x05\x00nope!")
        await term.lost
        self.assertEqual((server.bad_inits, server.malformed), (1, 0))
        self.assertEqual(server.sessions, {})
        self.assertEqual(term.received, b"")

    async def test_session_cap(self) -> None:
        server = self.make(max_sessions=1)
        first = await self.connect(uuid.uuid4(), "cat")
        await wait_until(lambda: server.sessions, "the first session")
        refused = await self.connect(uuid.uuid4(), "cat")
        await refused.lost
        self.assertIn(b"too many reconnecting PTY sessions (at most 1)", refused.received)
        self.assertEqual((server.refused, len(server.sessions)), (1, 1))
        self.assertFalse(first.closed)

    async def test_close_ends_every_session(self) -> None:
        server = self.make()
        a = await self.connect(uuid.uuid4(), "cat")
        b = await self.connect(uuid.uuid4(), "")
        await wait_until(lambda: len(server.sessions) == 2, "two sessions")
        sessions = list(server.sessions.values())
        await server.close()
        await a.lost
        await b.lost
        self.assertEqual(server.sessions, {})
        for s in sessions:
            self.assertRaises(ProcessLookupError, os.kill, s.pid, 0)
        refused = await self.connect(uuid.uuid4(), "cat")
        await refused.lost
        self.assertIn(b"the agent is stopping", refused.received)

    async def test_workspace_environment_and_directory(self) -> None:
        workdir = made_dir(self)
        env = SessionEnvironment("http://coder.example", base={"PATH": "/usr/bin:/bin", "CODER_AGENT_TOKEN": "secret"})
        env.update({"directory": workdir, "environment_variables": {"FROM_TEMPLATE": "tmpl-value"},
                    "workspace_name": "dev"})
        server = ReconnectingPTYServer(reactor, session_env=env, env={"PATH": "/usr/bin:/bin",
                                                                       "CODER_AGENT_TOKEN": "secret"},
                                       shell="/bin/sh")
        self.addCleanup(lambda: server.close())
        port = reactor.listenTCP(0, server, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.port = port.getHost().port
        term = await self.connect(uuid.uuid4(),
                                  'echo "t=$TERM w=$CODER_WORKSPACE_NAME v=$FROM_TEMPLATE s=${CODER_AGENT_TOKEN:-none}"; pwd')
        await term.lost
        self.assertIn(b"t=xterm-256color w=dev v=tmpl-value s=none", term.received)
        self.assertIn(os.path.realpath(workdir).encode(), term.received)

    async def test_a_slow_connection_pauses_the_pty(self) -> None:
        server = self.make()
        sid = uuid.uuid4()
        term = await self.connect(sid, "yes flood")
        session = await self.session(server, sid)
        await term.expect(b"flood")
        term.transport.pauseProducing()  # the client stops reading: the agent's send buffer fills
        await wait_until(lambda: not session._reading, "the PTY to be paused")
        (conn,) = session.connections
        # What waits in the agent for the client is about one send buffer and one PTY read.
        self.assertLess(len(conn.transport.dataBuffer) + sum(map(len, conn.transport._tempDataBuffer)),
                        256 * 1024)
        term.transport.resumeProducing()
        await wait_until(lambda: session._reading, "the PTY to be read again")
        seen = len(term.received)
        await wait_until(lambda: len(term.received) > seen + 100_000, "more output")

    async def test_a_large_replay_to_a_slow_connection_pauses_the_pty(self) -> None:
        server = self.make()
        sid = uuid.uuid4()
        first = await self.connect(sid, "cat")
        session = await self.session(server, sid)
        session.output(b"x" * 200_000)  # as if the process had printed it
        await self.hang_up(first, session)
        self.assertTrue(session._reading)
        # A transport that, as Twisted's do, pauses its producer when a write overfills it.
        transport = FillingTransport(limit=64 * 1024)
        proto = server.buildProtocol(None)
        proto.makeConnection(transport)
        proto.dataReceived(encode_init(sid, 24, 80, ""))
        self.assertEqual(transport.value(), b"x" * 200_000)
        self.assertFalse(session._reading)
        transport.producer.resumeProducing()
        self.assertTrue(session._reading)
        proto.connectionLost(None)

    async def test_a_child_ignoring_the_hangup_does_not_keep_the_session(self) -> None:
        server = self.make()
        sid = uuid.uuid4()
        # The shell ignores SIGHUP before it forks, so its child surely keeps the PTY open.
        term = await self.connect(sid, "trap '' HUP; sleep 100 & echo started-$((1+1))")
        await term.expect(b"started-2")
        session = await self.session(server, sid)
        await term.lost  # EXIT_GRACE (1 s) after the shell exited
        self.assertTrue(session.is_ended)
        self.assertNotIn(sid, server.sessions)

    async def test_after_the_exit_the_pty_is_closed_within_the_grace(self) -> None:
        clock = task.Clock()
        server = self.make(clock=clock)
        sid = uuid.uuid4()
        term = await self.connect(sid, "cat")
        session = await self.session(server, sid)
        session.exited()  # as if the process had exited with something still holding the PTY
        clock.advance(EXIT_GRACE - 0.1)
        self.assertFalse(session.is_ended)
        clock.advance(0.1)
        await term.lost
        await session.when_ended()
        self.assertNotIn(sid, server.sessions)


class ScrollbackTests(unittest.TestCase):
    def test_keeps_the_last_bytes(self) -> None:
        s = Scrollback(10)
        s.append(b"0123456")
        s.append(b"789abc")
        self.assertEqual(bytes(s), b"3456789abc")
        s.append(b"x" * 25)
        self.assertEqual(bytes(s), b"x" * 10)

    def test_never_starts_inside_a_character(self) -> None:
        s = Scrollback(4)
        s.append("a\u00e9\u20ac".encode())  # a, 2 bytes, 3 bytes: 6 bytes
        self.assertEqual(bytes(s), "\u20ac".encode())  # the cut fell inside e-acute: skipped
        s = Scrollback(4)
        s.append(b"\xff\x80\x80\x80\x80\x80")  # not UTF-8 at all: at most 3 bytes skipped
        self.assertEqual(len(s), 1)
