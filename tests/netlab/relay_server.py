"""A DERP relay (allow-all policy, plain HTTP) and a STUN server for the NAT lab::

    python -m tests.netlab.relay_server --http 8080 --stun 203.0.113.2:3478

prints ``ready`` once listening, then serves until terminated.
"""

from __future__ import annotations

import argparse
import sys

from twisted.internet import reactor
from twisted.web.resource import Resource
from twisted.web.server import Site

from coderstack.derp.policy import AllowAllPolicy
from coderstack.derp.server import make_derp_resources, make_relay
from coderstack.stun.server import listen_stun
from coderstack.wire import derp as w


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--http", type=int, default=8080)
    p.add_argument("--stun", action="append", default=[])
    args = p.parse_args()
    policy = AllowAllPolicy()
    relay = make_relay(w.generate_private_key(), policy, reactor)
    root = Resource()
    for path, res in make_derp_resources(relay, policy).items():
        root.putChild(path.lstrip("/").encode(), res)
    site = Site(root)
    site.noisy = False
    reactor.listenTCP(args.http, site)
    for spec in args.stun:
        host, port = spec.rsplit(":", 1)
        listen_stun(reactor, host, int(port))
    reactor.callWhenRunning(lambda: (print("ready", flush=True)))
    reactor.run()


if __name__ == "__main__":
    sys.exit(main())
