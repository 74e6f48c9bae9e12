"""``coderstack port-share`` and ``coderstack open app`` against a real in-process server."""

from __future__ import annotations

import json

from tests.cli.test_cli import CLITestCase


class PortShareTests(CLITestCase):
    async def test_add_list_remove(self) -> None:
        await self.login_owner()
        await self.create("box")
        code, out, err = await self.cli("port-share", "add", "box", "8080", "--share-level", "public")
        self.assertEqual(code, 0, err)
        self.assertIn("Port 8080 of box.main is shared: public.", out)
        code, out, err = await self.cli("port-share", "ls", "box", "--output", "json")
        self.assertEqual([(s["port"], s["share_level"], s["protocol"]) for s in json.loads(out)],
                         [(8080, "public", "http")])
        code, out, err = await self.cli("port-share", "rm", "box", "8080")
        self.assertEqual(code, 0, err)
        code, out, err = await self.cli("port-share", "list", "box")
        self.assertEqual(out.split(), ["AGENT", "PORT", "SHARE", "PROTOCOL"])
        code, out, err = await self.cli("port-share", "rm", "box", "8080")
        self.assertEqual(code, 1)
        self.assertIn("not shared", err)

    async def test_usage_errors_name_the_argument(self) -> None:
        await self.login_owner()
        for argv, named in ((("port-share", "add", "box", "4"), "PORT"),
                            (("port-share", "add", "box", "http"), "PORT"),
                            (("port-share", "add", "box", "8080", "--share-level", "everyone"), "--share-level"),
                            (("port-share", "add", "box", "8080", "--protocol", "ftp"), "--protocol"),
                            (("port-share", "add", "box"), "PORT"),
                            (("open", "app", "box"), "")):
            code, _out, err = await self.cli(*argv)
            self.assertEqual(code, 2, (argv, err))
            self.assertIn(named, err, argv)

    async def test_open_app_says_why_there_is_no_url(self) -> None:
        await self.login_owner()
        await self.create("box")
        code, _out, err = await self.cli("open", "app", "box", "code")
        self.assertEqual(code, 1)
        self.assertIn("no app 'code'", err)
