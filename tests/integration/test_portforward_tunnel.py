"""``coderstack port-forward`` through the real tunnel: curl to an HTTP server in the workspace
(5 MiB byte-exact) and a UDP echo, direct and relayed with ``--disable-direct-connections``.

The workspace "machine" is this host: services listen on 127.0.0.1 in the test process, and the
agent (a separate process) reaches them on its loopback, as Coder's agent does.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import sys

from twisted.internet import endpoints, protocol, reactor, utils
from twisted.trial import unittest
from twisted.web.server import Site
from twisted.web.static import File

from tests.integration.tunnel_support import relayed_bytes, user_env, workspace
from tests.support.echo import UDPClient, UDPEcho
from tests.support.processes import Process, free_port
from tests.support.waiting import wait_until

CURL = shutil.which("curl")
BODY_SIZE = 5 << 20


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]




class _Closed(protocol.Protocol):
    """A workspace service that notes when its connections end."""

    def connectionLost(self, reason: object = None) -> None:
        self.factory.lost.append(True)


class PortForwardThroughTunnelTests(unittest.TestCase):
    timeout = 120

    def setUp(self) -> None:
        if CURL is None:
            raise unittest.SkipTest("curl is not installed (.ci/run must install it)")

    def serve_workspace(self, directory: str) -> tuple[int, int, bytes]:
        """An HTTP static file server and a UDP echo on 127.0.0.1 "in the workspace"."""
        body = os.urandom(BODY_SIZE)
        with open(os.path.join(directory, "blob.bin"), "wb") as f:
            f.write(body)
        http = reactor.listenTCP(0, Site(File(directory)), interface="127.0.0.1")
        self.addCleanup(http.stopListening)
        echo = reactor.listenUDP(0, UDPEcho(), interface="127.0.0.1")
        self.addCleanup(echo.stopListening)
        return http.getHost().port, echo.getHost().port, body

    async def forward_and_check(self, *global_flags: str) -> None:
        d, alice, _agent = await workspace(self)
        web_dir = os.path.join(d.dir, "www")
        os.makedirs(web_dir)
        http_port, udp_port, body = self.serve_workspace(web_dir)
        closing_factory = protocol.Factory.forProtocol(_Closed)
        closing_factory.lost = []
        closing = reactor.listenTCP(0, closing_factory, interface="127.0.0.1")
        self.addCleanup(closing.stopListening)
        local_tcp, local_udp, local_closing = free_port(), free_udp_port(), free_port()
        argv = [sys.executable, "-m", "coderstack", *global_flags, "port-forward", "box",
                "--tcp", f"127.0.0.1:{local_tcp}:{http_port}", "--udp", f"127.0.0.1:{local_udp}:{udp_port}",
                "--tcp", f"127.0.0.1:{local_closing}:{closing.getHost().port}"]
        fwd = Process(self, "port-forward", argv, user_env(d, alice), alice.home)
        log = await fwd.output_shows("Ready!")
        self.assertIn(f"Forwarding 'tcp://127.0.0.1:{local_tcp}' locally to "
                      f"'tcp://127.0.0.1:{http_port}' in the workspace", log)
        self.assertIn(f"Forwarding 'udp://127.0.0.1:{local_udp}' locally to "
                      f"'udp://127.0.0.1:{udp_port}' in the workspace", log)

        relayed = await relayed_bytes(d, alice)
        out_path = os.path.join(alice.home, "fetched.bin")
        out, err, code = await utils.getProcessOutputAndValue(
            CURL, ["-sS", "--fail", "-o", out_path, f"http://127.0.0.1:{local_tcp}/blob.bin"], env=dict(os.environ))
        self.assertEqual(code, 0, err.decode())
        with open(out_path, "rb") as f:
            self.assertEqual(hashlib.sha256(f.read()).hexdigest(), hashlib.sha256(body).hexdigest())
        carried = await relayed_bytes(d, alice) - relayed
        if global_flags:
            self.assertGreater(carried, BODY_SIZE)
        else:  # direct: at most the first packets went through DERP too
            self.assertLess(carried, BODY_SIZE)

        # A client that goes away: its connection to the workspace service ends too (through
        # both netstacks, where each side of the forward is the other's push producer).
        client = await endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", local_closing).connect(
            protocol.Factory.forProtocol(protocol.Protocol))
        client.transport.write(b"bye")
        client.transport.loseConnection()
        await wait_until(lambda: closing_factory.lost, "the workspace side of the closed connection to end",
                         interval=0.05)

        # UDP: datagrams of several sizes, each answered through the same flow.
        udp_client = UDPClient()
        sock = reactor.listenUDP(0, udp_client, interface="127.0.0.1")
        self.addCleanup(sock.stopListening)
        sent = [b"ping %d " % i + os.urandom(size) for i, size in enumerate((0, 1, 100, 1000, 1100))]

        def all_answered() -> bool:
            # UDP may drop: resend what is still unanswered.
            udp_client.received = list(dict.fromkeys(udp_client.received))
            unanswered = [dg for dg in sent if b"echo:" + dg not in udp_client.received]
            for datagram in unanswered:
                sock.write(datagram, ("127.0.0.1", local_udp))
            return not unanswered

        await wait_until(all_answered, "an echo of every datagram", interval=0.2)
        self.assertEqual(sorted(udp_client.received), sorted(b"echo:" + dg for dg in sent))

    async def test_http_and_udp_direct(self) -> None:
        await self.forward_and_check()

    async def test_http_and_udp_relayed(self) -> None:
        await self.forward_and_check("--disable-direct-connections")
