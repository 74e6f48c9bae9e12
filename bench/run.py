#!/usr/bin/env python3
"""Run every benchmark (bench/bench_*.py), one after another, and print their tables.

Usage: python bench/run.py [--quick | --full] [NAME ...]     e.g. python bench/run.py derp stun

Benchmarks are not part of CI. Each one prints a Markdown table with the date, the machine and
the medians; BENCHMARKS.md records the numbers we measured and what they are compared with.
"""

from __future__ import annotations

import glob
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def main(argv: list[str]) -> int:
    flags = [a for a in argv if a.startswith("--")]
    names = [a for a in argv if not a.startswith("--")]
    scripts = sorted(glob.glob(os.path.join(HERE, "bench_*.py")))
    if names:
        scripts = [s for s in scripts if os.path.basename(s)[6:-3] in names]
    failed = 0
    for script in scripts:
        print(f"\n## {os.path.basename(script)}\n", flush=True)
        args = [sys.executable, script]
        if "--full" in flags and "--full" in open(script).read():
            args.append("--full")
        code = subprocess.call(args, cwd=os.path.dirname(HERE))
        failed += code != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
