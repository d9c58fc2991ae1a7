"""What a full-size model needs, tier by tier and policy by policy, from its config alone.

- `tier_table`: the bytes of one packed expert at each tier (dynaexq's layout, what a pool
  slot holds), of every routed expert, and what one decoded token reads at batch 1 with
  every expert at that tier: the routed experts it picks (top-k in every MoE layer), the
  non-expert weights (of the input embedding one row), and the generation state (the KV
  cache at `context`, and the linear-attention state of a Qwen3-Next, read and written).
- `policy_fits`: the smallest budget at which each policy loads, found with the planner
  `dynaexq.load` uses (`runtime.budget.plan_pool`, same fixed-memory accounting), and what
  each policy holds on a card of a given size.

    python -m dynaexq.bench.sizes            # Qwen3-Next-80B-A3B, markdown on stdout
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

from dynaexq.model.config import ModelConfig
from dynaexq.quant import expert_nbytes, parse_tier
from dynaexq.runtime.budget import BudgetError, FixedMemory, fixed_memory, plan_pool

GIB = 1024**3
POLICIES = ("static", "static-map", "dynamic", "offload", "full")


@dataclass(frozen=True)
class TierRow:
    tier: str
    expert_bytes: int  # one packed expert
    all_experts_bytes: int  # every routed expert at this tier
    routed_bytes_per_token: int  # the top-k experts of every MoE layer
    bytes_per_token: int  # + non-expert weights + generation state (batch 1)


def tier_table(
    config: ModelConfig, tiers: list[str], *, context: int, dtype_bytes: int = 2
) -> list[TierRow]:
    fixed = fixed_memory(config, dtype_bytes=dtype_bytes, batch=1, context=context, chunk=1)
    state = _state_traffic(config, context, dtype_bytes)
    # The input embedding is read one row per token (untied: the head is read in full).
    lookup = 0 if config.tie_word_embeddings else config.vocab_size * config.hidden_size
    weights = (
        fixed.weights - (lookup - config.hidden_size) * dtype_bytes if lookup else fixed.weights
    )
    n_layers = len(config.moe_layers)
    rows = []
    for name in tiers:
        tier = parse_tier(name)
        one = expert_nbytes(tier, config.hidden_size, config.moe_intermediate_size)
        routed = config.num_experts_per_tok * n_layers * one
        rows.append(
            TierRow(
                tier=tier.name,
                expert_bytes=one,
                all_experts_bytes=n_layers * config.num_experts * one,
                routed_bytes_per_token=routed,
                bytes_per_token=routed + weights + state,
            )
        )
    return rows


def _state_traffic(config: ModelConfig, context: int, dtype_bytes: int) -> int:
    """Bytes one decode step moves for one sequence's generation state: the KV cache read
    (context tokens) and a Qwen3-Next's fixed-size state read and written."""
    from dynaexq.runtime.budget import kv_cache_bytes

    total = kv_cache_bytes(config, 1, context, dtype_bytes)
    fixed_size = kv_cache_bytes(config, 1, 0, dtype_bytes)  # the part that is not per token
    return total + fixed_size


@dataclass(frozen=True)
class Fit:
    policy: str
    minimum: int  # smallest budget the planner accepts
    holds: dict[str, str]  # card name -> what the policy holds there ("" = does not fit)


def _plan(
    policy: str, config: ModelConfig, slots: list[int], fixed: FixedMemory, budget: int, **kw: Any
):
    return plan_pool(
        policy,
        layers=len(config.moe_layers),
        experts=config.num_experts,
        slot_bytes=slots,
        fixed=fixed,
        budget=budget,
        **kw,
    )


def minimum_budget(
    policy: str, config: ModelConfig, slots: list[int], fixed: FixedMemory, **kw: Any
) -> int:
    """The smallest budget (bytes) at which `plan_pool` accepts `policy` (bisection: a
    plan that fits a budget fits every larger one)."""
    if policy == "full":
        return _plan("full", config, slots, fixed, 0).total_bytes
    lo, hi = fixed.total, fixed.total + 2 * len(config.moe_layers) * config.num_experts * max(slots)
    while lo < hi:
        mid = (lo + hi) // 2
        try:
            _plan(policy, config, slots, fixed, mid, **kw)
            hi = mid
        except BudgetError:
            lo = mid + 1
    return lo


def policy_fits(
    config: ModelConfig,
    tiers: list[str],
    cards: dict[str, float],
    *,
    batch: int,
    context: int,
    chunk: int = 512,
    reserve_gib: float = 1.0,
    in_flight: int = 4,
) -> list[Fit]:
    """For each policy (static at each tier) its minimum budget and, for each card of
    `cards[name]` GiB less `reserve_gib` (CUDA context, allocator slack), what it holds."""
    specs = [parse_tier(t) for t in tiers]
    slots = [expert_nbytes(t, config.hidden_size, config.moe_intermediate_size) for t in specs]
    fixed = fixed_memory(config, dtype_bytes=2, batch=batch, context=context, chunk=chunk)
    n = len(config.moe_layers) * config.num_experts
    out = []
    variants: list[tuple[str, str, dict[str, Any]]] = [
        (f"static {t.name}", "static", {"static_tier": i}) for i, t in enumerate(specs)
    ]
    variants += [
        ("static-map", "static-map", {}),
        ("dynamic", "dynamic", {"in_flight": in_flight}),
        ("offload", "offload", {"in_flight": in_flight}),
        ("full (bf16)", "full", {}),
    ]
    for label, policy, kw in variants:
        if policy == "full":
            full_slot = expert_nbytes(
                parse_tier("bf16"), config.hidden_size, config.moe_intermediate_size
            )
            need = fixed.total + n * full_slot
            holds = {
                c: ("all bf16" if need <= (g - reserve_gib) * GIB else "") for c, g in cards.items()
            }
            out.append(Fit(label, need, holds))
            continue
        minimum = minimum_budget(policy, config, slots, fixed, **kw)
        holds = {}
        for card, gib in cards.items():
            budget = int((gib - reserve_gib) * GIB)
            try:
                plan = _plan(policy, config, slots, fixed, budget, **kw)
            except BudgetError:
                holds[card] = ""
                continue
            if policy == "static":
                holds[card] = f"all {specs[kw['static_tier']].name}"
            elif policy == "offload":
                holds[card] = f"{plan.slots[-1] / n:.1%} of experts cached at {specs[-1].name}"
            else:
                hot = (
                    plan.per_layer[-1]
                    if plan.per_layer
                    else plan.slots[-1] // len(config.moe_layers)
                )
                holds[card] = f"{hot}/{config.num_experts} per layer at {specs[-1].name}"
        out.append(Fit(label, minimum, holds))
    return out


def report(
    config: ModelConfig,
    *,
    name: str,
    tier_pairs: list[list[str]],
    cards: dict[str, float],
    tiers: tuple[str, ...] = ("int2g64", "int3g128", "int4g128", "int8g128", "bf16"),
    batch: int = 1,
    context: int = 32768,
) -> str:
    """Markdown: the tier table (`tiers`) and, for each pair of tiers, the policy fits."""
    gb = 1e9
    rows = tier_table(config, list(tiers), context=context)
    rows.sort(key=lambda r: r.expert_bytes)
    lines = [
        f"## {name}: bytes per expert and per token",
        "",
        f"Decode at batch 1, context {context}: a token reads its top-{config.num_experts_per_tok}"
        f" experts in each of {len(config.moe_layers)} MoE layers, the non-expert weights "
        "(bf16) and its generation state.",
        "",
        "| tier | bytes / expert | all routed experts | routed expert bytes / token | "
        "bytes read / token |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r.tier} | {r.expert_bytes / 1e6:.3f} MB | {r.all_experts_bytes / gb:.2f} GB | "
            f"{r.routed_bytes_per_token / 1e6:.1f} MB | {r.bytes_per_token / gb:.3f} GB |"
        )
    fixed = fixed_memory(config, dtype_bytes=2, batch=batch, context=context, chunk=512)
    lines += [
        "",
        f"Fixed memory (batch {batch}, context {context}): non-expert weights "
        f"{fixed.weights / gb:.2f} GB, generation state {fixed.kv_cache / gb:.2f} GB, "
        f"workspace {fixed.workspace / gb:.2f} GB.",
    ]
    for pair in tier_pairs:
        fits = policy_fits(config, pair, cards, batch=batch, context=context)
        head = " | ".join(f"{c} ({g:g} GiB)" for c, g in cards.items())
        lines += [
            "",
            f"### Policies with tiers {', '.join(pair)}: minimum budget, and what a card holds",
            "",
            f"Budget on a card = its memory less 1 GiB (CUDA context, allocator slack); "
            f"batch {batch}, context {context}, 4 transitions in flight.",
            "",
            f"| policy | minimum budget | {head} |",
            "|---|---|" + "---|" * len(cards),
        ]
        for f in fits:
            cells = " | ".join(f.holds[c] or "does not fit" for c in cards)
            lines.append(f"| {f.policy} | {f.minimum / GIB:.2f} GiB | {cells} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from dynaexq.bench.estimate import QWEN3_NEXT_80B_A3B_CONFIG

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--context", type=int, default=32768)
    p.add_argument("--batch", type=int, default=1)
    args = p.parse_args(argv)
    config = ModelConfig.from_dict(dict(QWEN3_NEXT_80B_A3B_CONFIG), source="Qwen3-Next-80B-A3B")
    print(
        report(
            config,
            name="Qwen3-Next-80B-A3B",
            tier_pairs=[["int2g64", "int4g128"], ["int2g64", "bf16"]],
            cards={"24 GB": 24.0, "32 GB": 32.0, "48 GB": 48.0},
            batch=args.batch,
            context=args.context,
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
