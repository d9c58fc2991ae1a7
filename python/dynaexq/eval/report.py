"""Plots (PNG, matplotlib) and the markdown report of `dynaexq eval`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from dynaexq.eval.shift import ShiftTrace


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_ppl_vs_budget(summary: dict[str, Any], out: Path) -> Path:
    plt = _plt()
    runs = summary["runs"]
    budgets = summary["config"]["budgets"]
    domains = sorted({r["domain"] for r in runs})
    fig, axes = plt.subplots(1, len(domains), figsize=(4.2 * len(domains), 3.4), squeeze=False)
    x = np.arange(len(budgets))
    for ax, d in zip(axes[0], domains, strict=False):
        for policy, style in (("static-map", "o--"), ("dynamic", "s-"), ("offload", "^:")):
            ys = [
                next(
                    (
                        r["perplexity"]
                        for r in runs
                        if r["policy"] == policy and r["budget"] == b and r["domain"] == d
                    ),
                    np.nan,
                )
                for b in budgets
            ]
            if not np.all(np.isnan(ys)):
                ax.plot(x, ys, style, label=policy)
        for policy, color in (("full", "green"), ("static", "red")):
            y = next(
                (r["perplexity"] for r in runs if r["policy"] == policy and r["domain"] == d), None
            )
            if y is not None:
                label = "full precision" if policy == "full" else "static low tier"
                ax.axhline(y, color=color, lw=1, ls="-.", label=label)
        ax.set_xticks(x, budgets)
        ax.set_xlabel("budget (share of experts static-map holds hot)")
        ax.set_title(d)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("perplexity")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    path = out / "ppl_vs_budget.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_pareto(summary: dict[str, Any], out: Path) -> Path:
    """Quality vs bytes: gap recovered (log-perplexity, mean over offsets) of every
    budgeted policy against the budget it ran in, one panel per domain."""
    plt = _plt()
    gaps = [g for g in summary["gaps"] if g["budget"] != "-"]
    runs = {(r["policy"], r["budget"], r["domain"], r.get("offset", 0), r.get("calibration")): r
            for r in summary["runs"]}  # fmt: skip
    domains = sorted({g["domain"] for g in gaps})
    fig, axes = plt.subplots(1, len(domains), figsize=(4.2 * len(domains), 3.4), squeeze=False)
    for ax, d in zip(axes[0], domains, strict=False):
        series: dict[str, dict[float, list[float]]] = {}
        for g in gaps:
            if g["domain"] != d:
                continue
            r = runs.get((g["policy"], g["budget"], d, g.get("offset", 0), g.get("calibration")))
            if r is None or not r.get("budget_bytes"):
                continue
            label = g["policy"] + ("" if g.get("calibration") in ("-", "domain") else
                                   f" [{g['calibration']}]")  # fmt: skip
            series.setdefault(label, {}).setdefault(r["budget_bytes"] / 2**20, []).append(
                100 * g["gap_recovered_ppl"]
            )
        for label, pts in sorted(series.items()):
            xs = sorted(pts)
            ax.plot(xs, [float(np.mean(pts[x])) for x in xs], "o-", ms=3, label=label)
        ax.set_xlabel("budget (MiB, everything dynaexq owns)")
        ax.set_title(d)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("gap recovered, log-ppl (%)")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    path = out / "pareto.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_shift(trace: ShiftTrace, order: list[str], out: Path) -> list[Path]:
    """Hotness heatmap per layer over time, and the tier map over time."""
    plt = _plt()
    paths = []
    steps, layers, experts = trace.tier_maps.shape
    for kind, data, cmap, title in (
        ("hotness", trace.hotness, "viridis", "hotness (controller score)"),
        ("tiers", trace.tier_maps.astype(float), "magma", "published tier (bright = high)"),
    ):
        fig, axes = plt.subplots(layers, 1, figsize=(10, 1.4 * layers + 0.8), squeeze=False)
        for li in range(layers):
            ax = axes[li][0]
            ax.imshow(data[:, li, :].T, aspect="auto", cmap=cmap, interpolation="nearest")
            for s in trace.segment_starts[1:]:
                ax.axvline(s - 0.5, color="white", lw=1.2)
            ax.set_ylabel(f"L{li}", rotation=0, labelpad=14)
            ax.set_yticks([])
            if li < layers - 1:
                ax.set_xticks([])
        axes[-1][0].set_xlabel(
            "step  (segments: " + " -> ".join(order) + "; white lines mark the shifts)"
        )
        fig.suptitle(f"dynamic: {title}, experts on the vertical axis")
        fig.tight_layout()
        path = out / f"shift_{kind}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def write_report(
    summary: dict[str, Any],
    shift: dict[str, Any] | None,
    out: Path,
    plots: list[Path],
    command: str,
) -> Path:
    lines = ["# dynaexq eval report", "", f"Command: `{command}`", ""]
    cfg = summary["config"]
    lines += [
        f"Tiers {', '.join(cfg['tiers'])}; {cfg['streams']} streams per domain, window "
        f"{cfg['window']}, chunk (step) {cfg['chunk']} tokens, {cfg['tokens_per_domain']} scored "
        f"tokens per domain after {cfg['calibration_tokens']} calibration tokens. Every policy "
        "at one budget holds the same device bytes; dynamic's staging slots are paid out of "
        "them, unless they are host memory the device reads (`--staging-memory host`).",
        "",
        "## Perplexity and next-token accuracy",
        "",
        "| budget | policy | calibration | domain | offset | hot/layer | perplexity | accuracy "
        "| transitions | bytes moved/token |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary["runs"]:
        t = r["telemetry"]
        name = r["policy"] + (f" ({r['tier']})" if r.get("tier") else "")
        lines.append(
            f"| {r['budget']} | {name} | {r.get('calibration', '-')} | {r['domain']} | "
            f"{r.get('offset', 0)} | {r['hot_per_layer'] or '-'} | "
            f"{r['perplexity']:.3f} | {r['accuracy']:.4f} | "
            f"{int(t.get('transitions_started', 0))} | {t.get('bytes_moved_per_token', 0):.0f} |"
        )
    lines += [
        "",
        "## Gap recovered",
        "",
        "(static-low - policy) / (static-low - full), on log-perplexity and on accuracy.",
        "",
        "| budget | policy | calibration | domain | offset | gap recovered (log ppl) | "
        "gap recovered (accuracy) | best static | margin over best static (points) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for g in summary["gaps"]:
        m = g.get("margin_over_best_static")
        name = g["policy"] + (f" ({g['tier']})" if g.get("tier") else "")
        lines.append(
            f"| {g['budget']} | {name} | {g.get('calibration', '-')} | {g['domain']} | "
            f"{g.get('offset', 0)} | {100 * g['gap_recovered_ppl']:.1f}% | "
            f"{100 * g['gap_recovered_acc']:.1f}% | {g.get('best_static', '-')} | "
            f"{'-' if m is None else f'{m:+.1f}'} |"
        )
    if summary.get("margins"):
        lines += [
            "",
            "## Margin over the best static policy at equal bytes",
            "",
            "Points of gap recovered (log-perplexity) above the best of static-low, the best "
            "uniform tier that fits, static-map and static-knapsack (same calibration), per "
            "scored slice; mean, min and max over the offsets. The last two columns: the one "
            "static configuration with the best mean over the offsets (the best a user could "
            "deploy for the cell, chosen in hindsight), the policy's mean above its mean, and "
            "that margin's standard error (from the paired differences of the two policies' "
            "losses window by window, over every offset's windows).",
            "",
            "| budget | policy | calibration | domain | offsets | mean | min | max | "
            "cell's best static | margin over it | standard error |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for m in summary["margins"]:
            cell = m.get("margin_over_cell_best")
            se = m.get("margin_over_cell_best_se")
            lines.append(
                f"| {m['budget']} | {m['policy']} | {m['calibration']} | {m['domain']} | "
                f"{m['offsets']} | {m['margin_mean']:+.1f} | {m['margin_min']:+.1f} | "
                f"{m['margin_max']:+.1f} | {m.get('cell_best_static', '-')} | "
                f"{'-' if cell is None else f'{cell:+.1f}'} | "
                f"{'-' if se is None else f'{se:.1f}'} |"
            )
    if shift is not None:
        lines += [
            "",
            f"## Workload shift ({' -> '.join(shift['order'])}, budget {shift['budget']})",
            "",
            "| policy | segment | perplexity | gap recovered | margin over best static | "
            "transitions | settle steps |",
            "|---|---|---|---|---|---|---|",
        ]
        for name, segs in shift["policies"].items():
            for s in segs:
                gap = s.get("gap_recovered_ppl")
                m = s.get("margin_over_best_static")
                margin = "-" if m is None else f"{m:+.1f} ({s['best_static']})"
                lines.append(
                    f"| {name} | {s['domain']} | {s['perplexity']:.3f} | "
                    f"{'-' if gap is None else f'{100 * gap:.1f}%'} | "
                    f"{margin} | "
                    f"{s.get('transitions', '-')} | {s.get('settle_steps', '-')} |"
                )
    lines += ["", "## Plots", ""]
    lines += [f"![{p.stem}]({p.name})" for p in plots]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    (out / "results.json").write_text(json.dumps({"eval": summary, "shift": shift}, indent=1))
    return path
