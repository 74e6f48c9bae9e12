"""Base class for leaf CLI commands: options may come before or after positional arguments.

``usage.Options`` stops at the first positional argument (plain getopt), but people type
``coderstack ping dev -n 3`` as readily as ``coderstack ping -n 3 dev``. This parses GNU-style
(``gnu_getopt``), then hands the options, ``--`` and the positionals to the normal parser. A
literal ``--`` still ends option parsing (``coderstack ssh dev -- ls -l``).
"""

from __future__ import annotations

import getopt
import sys

from twisted.python import usage

from coderstack import __version__


class _Versioned(usage.Options):
    def opt_version(self) -> None:
        """Print coderstack's version and exit."""
        # usage.Options' own --version prints Twisted's.
        print(f"coderstack {__version__}")
        sys.exit(0)


class Command(_Versioned):
    def parseOptions(self, options: list[str] | None = None) -> None:
        if options is None:
            return super().parseOptions(options)
        try:
            opts, args = getopt.gnu_getopt(options, self.shortOpt, self.longOpt)
        except getopt.error as err:
            raise usage.UsageError(str(err)) from None
        takes_value = {f"--{name[:-1]}" for name in self.longOpt if name.endswith("=")}
        ordered: list[str] = []
        for opt, value in opts:
            if opt.startswith("--"):
                ordered.append(f"{opt}={value}" if opt in takes_value else opt)
            else:
                ordered.append(opt)
                if f"{opt[1]}:" in self.shortOpt:
                    ordered.append(value)
        return super().parseOptions(ordered + ["--"] + args)


class CommandGroup(_Versioned):
    """A command with subcommands (``coderstack users create|list``). ``aliases`` maps extra
    names to subcommands (``ls`` for ``list``): usage.Options only knows one-letter short names,
    and its help text cannot show longer ones."""

    aliases: dict[str, str] = {}
    #: usage.Options' table of (name, short name, options class, description).
    subCommands: list[list] = []

    def parseOptions(self, options: list[str] | None = None) -> None:
        if options:
            options = list(options)
            for i, arg in enumerate(options):
                if not arg.startswith("-"):
                    options[i] = self.aliases.get(arg, arg)
                    break
        return super().parseOptions(options)

    def postOptions(self) -> None:
        if self.subCommand is None:
            names = [sub[0] for sub in self.subCommands]
            listed = " or ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)
            raise usage.UsageError(f"missing subcommand: {listed}")
