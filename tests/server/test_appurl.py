"""App addresses (path and subdomain), sharing levels, app keys and tickets."""

from __future__ import annotations

import uuid

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial import unittest

from coderstack.server import appshare
from coderstack.server.appkeys import APP_KEY_QUERY, VERIFIED_TICKETS, AppKeys, AppTicket
from coderstack.server.appurl import (
    AppTarget,
    AppURLError,
    WildcardHost,
    parse_path_app,
    parse_subdomain_label,
    path_app_url,
    subdomain_app_url,
)

names = st.from_regex(r"[a-z0-9][a-z0-9-]{0,12}", fullmatch=True).filter(lambda s: "--" not in s and not s.endswith("-"))


class PathAppTests(unittest.SynchronousTestCase):
    def test_forms(self) -> None:
        self.assertEqual(parse_path_app("/@bob/box/apps/code/x/y?z"),
                         (AppTarget("bob", "box", None, "code"), "/x/y?z"))
        self.assertEqual(parse_path_app("/%40bob/box.main/apps/code/"),
                         (AppTarget("bob", "box", "main", "code"), "/"))
        self.assertEqual(parse_path_app("/@bob/box/apps/code"), (AppTarget("bob", "box", None, "code"), None))
        self.assertIsNone(parse_path_app("/api/v2/users"))
        self.assertIsNone(parse_path_app("/@bob/box/terminal"))

    def test_refusals(self) -> None:
        for path in ("/@me/box/apps/code/", "/@bob/box/apps/8080/", "/@bob/b_x/apps/code/", "/@bo b/box/apps/c/"):
            with self.assertRaises(AppURLError, msg=path):
                parse_path_app(path)

    def test_url_round_trip(self) -> None:
        t = AppTarget("bob", "box", "main", "code")
        url = path_app_url("http://coder.example.com/", t)
        self.assertEqual(url, "http://coder.example.com/@bob/box.main/apps/code/")
        self.assertEqual(parse_path_app(url[len("http://coder.example.com"):]), (t, "/"))

    @given(st.text(max_size=80))
    def test_any_path_parses_or_is_refused(self, path: str) -> None:
        try:
            parse_path_app("/" + path)
        except AppURLError:
            pass


class SubdomainAppTests(unittest.SynchronousTestCase):
    def test_labels(self) -> None:
        self.assertEqual(parse_subdomain_label("code--main--box--bob"), AppTarget("bob", "box", "main", "code"))
        self.assertEqual(parse_subdomain_label("8080--main--box--bob"),
                         AppTarget("bob", "box", "main", None, 8080, False))
        self.assertEqual(parse_subdomain_label("8443s--main--box--bob"),
                         AppTarget("bob", "box", "main", None, 8443, True))
        self.assertEqual(parse_subdomain_label("extra---code--main--box--bob").slug, "code")
        for bad in ("code--main--box", "code----box--bob", "99999--main--box--bob", "a" * 64,
                    "co_de--main--box--bob"):
            with self.assertRaises(AppURLError, msg=bad):
                parse_subdomain_label(bad)

    def test_wildcard(self) -> None:
        w = WildcardHost.parse("*.apps.example.com", access_port=None)
        self.assertEqual(w, WildcardHost("apps.example.com", None))
        self.assertEqual(w.match("Code--main--box--bob.apps.example.com"), "code--main--box--bob")
        self.assertEqual(w.match("x.apps.example.com:443"), "x")
        self.assertIsNone(w.match("apps.example.com"))
        self.assertIsNone(w.match("a.b.apps.example.com"))
        self.assertIsNone(w.match("evil-apps.example.com"))
        self.assertIsNone(w.match("[::1]:80"))
        local = WildcardHost.parse("*.apps.localhost:3000")
        self.assertEqual(local.port, 3000)
        self.assertEqual(WildcardHost.parse("*.apps.localhost", access_port=8080).port, 8080)
        for bad in ("apps.example.com", "*.", "*.a*b", "*.x:notaport"):
            with self.assertRaises(ValueError, msg=bad):
                WildcardHost.parse(bad)

    @given(names, names, names, names)
    def test_subdomain_url_round_trip(self, slug: str, agent: str, ws: str, user: str) -> None:
        t = AppTarget(user, ws, agent, slug)
        if slug.isdigit() or (slug[:-1].isdigit() and slug.endswith("s")):
            return  # a port, tested above
        w = WildcardHost("apps.localhost", 3000)
        url = subdomain_app_url("http", w, t)
        host = url.split("/")[2]
        label = w.match(host)
        assert label is not None
        if len(label) <= 63:
            self.assertEqual(parse_subdomain_label(label), t)

    @given(st.text(max_size=100))
    def test_any_label_parses_or_is_refused(self, label: str) -> None:
        try:
            parse_subdomain_label(label)
        except AppURLError:
            pass


class SharingTests(unittest.SynchronousTestCase):
    def test_matrix(self) -> None:
        owner, other = uuid.uuid4(), uuid.uuid4()
        cases = {("owner", owner): True, ("owner", other): False, ("owner", None): False,
                 ("authenticated", owner): True, ("authenticated", other): True,
                 ("authenticated", None): False,
                 ("public", owner): True, ("public", other): True, ("public", None): True}
        for (level, viewer), allowed in cases.items():
            self.assertEqual(appshare.may_open(appshare.parse_level(level), viewer_id=viewer,
                                               workspace_owner_id=owner), allowed, (level, viewer))
        self.assertTrue(appshare.within("owner", "authenticated"))
        self.assertFalse(appshare.within("public", "authenticated"))
        with self.assertRaises(ValueError):
            appshare.parse_level("everyone")


class AppKeysTests(unittest.SynchronousTestCase):
    def setUp(self) -> None:
        self.keys = AppKeys(b"k" * 32)

    def test_seal_opens_only_on_its_host_and_in_time(self) -> None:
        sealed = self.keys.seal("tok-secret", "app--main--box--bob.apps.localhost:3000", now=100.0)
        self.assertNotIn("tok-secret", sealed)
        self.assertEqual(self.keys.open(sealed, "APP--main--box--bob.apps.localhost:3000", 110.0), "tok-secret")
        self.assertIsNone(self.keys.open(sealed, "other--main--box--bob.apps.localhost:3000", 110.0))
        self.assertIsNone(self.keys.open(sealed, "app--main--box--bob.apps.localhost:3000", 1000.0))
        self.assertIsNone(AppKeys(b"x" * 32).open(sealed, "app--main--box--bob.apps.localhost:3000", 110.0))

    def test_exchange_removes_the_key_and_keeps_the_rest(self) -> None:
        sealed = self.keys.seal("t", "h", 0.0)
        self.assertEqual(self.keys.exchange(f"a=1&{APP_KEY_QUERY}={sealed}&b=%20", "h", 1.0), ("t", "a=1&b=%20"))
        self.assertEqual(self.keys.exchange("a=1", "h", 1.0), (None, None))
        self.assertEqual(self.keys.exchange(f"{APP_KEY_QUERY}=garbage", "h", 1.0), (None, ""))

    def test_tickets(self) -> None:
        t = AppTicket("code--main--box--bob", str(uuid.uuid4()), "abc", str(uuid.uuid4()), 50.0)
        raw = self.keys.sign(t)
        self.assertEqual(self.keys.verify(raw, 10.0), t)
        self.assertIsNone(self.keys.verify(raw, 51.0))
        body, _, mac = raw.partition(".")
        self.assertIsNone(self.keys.verify(body[:-2] + "AA." + mac, 10.0))
        self.assertIsNone(AppKeys(b"y" * 32).verify(raw, 10.0))
        # Verified once, remembered: the second look still checks the expiry, and a tampered
        # copy is not taken for the remembered one.
        self.assertEqual(self.keys.verify(raw, 20.0), t)
        self.assertIsNone(self.keys.verify(raw, 51.0))
        self.assertIsNone(self.keys.verify(raw + "A", 20.0))
        # The memory is bounded.
        for i in range(VERIFIED_TICKETS + 10):
            self.keys.verify(self.keys.sign(AppTicket("a", "v", "s", str(i), 50.0)), 10.0)
        self.assertLessEqual(len(self.keys._verified), VERIFIED_TICKETS)
        self.assertEqual(self.keys.verify(raw, 10.0), t)

    @given(st.text(max_size=200))
    def test_garbage_never_opens(self, raw: str) -> None:
        self.assertIsNone(self.keys.open(raw, "h", 0.0))
        self.assertIsNone(self.keys.verify(raw, 0.0))
