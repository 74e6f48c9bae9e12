"""Shared pieces for the DERP socket tests: a relay server on 127.0.0.1:0, clients, a test CA."""

from __future__ import annotations

import datetime
import ipaddress
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import defer, reactor, ssl
from twisted.web.resource import Resource
from twisted.web.server import Site

from coderstack.derp.client import DERPClient, DERPClientHandler
from coderstack.derp.server import make_derp_resources, make_relay
from coderstack.derpmap import DERPNode, DERPRegion
from coderstack.wire import derp as w
from tests.support.waiting import wait_until


def make_ca_and_cert(hostname: str = "localhost") -> tuple[bytes, bytes]:
    """(CA certificate PEM, server key+certificate PEM) for ``hostname`` and 127.0.0.1."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "coderstack test CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)]))
        .issuer_name(ca_name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName(hostname), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    key_pem = key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return ca.public_bytes(pem), key_pem + cert.public_bytes(pem)


class Recorder(DERPClientHandler):
    def __init__(self) -> None:
        self.packets: list[tuple[bytes, bytes]] = []
        self.gone: list[tuple[bytes, int]] = []
        self.forced: list[tuple[int, str]] = []
        self.connects: list[tuple[bytes, Any, bool]] = []
        self.disconnects: list[str] = []
        self.on_packet: Any = None

    def packet_received(self, src: bytes, data: bytes) -> None:
        self.packets.append((src, data))
        if self.on_packet is not None:
            self.on_packet(src, data)

    def peer_gone(self, key: bytes, reason: int) -> None:
        self.gone.append((key, reason))

    def forced_websocket(self, region_id: int, reason: str) -> None:
        self.forced.append((region_id, reason))

    def connected(self, server_key: bytes, node: Any, websocket: bool) -> None:
        self.connects.append((server_key, node, websocket))

    def disconnected(self, reason: str) -> None:
        self.disconnects.append(reason)


class RelayServer:
    """A twisted.web Site with the DERP resources, on 127.0.0.1:0 (optionally TLS)."""

    def __init__(self, testcase: Any, policy: Any, *, tls_pem: bytes | None = None,
                 root: Resource | None = None, **relay_kw: Any) -> None:
        self.policy = policy
        self.relay = make_relay(w.generate_private_key(), policy, reactor, **relay_kw)
        self.resources = make_derp_resources(self.relay, policy)
        if root is None:
            root = Resource()
            for path, res in self.resources.items():
                root.putChild(path.lstrip("/").encode(), res)
        self.site = Site(root)
        if tls_pem is not None:
            cert = ssl.PrivateCertificate.loadPEM(tls_pem)
            self.port = reactor.listenSSL(0, self.site, cert.options(), interface="127.0.0.1")
        else:
            self.port = reactor.listenTCP(0, self.site, interface="127.0.0.1")
        self.tls = tls_pem is not None
        testcase.addCleanup(self.port.stopListening)
        testcase.addCleanup(lambda: defer.ensureDeferred(self._drain()))

    async def _drain(self) -> None:
        await wait_until(lambda: self.relay.clients == 0, "the server connections to close")

    @property
    def url(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://127.0.0.1:{self.port.getHost().port}"

    def region(self, host: str = "127.0.0.1") -> DERPRegion:
        node = DERPNode(name="999b", region_id=999, host_name=host, stun_port=-1,
                        derp_port=self.port.getHost().port, force_http=not self.tls)
        return DERPRegion(999, "coder", "Coder Embedded Relay", (node,), embedded_relay=True)


def start_client(testcase: Any, server: RelayServer, token: str = "tok", *,
                 priv: bytes | None = None, region: DERPRegion | None = None,
                 **kw: Any) -> tuple[DERPClient, Recorder]:
    rec = Recorder()
    client = DERPClient(reactor, region or server.region(), priv or w.generate_private_key(), rec,
                        token=token, **kw)
    client.start()

    def cleanup() -> defer.Deferred[None]:
        return client.stop()

    testcase.addCleanup(cleanup)
    return client, rec
