"""Summary tables of `dynaexq eval --json` results, as the README and the notes print them.

- `cells_table`: per budget and calibration, the range over the domains of each policy's
  mean gap recovered over the offsets, the cell's best single static configuration (by
  that mean), and each dynamic policy's margin over it; then the counts of cells within
  0.5 and the misses with their standard errors.
- `tiers_table`: runs of other tier sets, their gaps put on the static-int2 -> full scale
  of reference runs over the same slices (an int4 / bf16 run's own floor is int4).
- `shift_table`: the margins of a workload-shift run, segment by segment.

Several results (the same sets run with one calibration each) are read as one run.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

STATICS = ("uniform", "static-map", "static-knapsack")
Cell = tuple[str, str, str, str]  # (budget, calibration, domain, policy)


def _fmt_range(values: list[float], signed: bool = False) -> str:
    lo, hi = min(values), max(values)
    f = "{:+.1f}" if signed else "{:.1f}"
    if signed:
        return f.format(lo) if abs(lo - hi) < 0.05 else f"{f.format(lo)} to {f.format(hi)}"
    return f"{f.format(lo)}-{f.format(hi)}"


def _best_static(mean: dict[Cell, float], key: Cell) -> float:
    b, cal, d, _ = key
    return max(mean[(b, cal, d, p)] for p in (*STATICS, "static") if (b, cal, d, p) in mean)


def cells_table(evals: list[dict[str, Any]], policies: list[str]) -> str:
    """The README's results table (markdown) and its summary lines, from the `eval` parts
    of one or more results files."""
    gaps = [g for e in evals for g in e["gaps"]]
    margins = [m for e in evals for m in e["margins"]]
    budgets = list(dict.fromkeys(g["budget"] for g in gaps if g["budget"] != "-"))
    cals = sorted({g["calibration"] for g in gaps if g["calibration"] != "-"})
    # The static-low, uniform and full rows carry no calibration and stand for every one.
    per: dict[Cell, dict[int, float]] = defaultdict(dict)
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
    head += [f"**{p}**" for p in policies] + [f"{p} margin" for p in policies]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for b in budgets:
        for cal in cals:
            row = [b, cal]
            u = [mean[(b, cal, d, "uniform")] for d in domains if (b, cal, d, "uniform") in mean]
            row.append(f"{_fmt_range(u)} ({tier.get(b, '-')})" if u else "-")
            for p in ("static-map", "static-knapsack"):
                v = [mean[(b, cal, d, p)] for d in domains if (b, cal, d, p) in mean]
                row.append(_fmt_range(v) if v else "-")
            best = {d: _best_static(mean, (b, cal, d, "")) for d in domains}
            row.append(_fmt_range(list(best.values())))
            for p in policies:
                v = [mean[(b, cal, d, p)] for d in domains if (b, cal, d, p) in mean]
                row.append(f"**{_fmt_range(v)}**" if v else "-")
            for p in policies:
                v = [mean[(b, cal, d, p)] - best[d] for d in domains if (b, cal, d, p) in mean]
                row.append(_fmt_range(v, signed=True) if v else "-")
            lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    for p in policies:
        cells = [(k, mean[k] - _best_static(mean, k)) for k in mean if k[3] == p]
        within = sum(m >= -0.5 for _, m in cells)
        sl = [slice_margin[k] for k, _ in cells if k in slice_margin]
        lines.append(
            f"{p}: {within} / {len(cells)} cells within 0.5 of the cell's best static "
            f"(mean margin {sum(m for _, m in cells) / max(len(cells), 1):+.2f}); "
            f"{sum(x >= -0.5 for x in sl)} / {len(sl)} within 0.5 of the per-slice best "
            f"(mean {sum(sl) / max(len(sl), 1):+.2f})"
        )
        # A miss is clear when the margin lies below -0.5 by more than two standard errors.
        misses = sorted((k, m) for k, m in cells if m < -0.5)
        if misses and all(k in cell_se for k, _ in misses):
            clear = [(k, m) for k, m in misses if m + 2 * cell_se[k] < -0.5]

            def named(ms: list[tuple[Cell, float]]) -> str:
                return ", ".join(f"{k[0]} {k[2]} {k[1]} {m:+.1f} ± {cell_se[k]:.1f}" for k, m in ms)

            rest = [(k, m) for k, m in misses if (k, m) not in clear]
            lines.append(
                f"  cells below -0.5: {len(misses)}; below it by more than two standard "
                f"errors: {named(clear) or 'none'}; the others: {named(rest) or 'none'}"
            )
    return "\n".join(lines)


def _slices(runs: list[dict[str, Any]], policy: str) -> dict[tuple[str, int], float]:
    return {(r["domain"], r["offset"]): r["perplexity"] for r in runs if r["policy"] == policy}


def tiers_table(
    tier_evals: dict[str, dict[str, Any]],
    reference: list[dict[str, Any]],
    policies: list[str],
) -> str:
    """Per tier-set run (name -> its `eval`) and calibration, the range over the domains of
    each policy's mean gap recovered over the offsets, measured from the static int2 of the
    `reference` runs (the main cells, same domains, offsets and tokens) to full precision."""
    low: dict[tuple[str, int], float] = {}
    full_ref: dict[tuple[str, int], float] = {}
    for e in reference:
        low |= {
            (r["domain"], r["offset"]): r["perplexity"]
            for r in e["runs"]
            if r["policy"] == "static" and r["budget"] == "-"
        }
        full_ref |= _slices(e["runs"], "full")
    head = ["run", "tiers", "budget", "calibration", *policies]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, e in tier_evals.items():
        full = _slices(e["runs"], "full")
        for k, ppl in full.items():  # the same slices, or the scale means nothing
            if k not in low or not math.isclose(ppl, full_ref[k], rel_tol=1e-6):
                raise ValueError(
                    f"{name}: slice {k} is not among the reference runs' slices (or its "
                    "full-precision perplexity differs): run them on the same sets, "
                    "offsets and tokens"
                )
        cfg = e["config"]
        for b in cfg["budgets"]:
            for cal in cfg["calibrations"]:
                row = [name, "/".join(cfg["tiers"]), b, cal]
                for p in policies:
                    per: dict[str, list[float]] = defaultdict(list)
                    for r in e["runs"]:
                        if (r["policy"], r["budget"], r["calibration"]) != (p, b, cal):
                            continue
                        k = (r["domain"], r["offset"])
                        lo = math.log(low[k])
                        gap = (lo - math.log(r["perplexity"])) / (lo - math.log(full[k]))
                        per[r["domain"]].append(100 * gap)
                    means = {d: sum(v) / len(v) for d, v in per.items()}
                    if not means:
                        row.append("-")
                        continue
                    worst = min(means, key=means.__getitem__)
                    row.append(f"{_fmt_range(list(means.values()))} (lowest: {worst})")
                lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def shift_table(shift: dict[str, Any], policies: list[str]) -> str:
    """A shift run's gap recovered segment by segment, with each policy's margin over the
    best static and the transitions it made."""
    order = shift["order"]
    lines = [
        f"Shift {' -> '.join(order)} at {shift['budget']}, {shift['segment_tokens']} tokens a "
        "segment: gap recovered, margin over the best static, transitions",
        "",
        "| policy | " + " | ".join(order) + " |",
        "|---|" + "---|" * len(order),
    ]
    for p in policies:
        segs = shift["policies"].get(p)
        if not segs:
            continue
        cells = []
        for s in segs:
            gap = s.get("gap_recovered_ppl")
            cell = "-" if gap is None else f"{100 * gap:.1f}%"
            if s.get("margin_over_best_static") is not None:
                cell += f", {s['margin_over_best_static']:+.1f}, {s.get('transitions', 0)}"
            cells.append(cell)
        lines.append(f"| {p} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
