"""Workspace apps on any replica: two replicas on one PostgreSQL behind HAProxy, the agent
coordinated by one of them, and a port app requested through the load balancer so that both
replicas' app proxies serve it — each through its own server tailnet, which reaches the agent
through the shared coordinator (and, relayed, through the DERP mesh)."""

from __future__ import annotations

import json
from typing import Any

import treq
from twisted.internet import reactor
from twisted.trial import unittest
from twisted.web import resource, server

from tests.support import replicas
from tests.support.replicas import ReplicaSet

WILDCARD = "apps.localhost"


class EchoApp(resource.Resource):
    """The workspace's app (on this machine's loopback, which the agent shares)."""

    isLeaf = True

    def render(self, request: Any) -> bytes:
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps({"path": request.uri.decode(),
                           "forwarded_host": (request.getHeader(b"x-forwarded-host") or b"").decode()}).encode()


class ReplicaAppTests(unittest.TestCase):
    timeout = 180

    def setUp(self) -> None:
        why = replicas.available()
        if why is not None:
            raise unittest.SkipTest(why)
        listening = reactor.listenTCP(0, server.Site(EchoApp()), interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        self.app_port = listening.getHost().port

    async def app_on_both_replicas(self, *server_args: str) -> list[dict[str, Any]]:
        """Six requests through the load balancer; each replica's server-tailnet path to the agent."""
        rs = ReplicaSet(self, 2, "--wildcard-access-url", f"*.{WILDCARD}", *server_args)
        await rs.start()
        alice = rs.replicas[0].user("alice")
        await alice.login_first("alice", url=rs.url)
        token = await alice.create("box")
        agent = rs.replicas[0].start_agent(token)  # coordinated by replica 0 only
        ws = await alice.wait_status("box", "connected", watch=[agent])
        host = f"{self.app_port}--{ws['agents'][0]['name']}--box--alice.{WILDCARD}"
        before = await rs.served()
        for i in range(6):
            resp = await treq.get(f"{rs.url}/hello/{i}?q=1", headers={
                "Host": host, "Coder-Session-Token": alice.session_token()}, persistent=False)
            body = await resp.text()
            self.assertEqual(resp.code, 200, body)
            self.assertEqual(json.loads(body)["path"], f"/hello/{i}?q=1")
        after = await rs.served()
        self.assertEqual([a - b for a, b in zip(after, before, strict=True)], [3, 3])  # round-robin
        paths = []
        for d in rs.replicas:
            resp = await treq.get(f"{d.url}/api/v2/debug/tailnet", persistent=False,
                                  headers={"Coder-Session-Token": alice.session_token()})
            agents = json.loads(await resp.text())["agents"]
            self.assertEqual([a["agent_id"] for a in agents], [ws["agents"][0]["id"]])
            paths.append(agents[0])
        return paths

    async def test_a_port_app_through_either_replica(self) -> None:
        for path in await self.app_on_both_replicas():
            self.assertTrue(path["reachable"], path)

    async def test_relayed_through_either_replica(self) -> None:
        for path in await self.app_on_both_replicas("--block-direct-connections", "true"):
            self.assertEqual((path["path"], path["derp_region"]), ("derp", 999), path)
