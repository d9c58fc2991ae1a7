#!/usr/bin/env python3
"""How well each hotness signal predicts the routing the controller's plan serves
(dynaexq.eval.predict):

- mass: share of the oracle's captured mass, top-12 per layer, lag 2;
- next-window TV: total-variation distance between each signal's routed shares and the
  next window's (8 steps after a lag of 2), per layer, mean over steps;
- std coverage: how often the controller's standard error of the EMA share (move_z)
  covers its next-window error (1 and 2 standard errors) and RMS error / std;
- value (`--value BUDGET`, e.g. 4bits): how much more planned value (routed share x error
  reduction of the tier) the knapsack assignment of each signal serves over the next
  8 steps than the static knapsack of the calibration does (relative; 0 = as static).

    python scripts/signal_skill.py tuning                  # rust, yaml (unseen, tuning)
    python scripts/signal_skill.py tuning --value 4bits --tiers int2,int3,int4,bf16
    python scripts/signal_skill.py embedded                # the model's own domains
"""

from __future__ import annotations

import argparse

from dynaexq.eval.predict import (
    next_window_error,
    routing_trace,
    signal_skill,
    std_coverage,
    value_skill,
)
from dynaexq.eval.run import budget_bytes, embedded_domains, generic_calibration, unseen_domains
from dynaexq.eval.stream import as_streams
from dynaexq.runtime.load import calibration_scores, load_with_policy


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("which", nargs="?", default="tuning")
    p.add_argument("--value", default=None, help="also the value skill at this budget")
    p.add_argument("--tiers", default="int2,int3,int4,bf16")
    p.add_argument("--calibration", choices=("domain", "generic"), default="domain")
    args = p.parse_args()
    from dynaexq.engine import EMBEDDED_MODEL_DIR
    from dynaexq.runtime.budget import fixed_memory
    from dynaexq.runtime.store import TierStore, tiered_checkpoint_for

    full, _ = load_with_policy(None, policy="full")
    doms = embedded_domains() if args.which == "embedded" else unseen_domains(args.which)
    store = TierStore.from_tiered(tiered_checkpoint_for(EMBEDDED_MODEL_DIR, args.tiers.split(",")))
    fixed = fixed_memory(full.config, dtype_bytes=4, batch=4, context=256, chunk=32)
    generic = calibration_scores(full, generic_calibration(EMBEDDED_MODEL_DIR))
    for name, t in doms.items():
        cal, ev = t[:4096], t[4096:]
        prior = generic if args.calibration == "generic" else calibration_scores(full, [cal])
        tr = routing_trace(full, as_streams(ev, 4, 256, 8192), window=256, chunk=32)
        sk = signal_skill(tr, prior, 12)
        print(name, "mass", " ".join(f"{k}={v:.3f}" for k, v in sk.items()))
        nw = next_window_error(tr, prior)
        print(name, "next-window TV", " ".join(f"{k}={v['tv']:.3f}" for k, v in nw.items()))
        for a in (0.5, 0.8, 0.9):
            for avg in (False, True):
                cov = std_coverage(tr, prior, a, averaged=avg)
                what = f"std coverage ema {a}" + (" averaged" if avg else "")
                print(name, what, " ".join(f"{k}={v:.3f}" for k, v in cov.items()))
        if args.value:
            nbytes, _ = budget_bytes(
                args.value, store, fixed.total, len(store.layers), store.experts
            )
            vs = value_skill(tr, prior, store.gains(), store.slot_bytes, nbytes - fixed.total)
            print(name, "value", " ".join(f"{k}={v:+.3f}" for k, v in vs.items()))


if __name__ == "__main__":
    main()
