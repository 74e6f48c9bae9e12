"""``twistd coderstack-agent`` options: Coder's agent flag names and environment variables."""

from __future__ import annotations

from twisted.python import usage

from coderstack import envopts as e


class AgentOptions(e.EnvOptions):
    synopsis = "[options]"
    longdesc = (
        "Run a coderstack workspace agent. It only dials out: to the server's access URL for its "
        "manifest and coordination, and (later) to peers and relays for its tunnel."
    )
    envParameters = [
        ("url", "CODER_AGENT_URL", None, e.url, "The server's URL (the template's provider url)."),
        ("token", "CODER_AGENT_TOKEN", None, e.text,
         "The agent token (prefer the environment variable: arguments are visible to other users)."),
        ("data-dir", "CODER_AGENT_DATA_DIR", None, e.directory,
         "Where the agent keeps its keys (default: ~/.local/share/coderstack/agent/<agent id>)."),
        ("tailnet-listen-port", "CODER_AGENT_TAILNET_LISTEN_PORT", "0", e.port_number,
         "UDP port for the tunnel; 0 picks one."),
        ("reconnect-max", "CODER_AGENT_RECONNECT_MAX", "10", e.positive_int,
         "Longest wait, in seconds, between reconnect attempts."),
    ]

    def postOptions(self) -> None:
        super().postOptions()
        if not self["url"]:
            raise usage.UsageError("--url (or CODER_AGENT_URL) is required")
        if not self["token"]:
            raise usage.UsageError("--token (or CODER_AGENT_TOKEN) is required")
        # Unset: a directory per agent under the default base (agents never share keys).
        self["data-dir-per-agent"] = self["data-dir"] is None
        if self["data-dir"] is None:
            self["data-dir"] = e.default_data_dir("agent", self.environ)
