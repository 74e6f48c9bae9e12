"""``twistd coderstack-server`` options: Coder's flag names and environment variables."""

from __future__ import annotations

from typing import Any

from twisted.python import usage

from coderstack import envopts as e
from coderstack.server.clientaddr import ALLOWED_HEADERS, parse_headers, parse_origins
from coderstack.stun.address import (
    STUNAddressError,
    parse_stun_listen_addresses,
    parse_stun_server_list,
)


def non_negative_int(value: str) -> int:
    if not value.strip().isdigit():
        raise ValueError(f"{value!r} is not a whole number (0 or more)")
    return int(value)


class ServerOptions(e.EnvOptions):
    synopsis = "[options]"
    longdesc = (
        "Run the coderstack server: the /api/v2 control plane, the coordinator, the embedded DERP "
        "relay at /derp and the STUN server, on one access URL."
    )

    envParameters = [
        ("access-url", "CODER_ACCESS_URL", None, e.url,
         "External URL users and agents reach this server at (default: from the listen address)."),
        ("http-address", "CODER_HTTP_ADDRESS", "127.0.0.1:3000", e.host_port,
         "HTTP bind address; empty to disable HTTP."),
        ("tls-enable", "CODER_TLS_ENABLE", "false", e.boolean, "Serve HTTPS on --tls-address."),
        ("tls-address", "CODER_TLS_ADDRESS", "127.0.0.1:3443", e.host_port, "HTTPS bind address."),
        ("tls-cert-file", "CODER_TLS_CERT_FILE", None, e.existing_file,
         "PEM certificate (chain) for HTTPS."),
        ("tls-key-file", "CODER_TLS_KEY_FILE", None, e.existing_file, "PEM private key for HTTPS."),
        ("http-extra-address", "CODERSTACK_HTTP_EXTRA_ADDRESS", None, e.host_port,
         "A second HTTP bind address serving the same API (e.g. for a template's provider url)."),
        ("max-connections-per-source", "CODERSTACK_MAX_CONNECTIONS_PER_SOURCE", "128", non_negative_int,
         "Open HTTP connections (websockets included) one source address may hold; 0 for no cap."),
        ("proxy-trusted-headers", "CODER_PROXY_TRUSTED_HEADERS", "", parse_headers,
         "Headers that carry the client's address from a trusted proxy, comma separated, first "
         f"present wins (of {', '.join(ALLOWED_HEADERS)})."),
        ("proxy-trusted-origins", "CODER_PROXY_TRUSTED_ORIGINS", "", parse_origins,
         "Networks (CIDRs, comma separated, e.g. 10.0.0.0/8) whose connections' "
         "--proxy-trusted-headers are believed."),
        ("data-dir", "CODER_DATA_DIR", None, e.directory,
         "Where the SQLite database and server keys live (default: ~/.local/share/coderstack/server)."),
        ("postgres-url", "CODER_PG_CONNECTION_URL", None, e.text,
         "PostgreSQL URL; when set, used instead of the embedded SQLite database."),
        ("derp-server-enable", "CODER_DERP_SERVER_ENABLE", "true", e.boolean,
         "Run the embedded DERP relay at /derp."),
        ("derp-server-region-id", "CODER_DERP_SERVER_REGION_ID", "999", e.positive_int,
         "Region ID of the embedded relay."),
        ("derp-server-region-code", "CODER_DERP_SERVER_REGION_CODE", "coder", e.text,
         "Region code of the embedded relay."),
        ("derp-server-region-name", "CODER_DERP_SERVER_REGION_NAME", "Coder Embedded Relay", e.text,
         "Region name of the embedded relay (shown as DERP(<name>) by ping)."),
        ("derp-server-stun-addresses", "CODER_DERP_SERVER_STUN_ADDRESSES", "", e.text,
         "Extra STUN servers (host:port, comma separated) added as STUN-only regions; 'disable' for none."),
        ("derp-server-relay-url", "CODER_DERP_SERVER_RELAY_URL", None, e.url,
         "This replica's URL for the DERP mesh between replicas."),
        ("derp-config-url", "CODER_DERP_CONFIG_URL", None, e.url,
         "Fetch a DERP map (Tailscale JSON) from this URL at start-up and merge it."),
        ("derp-config-path", "CODER_DERP_CONFIG_PATH", None, e.existing_file,
         "Read a DERP map (Tailscale JSON) from this file and merge it."),
        ("derp-force-websockets", "CODER_DERP_FORCE_WEBSOCKETS", "false", e.boolean,
         "Tell clients and agents to use DERP over websockets only."),
        ("block-direct-connections", "CODER_BLOCK_DIRECT", "false", e.boolean,
         "Disable direct (P2P) connections: everything goes through DERP."),
        ("browser-only", "CODER_BROWSER_ONLY", "false", e.boolean,
         "Refuse CLI tunnels (ssh, port-forward, ping, speedtest): workspaces are reached through "
         "the web terminal and apps only."),
        ("wildcard-access-url", "CODER_WILDCARD_ACCESS_URL", None, e.text,
         "Wildcard host for subdomain apps, e.g. *.apps.example.com (or *.apps.localhost:3000); "
         "unset: subdomain apps are off."),
        ("disable-path-apps", "CODER_DISABLE_PATH_APPS", "false", e.boolean,
         "Refuse path-based apps (/@user/workspace/apps/slug/): they share the dashboard's origin "
         "and cookie. Subdomain apps are unaffected."),
        ("stun-address", "CODER_STUN_ADDRESS", None, e.text,
         "UDP address(es) of the embedded STUN server, comma separated (default: ports 3478 and 3479 on the HTTP "
         "interface, so netcheck can tell a hard NAT); 'disable' turns it off."),
        ("coordinator-peers-per-user", "CODERSTACK_COORDINATOR_PEERS_PER_USER", "100", e.positive_int,
         "Coordinator client peers a member may have connected at once (owners: times the owner multiplier)."),
        ("coordinator-lost-peers-per-user", "CODERSTACK_COORDINATOR_LOST_PEERS_PER_USER", "100", e.positive_int,
         "LOST coordinator peers kept per member; beyond that the oldest are forgotten at once."),
        ("derp-connections-per-user", "CODERSTACK_DERP_CONNECTIONS_PER_USER", "100", e.positive_int,
         "DERP relay connections a member (or an agent) may hold open."),
        ("owner-limit-multiplier", "CODERSTACK_OWNER_LIMIT_MULTIPLIER", "10", e.positive_int,
         "Owners get this many times the per-user limits above."),
        ("agent-binary-dir", "CODER_AGENT_BINARY_DIR", None, e.text,
         "Directory holding the twistd that local agents are started with (default: this installation's)."),
    ]
    optFlags = [
        ["dev", None, "Development demo: first user, logged-in CLI, workspace 'dev' and its local agent."],
    ]

    def postOptions(self) -> None:
        super().postOptions()
        if self["data-dir"] is None:
            self["data-dir"] = e.default_data_dir("server", self.environ)
        if self["tls-enable"]:
            missing = [f for f in ("tls-cert-file", "tls-key-file") if not self[f]]
            if missing:
                raise usage.UsageError(
                    f"--tls-enable needs {' and '.join('--' + m for m in missing)}"
                )
            if self["tls-address"] is None:
                raise usage.UsageError("--tls-enable needs a --tls-address")
        elif self["http-address"] is None:
            raise usage.UsageError("--http-address is empty and TLS is off: nothing would listen")
        if self["derp-config-url"] and self["derp-config-path"]:
            raise usage.UsageError("set only one of --derp-config-url and --derp-config-path")
        self["access-url-derived"] = self["access-url"] is None
        if self["access-url"] is None:
            self["access-url"] = self.default_access_url()
        try:
            self["stun-listen"] = parse_stun_listen_addresses(self["stun-address"], self.http_address_text())
            self["stun-servers"] = [f"[{h}]:{p}" if ":" in h else f"{h}:{p}"
                                    for h, p in parse_stun_server_list(self["derp-server-stun-addresses"])]
        except STUNAddressError as err:
            raise usage.UsageError(f"invalid value: {err}") from None
        if self["stun-address"] is None and self.http_port() == 0:
            # An ephemeral HTTP port (tests) gets ephemeral STUN ports, not a clash on 3478.
            self["stun-listen"] = [(host, 0) for host, _port in self["stun-listen"]]

    def http_address_text(self) -> str:
        addr = self["http-address"] or (self["tls-address"] if self["tls-enable"] else None)
        if addr is None:
            return ""
        host, port = addr
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def http_port(self) -> int | None:
        addr = self["http-address"] or (self["tls-address"] if self["tls-enable"] else None)
        return addr[1] if addr else None

    def default_access_url(self) -> str:
        if self["tls-enable"]:
            host, port = self["tls-address"]
            scheme = "https"
        else:
            host, port = self["http-address"]
            scheme = "http"
        if host in ("", "0.0.0.0", "::"):
            host = "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        return f"{scheme}://{host}:{port}"

    def as_dict(self) -> dict[str, Any]:
        return dict(self)
