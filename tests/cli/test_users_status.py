"""``coderstack users suspend|activate|delete`` against a real server in this process."""

from __future__ import annotations

import json

from tests.cli.test_cli import CLITestCase, one_line
from tests.support.inprocess import CLI


class UserStatusTests(CLITestCase):
    async def setUp(self) -> None:
        await super().setUp()
        await self.login_owner()
        code, _out, err = await self.cli("users", "create", "--username", "bob", "--email", "bob@example.com",
                                         "--password", "bobs password")
        self.assertEqual(code, 0, err)
        self.bob = CLI(self)
        code, _out, err = await self.bob("login", self.url, "--email", "bob", "--password", "bobs password")
        self.assertEqual(code, 0, err)

    async def status_of(self, name: str) -> str:
        code, out, err = await self.cli("users", "list", "--output", "json")
        self.assertEqual(code, 0, err)
        return next(u["status"] for u in json.loads(out) if u["username"] == name)

    async def test_suspend_and_activate(self) -> None:
        code, out, err = await self.cli("users", "suspend", "bob")
        self.assertEqual((code, out), (0, "User 'bob' is now suspended.\n"), err)
        self.assertEqual(await self.status_of("bob"), "suspended")
        code, out, err = await self.cli("users", "list")
        self.assertRegex(out, r"bob\s+bob@example.com\s+member\s+suspended")
        # Bob's session is dead and he cannot log in again.
        code, _out, err = await self.bob("list")
        self.assertEqual(code, 1)
        code, _out, err = await CLI(self)("login", self.url, "--email", "bob", "--password", "bobs password")
        self.assertEqual(code, 1)
        self.assertIn("suspended", err)
        code, out, err = await self.cli("users", "activate", "bob")
        self.assertEqual((code, out), (0, "User 'bob' is now active.\n"), err)
        code, _out, err = await CLI(self)("login", self.url, "--email", "bob", "--password", "bobs password")
        self.assertEqual(code, 0, err)

    async def test_delete(self) -> None:
        code, _out, err = await self.bob("create", "bobs")
        self.assertEqual(code, 0, err)
        code, _out, err = await self.cli("users", "delete", "bob")
        self.assertEqual(code, 1)
        self.assertTrue(one_line(err), err)
        self.assertIn("workspaces", err)
        code, _out, err = await self.bob("delete", "bobs", "--yes")
        self.assertEqual(code, 0, err)
        code, out, err = await self.cli("users", "delete", "bob")
        self.assertEqual((code, out), (0, "User 'bob' deleted.\n"), err)
        code, out, err = await self.cli("users", "list", "--output", "json")
        self.assertEqual([u["username"] for u in json.loads(out)], ["alice"])

    async def test_members_may_not_and_names_are_required(self) -> None:
        code, _out, err = await self.bob("users", "suspend", "alice")
        self.assertEqual(code, 1)
        self.assertIn("owner", err)
        code, _out, err = await self.cli("users", "suspend")
        self.assertEqual(code, 2)
        self.assertIn("USERNAME", err)
        code, _out, err = await self.cli("users", "suspend", "alice")
        self.assertEqual(code, 1)
        self.assertIn("yourself", err)
