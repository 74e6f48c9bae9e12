"""This replica's relay address, and which replicas its DERP mesh dials."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from twisted.trial import unittest

from coderstack.server.replicamesh import (
    MeshFollower,
    RelayURLError,
    mesh_addresses,
    relay_address,
    same_url,
)
from coderstack.server.replicas import Replica

T = datetime(2026, 1, 1, tzinfo=UTC)


def replica(url: str, region: int = 999, rid: uuid.UUID | None = None) -> Replica:
    return Replica(rid or uuid.uuid4(), "h", region, url, "0.1.0", "", 1.0, T, T)


class RelayAddressTests(unittest.TestCase):
    def cfg(self, **kw: Any) -> dict[str, Any]:
        return {"access-url": "https://coder.example.com", "access-url-derived": False, **kw}

    def test_a_given_url_is_used(self) -> None:
        got = relay_address(self.cfg(**{"derp-server-relay-url": "http://10.0.0.5:3000"}), ("0.0.0.0", 3000))
        self.assertEqual((got.url, got.warning), ("http://10.0.0.5:3000", None))

    def test_the_access_url_is_refused_naming_the_flag(self) -> None:
        for same in ("https://coder.example.com", "https://CODER.example.com:443/", "https://coder.example.com/"):
            with self.assertRaises(RelayURLError) as caught:
                relay_address(self.cfg(**{"derp-server-relay-url": same}), None)
            self.assertIn("--derp-server-relay-url", str(caught.exception))
            self.assertIn("access URL", str(caught.exception))

    def test_derived_from_a_concrete_listen_address(self) -> None:
        self.assertEqual(relay_address(self.cfg(), ("127.0.0.1", 4123)).url, "http://127.0.0.1:4123")
        self.assertEqual(relay_address(self.cfg(), ("::1", 4123)).url, "http://[::1]:4123")

    def test_no_mesh_from_a_wildcard_or_missing_address(self) -> None:
        for listen in (("0.0.0.0", 3000), ("", 3000), ("::", 3000), None):
            got = relay_address(self.cfg(), listen)
            self.assertEqual(got.url, "")
            self.assertIn("--derp-server-relay-url", got.warning or "")

    def test_a_derived_address_equal_to_a_given_access_url_turns_the_mesh_off(self) -> None:
        cfg = self.cfg(**{"access-url": "http://127.0.0.1:3000"})
        got = relay_address(cfg, ("127.0.0.1", 3000))
        self.assertEqual(got.url, "")
        self.assertIn("access URL", got.warning or "")
        # An access URL that was itself derived from the listen address is this replica's own.
        cfg["access-url-derived"] = True
        self.assertEqual(relay_address(cfg, ("127.0.0.1", 3000)).url, "http://127.0.0.1:3000")

    def test_same_url(self) -> None:
        self.assertTrue(same_url("http://a:80", "HTTP://A/"))
        self.assertFalse(same_url("http://a:3000", "http://a:3001"))
        self.assertFalse(same_url("http://a", "https://a"))


class MeshAddressTests(unittest.TestCase):
    def test_other_replicas_of_this_region_only(self) -> None:
        me = uuid.uuid4()
        replicas = [replica("http://me:1", rid=me), replica("http://b:1"), replica("http://c:1", region=5),
                    replica(""), replica("https://coder.example.com"), replica("http://b:1")]
        self.assertEqual(mesh_addresses(replicas, me, 999, ["http://me:1", "https://coder.example.com"]),
                         ["http://b:1"])

    def test_the_follower_sets_the_mesh_addresses(self) -> None:
        class FakeMesh:
            def __init__(self) -> None:
                self.calls: list[list[str]] = []

            def set_addresses(self, urls: list[str]) -> None:
                self.calls.append(list(urls))

        mesh = FakeMesh()
        me = uuid.uuid4()
        follower = MeshFollower(mesh, me, 999, ["http://me:1"])  # type: ignore[arg-type]
        follower.replicas_changed([replica("http://me:1", rid=me), replica("http://b:1")])
        follower.replicas_changed([replica("http://me:1", rid=me)])
        follower.health_changed(False, "gone")
        self.assertEqual(mesh.calls, [["http://b:1"], []])
