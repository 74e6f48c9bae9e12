"""``coderstack replicas`` against a real server in this process, and its table."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from twisted.trial import unittest

from coderstack.cli.replicas import age, rows
from tests.cli.test_cli import OWNER
from tests.support.inprocess import CLI, start_server


class ReplicasCommandTests(unittest.TestCase):
    async def test_lists_this_replica_for_owners_only(self) -> None:
        server, url = await start_server(self)
        cli = CLI(self)
        code, out, err = await cli("login", url, *OWNER)
        self.assertEqual(code, 0, err)
        code, out, err = await cli("replicas", "-o", "json")
        self.assertEqual(code, 0, err)
        (r,) = json.loads(out)
        assert server.replicas is not None
        self.assertEqual(r["id"], str(server.replicas.replica_id))
        self.assertTrue(r["healthy"])
        self.assertEqual(r["relay_address"], "")  # SQLite: one replica, no mesh
        code, out, err = await cli("replicas")
        self.assertEqual(code, 0, err)
        header, line = out.strip().splitlines()
        self.assertEqual(header.split(), ["ID", "HOSTNAME", "REGION", "RELAY", "LATENCY", "AGE", "ERROR"])
        self.assertTrue(line.startswith(r["id"]))
        # A member is refused in one line.
        code, out, err = await cli("users", "create", "--username", "bob", "--email", "bob@example.com",
                                   "--password", "correct horse")
        self.assertEqual(code, 0, err)
        bob = CLI(self)
        code, out, err = await bob("login", url, "--email", "bob@example.com", "--password", "correct horse")
        self.assertEqual(code, 0, err)
        code, out, err = await bob("replicas")
        self.assertEqual(code, 1)
        self.assertIn("owner", err)

    def test_the_table_rows(self) -> None:
        now = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)
        got = rows([{"id": "r1", "hostname": "box", "region_id": 999, "relay_address": "http://10.0.0.5:3000",
                     "database_latency": 1234, "database_latency_ms": 1.234,
                     "created_at": "2026-01-01T09:00:00+00:00", "error": ""}], now)
        self.assertEqual(got, [["r1", "box", "999", "http://10.0.0.5:3000", "1.2ms", "3h", "-"]])
        self.assertEqual(age("2026-01-01T11:59:15", now), "45s")
