"""A client for the coderstack server, used by the CLI and the agent.

HTTP goes through treq; websockets through Autobahn over a Twisted client endpoint (TLS when the
URL is https). A private CA is trusted when ``SSL_CERT_FILE`` names a PEM bundle (the variable Go
programs, and so Coder's CLI and agent, honour). Every failure becomes one ``SDKError`` whose
``str()`` is a single line fit for a terminal.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode, urlsplit

import treq
from autobahn.twisted.websocket import WebSocketClientFactory
from twisted.internet import defer, endpoints, protocol, ssl
from twisted.internet.error import (
    ConnectError,
    ConnectionRefusedError,
    DNSLookupError,
    TimeoutError,
)
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.web.client import (
    Agent,
    BrowserLikePolicyForHTTPS,
    HTTPConnectionPool,
    ResponseDone,
    ResponseNeverReceived,
)
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent

from coderstack.twistedtypes import provides

SESSION_HEADER = "Coder-Session-Token"


class SDKError(Exception):
    def __init__(self, message: str, status: int | None = None, detail: str = "") -> None:
        super().__init__(message)
        self.message, self.status, self.detail = message, status, detail

    def __str__(self) -> str:
        if self.detail:
            return f"{self.message} ({self.detail})"
        return self.message


def trust_root_from_env(environ: dict[str, str] | None = None) -> Any:
    """The CA bundle named by SSL_CERT_FILE, or None for the platform's trust store."""
    env = os.environ if environ is None else environ
    path = env.get("SSL_CERT_FILE")
    if not path:
        return None
    with open(path, "rb") as f:
        pem = f.read()
    marker = b"-----BEGIN CERTIFICATE-----"
    certs = [ssl.Certificate.loadPEM(marker + c) for c in pem.split(marker)[1:]]
    if not certs:
        raise SDKError(f"SSL_CERT_FILE {path!r} holds no PEM certificate")
    return ssl.trustRootFromCertificates(certs)


class Client:
    def __init__(self, reactor: Any, url: str, token: str | None = None, trust_root: Any = None) -> None:
        self.reactor = reactor
        self.url = url.rstrip("/")
        self.token = token
        self.trust_root = trust_root if trust_root is not None else trust_root_from_env()
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool.maxPersistentPerHost = 4
        policy = BrowserLikePolicyForHTTPS(trustRoot=self.trust_root)
        agent = Agent(reactor, contextFactory=policy, pool=self.pool, connectTimeout=10)
        self.http = treq.client.HTTPClient(provides(IAgent, agent))

    def close(self) -> Any:
        return self.pool.closeCachedConnections()

    def _headers(self) -> dict[bytes, list[bytes]]:
        h = {b"Accept": [b"application/json"], b"User-Agent": [b"coderstack"]}
        if self.token:
            h[SESSION_HEADER.encode()] = [self.token.encode()]
        return h

    async def request(self, method: str, path: str, body: Any = None, ok: tuple[int, ...] = (200, 201),
                      text: bool = False) -> Any:
        """The answer's JSON (``text``: its body as text); SDKError for another status."""
        url = self.url + path
        kwargs: dict[str, Any] = {"headers": Headers(self._headers())}
        if body is not None:
            kwargs["data"] = json.dumps(body).encode()
            kwargs["headers"].addRawHeader(b"Content-Type", b"application/json")
        try:
            resp = await self.http.request(method, url, **kwargs)
            raw = await resp.content()
        except (ConnectionRefusedError, ConnectError, DNSLookupError, TimeoutError, ResponseNeverReceived) as err:
            raise SDKError(f"cannot reach the server at {self.url}", detail=_why(err)) from None
        except Exception as err:  # TLS errors and the like arrive as various types
            raise SDKError(f"cannot reach the server at {self.url}", detail=_why(err)) from None
        try:
            data = json.loads(raw) if raw else None
        except ValueError:
            data = None
        if resp.code not in ok:
            message = data.get("message") if isinstance(data, dict) else None
            detail = data.get("detail", "") if isinstance(data, dict) else ""
            raise SDKError(message or f"unexpected HTTP {resp.code} from {path}", resp.code, detail)
        return raw.decode("utf-8", "replace") if text else data

    async def get(self, path: str) -> Any:
        return await self.request("GET", path)

    async def stream_json_lines(self, path: str, on_object: Callable[[Any], None]) -> None:
        """GET a newline-delimited JSON response (e.g. a build log with ``follow=true``),
        calling ``on_object`` for each line as it arrives; returns when the server ends it."""
        url = self.url + path
        try:
            resp = await self.http.request("GET", url, headers=Headers(self._headers()))
        except Exception as err:
            raise SDKError(f"cannot reach the server at {self.url}", detail=_why(err)) from None
        if resp.code != 200:
            raw = await resp.content()
            try:
                data = json.loads(raw)
            except ValueError:
                data = None
            message = data.get("message") if isinstance(data, dict) else None
            detail = data.get("detail", "") if isinstance(data, dict) else ""
            raise SDKError(message or f"unexpected HTTP {resp.code} from {path}", resp.code, detail)
        partial = b""

        def chunk(data: bytes) -> None:
            nonlocal partial
            *lines, partial = (partial + data).split(b"\n")
            for line in lines:
                if line.strip():
                    on_object(json.loads(line))

        try:
            await _collect(resp, chunk)
        except defer.CancelledError:
            raise
        except Exception as err:
            raise SDKError(f"lost the connection to {self.url}", detail=_why(err)) from None
        if partial.strip():
            on_object(json.loads(partial))

    async def post(self, path: str, body: Any = None) -> Any:
        return await self.request("POST", path, body if body is not None else {})

    async def delete(self, path: str) -> Any:
        return await self.request("DELETE", path)

    # -- websockets --------------------------------------------------------------------------

    def websocket_url(self, path: str, query: dict[str, str] | None = None) -> str:
        parts = urlsplit(self.url)
        scheme = "wss" if parts.scheme == "https" else "ws"
        q = ("?" + urlencode(query)) if query else ""
        return f"{scheme}://{parts.netloc}{path}{q}"

    def websocket_endpoint(self) -> Any:
        parts = urlsplit(self.url)
        host = parts.hostname or ""
        https = parts.scheme == "https"
        port = parts.port or (443 if https else 80)
        ep = provides(IStreamClientEndpoint, endpoints.HostnameEndpoint(self.reactor, host, port, timeout=10))
        if https:
            options = ssl.optionsForClientTLS(host, trustRoot=self.trust_root)
            ep = endpoints.wrapClientTLS(options, ep)
        return ep

    def websocket_factory(self, factory_class: type[WebSocketClientFactory], path: str,
                          query: dict[str, str] | None = None, **kwargs: Any) -> WebSocketClientFactory:
        headers = {SESSION_HEADER: self.token} if self.token else {}
        factory = factory_class(self.websocket_url(path, query), headers=headers, **kwargs)
        # A busy server gets 5 s (not autobahn's 1 s) to answer our close: aborting sooner resets
        # the connection, and the server's kernel may then drop our last frames unread — an
        # agent's graceful disconnect would be taken for a lost connection.
        factory.setProtocolOptions(perMessageCompressionOffers=[], autoPingInterval=5, autoPingTimeout=5,
                                   closeHandshakeTimeout=5)
        return factory

    # -- typed helpers -------------------------------------------------------------------------

    async def me(self) -> dict[str, Any]:
        return await self.get("/api/v2/users/me")

    async def workspace_by_name(self, name: str, owner: str = "me") -> dict[str, Any]:
        if "/" in name:
            owner, name = name.split("/", 1)
        try:
            return await self.get(f"/api/v2/users/{owner}/workspace/{name}")
        except SDKError as err:
            if err.status == 404:
                raise SDKError(f"workspace {name!r} not found", 404) from None
            raise

    async def connection_info(self, agent_id: str | None = None) -> dict[str, Any]:
        if agent_id:
            return await self.get(f"/api/v2/workspaceagents/{agent_id}/connection")
        return await self.get("/api/v2/workspaceagents/connection")


class _Body(protocol.Protocol):
    """A response body delivered chunk by chunk (like ``treq.collect``), whose Deferred can be
    cancelled: that drops the connection, so an endless stream (``follow=true``) ends."""

    def __init__(self, on_data: Callable[[bytes], None]) -> None:
        self.on_data = on_data
        self.done: defer.Deferred[None] = defer.Deferred(canceller=self._cancel)

    def _cancel(self, _d: defer.Deferred[None]) -> None:
        if self.transport is not None:
            self.transport.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        if not self.done.called:
            self.on_data(data)

    def connectionLost(self, reason: Any = None) -> None:
        if self.done.called:
            return
        if reason is None or reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(None)
        else:
            self.done.errback(reason)


def _collect(resp: Any, on_data: Callable[[bytes], None]) -> defer.Deferred[None]:
    body = _Body(on_data)
    resp.deliverBody(body)
    return body.done


def _why(err: BaseException) -> str:
    text = str(err) or type(err).__name__
    reasons = getattr(err, "reasons", None)
    if reasons:
        text = "; ".join(r.getErrorMessage() for r in reasons)
    return text.splitlines()[0][:200] if text else type(err).__name__
