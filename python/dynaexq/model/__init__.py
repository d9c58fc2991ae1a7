"""The models (Qwen3-MoE / Qwen2-MoE, Qwen3-Next): configuration, expert-executor interface,
the decoders and which one implements a config.

Plugging in another expert implementation (what the precision runtime does):

    class MyExperts:                      # satisfies model.experts.ExpertExecutor
        def forward(self, layer, hidden, expert_ids, weights):   # [T,H], [T,k], [T,k]
            ...                           # -> [T,H], sum_j weights[:,j] * expert(hidden)

    engine = dynaexq.load(path, experts=lambda checkpoint, dtype, device: MyExperts(...))
    engine.add_routing_hook(lambda layer, expert_ids, probs: ...)  # every MoE layer, step

`Checkpoint(path).expert(layer, e)` reads one expert's weights lazily from the mapped
safetensors files, so an executor can quantize or stage experts one at a time.
"""

from dynaexq.model.config import ModelConfig, RopeConfig
from dynaexq.model.experts import (
    ExpertExecutor,
    FullPrecisionExperts,
    MappedExperts,
    RoutingHook,
)
from dynaexq.model.qwen3_moe import KVCache, Qwen3MoeForCausalLM
from dynaexq.model.qwen3_next import HybridCache, Qwen3NextForCausalLM

# Every decoder takes (input_ids, positions, cache, token_mask, logits_index, key_slots), has
# `allocate_cache(batch, capacity, dtype, device)`, `config`, `runtime` and `rotary`.
CausalLM = Qwen3MoeForCausalLM | Qwen3NextForCausalLM
GenerationCache = KVCache | HybridCache


def causal_lm_class(config: ModelConfig) -> type[Qwen3MoeForCausalLM] | type[Qwen3NextForCausalLM]:
    """The decoder implementing `config`'s architecture."""
    return Qwen3NextForCausalLM if config.model_type == "qwen3_next" else Qwen3MoeForCausalLM


__all__ = [
    "CausalLM",
    "ExpertExecutor",
    "FullPrecisionExperts",
    "GenerationCache",
    "HybridCache",
    "KVCache",
    "MappedExperts",
    "ModelConfig",
    "Qwen3MoeForCausalLM",
    "Qwen3NextForCausalLM",
    "RopeConfig",
    "RoutingHook",
    "causal_lm_class",
]
