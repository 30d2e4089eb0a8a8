#!/usr/bin/env python3
"""`make bench`: run every benchmark (benchmarks/<name>/run.py) in turn and print their reports.

Each benchmark measures bootd against the real peer in the same run and prints ratios; nothing here
asserts a time. `make bench BENCH=tftp` (or `python benchmarks/run_all.py tftp nbd`) runs a subset.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv: list[str]) -> int:
    wanted = argv or os.environ.get("BENCH", "").split()
    benches = sorted(p for p in HERE.glob("*/run.py") if not wanted or p.parent.name in wanted)
    if not benches:
        print("no benchmarks found", file=sys.stderr)
        return 1
    failed = []
    for path in benches:
        name = path.parent.name
        print(f"\n=== benchmark {name} ===", flush=True)
        t0 = time.monotonic()
        r = subprocess.run([sys.executable, str(path)], cwd=str(HERE.parent))
        print(f"=== {name}: exit {r.returncode} in {time.monotonic() - t0:.0f} s ===", flush=True)
        if r.returncode != 0:
            failed.append(name)
    if failed:
        print("failed: " + ", ".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
