#!/usr/bin/env python3
"""The README's results table from `dynaexq eval --json` files (`dynaexq.eval.table`;
`dynaexq eval --suite` prints it too, after running the suite's cells).

Several files (the same sets run with one calibration each) are read as one run.

Usage::

    python scripts/results_table.py RESULTS.json [RESULTS.json ...] [--policies P,Q]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from dynaexq.eval.table import cells_table


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="+", type=Path)
    ap.add_argument("--policies", default="dynamic,dynamic-recal")
    args = ap.parse_args(argv)
    evals = [json.loads(path.read_text())["eval"] for path in args.results]
    print(cells_table(evals, [p.strip() for p in args.policies.split(",")]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
