"""``coderstack scaletest``'s flags: each bad value is a usage error naming its flag."""

from __future__ import annotations

from twisted.python import usage
from twisted.trial import unittest

from coderstack.cli.scaletest import ScaletestOptions, shard_of


def parse(*argv: str) -> ScaletestOptions:
    opts = ScaletestOptions()
    opts.parseOptions(list(argv))
    return opts


class OptionTests(unittest.TestCase):
    def test_defaults_and_durations(self) -> None:
        got = parse("traffic", "--tick-interval", "250ms", "-n", "3").subOptions
        self.assertEqual((got["tick-interval"], got["connections"], got["bytes-per-tick"], got["duration"]),
                         (0.25, 3, 4096, 30.0))
        got = parse("agents", "--announce-every", "0").subOptions
        self.assertEqual((got["announce-every"], got["count"], got["duration"]), (0.0, 0, 600.0))
        self.assertEqual(parse("create-workspaces", "12").subOptions["count"], 12)

    def test_bad_values_name_their_flag(self) -> None:
        cases = [
            (("traffic", "--tick-interval", "soon"), "--tick-interval"),
            (("traffic", "--bytes-per-tick", "0"), "--bytes-per-tick"),
            (("traffic", "--connections", "-1"), "--connections"),
            (("traffic", "-o", "xml"), "--output"),
            (("agents", "--duration", "0"), "--duration"),
            (("agents", "--rate", "x"), "--rate"),
            (("agents", "--shard", "2/2"), "--shard"),
            (("agents", "--shard", "-1/2"), "--shard"),
            (("traffic", "--shard", "1"), "--shard"),
            (("traffic", "--shard", "a/b"), "--shard"),
            (("create-workspaces", "many"), "count"),
            (("create-workspaces", "0"), "count"),
            (("create-workspaces", "5", "--concurrency", "0"), "--concurrency"),
            ((), "missing subcommand"),
        ]
        for argv, named in cases:
            with self.assertRaises(usage.UsageError, msg=argv) as caught:
                parse(*argv)
            self.assertIn(named, str(caught.exception), argv)

    def test_shards(self) -> None:
        self.assertEqual(parse("agents").subOptions["shard"], (0, 1))
        self.assertEqual(parse("traffic", "--shard", "2/3").subOptions["shard"], (2, 3))
        items = list(range(10))
        slices = [shard_of(items, i, 3) for i in range(3)]
        self.assertEqual(slices, [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]])
        self.assertEqual(sorted(sum(slices, [])), items)  # every item in exactly one slice
        self.assertEqual(shard_of(items, 0, 1), items)
        self.assertEqual(shard_of(range(2), 2, 4), [])  # more slices than items: some are empty
