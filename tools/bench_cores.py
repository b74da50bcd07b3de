"""Benchmarks of the four compiled cores against their naive Python references, in one run.

    python tools/bench_cores.py            # full sizes (the issue's bars), a few minutes
    python tools/bench_cores.py --quick    # small sizes, a smoke run

Prints one table of medians (see tools/benchlib.py) with the ratio to the reference and
whether each bar of the foundation issue is met. Each core's cases live in tools/cores/.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tools.benchlib import Row, format_table

AREAS = ("trie", "cache", "routing", "codec")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
    parser.add_argument("--only", choices=AREAS, action="append", help="run only this area")
    args = parser.parse_args(argv)

    import importlib

    rows: list[Row] = []
    for area in args.only or AREAS:
        mod = importlib.import_module(f"tools.cores.bench_{area}")
        area_rows = mod.rows(quick=args.quick)
        rows.extend(area_rows)
        print(format_table(area_rows), flush=True)
        print(flush=True)
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}"
    )
    print(format_table(rows))
    missed = [r for r in rows if r.met is False]
    if missed:
        print(f"\n{len(missed)} bar(s) not met: " + ", ".join(f"{r.area}/{r.case}" for r in missed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
