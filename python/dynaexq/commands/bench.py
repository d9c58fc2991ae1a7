"""`dynaexq bench`: throughput and latency of every policy at equal device bytes."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

HELP = "serving benchmark of every policy at equal memory (and a full-size estimate)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, default=None, help="checkpoint dir (default: embedded)")
    p.add_argument(
        "--policies", default="full,static,static-map,dynamic,offload", help="policies to run"
    )
    p.add_argument(
        "--budget",
        default="20%",
        help="device bytes for every policy: N%% = the bytes at which static-map holds N%% of "
        "experts hot, or a size like 6GiB",
    )
    p.add_argument("--tiers", default="int2,bf16", help="low and high tier")
    p.add_argument("--concurrency", default="1,8,32", help="concurrent requests per level")
    p.add_argument("--requests", type=int, default=0, help="requests per level (0: 2x level, >=8)")
    p.add_argument("--prompt-tokens", type=int, default=32, help="prompt length")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens generated per request")
    p.add_argument(
        "--pcie-gbs",
        type=float,
        default=25.0,
        help="offload on the CPU backend: modelled host-to-device bandwidth (GB/s)",
    )
    p.add_argument("--url", default=None, help="benchmark a running server instead")
    p.add_argument(
        "--estimate",
        action="store_true",
        help="also write the trace-driven estimate for Qwen3-30B-A3B / Qwen3-Next-80B-A3B",
    )
    p.add_argument("--out", type=Path, default=Path("runs/bench"), help="report directory")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument(
        "--device",
        default=None,
        help="where the models run: cuda[:N] (the default when a GPU is present) or cpu",
    )


def run(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from dynaexq.bench.serving import (
        bench_in_process,
        bench_url,
        prompts_from_tokens,
        write_bench_report,
    )
    from dynaexq.eval.run import budget_bytes, embedded_domains
    from dynaexq.runtime.budget import parse_budget

    try:  # the one budget parser, before anything is loaded
        parse_budget(args.budget)
    except ValueError as e:
        print(f"dynaexq bench: error: {e}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    from dynaexq.engine import resolve_device

    try:
        device = resolve_device(args.device)
    except ValueError as e:
        print(f"dynaexq bench: error: {e}", file=sys.stderr)
        return 2
    levels = [int(x) for x in args.concurrency.split(",")]
    if any(x < 1 for x in levels):
        print("dynaexq bench: concurrency levels must be >= 1", file=sys.stderr)
        return 2
    streams = list(embedded_domains().values())
    n_req = args.requests or max(8, 2 * max(levels))
    prompts = prompts_from_tokens(streams, n_req, args.prompt_tokens)
    command = "dynaexq bench " + " ".join(shlex.quote(a) for a in sys.argv[2:])
    results = []
    if args.url:
        results = bench_url(
            args.url,
            levels=levels,
            prompts=prompts,
            requests_per_level=n_req,
            max_tokens=args.max_tokens,
        )
        header = f"Command: `{command}` against {args.url}."
    else:
        from dynaexq.checkpoint import Checkpoint
        from dynaexq.engine import EMBEDDED_MODEL_DIR
        from dynaexq.runtime.budget import fixed_memory
        from dynaexq.runtime.store import TierStore, tiered_checkpoint_for

        path = args.model or EMBEDDED_MODEL_DIR
        config = Checkpoint(path).config
        store = TierStore.from_tiered(tiered_checkpoint_for(path, args.tiers))
        fixed = fixed_memory(
            config,
            dtype_bytes=4 if device.type == "cpu" else 2,
            batch=max(levels),
            context=args.prompt_tokens + args.max_tokens,
            chunk=args.prompt_tokens,
        )
        nbytes, _ = budget_bytes(
            args.budget, store, fixed.total, len(config.moe_layers), config.num_experts
        )
        for policy in [p.strip() for p in args.policies.split(",")]:
            print(f"dynaexq bench: {policy} ...", flush=True)
            rows = bench_in_process(
                policy,
                model=args.model,
                budget=None if policy == "full" else nbytes,
                tiers=args.tiers,
                levels=levels,
                requests_per_level=n_req,
                prompt_tokens=args.prompt_tokens,
                max_tokens=args.max_tokens,
                prompts=prompts,
                calibration=[t[:16384] for t in streams],
                pcie_gbs=args.pcie_gbs,
                device=device,
            )
            for r in rows:
                print(
                    f"  {policy:10s} x{r.concurrency:<3d} {r.tokens_per_s:8.1f} tok/s  "
                    f"TTFT p50 {1000 * r.ttft_p50:7.1f} ms  TPOT p50 "
                    f"{1000 * (r.tpot_p50 or np.nan):6.1f} ms  transitions {r.transitions}  "
                    f"wait {r.expert_wait_s:.3f} s",
                    flush=True,
                )
            results += rows
        header = (
            f"Command: `{command}`. In process, through the server's continuous-batching "
            f"scheduler, {device} ({'CPU backend, ' if device.type == 'cpu' else ''}"
            f"{args.threads} torch thread(s)). Every policy but full "
            f"holds {nbytes} bytes ({args.budget}). "
            + (
                f"Offload copies are throttled to {args.pcie_gbs} GB/s to model a PCIe "
                "link (the CPU backend's memcpy is faster than any real link)."
                if device.type == "cpu"
                else "Offload copies cross the real link (pinned host memory, a copy stream)."
            )
        )
    report = write_bench_report(results, args.out, header)
    print(f"report: {report}")
    if args.estimate:
        from dynaexq.bench.report_estimate import write_estimate

        print(f"estimate: {write_estimate(args.out, args.model)}")
    return 0
