"""The CPU expert executor (Rust, straight from packed pool bytes) at full-size shapes.

Two measurements, side by side in one run (report, not assert):

1. Per-expert cost at Qwen3-30B-A3B's expert shape (hidden 2048, moe_intermediate 768) for
   every tier, one token and 16 tokens, against a dense bf16 and a dense float32 torch
   matmul of the same shape (gate_up + SiLU + down).
2. Decode over a pool whose experts do not fit in the CPU caches (>= 1 GB of bf16
   experts): one token per step routed to top-8 of the experts of every layer, tokens/s
   at int4 and int2 against bf16, and the bytes read per second against a memcpy of a
   1 GiB buffer and a read-only sum over 1 GiB measured in the same run on the same
   threads (the physical bound: memory bandwidth).

    python benchmarks/bench_cpu_experts.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from dynaexq import ExpertPool, ExpertTable
from dynaexq._core import CpuExperts
from dynaexq.quant import pack_expert, parse_tier
from dynaexq.quant.expert import expert_nbytes


def best_of(fn, reps: int) -> float:
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def one_tier_table(tier: str, experts: int, h: int, i: int) -> ExpertTable:
    spec = parse_tier(tier)
    g = torch.Generator().manual_seed(0)
    blob = pack_expert(
        spec,
        torch.randn(i, h, generator=g) * 0.02,
        torch.randn(i, h, generator=g) * 0.02,
        torch.randn(h, i, generator=g) * 0.02,
    ).numpy()
    pool = ExpertPool({"t": expert_nbytes(spec, h, i)}, {"t": experts})
    table = ExpertTable(pool, [experts], [["t"]])
    for e in range(experts):  # the same bytes at distinct addresses
        table.load(0, e, blob)
    return table


def per_expert(args: argparse.Namespace) -> list[dict]:
    h, i = 2048, 768
    rows = []
    g = torch.Generator().manual_seed(1)
    w_gu = torch.randn(2 * i, h, generator=g) * 0.02
    w_dn = torch.randn(h, i, generator=g) * 0.02
    for tokens in (1, 16):
        x = torch.randn(tokens, h, generator=g)
        for dt in (torch.float32, torch.bfloat16):
            gu, dn, xd = w_gu.to(dt), w_dn.to(dt), x.to(dt)

            def dense(gu=gu, dn=dn, xd=xd) -> None:
                a = xd @ gu.T
                torch.nn.functional.silu(a[:, :i]) * a[:, i:] @ dn.T

            s = best_of(dense, args.reps)
            rows.append({"tokens": tokens, "what": f"torch dense {str(dt)[6:]}", "us": s * 1e6})
        xs = x.numpy()
        ids = np.zeros((tokens, 1), dtype=np.int64)
        w = np.ones((tokens, 1), dtype=np.float32)
        out = np.empty_like(xs)
        for tier, act in variants(args):
            table = one_tier_table(tier, 1, h, i)
            core = CpuExperts(table, [tier], h, i, 256, args.threads, act)

            def call(core=core, xs=xs, ids=ids, w=w, out=out) -> None:
                core.forward(0, xs, ids, w, out)

            s = best_of(call, args.reps)
            rows.append({"tokens": tokens, "what": f"dynaexq {label(tier, act)}", "us": s * 1e6})
    return rows


def variants(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(tier, activations) pairs: 16-bit tiers take float inputs either way."""
    out = []
    for tier in args.tiers.split(","):
        acts = ["float"] if not parse_tier(tier).is_quantized else args.activations.split(",")
        out += [(tier, a) for a in acts]
    return out


def label(tier: str, act: str) -> str:
    return tier if not parse_tier(tier).is_quantized else f"{tier}/{act}"


def memcpy_bandwidth(nbytes: int) -> float:
    """GB/s moved (read + write) by a copy of `nbytes` between two host buffers, on torch's
    threads (as many as the executor's)."""
    src = torch.ones(nbytes, dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)  # fault the pages in first
    return 2 * nbytes / best_of(lambda: dst.copy_(src), 3) / 1e9


def read_bandwidth(nbytes: int) -> float:
    """GB/s read by a sum over `nbytes` (int64 words) on torch's threads: the bound of a
    kernel that only reads its weights."""
    src = torch.ones(nbytes // 8, dtype=torch.int64)
    src.sum()
    return nbytes / best_of(lambda: src.sum(), 3) / 1e9


def decode(args: argparse.Namespace) -> dict:
    h, i = 2048, 768
    experts = args.experts
    top_k = 8
    memcpy_gbs = memcpy_bandwidth(1 << 30)
    read_gbs = read_bandwidth(1 << 30)
    rng = np.random.default_rng(0)
    result = {
        "memcpy_GBps_read_plus_write": memcpy_gbs,
        "read_GBps": read_gbs,
        "experts": experts,
        "tiers": {},
    }
    for tier, act in [("bf16", "float"), *variants(args)]:
        name = label(tier, act)
        if name in result["tiers"]:
            continue
        nbytes = expert_nbytes(parse_tier(tier), h, i)
        table = one_tier_table(tier, experts, h, i)
        core = CpuExperts(table, [tier], h, i, 256, args.threads, act)
        x = rng.standard_normal((1, h)).astype(np.float32)
        out = np.empty_like(x)
        w = np.full((1, top_k), 1 / top_k, dtype=np.float32)
        # Each step routes to fresh experts (cycling through all), so nothing stays cached.
        steps = args.steps
        picks = [
            np.array([[(s * top_k + j) % experts for j in range(top_k)]], dtype=np.int64)
            for s in range(steps)
        ]

        def run(core=core, x=x, out=out, w=w, picks=picks) -> None:
            for p in picks:
                core.forward(0, x, p, w, out)

        s = best_of(run, 2)
        read = steps * top_k * nbytes
        result["tiers"][name] = {
            "pool_GB": experts * nbytes / 1e9,
            "expert_MB": nbytes / 1e6,
            "steps_per_s": steps / s,
            "read_GBps": read / s / 1e9,
        }
    bf = result["tiers"]["bf16"]["steps_per_s"]
    for t in result["tiers"].values():
        t["vs_bf16"] = t["steps_per_s"] / bf
        t["of_memcpy_read"] = t["read_GBps"] / (memcpy_gbs / 2)
        t["of_read_bandwidth"] = t["read_GBps"] / read_gbs
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tiers", default="int8g128,int4g128,int3g64,int2g64,int2g64a,fp16")
    p.add_argument(
        "--activations",
        default="int8,float",
        help="inputs of the integer tiers: int8 (the default of the executor), float, or both",
    )
    p.add_argument("--experts", type=int, default=120, help="experts in the decode pool")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = per_expert(args)
    print(f"Per-expert cost at 2048 x 768 (gate_up + SiLU + down), {args.threads} thread(s):")
    for tokens in (1, 16):
        base = next(
            r["us"] for r in rows if r["tokens"] == tokens and r["what"] == "torch dense bfloat16"
        )
        for r in (r for r in rows if r["tokens"] == tokens):
            print(f"  {tokens:2d} tok  {r['what']:<28} {r['us']:9.0f} us  ({base / r['us']:.2f}x)")
    d = decode(args)
    print(
        f"\nDecode, one token per step to 8 of {d['experts']} experts (2048 x 768), "
        f"memcpy {d['memcpy_GBps_read_plus_write']:.1f} GB/s (read + write), read "
        f"{d['read_GBps']:.1f} GB/s (a sum), {args.threads} thread(s):"
    )
    for tier, t in d["tiers"].items():
        print(
            f"  {tier:<16} pool {t['pool_GB']:5.2f} GB  {t['steps_per_s']:7.1f} steps/s  "
            f"{t['vs_bf16']:.2f}x bf16  reads {t['read_GBps']:5.1f} GB/s "
            f"({100 * t['of_memcpy_read']:.0f}% of memcpy's read rate, "
            f"{100 * t['of_read_bandwidth']:.0f}% of the read bandwidth)"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"per_expert": rows, "decode": d, "threads": args.threads}, f, indent=1)


if __name__ == "__main__":
    main()
