"""The Qwen3-MoE model: configuration, expert-executor interface and the decoder.

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

__all__ = [
    "ExpertExecutor",
    "FullPrecisionExperts",
    "KVCache",
    "MappedExperts",
    "ModelConfig",
    "Qwen3MoeForCausalLM",
    "RopeConfig",
    "RoutingHook",
]
