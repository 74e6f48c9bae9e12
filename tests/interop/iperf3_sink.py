"""A minimal iperf3 *server* (receive side, TCP) as a Twisted factory, so ``iperf3 -c`` from the
kernel can measure our netstack.  Facts about the protocol (iperf 3.x, control connection):

- every connection starts with the client's 37-byte cookie (36 characters + NUL); the first is
  the control connection, later ones carrying the same cookie are data streams;
- the server drives the control connection with one-byte states: PARAM_EXCHANGE 9,
  CREATE_STREAMS 10, TEST_START 1, TEST_RUNNING 2, EXCHANGE_RESULTS 13, DISPLAY_RESULTS 14;
  the client sends TEST_END 4 and IPERF_DONE 16;
- JSON messages are a 4-byte big-endian length followed by the JSON text: the client's
  parameters after PARAM_EXCHANGE; after EXCHANGE_RESULTS the client sends its results and the
  server answers with ``cpu_util_total``, ``cpu_util_user``, ``cpu_util_system``,
  ``sender_has_retransmits`` and ``streams`` (``id`` — 1 for the first stream, then 3, 4, ... —,
  ``bytes``, ``retransmits``, ``jitter``, ``errors``, ``packets``, ``start_time``, ``end_time``).
"""

from __future__ import annotations

import json
import struct

from twisted.internet import protocol

COOKIE = 37
PARAM_EXCHANGE, CREATE_STREAMS, TEST_START, TEST_RUNNING = 9, 10, 1, 2
TEST_END, EXCHANGE_RESULTS, DISPLAY_RESULTS, IPERF_DONE = 4, 13, 14, 16


class _Conn(protocol.Protocol):
    def connectionMade(self):
        self.buf = b""
        self.role = None
        self.state = "cookie"
        self.count = 0

    def dataReceived(self, data):
        if self.role == "data":
            self.count += len(data)
            return
        self.buf += data
        if self.role is None:
            if len(self.buf) < COOKIE:
                return
            cookie, self.buf = self.buf[:COOKIE], self.buf[COOKIE:]
            self.factory.cookie_seen(self, cookie)
            if self.role == "data":
                self.count += len(self.buf)
                self.buf = b""
                return
        self.control()

    def _json(self):
        if len(self.buf) < 4:
            return None
        (n,) = struct.unpack("!I", self.buf[:4])
        if len(self.buf) < 4 + n:
            return None
        obj = json.loads(self.buf[4 : 4 + n])
        self.buf = self.buf[4 + n :]
        return obj

    def send_state(self, s):
        self.transport.write(struct.pack("b", s))

    def control(self):
        f = self.factory
        while True:
            if self.state == "params":
                params = self._json()
                if params is None:
                    return
                f.params = params
                f.expected_streams = int(params.get("parallel", 1))
                self.state = "running"
                self.send_state(CREATE_STREAMS)
            elif self.state == "running":
                if not self.buf:
                    return
                s, self.buf = self.buf[0], self.buf[1:]
                if s == TEST_END:
                    f.end = f.clock.seconds()
                    self.state = "results"
                    self.send_state(EXCHANGE_RESULTS)
                elif s == IPERF_DONE:
                    self.transport.loseConnection()
                    return
            elif self.state == "results":
                client = self._json()
                if client is None:
                    return
                f.client_results = client
                elapsed = (f.end or f.clock.seconds()) - (f.start or f.clock.seconds())
                f.reported = f.received
                streams = [
                    {"id": sid, "bytes": c.count, "retransmits": -1, "jitter": 0, "errors": 0, "packets": 0,
                     "start_time": 0, "end_time": elapsed}
                    for sid, c in zip(f.stream_ids(), f.streams, strict=False)
                ]
                body = json.dumps({"cpu_util_total": 0, "cpu_util_user": 0, "cpu_util_system": 0,
                                   "sender_has_retransmits": 0, "streams": streams}).encode()
                self.transport.write(struct.pack("!I", len(body)) + body)
                self.send_state(DISPLAY_RESULTS)
                self.state = "running"
            else:
                return


class Iperf3SinkFactory(protocol.Factory):
    protocol = _Conn

    def __init__(self, clock):
        self.clock = clock
        self.cookie = None
        self.control_conn = None
        self.streams: list[_Conn] = []
        self.expected_streams = 1
        self.params = None
        self.client_results = None
        self.start = self.end = None
        self.reported = None

    def stream_ids(self):
        return [1, *range(3, 2 + len(self.streams))]

    def cookie_seen(self, conn, cookie):
        if self.control_conn is None:
            self.cookie = cookie
            self.control_conn = conn
            conn.role = "control"
            conn.state = "params"
            conn.send_state(PARAM_EXCHANGE)
        elif cookie == self.cookie:
            conn.role = "data"
            self.streams.append(conn)
            if len(self.streams) == self.expected_streams:
                self.start = self.clock.seconds()
                self.control_conn.send_state(TEST_START)
                self.control_conn.send_state(TEST_RUNNING)
        else:
            conn.transport.loseConnection()

    @property
    def received(self) -> int:
        return sum(c.count for c in self.streams)
