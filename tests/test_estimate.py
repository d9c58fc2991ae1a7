"""The trace-driven estimator: its budget accounting and its limiting cases."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from dynaexq.bench.estimate import (
    GPU,
    QWEN3_30B_A3B,
    MoEShape,
    plan_budget,
    simulate,
    synthetic_trace,
    tier_bytes_per_param,
    top_share,
    zipf_exponent_for_top_share,
)

SMALL = MoEShape(
    name="small",
    layers=2,
    experts=16,
    top_k=2,
    hidden=256,
    moe_intermediate=128,
    non_expert_params=1e6,
    kv_layers=2,
    kv_heads=2,
    head_dim=32,
    hi_tier="bf16",
    lo_tier="int4g128",
)


def gpu_with_room_for(model: MoEShape, experts_at_hi: float, pcie_gbs: float = 25.0) -> GPU:
    """A GPU whose expert budget is exactly the given number of high-tier experts on top of
    every expert at the low tier (plus the 4 staging slots)."""
    n = model.layers * model.experts
    fixed = 2 * model.non_expert_params + model.kv_bytes(4, 64) + 2 * 2**30
    hi, lo = model.expert_bytes(model.hi_tier), model.expert_bytes(model.lo_tier)
    expert_bytes = n * lo + experts_at_hi * (hi - lo) + 4 * hi
    return GPU("test", (fixed + expert_bytes) / 2**30, 1000.0, pcie_gbs)


def test_tier_sizes() -> None:
    assert tier_bytes_per_param("bf16") == 2.0
    assert tier_bytes_per_param("int4g128") == pytest.approx(0.5 + 2 / 128)
    assert tier_bytes_per_param("int2g64a") == pytest.approx(0.25 + 4 / 64)
    with pytest.raises(ValueError):
        tier_bytes_per_param("int4")
    # Qwen3-30B-A3B: ~57 GB of expert weights in bf16 (method.md).
    n = QWEN3_30B_A3B.layers * QWEN3_30B_A3B.experts
    assert 55e9 < n * QWEN3_30B_A3B.expert_bytes("bf16") < 60e9


@pytest.mark.parametrize("share", [0.3, 0.5, 0.8])
def test_synthetic_trace_has_the_requested_skew(share: float) -> None:
    s = zipf_exponent_for_top_share(64, share)
    w = np.arange(1, 65, dtype=float) ** -s
    assert w[:16].sum() / w.sum() == pytest.approx(share, abs=1e-6)
    trace = synthetic_trace(steps=200, batch=4, layers=2, experts=64, top_k=1, top_share=share)
    assert top_share(trace, 64) == pytest.approx(share, abs=0.06)


def test_budget_counts_hot_slots_and_refuses_what_does_not_fit() -> None:
    gpu = gpu_with_room_for(SMALL, 10)
    b = plan_budget(SMALL, gpu, batch=4, context=64)
    assert b.fits and b.hot_slots == 10
    tiny = dataclasses.replace(gpu, memory_gib=2.0)
    assert not plan_budget(SMALL, tiny, batch=4, context=64).fits


def test_limiting_cases() -> None:
    trace = synthetic_trace(steps=60, batch=4, layers=2, experts=16, top_k=2, top_share=0.7)
    # Room for every expert at the high tier: dynamic reads everything hot once landed,
    # offload stops missing after warm-up, static picks the high tier.
    roomy = gpu_with_room_for(SMALL, SMALL.layers * SMALL.experts, pcie_gbs=1e6)
    static, dynamic, offload = simulate(trace, SMALL, roomy, context=64, replan_every=1)
    assert static.policy == "static (bf16)"
    assert dynamic.hi_share > 0.9
    assert offload.extra["hit_rate"] > 0.9
    # No hot slots: dynamic is exactly the low tier, with nothing moved.
    none = gpu_with_room_for(SMALL, 0)
    static, dynamic, offload = simulate(trace, SMALL, none, context=64)
    assert static.policy == "static (int4g128)"
    assert dynamic.hi_share == 0.0 and dynamic.moved_gb == 0.0
    assert dynamic.tokens_per_s == pytest.approx(static.tokens_per_s)


def test_offload_gets_slower_with_a_slower_link() -> None:
    trace = synthetic_trace(steps=40, batch=4, layers=2, experts=16, top_k=2, top_share=0.5)
    fast = simulate(trace, SMALL, gpu_with_room_for(SMALL, 4, pcie_gbs=50.0), context=64)[2]
    slow = simulate(trace, SMALL, gpu_with_room_for(SMALL, 4, pcie_gbs=5.0), context=64)[2]
    assert slow.tokens_per_s < fast.tokens_per_s
    assert slow.pcie_stall_ms > fast.pcie_stall_ms
