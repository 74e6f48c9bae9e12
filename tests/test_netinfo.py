"""The host's interfaces: a fake /sys and /proc/net/if_inet6, then this machine's own."""

from __future__ import annotations

import ipaddress
import os

from twisted.trial import unittest

from coderstack.netinfo import gather_interfaces, interface_addresses
from coderstack.tailnet.netcheck.health import interfaces_report


class GatherInterfacesTests(unittest.TestCase):
    def test_gather_interfaces_from_fake_sysfs(self) -> None:
        root = self.mktemp()
        os.makedirs(os.path.join(root, "net", "lo"))
        os.makedirs(os.path.join(root, "net", "tiny"))
        for name, mtu, flags in (("lo", 65536, "0x9"), ("tiny", 1200, "0x1003")):
            with open(os.path.join(root, "net", name, "mtu"), "w") as f:
                f.write(f"{mtu}\n")
            with open(os.path.join(root, "net", name, "flags"), "w") as f:
                f.write(flags + "\n")
        inet6 = os.path.join(root, "if_inet6")
        with open(inet6, "w") as f:
            f.write("fd000000000000000000000000000001 05 40 00 80     tiny\n")
        got = {i.name: i for i in gather_interfaces(os.path.join(root, "net"), inet6)}
        self.assertEqual(got["tiny"].mtu, 1200)
        self.assertIn("fd00::1/64", got["tiny"].addresses)
        self.assertTrue(got["lo"].up)
        rep = interfaces_report(got.values())
        self.assertIn("tiny has MTU 1200", rep["warnings"][0]["message"])

    def test_gather_real_interfaces(self) -> None:
        names = [i.name for i in gather_interfaces()]
        self.assertIn("lo", names)


class InterfaceAddressesTests(unittest.TestCase):
    def test_ipv6_from_if_inet6_without_loopback_or_link_local(self) -> None:
        inet6 = self.mktemp()
        with open(inet6, "w") as f:
            f.write("00000000000000000000000000000001 01 80 10 80       lo\n"
                    "fe800000000000000000000000000002 02 40 20 80     eth0\n"
                    "fd000000000000000000000000000003 02 40 00 80     eth0\n")
        v6 = [a for a in interface_addresses(inet6) if a.version == 6]
        self.assertEqual(v6, [ipaddress.IPv6Address("fd00::3")])

    def test_the_same_ipv4_addresses_as_the_interfaces_list(self) -> None:
        """Every non-loopback IPv4 address of the interfaces, and 127.0.0.1 left out."""
        listed = {ipaddress.ip_interface(a).ip for i in gather_interfaces() for a in i.addresses}
        v4 = [a for a in interface_addresses() if a.version == 4]
        self.assertNotIn(ipaddress.IPv4Address("127.0.0.1"), v4)
        self.assertEqual(set(v4), {a for a in listed if a.version == 4 and not a.is_loopback})
