"""Server and agent options: defaults, Coder's environment variables, flag over env, bad values.

The options read the environment given to their constructor (``environ=``), so these tests never
depend on the environment trial runs in.
"""

from __future__ import annotations

import os
import subprocess
import sys
from ipaddress import ip_network

from twisted.python import usage
from twisted.trial import unittest

from coderstack.agent.options import AgentOptions
from coderstack.server.options import ServerOptions
from tests.support.tempdirs import made_dir

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def server(argv: list[str], environ: dict[str, str] | None = None) -> ServerOptions:
    opts = ServerOptions(environ=environ or {})
    opts.parseOptions(argv)
    return opts


def agent(argv: list[str], environ: dict[str, str] | None = None) -> AgentOptions:
    opts = AgentOptions(environ=environ or {})
    opts.parseOptions(argv)
    return opts


class ServerDefaultsTests(unittest.SynchronousTestCase):
    def test_defaults(self) -> None:
        o = server([])
        self.assertEqual(o["http-address"], ("127.0.0.1", 3000))
        self.assertEqual(o["access-url"], "http://127.0.0.1:3000")
        self.assertIs(o["tls-enable"], False)
        self.assertEqual(o["tls-address"], ("127.0.0.1", 3443))
        self.assertIsNone(o["tls-cert-file"])
        self.assertIsNone(o["tls-key-file"])
        self.assertIsNone(o["postgres-url"])
        self.assertIs(o["derp-server-enable"], True)
        self.assertEqual(o["derp-server-region-id"], 999)
        self.assertEqual(o["derp-server-region-code"], "coder")
        self.assertIs(o["derp-force-websockets"], False)
        self.assertEqual(o["stun-listen"], [("127.0.0.1", 3478), ("127.0.0.1", 3479)])
        self.assertEqual(server(["--http-address", "127.0.0.1:0"])["stun-listen"],
                         [("127.0.0.1", 0), ("127.0.0.1", 0)])
        self.assertEqual(server(["--stun-address", ":4000"])["stun-listen"], [("127.0.0.1", 4000)])
        self.assertIs(o["block-direct-connections"], False)
        self.assertFalse(o["dev"])
        # The per-user default data dir.
        self.assertTrue(o["data-dir"].endswith(os.path.join("coderstack", "server")), o["data-dir"])
        self.assertTrue(os.path.isabs(o["data-dir"]))

    def test_the_process_environment_is_not_read_when_environ_is_given(self) -> None:
        os.environ["CODER_HTTP_ADDRESS"] = "127.0.0.1:1"
        self.addCleanup(os.environ.pop, "CODER_HTTP_ADDRESS", None)
        self.assertEqual(server([])["http-address"], ("127.0.0.1", 3000))
        # ... and is read when it is not.
        opts = ServerOptions()
        opts.parseOptions([])
        self.assertEqual(opts["http-address"], ("127.0.0.1", 1))


class ServerEnvironmentTests(unittest.SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = made_dir(self)
        self.cert = os.path.join(self.dir, "cert.pem")
        self.key = os.path.join(self.dir, "key.pem")
        for path in (self.cert, self.key):
            with open(path, "w") as f:
                f.write("placeholder\n")

    def test_every_variable(self) -> None:
        data = os.path.join(self.dir, "data")
        derp = os.path.join(self.dir, "derp.json")
        with open(derp, "w") as f:
            f.write("{}")
        env = {
            "CODER_ACCESS_URL": "https://coder.example.com/",
            "CODER_HTTP_ADDRESS": "0.0.0.0:8080",
            "CODER_TLS_ENABLE": "true",
            "CODER_TLS_ADDRESS": "[::1]:8443",
            "CODER_TLS_CERT_FILE": self.cert,
            "CODER_TLS_KEY_FILE": self.key,
            "CODER_DATA_DIR": data,
            "CODER_PG_CONNECTION_URL": "postgresql://u@127.0.0.1:5432/db",
            "CODER_DERP_SERVER_ENABLE": "false",
            "CODER_DERP_SERVER_REGION_ID": "7",
            "CODER_DERP_SERVER_REGION_CODE": "zz",
            "CODER_DERP_SERVER_REGION_NAME": "Zed",
            "CODER_DERP_SERVER_STUN_ADDRESSES": "disable",
            "CODER_DERP_SERVER_RELAY_URL": "http://10.0.0.1:3000",
            "CODER_DERP_CONFIG_PATH": derp,
            "CODER_DERP_FORCE_WEBSOCKETS": "yes",
            "CODER_BLOCK_DIRECT": "1",
            "CODER_STUN_ADDRESS": "disable",
        }
        o = server([], env)
        self.assertEqual(o["access-url"], "https://coder.example.com")  # trailing slash dropped
        self.assertEqual(o["http-address"], ("0.0.0.0", 8080))
        self.assertIs(o["tls-enable"], True)
        self.assertEqual(o["tls-address"], ("::1", 8443))
        self.assertEqual((o["tls-cert-file"], o["tls-key-file"]), (self.cert, self.key))
        self.assertEqual(o["data-dir"], data)
        self.assertEqual(o["postgres-url"], "postgresql://u@127.0.0.1:5432/db")
        self.assertIs(o["derp-server-enable"], False)
        self.assertEqual(o["derp-server-region-id"], 7)
        self.assertEqual(o["derp-server-region-code"], "zz")
        self.assertEqual(o["derp-server-region-name"], "Zed")
        self.assertEqual(o["derp-server-stun-addresses"], "disable")
        self.assertEqual(o["derp-server-relay-url"], "http://10.0.0.1:3000")
        self.assertEqual(o["derp-config-path"], derp)
        self.assertIs(o["derp-force-websockets"], True)
        self.assertIs(o["block-direct-connections"], True)
        self.assertEqual(o["stun-address"], "disable")

    def test_flag_beats_environment(self) -> None:
        env = {
            "CODER_HTTP_ADDRESS": "127.0.0.1:1111",
            "CODER_ACCESS_URL": "http://env.example.com",
            "CODER_DATA_DIR": os.path.join(self.dir, "env"),
            "CODER_PG_CONNECTION_URL": "postgresql://env@127.0.0.1/env",
            "CODER_TLS_ENABLE": "true",
            "CODER_TLS_CERT_FILE": "/nonexistent/cert.pem",
        }
        o = server([
            "--http-address", "127.0.0.1:2222",
            "--access-url", "http://flag.example.com",
            "--data-dir", os.path.join(self.dir, "flag"),
            "--postgres-url", "postgresql://flag@127.0.0.1/flag",
            "--tls-enable", "false",
            "--tls-cert-file", self.cert,
        ], env)
        self.assertEqual(o["http-address"], ("127.0.0.1", 2222))
        self.assertEqual(o["access-url"], "http://flag.example.com")
        self.assertEqual(o["data-dir"], os.path.join(self.dir, "flag"))
        self.assertEqual(o["postgres-url"], "postgresql://flag@127.0.0.1/flag")
        self.assertIs(o["tls-enable"], False)
        self.assertEqual(o["tls-cert-file"], self.cert)

    def test_access_url_defaults_from_listen_address(self) -> None:
        self.assertEqual(server(["--http-address", "0.0.0.0:4000"])["access-url"], "http://127.0.0.1:4000")
        self.assertEqual(server(["--http-address", ":4000"])["access-url"], "http://127.0.0.1:4000")
        self.assertEqual(server(["--http-address", "[::1]:4000"])["access-url"], "http://[::1]:4000")
        o = server(["--tls-enable", "true", "--tls-address", "127.0.0.1:4443",
                    "--tls-cert-file", self.cert, "--tls-key-file", self.key])
        self.assertEqual(o["access-url"], "https://127.0.0.1:4443")

    def test_empty_http_address_disables_http(self) -> None:
        o = server(["--http-address", "", "--tls-enable", "true", "--tls-cert-file", self.cert,
                    "--tls-key-file", self.key])
        self.assertIsNone(o["http-address"])

    def test_data_dir_is_made_absolute(self) -> None:
        o = server(["--data-dir", "relative/dir"])
        self.assertEqual(o["data-dir"], os.path.abspath("relative/dir"))


class ServerBadValueTests(unittest.SynchronousTestCase):
    def assertUsageError(self, argv: list[str], *fragments: str, environ: dict[str, str] | None = None) -> str:
        with self.assertRaises(usage.UsageError) as caught:
            server(argv, environ)
        message = str(caught.exception)
        for fragment in fragments:
            self.assertIn(fragment, message)
        return message

    def test_bad_flag_values_name_the_flag(self) -> None:
        cases = [
            (["--http-address", "nonsense"], "--http-address", "nonsense"),
            (["--http-address", "127.0.0.1:99999"], "--http-address"),
            (["--http-address", "127.0.0.1:http"], "--http-address"),
            (["--tls-address", "localhost"], "--tls-address"),
            (["--access-url", "ftp://example.com"], "--access-url"),
            (["--access-url", "http://"], "--access-url"),
            (["--access-url", "http://example.com:port"], "--access-url"),
            (["--tls-enable", "maybe"], "--tls-enable"),
            (["--tls-cert-file", "/nonexistent/cert.pem"], "--tls-cert-file"),
            (["--tls-key-file", "/nonexistent/key.pem"], "--tls-key-file"),
            (["--derp-server-region-id", "0"], "--derp-server-region-id"),
            (["--derp-server-region-id", "abc"], "--derp-server-region-id"),
            (["--derp-config-path", "/nonexistent/derp.json"], "--derp-config-path"),
            (["--derp-config-url", "file:///etc/passwd"], "--derp-config-url"),
            (["--block-direct-connections", "sometimes"], "--block-direct-connections"),
        ]
        for argv, *fragments in cases:
            self.assertUsageError(argv, *fragments)

    def test_data_dir_that_is_a_file(self) -> None:
        path = os.path.join(made_dir(self), "file")
        with open(path, "w") as f:
            f.write("x")
        self.assertUsageError(["--data-dir", path], "--data-dir")

    def test_bad_environment_values_name_flag_and_variable(self) -> None:
        cases = {
            "CODER_HTTP_ADDRESS": ("nonsense", "--http-address"),
            "CODER_ACCESS_URL": ("example.com", "--access-url"),
            "CODER_TLS_ENABLE": ("perhaps", "--tls-enable"),
            "CODER_TLS_ADDRESS": ("x", "--tls-address"),
            "CODER_TLS_CERT_FILE": ("/nonexistent", "--tls-cert-file"),
            "CODER_TLS_KEY_FILE": ("/nonexistent", "--tls-key-file"),
            "CODER_DERP_SERVER_REGION_ID": ("-3", "--derp-server-region-id"),
        }
        for var, (value, flag) in cases.items():
            message = self.assertUsageError([], flag, var, environ={var: value})
            self.assertIn(f"(from {var})", message)

    def test_unknown_flag(self) -> None:
        self.assertUsageError(["--no-such-flag"], "no-such-flag")

    def test_tls_needs_cert_and_key(self) -> None:
        d = made_dir(self)
        cert = os.path.join(d, "cert.pem")
        with open(cert, "w") as f:
            f.write("x")
        msg = self.assertUsageError(["--tls-enable", "true"], "--tls-enable", "--tls-cert-file", "--tls-key-file")
        self.assertIn("needs", msg)
        msg = self.assertUsageError(["--tls-enable", "true", "--tls-cert-file", cert], "--tls-key-file")
        self.assertNotIn("--tls-cert-file", msg)
        self.assertUsageError([], "--tls-key-file", environ={"CODER_TLS_ENABLE": "true", "CODER_TLS_CERT_FILE": cert})

    def test_tls_needs_an_address(self) -> None:
        d = made_dir(self)
        files = []
        for name in ("cert.pem", "key.pem"):
            files.append(os.path.join(d, name))
            with open(files[-1], "w") as f:
                f.write("x")
        self.assertUsageError(["--tls-enable", "true", "--tls-address", "", "--tls-cert-file", files[0],
                               "--tls-key-file", files[1]], "--tls-address")

    def test_nothing_would_listen(self) -> None:
        self.assertUsageError(["--http-address", ""], "--http-address")

    def test_derp_config_url_and_path_are_exclusive(self) -> None:
        d = made_dir(self)
        path = os.path.join(d, "derp.json")
        with open(path, "w") as f:
            f.write("{}")
        self.assertUsageError(["--derp-config-url", "https://example.com/derp.json", "--derp-config-path", path],
                              "--derp-config-url", "--derp-config-path")
        self.assertUsageError([], "--derp-config-url", "--derp-config-path",
                              environ={"CODER_DERP_CONFIG_URL": "https://example.com/derp.json",
                                       "CODER_DERP_CONFIG_PATH": path})


class AgentOptionsTests(unittest.SynchronousTestCase):
    BASE = {"CODER_AGENT_URL": "http://127.0.0.1:3000", "CODER_AGENT_TOKEN": "secret-token"}

    def test_from_environment_with_defaults(self) -> None:
        o = agent([], dict(self.BASE))
        self.assertEqual(o["url"], "http://127.0.0.1:3000")
        self.assertEqual(o["token"], "secret-token")
        self.assertEqual(o["tailnet-listen-port"], 0)
        self.assertEqual(o["reconnect-max"], 10)
        self.assertTrue(o["data-dir"].endswith(os.path.join("coderstack", "agent")), o["data-dir"])

    def test_every_variable(self) -> None:
        d = os.path.join(made_dir(self), "agent")
        o = agent([], dict(self.BASE, CODER_AGENT_DATA_DIR=d, CODER_AGENT_TAILNET_LISTEN_PORT="41641",
                           CODER_AGENT_RECONNECT_MAX="3", CODER_AGENT_URL="https://x.example.com/"))
        self.assertEqual(o["url"], "https://x.example.com")
        self.assertEqual(o["data-dir"], d)
        self.assertEqual(o["tailnet-listen-port"], 41641)
        self.assertEqual(o["reconnect-max"], 3)

    def test_flags_beat_environment(self) -> None:
        o = agent(["--url", "http://10.0.0.2:3000", "--token", "flag-token", "--reconnect-max", "5",
                   "--tailnet-listen-port", "1234"],
                  dict(self.BASE, CODER_AGENT_RECONNECT_MAX="3", CODER_AGENT_TAILNET_LISTEN_PORT="41641"))
        self.assertEqual((o["url"], o["token"], o["reconnect-max"], o["tailnet-listen-port"]),
                         ("http://10.0.0.2:3000", "flag-token", 5, 1234))

    def test_url_and_token_are_required(self) -> None:
        with self.assertRaises(usage.UsageError) as caught:
            agent([], {"CODER_AGENT_TOKEN": "t"})
        self.assertIn("--url", str(caught.exception))
        self.assertIn("CODER_AGENT_URL", str(caught.exception))
        with self.assertRaises(usage.UsageError) as caught:
            agent([], {"CODER_AGENT_URL": "http://127.0.0.1:3000"})
        self.assertIn("--token", str(caught.exception))
        self.assertIn("CODER_AGENT_TOKEN", str(caught.exception))

    def test_bad_values(self) -> None:
        for argv, env, flag in [
            (["--url", "127.0.0.1:3000"], {}, "--url"),
            ([], {"CODER_AGENT_URL": "nope"}, "CODER_AGENT_URL"),
            (["--reconnect-max", "0"], {}, "--reconnect-max"),
            (["--tailnet-listen-port", "70000"], {}, "--tailnet-listen-port"),
            ([], {"CODER_AGENT_TAILNET_LISTEN_PORT": "-1"}, "CODER_AGENT_TAILNET_LISTEN_PORT"),
        ]:
            with self.assertRaises(usage.UsageError) as caught:
                agent(argv, dict(self.BASE, **env))
            self.assertIn(flag, str(caught.exception))


class TwistdUsageErrorTests(unittest.SynchronousTestCase):
    """Under ``twistd`` a bad value exits non-zero, names the flag, and starts nothing."""

    def twistd(self, *args: str) -> tuple[int, str]:
        home = made_dir(self)
        env = dict(os.environ, PYTHONPATH=REPO_ROOT, HOME=home, XDG_DATA_HOME=os.path.join(home, "share"))
        env.pop("CODER_HTTP_ADDRESS", None)
        twistd = os.path.join(os.path.dirname(sys.executable), "twistd")
        proc = subprocess.run([twistd, "-n", "--pidfile=", *args], cwd=home, env=env,
                              capture_output=True, text=True)
        self.home = home
        # twistd prints its usage errors on stdout; either stream counts.
        return proc.returncode, proc.stdout + proc.stderr

    def test_bad_http_address(self) -> None:
        data = os.path.join(made_dir(self), "data")
        code, output = self.twistd("coderstack-server", "--http-address", "nonsense", "--data-dir", data)
        self.assertNotEqual(code, 0)
        self.assertIn("--http-address", output)
        self.assertIn("nonsense", output)
        # Nothing started: no data dir, no database, no log of a listener.
        self.assertFalse(os.path.exists(data))
        self.assertNotIn("listening on", output)

    def test_agent_without_token(self) -> None:
        code, output = self.twistd("coderstack-agent", "--url", "http://127.0.0.1:9")
        self.assertNotEqual(code, 0)
        self.assertIn("--token", output)
        self.assertFalse(os.path.exists(os.path.join(self.home, "share", "coderstack")))

    def test_both_plugins_are_listed_and_document_their_variables(self) -> None:
        code, output = self.twistd("--help")
        self.assertEqual(code, 0, output)
        self.assertIn("coderstack-server", output)
        self.assertIn("coderstack-agent", output)
        code, output = self.twistd("coderstack-server", "--help")
        self.assertEqual(code, 0, output)
        for text in ("--access-url", "CODER_ACCESS_URL", "--http-address", "CODER_HTTP_ADDRESS",
                     "--tls-cert-file", "CODER_PG_CONNECTION_URL", "--dev"):
            self.assertIn(text, output)
        code, output = self.twistd("coderstack-agent", "--help")
        self.assertEqual(code, 0, output)
        for text in ("--url", "CODER_AGENT_URL", "--token", "CODER_AGENT_TOKEN", "--data-dir"):
            self.assertIn(text, output)


class ConnectionCapOptionTests(unittest.SynchronousTestCase):
    def test_default_flag_env_and_bad_values(self) -> None:
        self.assertEqual(server([])["max-connections-per-source"], 128)
        self.assertEqual(server([], {"CODERSTACK_MAX_CONNECTIONS_PER_SOURCE": "0"})["max-connections-per-source"], 0)
        self.assertEqual(server(["--max-connections-per-source", "7"],
                                {"CODERSTACK_MAX_CONNECTIONS_PER_SOURCE": "9"})["max-connections-per-source"], 7)
        with self.assertRaises(usage.UsageError) as caught:
            server([], {"CODERSTACK_MAX_CONNECTIONS_PER_SOURCE": "-1"})
        self.assertIn("--max-connections-per-source (from CODERSTACK_MAX_CONNECTIONS_PER_SOURCE)", str(caught.exception))


class TrustedProxyOptionTests(unittest.SynchronousTestCase):
    def test_default_flag_and_coder_variables(self) -> None:
        o = server([])
        self.assertEqual((o["proxy-trusted-headers"], o["proxy-trusted-origins"]), ((), ()))
        env = {"CODER_PROXY_TRUSTED_HEADERS": "x-real-ip", "CODER_PROXY_TRUSTED_ORIGINS": "10.0.0.0/8"}
        o = server([], env)
        self.assertEqual(o["proxy-trusted-headers"], ("X-Real-IP",))
        self.assertEqual(o["proxy-trusted-origins"], (ip_network("10.0.0.0/8"),))
        o = server(["--proxy-trusted-headers", "X-Forwarded-For,X-Real-IP,True-Client-IP,CF-Connecting-IP",
                    "--proxy-trusted-origins", "127.0.0.1/32,fd00::/8"], env)
        self.assertEqual(o["proxy-trusted-headers"], ("X-Forwarded-For", "X-Real-IP", "True-Client-IP",
                                                      "CF-Connecting-IP"))
        self.assertEqual(o["proxy-trusted-origins"], (ip_network("127.0.0.1/32"), ip_network("fd00::/8")))

    def test_bad_values_are_usage_errors_naming_the_flag(self) -> None:
        cases = [
            (["--proxy-trusted-headers", "X-Forwarded-For,Forwarded"], "--proxy-trusted-headers", "'Forwarded'"),
            (["--proxy-trusted-headers", "X-Client-IP"], "--proxy-trusted-headers", "X-Client-IP"),
            (["--proxy-trusted-origins", "10.0.0.0/33"], "--proxy-trusted-origins", "10.0.0.0/33"),
            (["--proxy-trusted-origins", "127.0.0.1/32,lb.internal"], "--proxy-trusted-origins", "lb.internal"),
            (["--proxy-trusted-origins", "10.0.0.1/8"], "--proxy-trusted-origins", "host bits"),
        ]
        for argv, *fragments in cases:
            with self.assertRaises(usage.UsageError) as caught:
                server(argv)
            for fragment in fragments:
                self.assertIn(fragment, str(caught.exception))
        with self.assertRaises(usage.UsageError) as caught:
            server([], {"CODER_PROXY_TRUSTED_ORIGINS": "nope"})
        self.assertIn("--proxy-trusted-origins (from CODER_PROXY_TRUSTED_ORIGINS)", str(caught.exception))


class AgentDataDirOptionTests(unittest.SynchronousTestCase):
    def test_unset_means_a_dir_per_agent_under_the_default_base(self) -> None:
        base = {"CODER_AGENT_URL": "http://x", "CODER_AGENT_TOKEN": "t", "XDG_DATA_HOME": "/xdg"}
        o = agent([], base)
        self.assertEqual((o["data-dir"], o["data-dir-per-agent"]), ("/xdg/coderstack/agent", True))
        o = agent([], dict(base, CODER_AGENT_DATA_DIR="/keys/mine"))
        self.assertEqual((o["data-dir"], o["data-dir-per-agent"]), ("/keys/mine", False))
        o = agent(["--data-dir", "/keys/flag"], base)
        self.assertEqual((o["data-dir"], o["data-dir-per-agent"]), ("/keys/flag", False))


class AppOptionsTests(unittest.SynchronousTestCase):
    """The browser's ways in: browser-only, subdomain apps' wildcard, path apps off."""

    def test_defaults_keep_apps_on_and_tunnels_allowed(self) -> None:
        o = server([])
        self.assertIs(o["browser-only"], False)
        self.assertIs(o["disable-path-apps"], False)
        self.assertIsNone(o["wildcard-access-url"])

    def test_coder_environment_variables(self) -> None:
        o = server([], {"CODER_BROWSER_ONLY": "true", "CODER_DISABLE_PATH_APPS": "true",
                        "CODER_WILDCARD_ACCESS_URL": "*.apps.example.com"})
        self.assertIs(o["browser-only"], True)
        self.assertIs(o["disable-path-apps"], True)
        self.assertEqual(o["wildcard-access-url"], "*.apps.example.com")

    def test_flag_beats_environment(self) -> None:
        o = server(["--browser-only", "false"], {"CODER_BROWSER_ONLY": "true"})
        self.assertIs(o["browser-only"], False)

    def test_bad_boolean_names_the_flag(self) -> None:
        with self.assertRaises(usage.UsageError) as e:
            server(["--browser-only", "sometimes"])
        self.assertIn("browser-only", str(e.exception))
