#!/usr/bin/env python3
"""The ceiling of any precision policy on unseen text (dynaexq.eval.oracle): per scored
slice, the gap recovered of the deployable static knapsack (what `static-knapsack` and
dynamic's starting point hold), of the knapsack chosen in hindsight on the slice's own
routing (the best static assignment there is), and of a per-step hindsight assignment
switched in for free (a controller that knew the next step and moved at no cost).
Shift segments are scored with the first domain's calibration, as `dynaexq eval --shift`.

    python scripts/headroom.py --domains tuning --budgets 3bits,4bits
    python scripts/headroom.py --domains held-back --mixed --shift perl,shell,pypkg \\
        --json docs/results/eval/headroom/heldback.json
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
from dynaexq.engine import EMBEDDED_MODEL_DIR
from dynaexq.eval.oracle import headroom
from dynaexq.eval.run import (
    EvalConfig,
    budget_bytes,
    eval_slices,
    generic_calibration,
    split_calibration,
    unseen_domains,
)
from dynaexq.eval.stream import as_streams
from dynaexq.runtime.budget import fixed_memory
from dynaexq.runtime.load import calibration_scores, knapsack_values, load_with_policy
from dynaexq.runtime.policy import DEFAULT_CONTROLLER, Policy
from dynaexq.runtime.sensitivity import layer_losses, output_errors
from dynaexq.runtime.store import TierStore, tiered_checkpoint_for


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--domains", default="tuning")
    p.add_argument("--budgets", default="3bits,4bits")
    p.add_argument("--tiers", default="int2,int3,int4,bf16")
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--calibration-tokens", type=int, default=4096)
    p.add_argument("--offsets", type=int, default=3)
    p.add_argument("--calibration", default="domain", help="domain, generic or both")
    p.add_argument("--mixed", action="store_true")
    p.add_argument("--shift", default="none", help="comma list of domains, or none")
    p.add_argument("--segment-tokens", type=int, default=4096)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    import torch

    torch.set_num_threads(1)  # as `dynaexq eval`'s default

    cfg = EvalConfig(
        tiers=tuple(args.tiers.split(",")),
        tokens_per_domain=args.tokens,
        calibration_tokens=args.calibration_tokens,
        offsets=args.offsets,
        mixed=args.mixed,
    )
    domains = unseen_domains(args.domains)
    path = EMBEDDED_MODEL_DIR
    store = TierStore.from_tiered(tiered_checkpoint_for(path, [*cfg.tiers], progress=True))
    full, _ = load_with_policy(path, policy="full")
    calib, evals = split_calibration(domains, cfg.calibration_tokens)
    L, E = len(store.layers), store.experts
    ctl = DEFAULT_CONTROLLER
    modes = ["domain", "generic"] if args.calibration == "both" else [args.calibration]
    texts: dict[tuple[str, str], list[np.ndarray]] = {}
    for mode in modes:
        for d in calib:
            texts[(mode, d)] = [calib[d]] if mode == "domain" else generic_calibration(path)
        texts[(mode, "mixed")] = (
            list(calib.values()) if mode == "domain" else generic_calibration(path)
        )

    made: dict[tuple[str, str, str, int], tuple[np.ndarray, np.ndarray, int]] = {}

    def calibrated(key: tuple[str, str], text: list[np.ndarray], budget: str, batch: int):
        """The deployable static knapsack's map and the per-share tier values (made once
        per calibration text, budget and batch: every offset of a domain shares them)."""
        if (*key, budget, batch) not in made:
            made[(*key, budget, batch)] = _calibrated(text, budget, batch)
        return made[(*key, budget, batch)]

    def _calibrated(text: list[np.ndarray], budget: str, batch: int):
        scores = calibration_scores(full, text)
        errs = output_errors(full, store, text)
        losses = layer_losses(full, store, text) if ctl.value_scale == "layer" else None
        fixed = fixed_memory(full.config, dtype_bytes=4, batch=batch, context=256, chunk=32)
        nbytes, _ = budget_bytes(budget, store, fixed.total, L, E)
        pol = Policy(
            "static-map", tiers=cfg.tiers, controller=replace(ctl, planner="value", split="global")
        )
        _, dep = load_with_policy(
            path, policy=pol, budget=nbytes, calibration=scores, output_errors=errs,
            layer_losses=losses, batch=batch, context=256, chunk=32, progress=False,
        )  # fmt: skip
        assert dep is not None and dep.plan.assignment is not None
        deployed = np.asarray(dep.plan.assignment, dtype=np.int64).reshape(L, E)
        values, _ = knapsack_values(pol, store, scores, errs, losses)
        room = int(sum(store.slot_bytes[t] for t in deployed.ravel()))
        room = max(room, nbytes - fixed.total)
        return deployed, values, room

    rows = []
    streams = eval_slices(evals, cfg)
    for budget in args.budgets.split(","):
        for mode in modes:
            for (d, o), s in sorted(streams.items()):
                deployed, values, room = calibrated(
                    (mode, d), texts[(mode, d)], budget, cfg.streams
                )
                h = headroom(full, store, s, deployed=deployed, values=values, room=room)
                row = {"budget": budget, "calibration": mode, "domain": d, "offset": o, **h.row()}
                rows.append(row)
                print(json.dumps(row), flush=True)
        if args.shift != "none":
            order = args.shift.split(",")
            deployed, values, room = calibrated(("shift", order[0]), [calib[order[0]]], budget, 1)
            seg = args.segment_tokens // cfg.window * cfg.window
            for i, d in enumerate(order):
                s = as_streams(evals[d][: seg + 1], 1, cfg.window, seg)
                h = headroom(full, store, s, deployed=deployed, values=values, room=room)
                row = {"budget": budget, "calibration": f"shift:{order[0]}", "domain": d,
                       "offset": i, **h.row()}  # fmt: skip
                rows.append(row)
                print(json.dumps(row), flush=True)
    print()
    print("| budget | calibration | domain | slices | deployed | hindsight static | "
          "hindsight per step | static headroom | step headroom |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    keys = sorted({(r["budget"], r["calibration"], r["domain"]) for r in rows})
    for k in keys:
        rs = [r for r in rows if (r["budget"], r["calibration"], r["domain"]) == k]

        def m(f: str, rs=rs) -> str:
            v = [r[f] for r in rs]
            return f"{np.mean(v):.1f}" + (f" ({min(v):.1f}..{max(v):.1f})" if len(v) > 1 else "")

        print(f"| {k[0]} | {k[1]} | {k[2]} | {len(rs)} | {m('deployed')} | "
              f"{m('hindsight_static')} | {m('hindsight_step')} | {m('static_headroom')} | "
              f"{m('step_headroom')} |")  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)},
                                         "rows": rows}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
