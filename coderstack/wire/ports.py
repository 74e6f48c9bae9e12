"""The agent's ports on its tunnel address (Coder's numbering; clients rely on it).

====  =====================================================================
1     SSH (also on 22, for clients that assume the standard port)
2     reconnecting PTY (Coder's web terminal; ``coderstack/wire/rpty.py``)
3     speedtest
4     the agent's HTTP API (listening ports, netcheck)
5-8   reserved for more agent services
9+    forwarded to the workspace's own loopback (``port-forward``, web apps)
====  =====================================================================
"""

from __future__ import annotations

SSH_PORT = 1
STANDARD_SSH_PORT = 22
RECONNECTING_PTY_PORT = 2
SPEEDTEST_PORT = 3
AGENT_API_PORT = 4
# Ports below this one are the agent's own; they are never forwarded, nor listed as the
# workspace's listening ports.
MIN_FORWARDED_PORT = 9
