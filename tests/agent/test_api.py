"""Agent HTTP API (port 4): listening ports from /proc/net/tcp{,6} and the netcheck report."""

from __future__ import annotations

import json
import os
import shutil
import tempfile

from hypothesis import given
from hypothesis import strategies as st
from treq.testing import StubTreq
from twisted.internet import defer, protocol, reactor
from twisted.trial import unittest

from coderstack.agent.api import AgentAPI, listening_ports, parse_proc_net_tcp
from coderstack.netinfo import Interface
from tests.support.tempdirs import made_dir

TCP = """  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1001 1 0 100 0 0 10 0
   1: 00000000:0004 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1002 1 0 100 0 0 10 0
   2: 0100007F:1F90 0100007F:C350 01 00000000:00000000 00:00000000 00000000     0        0 1003 1 0 100 0 0 10 0
   3: garbage
"""
TCP6 = """  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000001000000:0BB8 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2001 1 0 100 0 0 10 0
   1: 00000000000000000000000001000000:1F90 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 2002 1 0 100 0 0 10 0
"""


class ProcParsingTests(unittest.TestCase):
    def test_parse_listen_only(self):
        self.assertEqual(parse_proc_net_tcp(TCP), [(8080, 1001), (4, 1002)])

    @given(st.text(max_size=300))
    def test_garbage_never_raises(self, text):
        parse_proc_net_tcp("header\n" + text)

    def test_listening_ports_filters_dedupes_sorts(self):
        d = tempfile.mkdtemp(prefix="usercmds-proc-")
        self.addCleanup(shutil.rmtree, d, True)
        os.mkdir(os.path.join(d, "net"))
        with open(os.path.join(d, "net", "tcp"), "w") as f:
            f.write(TCP)
        with open(os.path.join(d, "net", "tcp6"), "w") as f:
            f.write(TCP6)
        got = listening_ports(d, owners=lambda: {1001: "python3", 2001: "node"})
        self.assertEqual(got, [{"process_name": "node", "network": "tcp", "port": 3000},
                               {"process_name": "python3", "network": "tcp", "port": 8080}])

    def test_real_proc_sees_our_listener_with_its_name(self):
        port = reactor.listenTCP(0, protocol.Factory.forProtocol(protocol.Protocol), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        mine = [p for p in listening_ports() if p["port"] == port.getHost().port]
        self.assertEqual(len(mine), 1)
        with open("/proc/self/comm") as f:
            self.assertEqual(mine[0]["process_name"], f.read().strip())


class RouteTests(unittest.TestCase):
    def make(self, netcheck=None):
        async def default_netcheck():
            return {"UDP": True, "MappingVariesByDestIP": False, "PreferredDERP": 999}
        api = AgentAPI(netcheck or default_netcheck,
                       ports=lambda: [{"process_name": "x", "network": "tcp", "port": 3000}],
                       interfaces=lambda: [Interface("eth0", 1500, ("192.0.2.5/24",)),
                                           Interface("wg0", 1280, ("10.1.0.1/32",))])
        return StubTreq(api.resource())

    @defer.inlineCallbacks
    def test_listening_ports(self):
        treq = self.make()
        resp = yield treq.get("http://agent/api/v0/listening-ports")
        self.assertEqual(resp.code, 200)
        body = json.loads((yield resp.content()))
        self.assertEqual(body, {"ports": [{"process_name": "x", "network": "tcp", "port": 3000}]})

    @defer.inlineCallbacks
    def test_netcheck_report_shape(self):
        treq = self.make()
        resp = yield treq.get("http://agent/api/v0/netcheck")
        body = json.loads((yield resp.content()))
        self.assertEqual(resp.code, 200)
        self.assertEqual(body["netinfo"]["PreferredDERP"], 999)
        self.assertEqual(body["severity"], "warning")
        self.assertEqual(len(body["warnings"]), 1)
        self.assertIn("wg0 has MTU 1280", body["interfaces"]["warnings"][0]["message"])
        self.assertFalse(body["dismissed"])

    @defer.inlineCallbacks
    def test_netcheck_failure_and_unknown_route(self):
        async def broken():
            raise RuntimeError("no DERP map yet")
        treq = self.make(broken)
        resp = yield treq.get("http://agent/api/v0/netcheck")
        self.assertEqual(resp.code, 500)
        self.assertEqual(json.loads((yield resp.content())),
                         {"message": "Failed to run a network check.", "detail": "the agent logged the cause"})
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)  # the cause is in the log only
        resp = yield treq.get("http://agent/nope")
        self.assertEqual(resp.code, 404)
        self.assertEqual(json.loads((yield resp.content()))["message"], "Not found.")
        resp = yield treq.post("http://agent/api/v0/listening-ports")
        self.assertEqual(resp.code, 405)


class TunnelServicesTests(unittest.TestCase):
    def test_ports_and_one_ssh_factory(self):
        from coderstack.agent.service import AgentService, serve_standard_ports
        from coderstack.netstack.stack import ANY_PORT

        svc = AgentService(reactor, "http://127.0.0.1:3000", "token", made_dir(self))
        serve_standard_ports(svc, reactor, svc.key_dir)
        self.assertEqual(sorted(p for p in svc.services if p != ANY_PORT), [1, 2, 3, 4, 22])
        self.assertIn(ANY_PORT, svc.services)
        self.assertIs(svc.services[1], svc.services[22])
        self.assertIs(svc.services[2], svc.reconnecting_pty)
