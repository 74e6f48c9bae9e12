"""The server's STUN side: one responder on every --stun-address port, all of them in the map."""

from __future__ import annotations

from twisted.internet import reactor
from twisted.trial import unittest

from coderstack.server.derpsetup import build_derp_map, start_stun
from coderstack.server.options import ServerOptions
from coderstack.stun.client import open_stun_client


def options(*argv: str) -> ServerOptions:
    opts = ServerOptions(environ={})
    opts.parseOptions(["--http-address", "127.0.0.1:0", "--data-dir", "unused", *argv])
    return opts


class EmbeddedSTUNTests(unittest.TestCase):
    async def test_default_answers_on_two_ports_and_the_map_names_both(self) -> None:
        cfg = options()
        ports = start_stun(cfg, reactor)
        for p in ports:
            self.addCleanup(p.stopListening)
        self.assertEqual(len(ports), 2)
        numbers = [p.getHost().port for p in ports]
        client = open_stun_client(reactor, v4_interface="127.0.0.1")
        self.addCleanup(client.close)
        for port in numbers:
            answer = await client.query(("127.0.0.1", port), timeout=5)
            self.assertEqual(answer.mapped, client.local_address())
        # One responder behind both: one set of counters (and one rate limit per source).
        self.assertIs(ports[0].protocol.responder, ports[1].protocol.responder)
        self.assertEqual(ports[0].protocol.counters.answered, 2)
        m = await build_derp_map(cfg, reactor, numbers)
        self.assertEqual([n.effective_stun_port for n in m.region(999).stun_nodes], numbers)

    async def test_one_address_one_port_and_disable_none(self) -> None:
        ports = start_stun(options("--stun-address", "127.0.0.1:0"), reactor)
        for p in ports:
            self.addCleanup(p.stopListening)
        self.assertEqual(len(ports), 1)
        self.assertEqual(start_stun(options("--stun-address", "disable"), reactor), [])

    def test_a_port_in_use_names_the_flag_and_closes_the_others(self) -> None:
        taken = start_stun(options("--stun-address", "127.0.0.1:0"), reactor)[0]
        self.addCleanup(taken.stopListening)
        busy = taken.getHost().port
        with self.assertRaises(RuntimeError) as cm:
            start_stun(options("--stun-address", f"127.0.0.1:0,127.0.0.1:{busy}"), reactor)
        self.assertIn(f"--stun-address 127.0.0.1:{busy}: cannot listen", str(cm.exception))
