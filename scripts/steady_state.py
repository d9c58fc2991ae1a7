#!/usr/bin/env python3
"""Does dynamic pull away from the static knapsack as a stationary workload goes on?

Runs `dynaexq eval`'s policies on one long slice per domain (and the mixed batch), then
scores each policy part by part (the slice cut into `--parts` equal stretches of every
stream, in serving order): the gap recovered of each part and dynamic's margin over the
static knapsack there. A controller that converges on the workload's routing would gain
more in the later parts than in the first.

Usage::

    python scripts/steady_state.py --domains php,proto,javascript --budget 3bits \\
        --calibration generic --tokens 16384 --parts 4 [--policies ...]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "python"))

import dynaexq.eval.run as run  # noqa: E402
from dynaexq.eval.stream import StreamResult, gap_recovered  # noqa: E402


def part_gaps(r: StreamResult, low: StreamResult, full: StreamResult, parts: int) -> list[float]:
    """Gap recovered (points, log-perplexity) of each of `parts` stretches of the streams."""
    n = r.nll.shape[1]
    out = []
    for p in range(parts):
        sl = slice(p * n // parts, (p + 1) * n // parts)
        lo, hi, me = (math.log(x.perplexity(sl)) for x in (low, full, r))
        out.append(100 * gap_recovered(lo, hi, me))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--domains", default="php,proto,javascript")
    ap.add_argument("--budget", default="3bits")
    ap.add_argument("--calibration", default="generic")
    ap.add_argument("--tokens", type=int, default=16384, help="scored tokens per slice")
    ap.add_argument("--parts", type=int, default=4)
    ap.add_argument("--policies", default="full,static,static-knapsack,dynamic,dynamic-recal")
    args = ap.parse_args(argv)
    pols = tuple(p.strip() for p in args.policies.split(","))
    if not {"full", "static", "static-knapsack"} <= set(pols):
        ap.error("--policies must include full, static and static-knapsack")
    if "uniform" in pols:
        ap.error("uniform reuses its runs across budgets: leave it out")
    domains = run.unseen_domains(args.domains)
    cfg = run.EvalConfig(
        policies=pols,
        budgets=(args.budget,),
        tokens_per_domain=args.tokens,
        calibration_tokens=4096,
        offsets=1,
        mixed=len(domains) > 1,
        calibrations=(args.calibration,),
    )
    scored: list[StreamResult] = []
    evaluate = run.evaluate_streams

    def recording(*a, **kw) -> StreamResult:
        r = evaluate(*a, **kw)
        scored.append(r)
        return r

    run.evaluate_streams = recording  # every scored run, in the order of summary["runs"]
    try:
        summary = run.run_policies(None, domains, cfg, progress=lambda m: print(m, flush=True))
    finally:
        run.evaluate_streams = evaluate
    by = {(r["policy"], r["domain"]): (r, s) for r, s in zip(summary["runs"], scored, strict=True)}
    print(
        f"\nGap recovered (log-perplexity) per part of {args.tokens} tokens, "
        f"{args.budget}, {args.calibration} calibration"
    )
    for dom in sorted({d for _, d in by}):
        low, full = by[("static", dom)][1], by[("full", dom)][1]
        rows = {
            p: part_gaps(s, low, full, args.parts)
            for (p, d), (_, s) in by.items()
            if d == dom and p not in ("full", "static")
        }
        print(f"\n| {dom} | " + " | ".join(f"part {i + 1}" for i in range(args.parts)) + " |")
        print("|---|" + "---|" * args.parts)
        knap = rows["static-knapsack"]
        for p, g in sorted(rows.items()):
            tr = int(by[(p, dom)][0]["telemetry"].get("transitions_finished", 0))
            cells = " | ".join(f"{x:.1f}" for x in g)
            print(f"| {p} ({tr} transitions) | {cells} |")
            if p != "static-knapsack":
                print(
                    f"| {p} - knapsack | "
                    + " | ".join(f"{a - b:+.1f}" for a, b in zip(g, knap, strict=True))
                    + " |"
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
