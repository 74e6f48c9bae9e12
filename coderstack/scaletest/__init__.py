"""``coderstack scaletest``: a load generator for one deployment (Coder's ``exp scaletest`` in
spirit).

- :mod:`runfile`: the run's workspaces and their agent tokens, kept in an owner-only file so the
  agents and the traffic can run as separate processes (tokens are shown only once).
- :mod:`workspaces`: ``create-workspaces N`` and ``cleanup`` through the server's API.
- :mod:`simagent`: ``agents``: many simulated agents in one process, each a real coordinator
  websocket, a real DERP connection and a real WireGuard device and netstack serving an echo
  port.
- :mod:`traffic`: ``traffic``: one client per connection (the CLI's own dialing), moving bytes
  to an agent's echo port every tick and timing each round trip; node updates timed from their
  creation to their arrival (the fan-out).
- :mod:`stats`: percentiles, errors by kind, the server's figures from ``/metrics``, the summary.
"""
