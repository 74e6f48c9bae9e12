"""EnvOptions: boolean flags given bare, as Coder's CLI takes them."""

from __future__ import annotations

from twisted.python import usage
from twisted.trial import unittest

from coderstack.envopts import EnvOptions, boolean, text


class _Options(EnvOptions):
    envParameters = [
        ("tls-enable", "CODER_TLS_ENABLE", "false", boolean, "Serve HTTPS."),
        ("block-direct", None, "false", boolean, "Block direct connections."),
        ("name", None, "x", text, "A name."),
    ]


def parse(argv: list[str]) -> _Options:
    opts = _Options(environ={})
    opts.parseOptions(argv)
    return opts


class BareBooleanTests(unittest.SynchronousTestCase):
    def test_bare_flag_at_the_end_is_true(self) -> None:
        self.assertIs(parse(["--tls-enable"])["tls-enable"], True)

    def test_bare_flag_before_another_option_is_true(self) -> None:
        opts = parse(["--tls-enable", "--name", "y", "--block-direct"])
        self.assertIs(opts["tls-enable"], True)
        self.assertIs(opts["block-direct"], True)
        self.assertEqual(opts["name"], "y")

    def test_a_following_value_is_still_the_value(self) -> None:
        self.assertIs(parse(["--tls-enable", "false"])["tls-enable"], False)
        self.assertIs(parse(["--tls-enable=false"])["tls-enable"], False)

    def test_a_bad_following_value_names_the_flag(self) -> None:
        with self.assertRaises(usage.UsageError) as caught:
            parse(["--tls-enable", "maybe"])
        self.assertIn("--tls-enable", str(caught.exception))

    def test_only_boolean_flags_may_be_bare(self) -> None:
        with self.assertRaises(usage.UsageError):
            parse(["--name"])
