"""The grouped mixed-tier MoE kernels (kernels/moe.cu) on a GPU at Qwen3-30B-A3B's expert
shape (hidden 2048, moe_intermediate 768, 128 experts, top-8), side by side in one run:

- decode of one MoE layer at batch 1, 8 and 32 for int2, int4, bf16 and a mixed table
  (20% of the experts bf16, the rest int2), the two launches timed with CUDA events;
- the bandwidth bound: bytes of every touched expert once at its tier, divided by a
  device-to-device copy bandwidth measured in the same run; achieved / bound;
- the peer a user would write in torch: a loop over the hit experts with bf16 matmuls.

Report, not assert. Needs a CUDA device.

    python benchmarks/bench_moe_gpu.py [--out DIR]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from dynaexq.quant import pack_expert, parse_tier
from dynaexq.quant.cuda import CudaKernels
from dynaexq.quant.expert import expert_nbytes
from dynaexq.runtime.executors.grouped import EXPERT_ENTRY, tier_descriptors

H, INTER, E, TOP_K = 2048, 768, 128, 8


def timed(fn, reps: int = 50) -> float:
    """Median seconds of `fn` over `reps` runs (CUDA events, after a warm-up)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return float(np.median(times))


def copy_bandwidth() -> float:
    """GB/s read + written by a 1 GiB device-to-device copy."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    s = timed(lambda: dst.copy_(src), reps=10)
    return 2 * src.numel() / s / 1e9


class Arena:
    """Every expert at every tier of `tiers` in one device buffer (the same random
    weights for all experts, at distinct addresses so nothing is shared in caches)."""

    def __init__(self, tiers: list[str]) -> None:
        gen = torch.Generator().manual_seed(0)
        gate, up, down = (
            torch.randn(*s, generator=gen) * 0.02 for s in ((INTER, H), (INTER, H), (H, INTER))
        )
        self.tiers = tiers
        self.nbytes = [expert_nbytes(parse_tier(t), H, INTER) for t in tiers]
        blobs = [pack_expert(parse_tier(t), gate, up, down) for t in tiers]
        total = E * sum(self.nbytes)
        self.buf = torch.empty(total, dtype=torch.uint8, device="cuda")
        self.offset = np.zeros((E, len(tiers)), dtype=np.int64)
        off = 0
        for e in range(E):
            for k, blob in enumerate(blobs):
                self.buf[off : off + blob.numel()].copy_(blob.cuda())
                self.offset[e, k] = off
                off += self.nbytes[k]
        descs = tier_descriptors([parse_tier(t) for t in tiers], H, INTER, 256)
        self.descs = torch.from_numpy(descs.view(np.uint8).copy()).cuda()

    def table(self, tier_of: np.ndarray) -> torch.Tensor:
        t = np.zeros(E, dtype=EXPERT_ENTRY)
        t["offset"] = self.offset[np.arange(E), tier_of]
        t["tier"] = tier_of
        return torch.from_numpy(t.view(np.uint8).copy()).cuda()


def grouped_layer(kernels: CudaKernels, arena: Arena, table: torch.Tensor, ids: torch.Tensor):
    """The two launches for one layer (routing sorted on the device, no host sync)."""
    t, k = ids.shape
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(E, dtype=torch.int32, device="cuda")
    counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
    start = torch.zeros(E + 1, dtype=torch.int32, device="cuda")
    start[1:] = counts.cumsum(0)
    token = torch.div(order, k, rounding_mode="floor").to(torch.int32)
    x = torch.randn(t, H, dtype=torch.bfloat16, device="cuda")
    act = torch.empty(t * k, INTER, dtype=torch.bfloat16, device="cuda")
    y = torch.empty(t * k, H, dtype=torch.bfloat16, device="cuda")
    common = [arena.buf.data_ptr(), table.data_ptr(), arena.descs.data_ptr(), start.data_ptr()]

    def run() -> None:
        kernels.launch_moe(
            "dq_moe_gate_up_bf16", ((INTER + 3) // 4, E),
            [*common, token.data_ptr(), x.data_ptr(), act.data_ptr()], [E, H, INTER],
        )  # fmt: skip
        kernels.launch_moe(
            "dq_moe_down_bf16", ((H + 3) // 4, E),
            [*common, 0, act.data_ptr(), y.data_ptr()], [E, H, INTER],
        )  # fmt: skip

    return run


def torch_loop(weights: list[tuple[torch.Tensor, torch.Tensor]], ids: torch.Tensor):
    """What a user writes in torch: bf16 matmuls over the hit experts (host loop)."""
    t, _ = ids.shape
    x = torch.randn(t, H, dtype=torch.bfloat16, device="cuda")
    hit = sorted(set(ids.reshape(-1).tolist()))
    rows = {e: (ids == e).any(1).nonzero().reshape(-1) for e in hit}

    def run() -> None:
        for e in hit:
            gu, dn = weights[e % len(weights)]
            a = x[rows[e]] @ gu.T
            (torch.nn.functional.silu(a[:, :INTER]) * a[:, INTER:]) @ dn.T

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="directory for bench_moe_gpu.json")
    args = ap.parse_args()
    kernels = CudaKernels()
    bw = copy_bandwidth()
    arena = Arena(["int2g64", "int4g128", "bf16"])
    rng = np.random.default_rng(0)
    hot = rng.permutation(E)[: E // 5]
    mixed = np.zeros(E, dtype=np.int64)
    mixed[hot] = 2
    configs = {
        "int2": np.zeros(E, dtype=np.int64),
        "int4": np.ones(E, dtype=np.int64),
        "bf16": np.full(E, 2, dtype=np.int64),
        "mixed int2 + 20% bf16": mixed,
    }
    dense = [
        (torch.randn(2 * INTER, H, dtype=torch.bfloat16, device="cuda") * 0.02,
         torch.randn(H, INTER, dtype=torch.bfloat16, device="cuda") * 0.02)
        for _ in range(16)
    ]  # fmt: skip
    result = {"device": torch.cuda.get_device_name(), "copy_GBps": bw, "rows": []}
    print(f"{result['device']}: device copy {bw:.0f} GB/s (read + write)")
    for batch in (1, 8, 32):
        ids = torch.from_numpy(
            np.stack([rng.choice(E, TOP_K, replace=False) for _ in range(batch)])
        ).cuda()
        hit = np.unique(ids.cpu().numpy())
        base = timed(torch_loop(dense, ids))
        for name, tier_of in configs.items():
            s = timed(grouped_layer(kernels, arena, arena.table(tier_of), ids))
            touched = sum(arena.nbytes[tier_of[e]] for e in hit)
            bound = touched / (bw / 2 * 1e9)  # the copy's read rate
            row = {
                "batch": batch,
                "table": name,
                "us": s * 1e6,
                "touched_MB": touched / 1e6,
                "of_bound": bound / s,
                "vs_torch_bf16_loop": base / s,
            }
            result["rows"].append(row)
            print(
                f"  batch {batch:2d}  {name:<22} {s * 1e6:8.1f} us  reads {touched / 1e6:6.1f} MB"
                f"  {100 * bound / s:5.1f}% of the bandwidth bound  "
                f"{base / s:5.2f}x the torch bf16 loop ({base * 1e6:.0f} us)"
            )
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        Path(args.out, "bench_moe_gpu.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
