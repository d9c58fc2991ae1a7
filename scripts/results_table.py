#!/usr/bin/env python3
"""The README's results table from `dynaexq eval --json` files: per budget and calibration,
the range over the domains of each policy's mean gap recovered over the offsets, the
cell's best single static configuration (by that mean), and each dynamic policy's margin
over it (range over the domains) and over the per-slice best static (mean of the cells).

Several files (the same sets run with one calibration each) are read as one run.

Usage::

    python scripts/results_table.py RESULTS.json [RESULTS.json ...] [--policies P,Q]
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

STATICS = ("uniform", "static-map", "static-knapsack")


def _fmt_range(values: list[float], signed: bool = False) -> str:
    lo, hi = min(values), max(values)
    f = "{:+.1f}" if signed else "{:.1f}"
    if signed:
        return f.format(lo) if abs(lo - hi) < 0.05 else f"{f.format(lo)} to {f.format(hi)}"
    return f"{f.format(lo)}-{f.format(hi)}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", nargs="+", type=Path)
    ap.add_argument("--policies", default="dynamic,dynamic-recal")
    args = ap.parse_args(argv)
    dyn = [p.strip() for p in args.policies.split(",")]
    gaps: list[dict] = []
    margins: list[dict] = []
    for path in args.results:
        e = json.loads(path.read_text())["eval"]
        gaps += e["gaps"]
        margins += e["margins"]
    budgets = list(dict.fromkeys(g["budget"] for g in gaps if g["budget"] != "-"))
    cals = sorted({g["calibration"] for g in gaps if g["calibration"] not in ("-",)})
    # (budget, calibration, domain, policy) -> gaps over the offsets; the static-low,
    # uniform and full rows carry no calibration and stand for every one.
    per: dict[tuple[str, str, str, str], dict[int, float]] = defaultdict(dict)
    tier: dict[str, str] = {}
    for g in gaps:
        if g["budget"] == "-":
            continue
        for cal in cals if g["calibration"] == "-" else [g["calibration"]]:
            per[(g["budget"], cal, g["domain"], g["policy"])][g["offset"]] = (
                100 * g["gap_recovered_ppl"]
            )
        if g["policy"] == "uniform":
            tier[g["budget"]] = g["tier"]
    mean = {k: sum(v.values()) / len(v) for k, v in per.items()}
    slice_margin = {
        (m["budget"], m["calibration"], m["domain"], m["policy"]): m["margin_mean"] for m in margins
    }
    cell_se = {
        (m["budget"], m["calibration"], m["domain"], m["policy"]): m["margin_over_cell_best_se"]
        for m in margins
        if "margin_over_cell_best_se" in m
    }
    domains = sorted({k[2] for k in per})
    head = ["budget", "calibration", "uniform", "static-map", "static knapsack", "best static"]
    head += [f"**{p}**" for p in dyn] + [f"{p} margin" for p in dyn]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for b in budgets:
        for cal in cals:
            row = [b, cal]
            u = [mean[(b, cal, d, "uniform")] for d in domains if (b, cal, d, "uniform") in mean]
            row.append(f"{_fmt_range(u)} ({tier.get(b, '-')})" if u else "-")
            for p in ("static-map", "static-knapsack"):
                v = [mean[(b, cal, d, p)] for d in domains if (b, cal, d, p) in mean]
                row.append(_fmt_range(v) if v else "-")
            best = {
                d: max(mean[(b, cal, d, p)] for p in (*STATICS, "static") if (b, cal, d, p) in mean)
                for d in domains
            }
            row.append(_fmt_range(list(best.values())))
            for p in dyn:
                v = [mean[(b, cal, d, p)] for d in domains if (b, cal, d, p) in mean]
                row.append(f"**{_fmt_range(v)}**" if v else "-")
            for p in dyn:
                v = [mean[(b, cal, d, p)] - best[d] for d in domains if (b, cal, d, p) in mean]
                row.append(_fmt_range(v, signed=True) if v else "-")
            print("| " + " | ".join(row) + " |")
    print()
    for p in dyn:
        cells = [(k, mean[k] - best_of(mean, k)) for k in mean if k[3] == p]
        within = sum(m >= -0.5 for _, m in cells)
        sl = [slice_margin[k] for k, _ in cells if k in slice_margin]
        print(
            f"{p}: {within} / {len(cells)} cells within 0.5 of the cell's best static "
            f"(mean margin {sum(m for _, m in cells) / max(len(cells), 1):+.2f}); "
            f"{sum(x >= -0.5 for x in sl)} / {len(sl)} within 0.5 of the per-slice best "
            f"(mean {sum(sl) / max(len(sl), 1):+.2f})"
        )
        # A miss is clear when the margin lies below -0.5 by more than two standard errors.
        misses = sorted((k, m) for k, m in cells if m < -0.5)
        if misses and all(k in cell_se for k, _ in misses):
            clear = [(k, m) for k, m in misses if m + 2 * cell_se[k] < -0.5]
            print(
                f"  cells below -0.5: {len(misses)}; below it by more than two standard "
                "errors: "
                + (
                    ", ".join(f"{k[0]} {k[2]} {k[1]} {m:+.1f} ± {cell_se[k]:.1f}" for k, m in clear)
                    or "none"
                )
                + "; the others: "
                + (
                    ", ".join(
                        f"{k[0]} {k[2]} {k[1]} {m:+.1f} ± {cell_se[k]:.1f}"
                        for k, m in misses
                        if (k, m) not in clear
                    )
                    or "none"
                )
            )
    return 0


def best_of(mean: dict, key: tuple[str, str, str, str]) -> float:
    b, cal, d, _ = key
    return max(mean[(b, cal, d, p)] for p in (*STATICS, "static") if (b, cal, d, p) in mean)


if __name__ == "__main__":
    raise SystemExit(main())
