"""The projection behind the KV figures (docs/results/kv/figures.md) follows its own
accounting: contiguous rows reserve the longest context, pages the real length, and the
shared budget adds the whole pages the lent high-tier slots hold (at most the hot
experts' bytes: a slot's remainder under one page stays unused)."""

from __future__ import annotations

from dynaexq.bench.kv_share import GIB, project
from dynaexq.model.config import ModelConfig
from dynaexq.model.paged_kv import kv_bytes_per_token
from dynaexq.quant import expert_nbytes, parse_tier
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
