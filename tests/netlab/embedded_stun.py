"""The server's STUN side with its default options, run in the lab's server namespace::

    python -m tests.netlab.embedded_stun HTTP_HOST:PORT DATA_DIR

Parses the server's options as ``twistd coderstack-server --http-address HTTP_HOST:PORT`` would
(no STUN flags: the defaults), starts its STUN listeners (``start_stun``) and the latency-check
endpoint on the HTTP address, builds the DERP map the server would hand out (``build_derp_map``)
and prints it as one JSON line once everything listens. No other STUN server exists: this is what a
client sees of a deployment with the default configuration.
"""

from __future__ import annotations

import sys

from twisted.internet import defer, task


def main(reactor, http_address: str, data_dir: str):
    from coderstack.server.derpsetup import build_derp_map, start_stun
    from coderstack.server.options import ServerOptions
    from tests.tailnet.derp_endpoints import endpoints_site

    opts = ServerOptions(environ={})
    opts.parseOptions(["--http-address", http_address, "--data-dir", data_dir])
    ports = start_stun(opts, reactor)
    host, port = opts["http-address"]
    reactor.listenTCP(port, endpoints_site(), interface=host)

    async def go() -> None:
        derp_map = await build_derp_map(opts, reactor, [p.getHost().port for p in ports])
        print(derp_map.dumps(), flush=True)
        await defer.Deferred()  # serve until terminated

    return defer.ensureDeferred(go())


if __name__ == "__main__":
    task.react(main, sys.argv[1:])
