"""`dynaexq quantize`: pack every expert of a Qwen3-MoE checkpoint at every requested tier."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HELP = "quantize a Hugging Face Qwen3-MoE checkpoint into a tiered dynaexq checkpoint"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="Hugging Face checkpoint directory (config.json + safetensors)")
    parser.add_argument(
        "--tiers",
        default="bf16,int4,int2",
        help="comma-separated tiers, e.g. bf16,int4,int2 or fp16,int4g128,int2g64a-rtn",
    )
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--force", action="store_true", help="overwrite an existing output")
    parser.add_argument("--alignment", type=int, default=256, help="blob section alignment")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="experts quantized in parallel, by worker processes of ~0.7 GB each beyond the "
        "first (0: one per CPU core, as many as fit in half the available RAM); the output "
        "does not depend on it",
    )


def run(args: argparse.Namespace) -> int:
    import os

    from dynaexq.checkpoint import CheckpointError
    from dynaexq.quant.expert import PackedExpertError
    from dynaexq.quant.methods import QuantizationError
    from dynaexq.quant.tiered import partial_dir, quantize_checkpoint
    from dynaexq.quant.tiers import TierError, parse_tiers
    from dynaexq.runtime.store import mem_available

    # Each worker beyond the first is a process of ~0.7 GB (torch and the quantizer's
    # temporaries): by default one per core, as many as leave half the free RAM.
    fit = max(1, int(mem_available() * 0.5) // (700 << 20))
    threads = args.threads if args.threads > 0 else max(1, min(len(os.sched_getaffinity(0)), fit))
    try:
        tiers = parse_tiers(args.tiers)
        resuming = partial_dir(Path(args.out)).is_dir()
        m = quantize_checkpoint(
            args.src,
            args.out,
            tiers,
            force=args.force,
            alignment=args.alignment,
            progress=not args.no_progress,
            threads=threads,
        )
    except (TierError, CheckpointError, QuantizationError, PackedExpertError) as e:
        print(f"dynaexq quantize: error: {e}", file=sys.stderr)
        return 2
    except FileExistsError as e:
        print(f"dynaexq quantize: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"dynaexq quantize: interrupted; run the same command again to resume from "
            f"{partial_dir(Path(args.out))}",
            file=sys.stderr,
        )
        raise
    resumed = m["resumed_layers"]
    note = f" (resumed: {len(resumed)} layers were already done)" if resuming and resumed else ""
    print(
        f"wrote {args.out}: {len(m['experts'])} MoE layers x {m['num_experts']} experts, "
        f"tiers {', '.join(t['name'] for t in m['tiers'])}; "
        f"{m['source_expert_bytes'] / 1e6:.1f} MB of expert weights, this run "
        f"{m['quantize_seconds']:.1f} s ({m['quantize_mb_per_s']:.2f} MB/s, "
        f"{threads} thread{'s' if threads > 1 else ''}){note}"
    )
    for name, s in m["summary"].items():
        if s:
            print(
                f"  {name:>14}: {m['expert_nbytes'][name]} B/expert, rel. weight error "
                f"mean {s['weights_mean']:.4f} max {s['weights_max']:.4f}"
            )
    return 0
