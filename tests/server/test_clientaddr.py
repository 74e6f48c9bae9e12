"""The client's address behind trusted proxies: the rule for each header, spoofed prefixes,
IPv6, malformed values; hypothesis for the parser (it never raises, and a chain it builds
itself reads back)."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv6Address, ip_network

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial import unittest

from coderstack.server import clientaddr as c
from coderstack.server.clientaddr import ClientAddress, TrustedProxies, client_address

LB = "10.0.0.5"
PROXIES = TrustedProxies(headers=c.ALLOWED_HEADERS, origins=c.parse_origins("10.0.0.0/8,fd00::/8"))


def xff(*values: str) -> dict[str, list[str]]:
    return {"x-forwarded-for": list(values)}


class ParseAddressTests(unittest.TestCase):
    def test_forms(self) -> None:
        cases = {
            "192.0.2.1": IPv4Address("192.0.2.1"),
            " 192.0.2.1\t": IPv4Address("192.0.2.1"),
            "192.0.2.1:8080": IPv4Address("192.0.2.1"),
            "2001:db8::1": IPv6Address("2001:db8::1"),
            "[2001:db8::1]": IPv6Address("2001:db8::1"),
            "[2001:db8::1]:443": IPv6Address("2001:db8::1"),
            "::ffff:192.0.2.1": IPv4Address("192.0.2.1"),
        }
        for text, want in cases.items():
            self.assertEqual(c.parse_address(text), want, text)

    def test_malformed(self) -> None:
        for text in ["", "unknown", "_hidden", "192.0.2", "192.0.2.1:", "192.0.2.1:99999",
                     "192.0.2.1:８０", "[192.0.2.1]", "[2001:db8::1", "[2001:db8::1]x",
                     "2001:db8::1:443x", "fe80::1%eth0", "[fe80::1%eth0]", "192.0.2.1/32",
                     "01.2.3.4", "example.com", "192.0.2.1:80:80"]:
            self.assertIsNone(c.parse_address(text), text)


class RuleTests(unittest.TestCase):
    def test_untrusted_peer_is_the_client_whatever_it_sends(self) -> None:
        for headers in [xff("203.0.113.9"), {"x-real-ip": ["203.0.113.9"]}, {}]:
            self.assertEqual(client_address("192.0.2.50", headers, PROXIES), ClientAddress("192.0.2.50"))

    def test_nothing_configured_trusts_no_one(self) -> None:
        for proxies in [TrustedProxies(), TrustedProxies(headers=("X-Forwarded-For",)),
                        TrustedProxies(origins=PROXIES.origins)]:
            self.assertEqual(client_address(LB, xff("203.0.113.9"), proxies).host, LB)

    def test_trusted_peer_without_a_header_is_the_client(self) -> None:
        self.assertEqual(client_address(LB, {}, PROXIES), ClientAddress(LB))
        self.assertEqual(client_address(LB, xff(" ", ""), PROXIES), ClientAddress(LB))

    def test_forwarded_for_from_a_trusted_peer(self) -> None:
        got = client_address(LB, xff("203.0.113.9"), PROXIES)
        self.assertEqual(got, ClientAddress("203.0.113.9", (LB,)))
        self.assertEqual(got.forwarded_for, "203.0.113.9, 10.0.0.5")

    def test_a_spoofed_prefix_is_passed_over(self) -> None:
        # The client sent "X-Forwarded-For: 198.51.100.1"; the load balancer appended the client.
        got = client_address(LB, xff("198.51.100.1, 203.0.113.9"), PROXIES)
        self.assertEqual(got.host, "203.0.113.9")
        # Claiming to be a trusted proxy does not help either: the rightmost untrusted wins.
        got = client_address(LB, xff("10.9.9.9, 203.0.113.9"), PROXIES)
        self.assertEqual(got.host, "203.0.113.9")

    def test_trusted_hops_are_passed_over(self) -> None:
        got = client_address(LB, xff("198.51.100.1, 203.0.113.9", "10.1.1.1:3000, [fd00::7]"), PROXIES)
        self.assertEqual(got, ClientAddress("203.0.113.9", ("10.1.1.1", "fd00::7", LB)))
        self.assertEqual(got.forwarded_for, "203.0.113.9, 10.1.1.1, fd00::7, 10.0.0.5")

    def test_every_entry_trusted_gives_the_leftmost(self) -> None:
        got = client_address(LB, xff("10.1.1.1, 10.2.2.2"), PROXIES)
        self.assertEqual(got, ClientAddress("10.1.1.1", ("10.2.2.2", LB)))

    def test_ipv6(self) -> None:
        got = client_address("fd00::1", xff("2001:db8::9"), PROXIES)
        self.assertEqual(got, ClientAddress("2001:db8::9", ("fd00::1",)))
        got = client_address("fd00::1", xff("[2001:db8::9]:51000"), PROXIES)
        self.assertEqual(got.host, "2001:db8::9")
        # A dual-stack listener sees an IPv4 proxy as IPv4-mapped: still the trusted network.
        got = client_address("::ffff:10.0.0.5", xff("::ffff:203.0.113.9"), PROXIES)
        self.assertEqual(got, ClientAddress("203.0.113.9", (LB,)))
        self.assertEqual(client_address("2001:db8::50", xff("203.0.113.9"), PROXIES).host, "2001:db8::50")

    def test_malformed_falls_back_to_the_peer(self) -> None:
        for value in ["unknown", "203.0.113.9, nonsense", "203.0.113.9:http", "fe80::1%eth0"]:
            self.assertEqual(client_address(LB, xff(value), PROXIES), ClientAddress(LB), value)
        # Junk to the left of the client is the client's own claim, and unread.
        self.assertEqual(client_address(LB, xff("nonsense, 203.0.113.9"), PROXIES).host, "203.0.113.9")
        # A peer that is not an address (a unix socket) is never trusted.
        self.assertEqual(client_address("local", xff("203.0.113.9"), PROXIES).host, "local")

    def test_too_long_a_chain_falls_back_to_the_peer(self) -> None:
        chain = ", ".join(["10.1.1.1"] * (c.MAX_HOPS + 1))
        self.assertEqual(client_address(LB, xff(chain), PROXIES).host, LB)
        spoofs = ", ".join(["198.51.100.1"] * 1000 + ["203.0.113.9"])
        self.assertEqual(client_address(LB, xff(spoofs), PROXIES).host, "203.0.113.9")

    def test_each_single_address_header(self) -> None:
        for name in ["X-Real-IP", "True-Client-IP", "CF-Connecting-IP"]:
            proxies = TrustedProxies((name,), PROXIES.origins)
            headers = {name.lower(): [b"203.0.113.9"]}
            self.assertEqual(client_address(LB, headers, proxies), ClientAddress("203.0.113.9", (LB,)), name)
            # A list, or two lines, is not one address.
            for bad in [[b"203.0.113.9, 198.51.100.1"], [b"203.0.113.9", b"198.51.100.1"]]:
                self.assertEqual(client_address(LB, {name.lower(): bad}, proxies).host, LB, name)
            # Only the configured header is read.
            other = TrustedProxies(("X-Forwarded-For",), PROXIES.origins)
            self.assertEqual(client_address(LB, headers, other).host, LB, name)

    def test_the_first_configured_header_present_decides(self) -> None:
        headers = {"x-real-ip": ["198.51.100.1"], "x-forwarded-for": ["203.0.113.9"]}
        both = c.parse_headers("CF-Connecting-IP, X-Forwarded-For, X-Real-IP")
        self.assertEqual(client_address(LB, headers, TrustedProxies(both, PROXIES.origins)).host, "203.0.113.9")
        reverse = c.parse_headers("X-Real-IP,X-Forwarded-For")
        self.assertEqual(client_address(LB, headers, TrustedProxies(reverse, PROXIES.origins)).host,
                         "198.51.100.1")


class OptionParsingTests(unittest.TestCase):
    def test_headers(self) -> None:
        self.assertEqual(c.parse_headers(""), ())
        self.assertEqual(c.parse_headers("x-forwarded-for, CF-CONNECTING-IP,,X-Forwarded-For"),
                         ("X-Forwarded-For", "CF-Connecting-IP"))
        for bad in ["Forwarded", "X-Forwarded-For,X-Client-IP", "X-Forwarded-For;X-Real-IP"]:
            with self.assertRaises(ValueError):
                c.parse_headers(bad)

    def test_origins(self) -> None:
        self.assertEqual(c.parse_origins(""), ())
        self.assertEqual(c.parse_origins("127.0.0.1/32, 10.0.0.0/8,::1,fd00::/8"),
                         (ip_network("127.0.0.1/32"), ip_network("10.0.0.0/8"), ip_network("::1/128"),
                          ip_network("fd00::/8")))
        for bad in ["10.0.0.1/8", "10.0.0.0/33", "nope", "10.0.0.0/8;127.0.0.1/32", "fd00::/129"]:
            with self.assertRaises(ValueError):
                c.parse_origins(bad)


_v4 = st.ip_addresses(v=4).map(str)
_v6 = st.ip_addresses(v=6).map(str)
_entry = st.one_of(
    _v4, _v6, _v4.map(lambda a: a + ":80"), _v6.map(lambda a: f"[{a}]"), _v6.map(lambda a: f"[{a}]:443"),
    st.text(alphabet="0123456789abcdef.:[]%, \t_-xyz", max_size=20),
)
_header = st.lists(st.one_of(st.binary(max_size=40), st.text(max_size=40)), max_size=3)
_trusted = ip_network("10.0.0.0/8")


class FuzzTests(unittest.TestCase):
    @given(st.text(max_size=60))
    def test_parse_address_never_raises(self, text: str) -> None:
        got = c.parse_address(text)
        self.assertTrue(got is None or isinstance(got, IPv4Address | IPv6Address))

    @given(st.one_of(_v4, _v6, st.text(max_size=20)), st.dictionaries(
        st.sampled_from([h.lower() for h in c.ALLOWED_HEADERS]), _header, max_size=4))
    def test_client_address_never_raises_and_names_an_address(
            self, peer: str, headers: dict[str, list[str | bytes]]) -> None:
        proxies = TrustedProxies(c.ALLOWED_HEADERS, (_trusted, ip_network("::/0")))
        got = client_address(peer, headers, proxies)
        if got.host != peer:
            self.assertIsNotNone(c.parse_address(got.host))
            self.assertTrue(got.via)

    @given(st.lists(_entry, max_size=8), _v4.filter(lambda a: IPv4Address(a) not in _trusted),
           st.lists(st.integers(1, 2**24 - 1).map(lambda n: str(IPv4Address(0x0A000000 + n))), max_size=4))
    def test_the_rightmost_untrusted_entry_wins(self, claims: list[str], client: str, hops: list[str]) -> None:
        # Whatever the client claimed, the entries the trusted proxies appended decide.
        value = ", ".join([*claims, client, *hops])
        proxies = TrustedProxies(("X-Forwarded-For",), (_trusted,))
        got = client_address(LB, {"x-forwarded-for": [value]}, proxies)
        self.assertEqual(got, ClientAddress(client, (*hops, LB)))
