"""Test-only stand-ins for the DERP server's plain HTTP endpoints (the real ones are the DERP
engineer's): ``/derp/latency-check`` answers 200 and ``/generate_204`` answers 204, echoing a
well-formed ``X-Tailscale-Challenge`` as ``X-Tailscale-Response: response <challenge>``.

Also runnable inside a network namespace::

    python -m tests.tailnet.derp_endpoints HTTP_PORT [STUN_HOST:STUN_PORT ...]

which serves HTTP on all addresses and our STUN server on each STUN address, and prints
``ready`` when listening.
"""

from __future__ import annotations

import re
import sys

from twisted.web.resource import Resource
from twisted.web.server import Site

_CHALLENGE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class _LatencyCheck(Resource):
    isLeaf = True

    def render_GET(self, request) -> bytes:  # noqa: N802
        request.setHeader(b"Access-Control-Allow-Origin", b"*")
        return b""

    render_HEAD = render_GET


class _Generate204(Resource):
    isLeaf = True

    def render_GET(self, request) -> bytes:  # noqa: N802
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


def main(argv: list[str]) -> None:
    from twisted.internet import reactor

    from coderstack.stun.address import parse_host_port
    from coderstack.stun.server import listen_stun

    reactor.listenTCP(int(argv[0]), endpoints_site())
    for item in argv[1:]:
        host, port = parse_host_port(item)
        listen_stun(reactor, host, port)
    print("ready", flush=True)
    reactor.run()


if __name__ == "__main__":
    main(sys.argv[1:])
