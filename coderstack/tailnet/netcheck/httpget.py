"""The HTTP(S) GETs of netcheck (``/derp/latency-check``, ``/generate_204``) on treq.

One persistent connection pool, so the second latency-check request of a region reuses the
first one's connection (and measures a round trip, not a TCP and TLS set-up). Redirects are
not followed and connections are not retried: either would hide what the network did.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

from treq.client import HTTPClient
from twisted.internet import defer
from twisted.internet.ssl import CertificateOptions
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.iweb import IAgent, IPolicyForHTTPS
from zope.interface import implementer

from coderstack.tailnet.netcheck.plan import REPORT_TIMEOUT


@implementer(IPolicyForHTTPS)
class _InsecureTLSPolicy:
    """``InsecureForTests`` nodes: TLS without certificate verification."""

    def creatorForNetloc(self, hostname: bytes, port: int) -> CertificateOptions:
        return CertificateOptions(verify=False)


class TreqHTTP:
    """``http_get`` for the netcheck driver: ``(status, lower-case headers)`` of one GET."""

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.pool = HTTPConnectionPool(reactor, persistent=True)
        self.pool.retryAutomatically = False
        # Agent provides IAgent by a zope declaration, which mypy does not read.
        self._agent = cast(IAgent, Agent(reactor, pool=self.pool, connectTimeout=REPORT_TIMEOUT))
        self._insecure = cast(IAgent, Agent(reactor, contextFactory=_InsecureTLSPolicy(),
                                            pool=self.pool, connectTimeout=REPORT_TIMEOUT))

    def __call__(self, url: str, *, headers: Mapping[str, str], timeout: float,
                 insecure: bool = False,
                 follow_redirects: bool = False) -> defer.Deferred[tuple[int, dict[str, str]]]:
        client = HTTPClient(self._insecure if insecure else self._agent)
        return defer.ensureDeferred(self._get(client, url, headers, timeout, follow_redirects))

    async def _get(self, client: HTTPClient, url: str, headers: Mapping[str, str], timeout: float,
                   follow_redirects: bool) -> tuple[int, dict[str, str]]:
        request_headers: dict[bytes | str, bytes | str] = {k: v for k, v in headers.items()}
        resp = await client.get(url, headers=request_headers, timeout=timeout,
                                allow_redirects=follow_redirects)
        await resp.content()  # drain, so the connection goes back to the pool
        hdrs = {k.decode().lower(): v[-1].decode("latin-1")
                for k, v in resp.headers.getAllRawHeaders()}
        return resp.code, hdrs

    def close(self) -> defer.Deferred[None]:
        return self.pool.closeCachedConnections()
