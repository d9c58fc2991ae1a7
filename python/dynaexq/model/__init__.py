"""The Qwen3-MoE model: configuration, expert-executor interface and the decoder."""

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
