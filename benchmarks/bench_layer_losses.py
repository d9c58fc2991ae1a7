#!/usr/bin/env python3
"""Layer losses (each MoE layer alone at each lower tier: at load and at every
recalibration) two ways, side by side on the embedded model: every pass run whole, and
each pass run only from the layer measured up (what `layer_losses` does). Alternating,
best of `--repeats`; prints the ratio. The bound is the layer work: a pass from layer l
of L runs L - l layers, so the layers' share of the work falls to about (L + 1) / 2L.

    python benchmarks/bench_layer_losses.py [--tokens 1024,4096] [--repeats 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "python"))


def main(argv: list[str] | None = None) -> int:
    from dynaexq.engine import EMBEDDED_MODEL_DIR
    from dynaexq.runtime.calibration import default_calibration_text, window_losses, windows_of
    from dynaexq.runtime.load import load_with_policy
    from dynaexq.runtime.policy import DEFAULT_TIERS
    from dynaexq.runtime.sensitivity import _layer_loss_passes
    from dynaexq.runtime.store import TierStore, tiered_checkpoint_for
    from dynaexq.tokenizer import Tokenizer

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", default="1024,4096", help="calibration tokens, comma list")
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args(argv)
    text = np.asarray(Tokenizer(EMBEDDED_MODEL_DIR).encode(default_calibration_text()))
    full, _ = load_with_policy(EMBEDDED_MODEL_DIR, policy="full")
    store = TierStore.from_tiered(tiered_checkpoint_for(EMBEDDED_MODEL_DIR, list(DEFAULT_TIERS)))
    L, E, T = len(store.layers), store.experts, len(store.tiers)
    top = np.full((L, E), T - 1, dtype=np.int64)
    print(f"embedded model: {L} MoE layers, {T} tiers ({L * (T - 1)} passes)")
    for n in (int(x) for x in args.tokens.split(",")):
        wins = windows_of([np.resize(text, n)], 128, 32)
        whole, from_layer = [], []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            base = window_losses(full, store, top, wins)
            for li in range(L):
                for t in range(T - 1):
                    m = top.copy()
                    m[li] = t
                    window_losses(full, store, m, wins) - base
            whole.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            _layer_loss_passes(full, store, wins)
            from_layer.append(time.perf_counter() - t0)
        a, b = min(whole), min(from_layer)
        print(
            f"{n} tokens ({len(wins)} windows of 128): whole passes {a:.2f} s, "
            f"from the layer up {b:.2f} s: {a / b:.2f}x (layer-work bound {2 * L / (L + 1):.2f}x)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
