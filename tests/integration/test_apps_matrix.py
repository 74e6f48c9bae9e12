"""Workspace apps through the server, against a real agent process: who may open what.

A real server in the test process (so the test can give the workspace its apps directly, as a
build would), a real agent under ``twistd`` connected to it, and a plain HTTP app on this
machine's loopback (the workspace's, for the agent). Bob owns workspace ``box``; Carol is
another member; Alice is the site owner (the first user); and anonymous visitors.

The matrix: viewer × sharing level (owner / authenticated / public) × path-based and subdomain
apps, with the session as a cookie and as a header. Then: what reaches the app (coderstack's
cookies and token header stripped, X-Forwarded-* set), port sharing on subdomains, the auth
redirect turning a session into an app cookie, and the agent going away (the 502 page).
"""

from __future__ import annotations

import json
import os
import uuid
from typing import Any
from urllib.parse import parse_qs, urlsplit

import treq
from twisted.internet import reactor
from twisted.trial import unittest
from twisted.web import resource, server

from coderstack.server import auth
from coderstack.server.clientaddr import TrustedProxies, parse_origins
from coderstack.server.records import AgentRecord
from tests.support.inprocess import CLI, start_server
from tests.support.processes import TWISTD, Process, base_env
from tests.support.tempdirs import made_dir
from tests.support.waiting import wait_until

WILDCARD = "apps.localhost"


class EchoApp(resource.Resource):
    """The workspace's app: answers with what it was sent."""

    isLeaf = True

    def render(self, request: Any) -> bytes:
        request.setHeader(b"Content-Type", b"application/json")
        return json.dumps({
            "path": request.uri.decode(),
            "headers": {k.decode().lower(): v[0].decode() for k, v in request.requestHeaders.getAllRawHeaders()},
        }).encode()


def app_spec(slug: str, port: int, share: str, subdomain: bool) -> dict[str, Any]:
    return {"id": str(uuid.uuid4()), "slug": slug, "display_name": slug, "url": f"http://localhost:{port}",
            "command": "", "external": False, "subdomain": subdomain, "sharing_level": share,
            "hidden": False, "order": 0, "group": "", "open_in": "slim-window", "icon": "", "tooltip": "",
            "healthcheck": None}


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class AppsMatrixTests(unittest.TestCase):
    timeout = 180

    async def setUp(self) -> None:
        self.svc, self.url = await start_server(self, "--wildcard-access-url", f"*.{WILDCARD}")
        self.port = urlsplit(self.url).port
        site = server.Site(EchoApp())
        listening = reactor.listenTCP(0, site, interface="127.0.0.1")
        self.addCleanup(listening.stopListening)
        self.app_port = listening.getHost().port

        self.tokens: dict[str, str] = {}
        admin = CLI(self)
        code, _out, err = await admin("login", self.url, "--first-user-username", "alice",
                                      "--first-user-email", "alice@example.com",
                                      "--first-user-password", "alice password")
        self.assertEqual(code, 0, err)
        self.tokens["alice"] = admin.read_config("session") or ""
        self.cli: dict[str, CLI] = {}
        for name in ("bob", "carol"):
            code, _out, err = await admin("users", "create", "--username", name, "--email",
                                          f"{name}@example.com", "--password", f"{name} password")
            self.assertEqual(code, 0, err)
            cli = self.cli[name] = CLI(self)
            code, _out, err = await cli("login", self.url, "--email", f"{name}@example.com",
                                        "--password", f"{name} password")
            self.assertEqual(code, 0, err)
            self.tokens[name] = cli.read_config("session") or ""
        code, out, err = await self.cli["bob"]("create", "box")
        self.assertEqual(code, 0, err)
        agent_token = next(w.split("=", 1)[1] for w in out.split() if w.startswith("CODER_AGENT_TOKEN="))

        store = self.svc.store
        assert store is not None
        bob = (await store.user_by_login("bob"))[0]
        ws = await store.workspace_by_name(bob.id, "box")
        agent = ws.agents[0]
        self.agent_name = agent.name
        apps = [app_spec(f"{level}-{kind}", self.app_port, level, kind == "sub")
                for level in ("owner", "authenticated", "public") for kind in ("path", "sub")]
        # Two apps nothing listens for: one plain, one whose healthcheck fails.
        closed = closed_port()
        apps.append(app_spec("down", closed, "owner", False))
        sick = app_spec("sick", closed, "owner", False)
        sick["healthcheck"] = {"url": f"http://127.0.0.1:{closed}/", "interval": 1, "threshold": 1}
        apps.append(sick)
        spec = {"apps": apps}
        await store.sync_agents(ws.id, [AgentRecord(
            id=agent.id, name=agent.name, token_hash=auth.hash_agent_token(agent_token), os="linux",
            arch="amd64", directory="", access_url=self.url, spec=spec)])

        home = made_dir(self)
        self.agent = Process(self, "agent", [TWISTD, "-n", "--pidfile=", "coderstack-agent", "--data-dir",
                                             os.path.join(home, "data")],
                             base_env(home, CODER_AGENT_URL=self.url, CODER_AGENT_TOKEN=agent_token), home)
        deployment = self.svc.deployment
        assert deployment is not None
        await wait_until(lambda: deployment.agent_status(agent)[0] == "connected" or self.agent.check_running(),
                         "the agent to connect", timeout=60, interval=0.1)
        self.deployment, self.agent_record = deployment, agent

    # -- requests --------------------------------------------------------------------------

    async def get(self, path: str, *, host: str | None = None, token: str | None = None,
                  as_cookie: str | None = None, method: str = "GET", headers: dict[str, str] | None = None,
                  ) -> tuple[int, bytes, Any]:
        h = {"Host": host or f"127.0.0.1:{self.port}", **(headers or {})}
        if token is not None:
            if as_cookie:
                h["Cookie"] = f"{as_cookie}={token}; other=kept"
            else:
                h["Coder-Session-Token"] = token
        resp = await treq.request(method, f"http://127.0.0.1:{self.port}{path}", headers=h,
                                  allow_redirects=False, persistent=False)
        return resp.code, await resp.content(), resp.headers

    def sub_host(self, slug: str) -> str:
        return f"{slug}--{self.agent_name}--box--bob.{WILDCARD}:{self.port}"

    # -- the matrix ------------------------------------------------------------------------

    async def test_who_opens_what(self) -> None:
        allowed = {
            "owner": {"bob"},
            "authenticated": {"bob", "carol", "alice"},
            "public": {"bob", "carol", "alice", None},
        }
        for level, may in allowed.items():
            for viewer in ("bob", "carol", "alice", None):
                token = self.tokens[viewer] if viewer else None
                for cookie in (False, True):
                    if viewer is None and cookie:
                        continue
                    what = f"{level} app, viewer {viewer}, {'cookie' if cookie else 'header'}"
                    code, body, headers = await self.get(
                        f"/@bob/box/apps/{level}-path/x?y=1", token=token,
                        as_cookie="coder_session_token" if cookie else None)
                    if viewer in may:
                        self.assertEqual(code, 200, f"path {what}: {body[:300]!r}")
                        self.assertEqual(json.loads(body)["path"], "/x?y=1", what)
                    elif viewer is None:
                        self.assertEqual(code, 401, f"path {what}")
                        self.assertIn(b"Log in", body)
                        # A browser navigating there goes to the login form, and back after.
                        code, _, headers = await self.get(f"/@bob/box/apps/{level}-path/x?y=1",
                                                          headers={"Accept": "text/html"})
                        self.assertEqual((code, headers.getRawHeaders("location")),
                                         (303, [f"/login?next=/%40bob/box/apps/{level}-path/x%3Fy%3D1"]), what)
                    else:
                        self.assertIn(code, (403, 404), f"path {what}")
                    code, body, headers = await self.get(
                        "/x", host=self.sub_host(f"{level}-sub"), token=token,
                        as_cookie="coder_subdomain_app_session_token" if cookie else None)
                    if viewer in may:
                        self.assertEqual(code, 200, f"subdomain {what}: {body[:300]!r}")
                    elif viewer is None:
                        self.assertEqual(code, 307, f"subdomain {what}")
                        location = headers.getRawHeaders("location")[0]
                        self.assertTrue(location.startswith(f"{self.url}/api/v2/applications/auth-redirect?"),
                                        location)
                    else:
                        self.assertIn(code, (403, 404), f"subdomain {what}")

    async def test_what_reaches_the_app(self) -> None:
        code, body, _ = await self.get("/@bob/box/apps/owner-path/", token=self.tokens["bob"],
                                       as_cookie="coder_session_token")
        self.assertEqual(code, 200, body)
        seen = json.loads(body)["headers"]
        self.assertNotIn("coder-session-token", seen)
        self.assertEqual(seen.get("cookie"), "other=kept")  # ours stripped, the app's own kept
        self.assertEqual(seen["x-forwarded-for"], "127.0.0.1")
        self.assertEqual(seen["x-forwarded-proto"], "http")
        self.assertEqual(seen["x-forwarded-host"], f"127.0.0.1:{self.port}")
        # A path app without its trailing slash is redirected to it, query kept.
        code, _body, headers = await self.get("/@bob/box/apps/owner-path?q=1", token=self.tokens["bob"])
        self.assertEqual(code, 307)
        self.assertEqual(headers.getRawHeaders("location")[0], "/@bob/box/apps/owner-path/?q=1")
        # A cookie-authenticated state change from another site is refused before the app.
        code, body, _ = await self.get("/@bob/box/apps/owner-path/", token=self.tokens["bob"],
                                       as_cookie="coder_session_token", method="POST",
                                       headers={"Origin": "http://evil.example"})
        self.assertEqual(code, 403, body)
        code, _body, _ = await self.get("/@bob/box/apps/owner-path/", token=self.tokens["bob"],
                                        as_cookie="coder_session_token", method="POST",
                                        headers={"Origin": self.url})
        self.assertEqual(code, 200)

    async def test_the_app_sees_the_client_behind_a_trusted_proxy(self) -> None:
        async def forwarded_for(sent: str) -> str:
            code, body, _ = await self.get("/@bob/box/apps/owner-path/", token=self.tokens["bob"],
                                           headers={"X-Forwarded-For": sent})
            self.assertEqual(code, 200, body)
            return str(json.loads(body)["headers"]["x-forwarded-for"])

        # Not a trusted origin: what the client sent is its own claim, and goes.
        self.assertEqual(await forwarded_for("203.0.113.9"), "127.0.0.1")
        # This test is the load balancer (127.0.0.1), which appended the client it saw: the app
        # gets the client first, then the proxy; the spoofed entry before it goes.
        self.deployment.trusted_proxies = TrustedProxies(("X-Forwarded-For",), parse_origins("127.0.0.1/32"))
        self.assertEqual(await forwarded_for("198.51.100.1, 203.0.113.9"), "203.0.113.9, 127.0.0.1")
        self.assertEqual(await forwarded_for("unknown"), "127.0.0.1")

    async def test_shared_port_on_a_subdomain(self) -> None:
        host = self.sub_host(str(self.app_port))
        code, _body, _ = await self.get("/", host=host, token=self.tokens["bob"])
        self.assertEqual(code, 200)  # the owner opens any port of their workspace
        code, _body, _ = await self.get("/", host=host, token=self.tokens["carol"])
        self.assertIn(code, (403, 404))
        code, out, err = await self.cli["bob"]("port-share", "add", "box", str(self.app_port),
                                                "--share-level", "authenticated")
        self.assertEqual(code, 0, err)
        code, body, _ = await self.get("/", host=host, token=self.tokens["carol"])
        self.assertEqual(code, 200, body)
        code, _body, _ = await self.get("/", host=host)
        self.assertEqual(code, 307)  # not public: anonymous visitors are sent to log in
        code, _body, _ = await self.get("/", host=self.sub_host("4"), token=self.tokens["bob"])
        self.assertEqual(code, 404)  # the agent's own ports are never apps

    async def test_auth_redirect_sets_the_app_cookie(self) -> None:
        host = self.sub_host("owner-sub")
        code, _body, headers = await self.get("/page?a=b", host=host)
        self.assertEqual(code, 307)
        redirect = headers.getRawHeaders("location")[0]
        path = redirect[len(self.url):]
        code, body, headers = await self.get(path, token=self.tokens["bob"], as_cookie="coder_session_token")
        self.assertEqual(code, 307, body)
        back = urlsplit(headers.getRawHeaders("location")[0])
        self.assertEqual(back.netloc, host)
        self.assertIn("coder_application_connect_api_key_35e783", parse_qs(back.query))
        code, body, headers = await self.get(f"{back.path}?{back.query}", host=host)
        self.assertEqual(code, 303, body)
        self.assertEqual(headers.getRawHeaders("location")[0], f"http://{host}/page?a=b")
        cookie = headers.getRawHeaders("set-cookie")[0]
        self.assertIn("HttpOnly", cookie)
        name, _, value = cookie.split(";")[0].partition("=")
        self.assertEqual(name, "coder_subdomain_app_session_token")
        code, body, _ = await self.get("/page?a=b", host=host, token=value,
                                       as_cookie="coder_subdomain_app_session_token")
        self.assertEqual(code, 200, body)
        # Carol, logged in, cannot use the redirect to get into Bob's owner-level app.
        code, _body, headers = await self.get(path, token=self.tokens["carol"], as_cookie="coder_session_token")
        carol_back = urlsplit(headers.getRawHeaders("location")[0])
        code, _body, headers = await self.get(f"{carol_back.path}?{carol_back.query}", host=host)
        value = headers.getRawHeaders("set-cookie")[0].split(";")[0].partition("=")[2]
        code, _body, _ = await self.get("/page", host=host, token=value,
                                        as_cookie="coder_subdomain_app_session_token")
        self.assertIn(code, (403, 404))

    async def test_app_down_and_unhealthy_give_their_pages(self) -> None:
        token = self.tokens["bob"]
        code, body, headers = await self.get("/@bob/box/apps/down/", token=token)
        self.assertEqual(code, 502, body)
        self.assertIn(b"not responding", body)
        self.assertTrue(headers.getRawHeaders("content-type")[0].startswith("text/html"))
        self.assertNotIn(b"Traceback", body)

        async def unhealthy() -> bool:
            code, body, _ = await self.get("/@bob/box/apps/sick/", token=token)
            return code == 503 and b"unhealthy" in body

        await wait_until(unhealthy, "the sick app's 503 page", timeout=30, interval=0.5)

    async def test_agent_gone_gives_the_502_page(self) -> None:
        await self.agent.stop()
        await wait_until(lambda: self.deployment.agent_status(self.agent_record)[0] != "connected",
                         "the agent to leave", timeout=60, interval=0.1)
        code, body, headers = await self.get("/@bob/box/apps/public-path/")
        self.assertEqual(code, 502)
        self.assertIn(b"not connected", body)
        self.assertTrue(headers.getRawHeaders("content-type")[0].startswith("text/html"))
        self.assertNotIn(b"Traceback", body)

    async def test_app_ticket_is_bound_to_its_session_and_app(self) -> None:
        code, _body, headers = await self.get("/@bob/box/apps/owner-path/", token=self.tokens["bob"])
        self.assertEqual(code, 200)
        cookie = next(c for c in headers.getRawHeaders("set-cookie") if c.startswith("coder_signed_app_token="))
        self.assertIn("Path=/@bob/box/apps/owner-path/", cookie)
        self.assertIn("HttpOnly", cookie)
        ticket = cookie.split(";")[0]
        # With Bob's session the ticket is honoured, and it never reaches the app.
        code, body, _ = await self.get("/@bob/box/apps/owner-path/", token=self.tokens["bob"],
                                       headers={"Cookie": ticket})
        self.assertEqual(code, 200)
        self.assertNotIn("coder_signed_app_token", json.loads(body)["headers"].get("cookie", ""))
        # Carol presenting Bob's ticket, or nobody presenting it, is checked afresh and refused.
        code, _body, _ = await self.get("/@bob/box/apps/owner-path/", token=self.tokens["carol"],
                                        headers={"Cookie": ticket})
        self.assertEqual(code, 404)
        code, _body, _ = await self.get("/@bob/box/apps/owner-path/", headers={"Cookie": ticket})
        self.assertEqual(code, 401)
        # Nor does it open another app of Bob's.
        code, _body, _ = await self.get("/@bob/box/apps/authenticated-path/", token=self.tokens["carol"],
                                        headers={"Cookie": ticket})
        self.assertEqual(code, 200)  # shared with Carol anyway: checked on its own terms
