"""The port-forward spec grammar: every example and error of Coder's."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial import unittest

from coderstack.forward.spec import (
    ForwardSpec,
    SpecError,
    forwarding_line,
    parse_forwards,
    parse_spec,
)


class GrammarTests(unittest.TestCase):
    def test_every_documented_form(self):
        cases = {
            "8000": [("", 8000, 8000)],
            "8888:9999": [("", 8888, 9999)],
            "8000-8002": [("", 8000, 8000), ("", 8001, 8001), ("", 8002, 8002)],
            "1-3:6-8": [("", 1, 6), ("", 2, 7), ("", 3, 8)],
            "127.0.0.1:4000:4000": [("127.0.0.1", 4000, 4000)],
            "[::1]:8080:8081": [("::1", 8080, 8081)],
            "127.0.0.1:4000-4001": [("127.0.0.1", 4000, 4000), ("127.0.0.1", 4001, 4001)],
            "[::1]:4000-4001:5000-5001": [("::1", 4000, 5000), ("::1", 4001, 5001)],
            "0.0.0.0:22": [("0.0.0.0", 22, 22)],
            "65535": [("", 65535, 65535)],
        }
        for text, want in cases.items():
            self.assertEqual(parse_spec(text), want, text)

    def test_errors_carry_coders_messages(self):
        cases = {
            "abc": 'invalid port specification "abc"',
            "8000:": 'invalid port specification "8000:"',
            "::1:80": 'invalid port specification "::1:80"',
            "[::1]80": 'invalid port specification "[::1]80"',
            "١٢٣": 'invalid port specification "١٢٣"',   # non-ASCII digits: Go's \d is ASCII
            "999.0.0.1:80": 'invalid IP address "999.0.0.1"',
            "[:::1]:80": 'invalid IP address "[:::1]"',
            "0": 'parse local port range from "0": parse range start port from "0": port cannot be 0',
            "80:0": 'parse remote port range from "80:0": parse range start port from "0": port cannot be 0',
            "70000": ('parse local port range from "70000": parse range start port from "70000": '
                      'parse port "70000": strconv.ParseUint: parsing "70000": value out of range'),
            "5-0": 'parse local port range from "5-0": parse range end port from "0": port cannot be 0',
            "9-5": 'parse local port range from "9-5": range end port 5 is less than start port 9',
            "1-5:6-7": "port ranges must be the same length, got 5 ports forwarded to 2 ports",
        }
        for text, want in cases.items():
            with self.assertRaises(SpecError, msg=text) as cm:
                parse_spec(text)
            self.assertEqual(str(cm.exception), want)

    def test_comma_lists_networks_and_duplicates(self):
        specs = parse_forwards(["8000,9000:9001", " 7000 "], ["53"])
        self.assertEqual(specs, [ForwardSpec("tcp", "", 8000, 8000), ForwardSpec("tcp", "", 9000, 9001),
                                 ForwardSpec("tcp", "", 7000, 7000), ForwardSpec("udp", "", 53, 53)])
        # Same port on TCP and UDP, or on different bind addresses, is fine.
        parse_forwards(["53", "127.0.0.1:53"], ["53"])
        with self.assertRaises(SpecError) as cm:
            parse_forwards(["8000", "7999-8001:1-3"], [])
        self.assertEqual(str(cm.exception), "local tcp host:invalid IP port:8000 is specified twice")
        with self.assertRaises(SpecError) as cm:
            parse_forwards([], ["[::1]:53,[0::1]:53:54"])
        self.assertEqual(str(cm.exception), "local udp host:::1 port:53 is specified twice")
        with self.assertRaises(SpecError) as cm:
            parse_forwards(["80,x"], [])
        self.assertEqual(str(cm.exception),
                         'failed to parse TCP port-forward specification "x": invalid port specification "x"')

    @given(st.text(max_size=40))
    def test_garbage_only_raises_spec_error(self, text):
        try:
            parse_forwards([text], [text])
        except SpecError:
            pass

    def test_forwarding_line(self):
        self.assertEqual(forwarding_line("tcp", "127.0.0.1", 8080, 3000),
                         "Forwarding 'tcp://127.0.0.1:8080' locally to 'tcp://127.0.0.1:3000' in the workspace")
        self.assertEqual(forwarding_line("udp", "::1", 53, 5353),
                         "Forwarding 'udp://[::1]:53' locally to 'udp://127.0.0.1:5353' in the workspace")
