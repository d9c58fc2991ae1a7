#!/usr/bin/env python3
"""GPU timing of the packed-expert kernels against a dense torch matmul of the same shape.

    python benchmarks/gpu_kernels.py [--json OUT]

For each tier and token count it runs the whole expert (gate_up SwiGLU launch + down
launch) from a packed blob in device memory and the dense bf16 SwiGLU expert with torch,
timed with CUDA events in the same run, and prints the ratio. Needs a CUDA device.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

root = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(root / "python"))

from dynaexq.quant import PackedExpertView, pack_expert, parse_tier  # noqa: E402
from dynaexq.quant.cuda import CudaKernels  # noqa: E402


def _time(fn, reps: int = 50) -> float:
    for _ in range(5):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps * 1e3  # microseconds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    k = CudaKernels()
    rows = []
    print(f"{'H':>5} {'I':>4} {'T':>4} {'tier':>10} {'packed us':>10} {'dense bf16 us':>13} "
          f"{'ratio':>6}")  # fmt: skip
    for h, i in ((2048, 768), (128, 48)):
        g = torch.Generator().manual_seed(0)
        gate, up, down = (torch.randn(*s, generator=g) * 0.02 for s in ((i, h), (i, h), (h, i)))
        w1 = torch.cat([gate, up]).bfloat16().cuda()
        w2 = down.bfloat16().cuda()
        for tier in ("bf16", "int8", "int4", "int3", "int2"):
            t = parse_tier(tier)
            view = PackedExpertView(t, h, i, pack_expert(t, gate, up, down).cuda())
            for tokens in (1, 4, 8, 64, 512):
                x = torch.randn(tokens, h, device="cuda", dtype=torch.bfloat16)

                def dense(x=x, w1=w1, w2=w2, i=i):
                    y = x @ w1.T
                    return (F.silu(y[:, :i]) * y[:, i:]) @ w2.T

                p = _time(lambda x=x, view=view: k.expert_forward(view, x))
                d = _time(dense)
                rows.append({"hidden": h, "inter": i, "tokens": tokens, "tier": t.name,
                             "packed_us": p, "dense_bf16_us": d, "ratio": p / d})  # fmt: skip
                print(f"{h:>5} {i:>4} {tokens:>4} {t.name:>10} {p:10.1f} {d:13.1f} {p / d:6.2f}")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1)
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
