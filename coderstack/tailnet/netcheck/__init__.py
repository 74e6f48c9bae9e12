"""netcheck: what the network lets this node do, measured against a DERP map.

The report answers: does UDP work (a STUN round trip completed), over IPv4 and/or IPv6; what
are our global addresses as STUN servers see them; does our NAT give a different mapping per
destination (``MappingVariesByDestIP``: hard NAT, hole punching unlikely); how far is each DERP
region; which region should be home; is a captive portal intercepting HTTP.

Sans-IO parts (plain data in and out, no reactor):

- ``plan``: which STUN nodes to probe over which family and when; latency-check and
  captive-portal URLs; the timing constants.
- ``home``: the home region, with hysteresis over recent reports (``ReportHistory``).
- ``report``: ``ProbeResult``, Tailscale's ``Report`` and its JSON, ``assemble_report``.
- ``health``: Coder's JSON shapes (DERP health report, interfaces report, ``ClientNetcheckReport``).

Twisted adapters: ``checker.Netchecker`` runs reports on an injected clock with a socket-less
STUN client and an injected HTTP GET (``httpget.TreqHTTP`` on treq); ``checker.run_netcheck``
is one standalone report. The host's interfaces are ``coderstack.netinfo``.

Nothing here is imported by this package's ``__init__`` so that the sans-IO parts stay cheap
to import.
"""
