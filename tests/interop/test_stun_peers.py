"""STUN against real peers on 127.0.0.1: Debian's turnutils_stunclient (coturn) and ``stun``
(stun-client, an RFC 3489 client) against our server; our client against coturn's turnserver."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import tempfile

from twisted.internet import defer, reactor, utils
from twisted.trial import unittest

from coderstack.stun.client import open_stun_client
from coderstack.stun.server import listen_stun
from tests.support.processes import die_with_parent


def need(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:  # CI installs coturn and stun-client (.ci/run)
        raise unittest.SkipTest(f"{binary} is not installed")
    return path


def free_udp_port() -> int:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class PeersAgainstOurServer(unittest.TestCase):
    def setUp(self) -> None:
        self.port = listen_stun(reactor, "127.0.0.1", 0)
        self.addCleanup(self.port.stopListening)

    @defer.inlineCallbacks
    def test_turnutils_stunclient(self):
        exe = need("turnutils_stunclient")
        out, err, code = yield utils.getProcessOutputAndValue(
            exe, ["-p", str(self.port.getHost().port), "127.0.0.1"], env=os.environ)
        text = out.decode() + err.decode()
        self.assertEqual(code, 0, text)
        m = re.search(r"UDP reflexive addr: 127\.0\.0\.1:(\d+)", text)
        self.assertIsNotNone(m, text)
        self.assertGreater(self.port.protocol.counters.answered, 0)

    @defer.inlineCallbacks
    def test_stun_client_rfc3489(self):
        exe = need("stun")
        src = free_udp_port()
        out, err, _code = yield utils.getProcessOutputAndValue(
            exe, [f"127.0.0.1:{self.port.getHost().port}", "-v", "-p", str(src)], env=os.environ)
        text = out.decode(errors="replace") + err.decode(errors="replace")
        # Classic request (no cookie) answered with MAPPED-ADDRESS that it parses cleanly.
        self.assertIn(f"MappedAddress = 127.0.0.1:{src}", text)
        self.assertNotIn("problem parsing", text)
        self.assertIn("test I = 1", text)
        c = self.port.protocol.counters
        self.assertGreater(c.answered, 0)
        self.assertEqual(c.dropped_malformed, 0)


class OurClientAgainstCoturn(unittest.TestCase):
    def start_turnserver(self) -> int:
        exe = need("turnserver")
        tmp = tempfile.mkdtemp(prefix="csst-turn-")
        self.addCleanup(shutil.rmtree, tmp, True)
        port = free_udp_port()
        log = open(os.path.join(tmp, "log"), "w")
        self.addCleanup(log.close)
        proc = subprocess.Popen(
            [exe, "-n", "--stun-only", "-L", "127.0.0.1", "-p", str(port), "--no-cli",
             "--no-tls", "--no-dtls", "--no-tcp", "--log-file", "stdout", "--simple-log",
             "--pidfile", os.path.join(tmp, "pid"), "--userdb", os.path.join(tmp, "db.sqlite")],
            stdout=log, stderr=subprocess.STDOUT, cwd=tmp, preexec_fn=die_with_parent,
        )

        def stop() -> None:
            if proc.poll() is None:
                proc.terminate()  # by PID: Popen signals its own child only
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()

        self.addCleanup(stop)
        return port

    @defer.inlineCallbacks
    def test_our_client_learns_its_address_from_coturn(self):
        port = self.start_turnserver()
        s = open_stun_client(reactor, v4_interface="127.0.0.1")
        self.addCleanup(s.close)
        # The RFC schedule's retransmissions cover turnserver's start-up.
        r = yield s.query(("127.0.0.1", port), timeout=10)
        self.assertEqual(r.mapped, s.local_address())
        self.assertIn("Coturn", r.software)
        # Several transactions in parallel from the same socket: the same mapping each time.
        rs = yield defer.gatherResults([s.query(("127.0.0.1", port), timeout=5) for _ in range(5)])
        self.assertEqual({x.mapped for x in rs}, {s.local_address()})
