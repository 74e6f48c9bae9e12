"""After the CLI's coordination websocket reopens, the DERP map is fetched again and applied when
the server's changed (``coderstack.tailnet.dial.refresh_derp_map``, from the dial's link handler)."""

from __future__ import annotations

from typing import Any
from uuid import UUID, uuid4

from twisted.internet import defer, task
from twisted.trial import unittest

from coderstack.backoff import Backoff
from coderstack.coordinator.client import CoordinationLink
from coderstack.tailnet.client import TailnetClient
from coderstack.tailnet.conn import Conn
from coderstack.tailnet.dial import (
    RECONNECT_FIRST,
    RECONNECT_MAX,
    _ServerCoordination,
    refresh_derp_map,
)
from coderstack.wire.coordination import CoordinateRequest
from tests.coordinator.test_link import FakeSocket


def region(rid: int, name: str, host: str = "198.51.100.7", embedded: bool = False) -> dict[str, Any]:
    return {"RegionID": rid, "RegionCode": name, "RegionName": name, "EmbeddedRelay": embedded,
            "Nodes": [{"Name": f"{rid}a", "RegionID": rid, "HostName": host, "DERPPort": 443,
                       "STUNPort": -1}]}


class FakeAPI:
    url = "https://coder.example.com"

    def __init__(self, derp_map: dict[str, Any]) -> None:
        self.derp_map = derp_map
        self.calls: list[str] = []
        self.fail: Exception | None = None

    async def connection_info(self, agent_id: str | None = None) -> dict[str, Any]:
        self.calls.append(agent_id or "")
        if self.fail is not None:
            raise self.fail
        return {"derp_map": self.derp_map}


class RefreshTests(unittest.TestCase):
    def setUp(self) -> None:
        self.clock = task.Clock()
        self.api = FakeAPI({"Regions": {"999": region(999, "coder", embedded=True)}})
        self.agent = uuid4()
        self.conn = Conn(self.clock, netcheck=False, derp_client_factory=lambda region, handler: _NoDERP())
        self.assertTrue(self.refresh())  # the Conn had no map yet

    def refresh(self) -> bool:
        return self.successResultOf(defer.ensureDeferred(refresh_derp_map(self.conn, self.api, self.agent)))

    def test_unchanged_map_is_left_alone(self) -> None:
        self.assertFalse(self.refresh())
        self.assertEqual(self.api.calls, [str(self.agent)] * 2)

    def test_changed_map_is_applied(self) -> None:
        self.api.derp_map = {"Regions": {"999": region(999, "coder", embedded=True), "7": region(7, "eu")}}
        self.assertTrue(self.refresh())
        self.assertEqual(sorted(self.conn.derp_map.regions), [7, 999])
        # The embedded region points at the URL we use, as at the first dial.
        self.assertEqual(self.conn.derp_map.regions[999].derp_nodes[0].host_name, "coder.example.com")
        self.assertFalse(self.refresh())

    def test_home_region_gone_moves_home(self) -> None:
        self.assertEqual(self.conn.preferred_derp, 999)
        self.api.derp_map = {"Regions": {"7": region(7, "eu")}}
        self.assertTrue(self.refresh())
        self.assertEqual(self.conn.preferred_derp, 7)

    def test_unusable_or_empty_map_keeps_the_old_one(self) -> None:
        before = self.conn.derp_map
        self.api.derp_map = {"Regions": {"7": {"RegionID": "not a number", "Nodes": "x"}}}
        self.assertFalse(self.refresh())
        self.api.derp_map = {}
        self.assertFalse(self.refresh())
        self.assertIs(self.conn.derp_map, before)


class _NoDERP:
    def start(self) -> None:
        pass

    def stop(self) -> defer.Deferred[None]:
        return defer.succeed(None)

    def note_preferred(self, preferred: bool) -> None:
        pass


class _Coordination(_ServerCoordination):
    """The dial's link handler with websockets that are fakes."""

    def __init__(self, api: FakeAPI, client: TailnetClient, agent: UUID) -> None:
        super().__init__(api, client, agent)  # type: ignore[arg-type]
        self.sockets: list[FakeSocket] = []

    async def open_socket(self) -> FakeSocket:  # type: ignore[override]
        self.sockets.append(FakeSocket())
        return self.sockets[-1]


class ReopenTests(unittest.TestCase):
    def test_map_fetched_after_each_reopen_and_errors_do_not_stop_the_link(self) -> None:
        clock = task.Clock()
        api = FakeAPI({"Regions": {"999": region(999, "coder", embedded=True)}})
        conn = Conn(clock, netcheck=False, derp_client_factory=lambda region, handler: _NoDERP())
        client = TailnetClient(clock, conn, link_monitor=False)
        agent = uuid4()
        client.add_tunnel(agent)
        handler = _Coordination(api, client, agent)
        link = CoordinationLink(clock, handler, Backoff(first=RECONNECT_FIRST, cap=RECONNECT_MAX, rng=lambda: 0.0))
        client.coordinate(link)
        self.successResultOf(defer.ensureDeferred(link.open()))
        self.assertEqual(api.calls, [])  # not on the first open: the dial just fetched the map
        self.assertEqual(handler.sockets[0].sent, [CoordinateRequest(add_tunnel=agent)])
        api.fail = ConnectionError("the server is still starting")
        handler.sockets[-1].closed.callback((1006, "server restarted"))
        clock.advance(RECONNECT_FIRST)
        self.assertEqual(api.calls, [str(agent)])  # after the second websocket opened (and failed)
        self.assertEqual(handler.sockets[1].sent, [CoordinateRequest(add_tunnel=agent)])
        api.fail = None
        api.derp_map = {"Regions": {"7": region(7, "eu")}}
        handler.sockets[-1].closed.callback((1006, "server restarted"))
        clock.advance(RECONNECT_FIRST)
        self.assertEqual(api.calls, [str(agent)] * 2)
        assert conn.derp_map is not None
        self.assertEqual(sorted(conn.derp_map.regions), [7])
        self.successResultOf(defer.ensureDeferred(client.close()))
        self.assertTrue(handler.sockets[-1].left)
