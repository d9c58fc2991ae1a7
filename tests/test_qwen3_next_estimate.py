"""The full-size Qwen3-Next figures come from the model itself: the estimate's shape and
the sizes report agree with dynaexq's Qwen3-Next built from the published config, and the
budgets they print are the ones the planner accepts."""

from __future__ import annotations

import dataclasses

import pytest
from dynaexq.bench.estimate import (
    GPU,
    QWEN3_NEXT_80B_A3B,
    QWEN3_NEXT_80B_A3B_CONFIG,
    plan_budget,
    simulate,
    synthetic_trace,
)
from dynaexq.bench.sizes import minimum_budget, policy_fits, report, tier_table
from dynaexq.model.config import ModelConfig
from dynaexq.model.qwen3_next import HybridCache, non_expert_params
from dynaexq.quant import expert_nbytes, parse_tier
from dynaexq.runtime.budget import BudgetError, fixed_memory, plan_pool

CONFIG = ModelConfig.from_dict(dict(QWEN3_NEXT_80B_A3B_CONFIG))
SHAPE = QWEN3_NEXT_80B_A3B


def test_the_estimate_shape_is_the_model_built_from_the_published_config() -> None:
    assert CONFIG.layer_types.count("full_attention") == SHAPE.kv_layers == 12
    assert len(CONFIG.moe_layers) == SHAPE.layers
    assert (CONFIG.num_experts, CONFIG.num_experts_per_tok) == (SHAPE.experts, SHAPE.top_k)
    assert non_expert_params(CONFIG) == SHAPE.non_expert_params
    assert HybridCache.bytes_for(CONFIG, 1, 0, 2) == SHAPE.state_bytes
    per_token = HybridCache.bytes_for(CONFIG, 1, 1, 2) - HybridCache.bytes_for(CONFIG, 1, 0, 2)
    assert per_token == SHAPE.kv_bytes(1, 1)
    for tier in (SHAPE.hi_tier, SHAPE.lo_tier):
        assert SHAPE.expert_bytes(tier) == expert_nbytes(parse_tier(tier), 2048, 512)
    # 80B in all (the MTP head aside): 77.3B in routed experts
    total = SHAPE.non_expert_params + SHAPE.layers * SHAPE.experts * SHAPE.expert_params
    assert 79.5e9 < total < 80.0e9


def test_the_linear_attention_state_costs_memory_and_bandwidth() -> None:
    gpu = GPU("test", 48.0, 1000.0, 25.0)
    stateless = dataclasses.replace(SHAPE, state_bytes=0.0)
    with_state = plan_budget(SHAPE, gpu, batch=32, context=1024)
    without = plan_budget(stateless, gpu, batch=32, context=1024)
    assert without.expert_bytes - with_state.expert_bytes == pytest.approx(32 * SHAPE.state_bytes)
    trace = synthetic_trace(steps=3, batch=8, layers=48, experts=512, top_k=10, top_share=0.5)
    slow = simulate(trace, SHAPE, gpu, context=1024)[0]
    fast = simulate(trace, stateless, gpu, context=1024)[0]
    extra_s = 2 * 8 * SHAPE.state_bytes / (gpu.hbm_gbs * 1e9 * 0.75)
    assert slow.step_ms - fast.step_ms == pytest.approx(extra_s * 1e3, rel=1e-6)


def test_minimum_budgets_are_what_the_planner_accepts() -> None:
    slots = [expert_nbytes(parse_tier(t), 2048, 512) for t in ("int2g64", "int4g128")]
    fixed = fixed_memory(CONFIG, dtype_bytes=2, batch=1, context=4096, chunk=512)
    n = 48 * 512
    assert (
        minimum_budget("static", CONFIG, slots, fixed, static_tier=0) == fixed.total + n * slots[0]
    )
    need = minimum_budget("dynamic", CONFIG, slots, fixed, in_flight=4)
    assert need == fixed.total + n * slots[0] + 4 * sum(slots)
    kw = dict(layers=48, experts=512, slot_bytes=slots, fixed=fixed, in_flight=4)
    plan_pool("dynamic", budget=need, **kw)
    with pytest.raises(BudgetError):
        plan_pool("dynamic", budget=need - 1, **kw)


def test_cards() -> None:
    cards = {"24": 24.0, "32": 32.0, "48": 48.0}
    fits = {
        f.policy: f
        for f in policy_fits(CONFIG, ["int2g64", "int4g128"], cards, batch=1, context=32768)
    }
    # every routed expert at int2 alone is 21.7 GB: nothing fits on 24 GB
    assert all(not f.holds["24"] for f in fits.values())
    assert fits["static int2g64"].holds["32"] and not fits["static int4g128"].holds["32"]
    assert fits["static int4g128"].holds["48"]
    assert fits["dynamic"].minimum > fits["static-map"].minimum  # staging slots
    rows = {r.tier: r for r in tier_table(CONFIG, ["int2g64", "bf16"], context=0)}
    assert rows["bf16"].routed_bytes_per_token == 480 * 6_291_456
    assert "Qwen3-Next" in report(
        CONFIG, name="Qwen3-Next", tier_pairs=[["int2g64", "bf16"]], cards=cards
    )
