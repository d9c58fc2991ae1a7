"""The projection behind the KV figures (docs/results/kv/figures.md) follows its own
accounting: contiguous rows reserve the longest context, pages the real length, and the
shared budget adds the whole pages the lent high-tier slots hold (at most the hot
experts' bytes: a slot's remainder under one page stays unused)."""

from __future__ import annotations

import numpy as np
import pytest
from dynaexq.bench.kv_share import GIB, TextSpec, gap_recovered_pct, project, score_maps
from dynaexq.model.config import ModelConfig
from dynaexq.model.paged_kv import kv_bytes_per_token
from dynaexq.quant import expert_nbytes, parse_tier
from dynaexq.runtime.budget import BudgetError, fixed_memory, plan_for_map
from dynaexq.runtime.load import load_with_policy
from dynaexq.runtime.memory import QWEN3_30B_A3B_CONFIG


def test_qwen3_30b_projection_is_consistent() -> None:
    config = ModelConfig.from_dict(dict(QWEN3_30B_A3B_CONFIG), source="Qwen3-30B-A3B")
    per_token = kv_bytes_per_token(config, 2)
    assert per_token == 96 * 1024
    rows = project(config, {"24 GB": 24e9 / GIB, "32 GB": 32e9 / GIB})
    assert {r.card for r in rows} == {"24 GB", "32 GB"}
    lo, hi = (
        expert_nbytes(parse_tier(t), config.hidden_size, config.moe_intermediate_size, 256)
        for t in ("int2", "bf16")
    )
    hot_bytes = int(0.2 * config.num_experts) * len(config.moe_layers) * (hi - lo)
    for r in rows:
        page = -(-r.request_tokens // 16) * 16 * per_token
        assert r.contiguous == r.kv_bytes_fixed_split // (r.context * per_token)
        assert r.paged == r.kv_bytes_fixed_split // page
        per_slot = ((hi - lo) // per_token - 1) // 16
        assert r.pages_per_lent_slot == per_slot > 0
        counted = (r.kv_bytes_fixed_split + hot_bytes) // page
        assert 0.85 * counted <= r.paged_shared <= counted
        assert r.contiguous <= r.paged <= r.paged_shared
        assert 0.0 <= r.hot_share_idle <= 1.0
    by = {(r.card, r.context, r.request_tokens): r for r in rows}
    # A 32 GB card has 8 GB more for KV than a 24 GB one, whatever the split.
    extra = (
        by["32 GB", 4096, 1024].kv_bytes_fixed_split - by["24 GB", 4096, 1024].kv_bytes_fixed_split
    )
    assert extra == int((32e9 / GIB - 1) * GIB) - int((24e9 / GIB - 1) * GIB)


def test_gap_recovered_of_tier_maps_spans_int2_to_bf16() -> None:
    """The quality column: a map is held exactly by a static runtime and scored against
    the `dynaexq eval` baselines (static all-int2, full), so the all-int2 map recovers
    0% of the gap and the all-bf16 map 100%; a partial map lands between."""
    spec = TextSpec(tokens=256, streams=1, domains=("prose",))
    engine, dep = load_with_policy(policy="static", budget="100%", progress=False)
    shape = engine.precision.tier_map().shape
    del engine
    none, every = np.zeros(shape, np.uint8), np.ones(shape, np.uint8)
    some = (np.random.default_rng(0).random(shape) < 0.3).astype(np.uint8)
    (p_none, p_every, p_some), low, full = score_maps([none, every, some], spec)
    assert low > full
    assert abs(gap_recovered_pct(low, full, p_none)) < 1e-6
    assert abs(gap_recovered_pct(low, full, p_every) - 100.0) < 1e-4
    assert 0.0 < gap_recovered_pct(low, full, p_some) < 100.0
    assert gap_recovered_pct(2.0, 1.0, 1.25) == 75.0


def test_a_tier_map_is_held_exactly_within_its_bytes() -> None:
    engine, dep = load_with_policy(policy="static", budget="100%", progress=False)
    shape = engine.precision.tier_map().shape
    del engine
    m = np.zeros(shape, np.uint8)
    m[:, ::5] = 1
    e, d = load_with_policy(policy="static-map", tier_map=m, progress=False)
    assert (e.precision.tier_map() == m).all()
    assert d is not None and d.plan.slots == (int((m == 0).sum()), int((m == 1).sum()))
    assert d.plan.staging == (0, 0)
    fixed = fixed_memory(e.config, dtype_bytes=4, batch=1, context=16, chunk=32)
    need = fixed.total + sum(c * b for c, b in zip(d.plan.slots, d.plan.slot_bytes, strict=True))
    assert plan_for_map(m, d.plan.slot_bytes, fixed, need).pool_bytes == need - fixed.total
    with pytest.raises(BudgetError):
        plan_for_map(m, d.plan.slot_bytes, fixed, need - 1)
    with pytest.raises(ValueError):
        load_with_policy(policy="dynamic", tier_map=m, progress=False)
