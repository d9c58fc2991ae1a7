"""Teacher-forced scoring speed (what `dynaexq eval` spends its time on): forward passes of
[8, 128]-token chunks of the embedded model's calibration text at full precision and under
a 20% budget (static, dynamic), best of 3, one thread, side by side in one run.

    python benchmarks/bench_scoring.py
"""

from __future__ import annotations

import time

import dynaexq
import numpy as np
import torch
from dynaexq.runtime.load import default_calibration


def main() -> None:
    torch.set_num_threads(1)
    tokens = np.concatenate(default_calibration(None))
    x = torch.from_numpy(tokens[: 8 * 128].reshape(8, 128).astype(np.int64))
    rates = {}
    for policy in ("full", "static", "dynamic"):
        kw = {} if policy == "full" else {"budget": "20%", "policy": policy}
        engine = dynaexq.load(**kw)
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            engine.forward(x)
            best = min(best, time.perf_counter() - t0)
        rates[policy] = x.numel() / best
    full = rates["full"]
    for policy, r in rates.items():
        print(f"{policy:8s} {r:8.0f} tokens/s  ({r / full:.2f}x full)")


if __name__ == "__main__":
    main()
