#!/usr/bin/env python3
"""Expert quantization figures: quality per tier and method, CPU packed-expert throughput
against a dense matmul of the same shape, and quantize speed. All ratios come from the
same run.

    python benchmarks/bench_quant.py [--model DIR] [--quick] [--json OUT]

--model: a Hugging Face Qwen3-MoE checkpoint (e.g. python/dynaexq/data/embedded). Without
it, a randomly initialised transformers Qwen3-MoE (hidden 128, moe_intermediate 48, 64
experts) stands in: its weights are N(0, 0.02), so the errors are a Gaussian-weight
figure, not a trained-model one. Activations are the real inputs of each MoE block,
captured by running the model on held-out tokens (or random token ids if none exist),
restricted to the tokens the router sends to the expert.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

root = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(root / "python"))

from dynaexq.quant import (  # noqa: E402
    PackedExpertView,
    dequantize_matrix,
    expert_forward,
    expert_nbytes,
    pack_quantized_expert,
    parse_tier,
    quantize_expert,
    relative_error,
    swiglu_reference,
)

BF16 = torch.bfloat16
QUALITY_TIERS = [
    "int8g128-rtn", "int8g128",
    "int4g128-rtn", "int4g128", "int4g128a-rtn", "int4g128a", "int4g64-rtn", "int4g64",
    "int3g64-rtn", "int3g64", "int3g64a-rtn", "int3g64a",
    "int2g64-rtn", "int2g64", "int2g64a-rtn", "int2g64a", "int2g32a-rtn", "int2g32a",
]  # fmt: skip


def load_model(path: str | None):
    import transformers

    if path:
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        src = path
    else:
        cfg = transformers.Qwen3MoeConfig(
            vocab_size=512, hidden_size=128, intermediate_size=256, moe_intermediate_size=48,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
            num_experts=64, num_experts_per_tok=4, max_position_embeddings=512,
        )  # fmt: skip
        torch.manual_seed(0)
        model = transformers.Qwen3MoeForCausalLM(cfg)
        src = "random-init transformers Qwen3-MoE (hidden 128, inter 48, 64 experts)"
    return model.eval(), src


def capture(model, model_dir: str | None, tokens: int):
    """Per layer: MoE-block inputs [T, H] and the top-k expert ids [T, k]."""
    cfg = model.config
    ids = None
    if model_dir:
        held = sorted(Path(model_dir).glob("heldout/*.npy"))
        if held:
            import numpy as np

            ids = torch.from_numpy(np.load(held[0])[:tokens].astype("int64"))
    if ids is None:
        ids = torch.randint(
            0, cfg.vocab_size, (tokens,), generator=torch.Generator().manual_seed(0)
        )
    acts: dict[int, list[torch.Tensor]] = {}
    hooks = []
    for li, layer in enumerate(model.model.layers):
        if hasattr(layer.mlp, "experts"):
            hooks.append(layer.mlp.register_forward_pre_hook(
                lambda m, a, li=li: acts.setdefault(li, []).append(
                    a[0].reshape(-1, a[0].shape[-1]).detach())
            ))  # fmt: skip
    with torch.no_grad():
        for chunk in ids.split(256):
            model(chunk.view(1, -1))
    for h in hooks:
        h.remove()
    out = {}
    for li, xs in acts.items():
        x = torch.cat(xs)
        gate = model.model.layers[li].mlp.gate
        logits = F.linear(x, gate.weight)
        topk = logits.topk(cfg.num_experts_per_tok, dim=-1).indices
        out[li] = (x, topk)
    return out


def expert_weights(model, li: int, e: int):
    ex = model.model.layers[li].mlp.experts
    i = ex.gate_up_proj.shape[1] // 2
    gu, dn = ex.gate_up_proj[e].detach(), ex.down_proj[e].detach()
    return gu[:i], gu[i:], dn


def _output_error(qe, gate, up, down, x) -> float:
    """Relative output error of a quantized expert on activations x."""
    i = gate.shape[0]
    if isinstance(qe.gate_up, torch.Tensor):
        gu, dn = qe.gate_up.float(), qe.down.float()
    else:
        gu, dn = dequantize_matrix(qe.gate_up), dequantize_matrix(qe.down)
    ref = swiglu_reference(gate, up, down, x)
    return relative_error(ref, swiglu_reference(gu[:i], gu[i:], dn, x))


def quality(model, acts, experts_per_layer: int, tiers: list[str]):
    """Per tier: mean metrics over experts. ALS rows twice: fitted with the routed
    activations as column weights ("+act"), and on the weights alone (what
    `dynaexq quantize` does)."""
    rows = []
    h = model.config.hidden_size
    i = model.config.moe_intermediate_size
    keys = ("gate_proj", "up_proj", "down_proj", "weights", "output")
    for name in tiers:
        t = parse_tier(name)
        variants = [("", False)] if t.method == "rtn" else [("", False), ("+act", True)]
        for suffix, use_act in variants:
            agg: dict[str, list[float]] = {k: [] for k in keys}
            for li, (x, topk) in acts.items():
                for e in range(experts_per_layer):
                    xe = x[(topk == e).any(-1)]
                    if xe.shape[0] < 4:
                        continue
                    g, u, d = expert_weights(model, li, e)
                    qe = quantize_expert(t, g, u, d, activations=xe if use_act else None)
                    m = dict(qe.metrics)
                    m["output"] = _output_error(qe, g, u, d, xe)
                    for k in keys:
                        agg[k].append(m[k])
            rows.append({
                "tier": t.name + suffix, "bytes_per_expert": expert_nbytes(t, h, i),
                "experts": len(agg["weights"]),
                **{k: sum(v) / max(len(v), 1) for k, v in agg.items()},
            })  # fmt: skip
    return rows


def _best(fn, reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def throughput(shapes, token_counts, tiers, reps):
    rows = []
    for h, i in shapes:
        g = torch.Generator().manual_seed(0)
        gate, up, down = (torch.randn(*s, generator=g) * 0.02 for s in ((i, h), (i, h), (h, i)))
        gu = torch.cat([gate, up])
        dense = {torch.float32: (gu, down), torch.bfloat16: (gu.bfloat16(), down.bfloat16())}

        def dense_fwd(x, dt, dense=dense, i=i):
            w1, w2 = dense[dt]
            y = x @ w1.T
            return (F.silu(y[:, :i]) * y[:, i:]) @ w2.T

        views = {}
        for name in tiers:
            t = parse_tier(name)
            qe = quantize_expert(t, gate, up, down)
            views[name] = PackedExpertView(t, h, i, pack_quantized_expert(qe))
        for tt in token_counts:
            x = torch.randn(tt, h, generator=g)
            xb = x.bfloat16()
            d32 = _best(lambda x=x: dense_fwd(x, torch.float32), reps)
            d16 = _best(lambda xb=xb: dense_fwd(xb, torch.bfloat16), reps)
            for name, v in views.items():
                p32 = _best(lambda v=v, x=x: expert_forward(v, x), reps)
                p16 = _best(lambda v=v, xb=xb: expert_forward(v, xb, compute_dtype=BF16), reps)
                rows.append({
                    "hidden": h, "inter": i, "tokens": tt, "tier": name,
                    "packed_f32_us": p32 * 1e6, "dense_f32_us": d32 * 1e6,
                    "packed_bf16_us": p16 * 1e6, "dense_bf16_us": d16 * 1e6,
                    "ratio_f32": p32 / d32, "ratio_bf16": p16 / d16,
                })  # fmt: skip
    return rows


def quant_speed(h, i, tiers):
    g = torch.Generator().manual_seed(0)
    w = [(torch.randn(*s, generator=g) * 0.02).bfloat16() for s in ((i, h), (i, h), (h, i))]
    src_bytes = sum(x.numel() * 2 for x in w)
    rows = []
    for name in tiers:
        t = parse_tier(name)
        t0 = time.perf_counter()
        pack_quantized_expert(quantize_expert(t, *w))
        dt = time.perf_counter() - t0
        rows.append({"tier": t.name, "seconds": dt, "mb_per_s": src_bytes / 1e6 / dt})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="Hugging Face Qwen3-MoE checkpoint directory")
    ap.add_argument("--quick", action="store_true", help="fewer experts, shapes and repeats")
    ap.add_argument("--json", help="write all figures to this file")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    ap.add_argument(
        "--only", choices=["quality", "throughput", "speed"], help="run one section only"
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    out: dict = {"torch_threads": torch.get_num_threads()}

    def want(section: str) -> bool:
        return args.only in (None, section)

    model, src = (None, "") if not want("quality") else load_model(args.model)
    if want("quality"):
        quality_section(out, model, src, args)
    if want("throughput"):
        throughput_section(out, args)
    if want("speed"):
        speed_section(out)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


def quality_section(out: dict, model, src: str, args) -> None:
    out["quality_source"] = src
    acts = capture(model, args.model, 512 if args.quick else 2048)
    n_exp = 4 if args.quick else 16
    print(f"== quality: {src}; {n_exp} experts x {len(acts)} MoE layers, activations = routed "
          "MoE-block inputs")  # fmt: skip
    print(f"{'tier':>14} {'B/expert':>9} {'gate':>7} {'up':>7} {'down':>7} {'weights':>8} "
          f"{'output':>7}")  # fmt: skip
    out["quality"] = quality(model, acts, n_exp, QUALITY_TIERS)
    for r in out["quality"]:
        print(
            f"{r['tier']:>14} {r['bytes_per_expert']:>9} {r['gate_proj']:7.4f} "
            f"{r['up_proj']:7.4f} {r['down_proj']:7.4f} {r['weights']:8.4f} {r['output']:7.4f}"
        )


def throughput_section(out: dict, args) -> None:
    shapes = (
        [(128, 48), (2048, 768)] if args.quick else [(64, 32), (128, 48), (256, 64), (2048, 768)]
    )
    tiers = ["bf16", "int8", "int4", "int3", "int2"]
    print(f"\n== CPU SwiGLU expert: packed (expert_forward) vs dense matmul, same run, "
          f"{torch.get_num_threads()} threads; best of repeats")  # fmt: skip
    print(f"{'H':>5} {'I':>4} {'T':>3} {'tier':>9} {'packed f32 us':>13} {'dense f32 us':>12} "
          f"{'ratio':>6} {'packed bf16 us':>14} {'dense bf16 us':>13} {'ratio':>6}")  # fmt: skip
    out["throughput"] = throughput(shapes, [1, 8, 64], tiers, 5 if args.quick else 20)
    for r in out["throughput"]:
        print(
            f"{r['hidden']:>5} {r['inter']:>4} {r['tokens']:>3} {r['tier']:>9} "
            f"{r['packed_f32_us']:13.1f} {r['dense_f32_us']:12.1f} {r['ratio_f32']:6.2f} "
            f"{r['packed_bf16_us']:14.1f} {r['dense_bf16_us']:13.1f} {r['ratio_bf16']:6.2f}"
        )


def speed_section(out: dict) -> None:
    print("\n== quantize speed, one Qwen3-30B expert (2048 x 768, bf16 source)")
    speed_tiers = ["int8-rtn", "int8", "int4-rtn", "int4", "int3-rtn", "int3", "int2-rtn", "int2"]
    out["quantize_speed"] = quant_speed(2048, 768, speed_tiers)
    for r in out["quantize_speed"]:
        print(f"{r['tier']:>14} {r['seconds']:7.3f} s  {r['mb_per_s']:7.2f} MB/s")


if __name__ == "__main__":
    raise SystemExit(main())
