"""Hostile input to the API in memory: login limits, users/first before hashing, names checked
whole, malformed bodies answered 4xx JSON (fuzzed), template push bounds."""

from __future__ import annotations

import base64
import json
import string
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import task
from twisted.trial import unittest

from coderstack.server import api as api_module
from coderstack.server import templatepush
from coderstack.server.api import valid_name
from coderstack.server.clientaddr import TrustedProxies, parse_origins
from coderstack.server.jsonhttp import APIError, field, parse_json_object
from coderstack.server.loginlimit import LoginLimiter, Policy
from coderstack.server.templatepush import PushRejected, parse_files
from tests.support.api import ACCESS_URL, Caller, make_deployment

NAME_CHARS = string.ascii_letters + string.digits + "-"

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def hostile_bodies() -> list[bytes]:
    """Bodies every JSON route must answer with a 4xx, never a 5xx."""
    return [
        b"[" * 100_000 + b"]" * 100_000,  # a nesting bomb
        b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
        b"\xff\xfe\x00garbage",
        b'{"username": "\\ud800", "email": "a@b", "password": "12345678"}',
        b'{"username": "box\\u0000", "email": "a@b", "password": "12345678"}',
        b'{"username": "boxa\\n", "email": "a@b", "password": "12345678"}',
        b'{"email": ["x"], "password": {"p": 1}}',
        b'{"email": "a@b\\u0000", "password": "12345678"}',
        b'{"name": 5, "transition": ["start"], "template_name": {"x": 1}}',
        b'{"name": "t", "files": {"main\\u0000.tf": "AAAA"}}',
        b'{"name": "t", "files": {"main.tf": 7}}',
        b'{"name": "t", "files": ["main.tf"]}',
        b'{"name": "t", "files": {"../main.tf": ""}}',
        b"1e999999",
        b'"just a string"',
        b"null",
        b"{}",
    ]


class PureParsingTests(unittest.SynchronousTestCase):
    """The parsing helpers either return or raise a 4xx APIError, whatever the input."""

    def assert_4xx(self, fn: Any, *args: Any) -> None:
        try:
            fn(*args)
        except (APIError, PushRejected) as err:
            self.assertTrue(400 <= err.code < 500, err.code)
            json.dumps({"message": err.message, "detail": err.detail})  # always serialisable

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v).encode()))
    def test_parse_json_object_never_escapes(self, body: bytes) -> None:
        self.assert_4xx(parse_json_object, body)

    @settings(max_examples=300, deadline=None)
    @given(st.dictionaries(st.text(max_size=10), json_values, max_size=5), st.text(max_size=10))
    def test_field_and_names_never_escape(self, body: dict, name: str) -> None:
        self.assert_4xx(field, body, name)
        value = body.get(name)
        if isinstance(value, str):
            self.assert_4xx(valid_name, value, "name")

    @settings(max_examples=300, deadline=None)
    @given(json_values | st.dictionaries(st.text(max_size=12), st.text(max_size=12) | json_values,
                                         min_size=1, max_size=5))
    def test_template_files_never_escape(self, raw: Any) -> None:
        self.assert_4xx(parse_files, raw)

    @given(st.text(NAME_CHARS, min_size=1, max_size=40), st.sampled_from(["\n", "\r\n", "\x00", " ", "\t", "é"]),
           st.booleans())
    def test_names_are_matched_whole(self, name: str, junk: str, before: bool) -> None:
        ok = len(name) <= 32 and not name.startswith("-") and not name.endswith("-")
        if ok:
            self.assertEqual(valid_name(name, "workspace name"), name)
        bad = junk + name if before else name + junk
        with self.assertRaises(APIError) as caught:
            valid_name(bad, "workspace name")
        self.assertEqual(caught.exception.code, 400)

    def test_template_bounds_name_the_limit(self) -> None:
        many = {f"f{i}.tf": "" for i in range(templatepush.MAX_FILES + 1)}
        with self.assertRaises(PushRejected) as caught:
            parse_files(many)
        self.assertEqual(caught.exception.code, 413)
        self.assertIn(str(templatepush.MAX_FILES), caught.exception.message)
        big = base64.b64encode(b"x" * (templatepush.MAX_TOTAL_BYTES // 2 + 10)).decode()
        with self.assertRaises(PushRejected) as caught:
            parse_files({"a.tf": big, "b.tf": big})
        self.assertEqual(caught.exception.code, 413)
        self.assertIn(str(templatepush.MAX_TOTAL_BYTES), caught.exception.message)
        self.assertEqual(parse_files({"main.tf": base64.b64encode(b"# ok").decode()}), {"main.tf": b"# ok"})
        for bad in ("main\x00.tf", "a\nb.tf", "", "x" * 300, "dir/main.tf", ".hidden.tf", "\ud800.tf"):
            with self.assertRaises(PushRejected) as caught:
                parse_files({bad: ""})
            self.assertEqual(caught.exception.code, 400, repr(bad))


class HostileAPITests(unittest.TestCase):
    async def setUpAPI(self) -> Caller:
        self.d, self.api = await make_deployment(self)
        self.clock = task.Clock()
        self.d.logins = LoginLimiter(self.clock)
        self.c = Caller(self.api)
        return self.c

    async def raw_login(self, email: str, password: str,
                        headers: dict[str, str] | None = None) -> tuple[int, dict, Any]:
        pump = task.LoopingCall(self.c.stub.flush)
        pump.start(0.001)
        try:
            resp = await self.c.stub.post(ACCESS_URL + "/api/v2/users/login", headers=headers,
                                          data=json.dumps({"email": email, "password": password}).encode())
            body = json.loads(await self.c.stub.content(resp))
        finally:
            pump.stop()
        return resp.code, body, resp.headers

    async def test_login_failures_are_rate_limited_with_retry_after(self) -> None:
        c = await self.setUpAPI()
        await c.owner()
        codes = []
        for i in range(13):  # ten free failures, the eleventh starts the delays
            code, body, headers = await self.raw_login(f"ghost{i}@example.com", "wrong password")
            codes.append(code)
        self.assertEqual(codes[:11], [401] * 11)
        self.assertEqual(codes[11:], [429, 429])
        self.assertEqual(set(body), {"message", "detail"})
        self.assertEqual(headers.getRawHeaders("Retry-After"), ["1"])
        self.clock.advance(1.0)
        code, _, _ = await self.raw_login("ghost@example.com", "wrong password")
        self.assertEqual(code, 401)
        code, _, headers = await self.raw_login("alice@example.com", "correct horse")
        self.assertEqual(code, 429)
        self.assertEqual(headers.getRawHeaders("Retry-After"), ["2"])
        self.clock.advance(2.0)
        code, body, _ = await self.raw_login("alice@example.com", "correct horse")
        self.assertEqual(code, 201, body)

    async def test_behind_a_trusted_proxy_the_forwarded_client_is_the_source(self) -> None:
        c = await self.setUpAPI()
        await c.owner()

        async def fail_from(xff: str, n: int = 1) -> list[int]:
            return [(await self.raw_login(f"ghost{i}@example.com", "wrong password",
                                          {"X-Forwarded-For": xff}))[0] for i in range(n)]

        # The in-memory requests come from 127.0.0.1: here, the load balancer.
        self.d.trusted_proxies = TrustedProxies(("X-Forwarded-For",), parse_origins("127.0.0.1/32"))
        self.assertEqual(await fail_from("203.0.113.9", 11), [401] * 11)
        self.assertEqual(await fail_from("203.0.113.9"), [429])
        # A spoofed prefix does not escape: the proxy appended the client's real address.
        self.assertEqual(await fail_from("198.51.100.1, 203.0.113.9"), [429])
        self.assertEqual(await fail_from("203.0.113.10"), [401])
        self.assertEqual((await self.raw_login("ghost@example.com", "wrong password"))[0], 401)
        # Without trusted origins the header is the client's own claim: one source for all.
        self.clock.advance(1000)
        self.d.trusted_proxies = TrustedProxies(("X-Forwarded-For",))
        self.assertEqual(await fail_from("203.0.113.9", 11), [401] * 11)
        self.assertEqual(await fail_from("203.0.113.10"), [429])

    async def test_email_and_username_count_as_one_account(self) -> None:
        c = await self.setUpAPI()
        await c.owner()
        # A fresh limiter (127.0.0.1 not trusted) that leaves the source generous: only the
        # account limit (5 free failures) can refuse here.
        self.d.logins = LoginLimiter(self.clock, source_policy=Policy(free=100, base=1, cap=1, forget=900))
        codes = []
        for i in range(7):
            login = "alice" if i % 2 else "alice@example.com"
            code, body, _ = await self.raw_login(login, "wrong password")
            codes.append(code)
        self.assertEqual(codes, [401] * 6 + [429])
        self.assertEqual(self.d.logins.debug()["accounts"], 1)

    async def test_first_user_is_checked_before_hashing(self) -> None:
        c = await self.setUpAPI()
        await c.owner()
        hashed = []
        real = self.d.hash_password
        self.d.hash_password = lambda pw: (hashed.append(pw), real(pw))[1]
        code, body = await c.call("POST", "/api/v2/users/first",
                                  {"username": "mallory", "email": "m@example.com", "password": "12345678"})
        self.assertEqual((code, hashed), (409, []))
        self.assertEqual(set(body), {"message", "detail"})

    async def test_a_full_hashing_queue_is_a_503_not_a_wait(self) -> None:
        c = await self.setUpAPI()
        token = await c.owner()
        self.d.passwords.pending = self.d.passwords.limit
        self.addCleanup(setattr, self.d.passwords, "pending", 0)
        code, body = await c.call("POST", "/api/v2/users", {"username": "bob", "email": "b@example.com",
                                                            "password": "12345678"}, token=token)
        self.assertEqual(code, 503, body)
        code, body = await c.call("POST", "/api/v2/users/login",
                                  {"email": "alice@example.com", "password": "correct horse"})
        self.assertEqual(code, 503, body)
        self.assertEqual(self.d.logins.debug()["in_flight"], 0)  # the refused check was not counted

    async def test_hostile_bodies_on_every_json_route_are_4xx_json(self) -> None:
        c = await self.setUpAPI()
        token = await c.owner()
        code, ws = await c.call("POST", "/api/v2/users/me/workspaces", {"name": "box"}, token=token)
        self.assertEqual(code, 201)
        self.api.builder = FakeBuilder()
        routes = ["/api/v2/users/first", "/api/v2/users/login", "/api/v2/users",
                  "/api/v2/users/me/workspaces", "/api/v2/templates",
                  f"/api/v2/workspaces/{ws['id']}/builds"]
        refused = 0
        for path in routes:
            for body in hostile_bodies():
                self.clock.advance(1000)  # keep the login limits out of the way
                code, got = await c.call("POST", path, raw=body, token=token)
                self.assertLess(code, 500, (path, body[:60], got))
                if code >= 400:
                    self.assertEqual(set(got), {"message", "detail"}, (path, body[:60]))
                    refused += 1
        # Only bodies that happen to be a valid workspace ("name": "t") got through.
        self.assertGreaterEqual(refused, len(routes) * len(hostile_bodies()) - 2)

    async def test_names_with_a_trailing_newline_are_refused(self) -> None:
        c = await self.setUpAPI()
        token = await c.owner()
        code, _ = await c.call("POST", "/api/v2/users/me/workspaces", {"name": "boxa"}, token=token)
        self.assertEqual(code, 201)
        code, body = await c.call("POST", "/api/v2/users/me/workspaces", {"name": "boxa\n"}, token=token)
        self.assertEqual(code, 400, body)
        code, listed = await c.call("GET", "/api/v2/workspaces", token=token)
        self.assertEqual([w["name"] for w in listed["workspaces"]], ["boxa"])

    async def test_an_unexpected_error_is_a_500_without_its_text(self) -> None:
        c = await self.setUpAPI()

        async def broken() -> int:
            raise RuntimeError("SELECT secret FROM api_keys")

        self.d.store.count_users = broken
        code, body = await c.call("GET", "/api/v2/users/first")
        self.assertEqual(code, 500)
        self.assertNotIn("SELECT", json.dumps(body))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    async def test_template_push_bounds_are_413_naming_the_limit(self) -> None:
        c = await self.setUpAPI()
        token = await c.owner()
        self.api.builder = FakeBuilder()
        files = {f"f{i}.tf": "" for i in range(templatepush.MAX_FILES + 1)}
        code, body = await c.call("POST", "/api/v2/templates", {"name": "t", "files": files}, token=token)
        self.assertEqual(code, 413, body)
        self.assertIn(f"at most {templatepush.MAX_FILES} files", body["message"])
        self.assertEqual(self.api.builder.validated, [])
        code, body = await c.call("POST", "/api/v2/templates",
                                  {"name": "t", "files": {"main.tf": base64.b64encode(b"#").decode()}},
                                  token=token)
        self.assertEqual(code, 201, body)
        self.assertEqual(self.api.builder.validated, [{"main.tf": b"#"}])


class FakeBuilder:
    """Accepts every template (terraform itself is exercised by tests/integration)."""

    def __init__(self) -> None:
        self.validated: list[dict[str, bytes]] = []

    async def validate(self, files: dict[str, bytes]) -> dict[str, bytes]:
        self.validated.append(dict(files))
        return dict(files)

    async def start(self, ws: Any, transition: str, user: Any) -> Any:
        raise AssertionError("no build expected")


assert api_module.MAX_TEMPLATE_BODY > templatepush.MAX_TOTAL_BYTES  # base64 of the largest push fits
