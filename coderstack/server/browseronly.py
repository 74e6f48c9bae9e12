"""Browser-only mode (``--browser-only``, ``CODER_BROWSER_ONLY``): users reach workspaces only
through the server (web terminal, apps); tunnels from the CLI (ssh, config-ssh's ProxyCommand,
port-forward, ping, speedtest) are refused where they start: the connection info, the client
coordination websocket and the DERP relay. Agents and the server's own tailnet are unaffected.
"""

from __future__ import annotations

MESSAGE = "Browser-only connections are enabled on this deployment."
DETAIL = ("the server runs with --browser-only (CODER_BROWSER_ONLY): reach workspaces through the "
          "web terminal and apps in the dashboard; CLI tunnels (ssh, port-forward, ping, speedtest) "
          "are refused")
