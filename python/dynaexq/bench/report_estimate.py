"""The trace-driven estimate for full-size models, with routing statistics measured on the
embedded model: how skewed expert use is (share of routed picks on each layer's top 25%
experts) and how much the favourite experts change between domains."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dynaexq.bench.estimate import (
    ASSUMPTIONS,
    GPU,
    H200,
    QWEN3_30B_A3B,
    QWEN3_NEXT_80B_A3B,
    RTX_5090,
    RTX_A6000,
    MoEShape,
    simulate,
    synthetic_trace,
)


def measured_routing(model: Path | None, tokens: int = 8192) -> tuple[float, float]:
    """(top-25% share of picks, 1 - Jaccard overlap of domains' top-25% experts), averaged
    over layers and domain pairs, from the embedded model on its held-out text."""
    from dynaexq.engine import load
    from dynaexq.eval.run import embedded_domains

    engine = load(model, dtype="float32", device="cpu")
    layers = engine.config.moe_layers
    experts = engine.config.num_experts
    counts: dict[str, np.ndarray] = {}
    pos = {layer: i for i, layer in enumerate(layers)}
    for name, toks in embedded_domains().items():
        c = np.zeros((len(layers), experts))

        def hook(layer: int, ids: torch.Tensor, probs: torch.Tensor, c=c) -> None:
            np.add.at(c[pos[layer]], ids.reshape(-1).numpy(), 1)

        remove = engine.add_routing_hook(hook)
        try:
            n = tokens // 256 * 256
            engine.forward(torch.from_numpy(toks[-n:].reshape(-1, 256).astype(np.int64)))
        finally:
            remove()
        counts[name] = c
    top = experts // 4
    total = sum(counts.values())
    share = float(np.mean([np.sort(row)[::-1][:top].sum() / row.sum() for row in total]))
    favs = {d: [set(np.argsort(-row)[:top]) for row in c] for d, c in counts.items()}
    names = sorted(favs)
    change = []
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            for fa, fb in zip(favs[a], favs[b], strict=True):
                change.append(1 - len(fa & fb) / len(fa | fb))
    return share, float(np.mean(change)) if change else 0.5


def estimate_table(
    share: float, shift_fraction: float, steps: int = 120, shift_every: int = 60
) -> list[dict[str, object]]:
    rows = []
    setups: list[tuple[MoEShape, GPU]] = [
        (QWEN3_30B_A3B, RTX_A6000),
        (QWEN3_30B_A3B, RTX_5090),
        (QWEN3_NEXT_80B_A3B, RTX_5090),
        (QWEN3_NEXT_80B_A3B, RTX_A6000),
        (QWEN3_NEXT_80B_A3B, H200),
    ]
    for model, gpu in setups:
        for batch in (1, 8, 32):
            trace = synthetic_trace(
                steps=steps,
                batch=batch,
                layers=model.layers,
                experts=model.experts,
                top_k=model.top_k,
                top_share=share,
                shift_every=shift_every,
                shift_fraction=shift_fraction,
                seed=batch,
            )
            try:
                res = simulate(trace, model, gpu, offload_cache="lfu")
            except ValueError as e:
                rows.append({"model": model.name, "gpu": gpu.name, "batch": batch, "error": str(e)})
                continue
            by = {r.policy.split()[0]: r for r in res}
            rows.append(
                {
                    "model": model.name,
                    "gpu": gpu.name,
                    "batch": batch,
                    "static": res[0].policy,
                    "static_tok_s": by["static"].tokens_per_s,
                    "dynamic_tok_s": by["dynamic"].tokens_per_s,
                    "offload_tok_s": by["offload"].tokens_per_s,
                    "dynamic_hi_share": by["dynamic"].hi_share,
                    "offload_hit_rate": by["offload"].extra["hit_rate"],
                    "dynamic_over_offload": by["dynamic"].tokens_per_s / by["offload"].tokens_per_s,
                    "dynamic_over_static": by["dynamic"].tokens_per_s / by["static"].tokens_per_s,
                }
            )
    return rows


def write_estimate(out: Path, model: Path | None) -> Path:
    share, change = measured_routing(model)
    rows = estimate_table(share, change)
    lines = [
        "# Trace-driven decode estimate for full-size models",
        "",
        f"Routing measured on the embedded model's held-out text: the top 25% of experts of "
        f"a layer receive {100 * share:.1f}% of the picks; between two domains "
        f"{100 * change:.1f}% of the favourite experts change (1 - Jaccard). Synthetic "
        "traces with that skew shift domain every 60 decode steps. Offload uses an "
        "activation-frequency (LFU) cache, the stronger of the two simulated.",
        "",
        "| model | GPU | batch | static tier | static tok/s | dynamic tok/s | offload tok/s | "
        "dynamic / offload | dynamic / static | hot share | offload hits |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['gpu']} | {r['batch']} | {r['error']} |")
            continue
        lines.append(
            f"| {r['model']} | {r['gpu']} | {r['batch']} | {r['static']} | "
            f"{r['static_tok_s']:.0f} | {r['dynamic_tok_s']:.0f} | {r['offload_tok_s']:.0f} | "
            f"{r['dynamic_over_offload']:.2f}x | {r['dynamic_over_static']:.2f}x | "
            f"{r['dynamic_hi_share']:.2f} | {r['offload_hit_rate']:.2f} |"
        )
    lines += [
        "",
        "The paper reports up to 2.73x over offloading/prefetch baselines at batch 32.",
        "",
        "Assumptions:",
        "",
        ASSUMPTIONS,
    ]
    out.mkdir(parents=True, exist_ok=True)
    path = out / "estimate.md"
    path.write_text("\n".join(lines))
    return path
