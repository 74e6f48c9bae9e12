"""Test-only stand-ins for the DERP server's plain HTTP endpoints (the real ones are the DERP
engineer's): ``/derp/latency-check`` answers 200 and ``/generate_204`` answers 204, echoing a
well-formed ``X-Tailscale-Challenge`` as ``X-Tailscale-Response: response <challenge>``.

Also runnable inside a network namespace::

    python -m tests.tailnet.derp_endpoints [--http PORT] [--https PORT] [--stun HOST:PORT ...]

which serves the endpoints over HTTP and/or HTTPS (self-signed) on all addresses and our STUN
server on each STUN address, and prints ``ready`` when listening.
"""

from __future__ import annotations

import re
import sys

from twisted.web.resource import Resource
from twisted.web.server import Site

_CHALLENGE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class _LatencyCheck(Resource):
    isLeaf = True

    def render_GET(self, request) -> bytes:
        request.setHeader(b"Access-Control-Allow-Origin", b"*")
        return b""

    render_HEAD = render_GET


class _Generate204(Resource):
    isLeaf = True

    def render_GET(self, request) -> bytes:
        raw = request.getHeader(b"X-Tailscale-Challenge")
        challenge = raw.decode("latin-1") if raw else ""
        if _CHALLENGE.match(challenge):
            request.setHeader(b"X-Tailscale-Response", f"response {challenge}".encode())
        request.setResponseCode(204)
        return b""


def endpoints_site() -> Site:
    root = Resource()
    derp = Resource()
    derp.putChild(b"latency-check", _LatencyCheck())
    derp.putChild(b"probe", _LatencyCheck())
    root.putChild(b"derp", derp)
    root.putChild(b"generate_204", _Generate204())
    site = Site(root)
    site.noisy = False
    return site


def self_signed_tls():
    """A throwaway certificate (clients must not verify it: InsecureForTests)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    from twisted.internet import ssl

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "derp.test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    pem = cert.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())
    return ssl.PrivateCertificate.loadPEM(pem).options()


def main(argv: list[str]) -> None:
    import argparse

    from twisted.internet import reactor

    from coderstack.stun.address import parse_host_port
    from coderstack.stun.server import listen_stun

    ap = argparse.ArgumentParser()
    ap.add_argument("--http", type=int)
    ap.add_argument("--https", type=int)
    ap.add_argument("--stun", action="append", default=[])
    args = ap.parse_args(argv)
    if args.http:
        reactor.listenTCP(args.http, endpoints_site())
    if args.https:
        reactor.listenSSL(args.https, endpoints_site(), self_signed_tls())
    for item in args.stun:
        host, port = parse_host_port(item)
        listen_stun(reactor, host, port)
    print("ready", flush=True)
    reactor.run()


if __name__ == "__main__":
    main(sys.argv[1:])
