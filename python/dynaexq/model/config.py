"""The model configuration, parsed from a Hugging Face `config.json`.

Only the fields the Qwen3-MoE, Qwen2-MoE and Qwen3-Next architectures need are kept, under
one spelling: `transformers` 5.x writes `num_local_experts` and `rope_parameters`, released
Qwen checkpoints write `num_experts`, `rope_theta` and `rope_scaling`; both are accepted.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dynaexq.checkpoint import CheckpointError, UnsupportedArchitectureError

# Architectures this runtime implements, by the `architectures` entry and the `model_type`.
SUPPORTED_ARCHITECTURES = {
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3NextForCausalLM": "qwen3_next",
}
# Qwen3-Next's token mixers, by the names of its config's `layer_types`.
LAYER_TYPES = ("linear_attention", "full_attention")
SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "yarn")


@dataclass(frozen=True)
class RopeConfig:
    """Rotary position embedding parameters (one global set; Qwen MoE models use one)."""

    rope_type: str = "default"
    theta: float = 10000.0
    factor: float = 1.0
    # yarn
    original_max_position_embeddings: int | None = None
    attention_factor: float | None = None
    beta_fast: float | None = None
    beta_slow: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True
    partial_rotary_factor: float = 1.0


@dataclass(frozen=True)
class ModelConfig:
    """Everything the model files need to build a Qwen3-MoE / Qwen2-MoE / Qwen3-Next decoder."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope: RopeConfig
    tie_word_embeddings: bool
    # attention projections: Qwen3 has one `attention_bias` for q/k/v/o and q/k RMSNorm;
    # Qwen2-MoE has biases on q/k/v only and no q/k norm.
    qkv_bias: bool
    o_bias: bool
    qk_norm: bool
    # mixture of experts
    num_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    norm_topk_prob: bool
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    shared_expert_intermediate_size: int = 0
    # tokens
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    pad_token_id: int | None = None
    torch_dtype: str | None = None
    # Qwen3-Next: the token mixer of every layer (empty: every layer is full attention) and
    # the shape of its Gated DeltaNet (linear-attention) layers.
    layer_types: tuple[str, ...] = ()
    linear_num_key_heads: int = 0
    linear_num_value_heads: int = 0
    linear_key_head_dim: int = 0
    linear_value_head_dim: int = 0
    linear_conv_kernel_dim: int = 0
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def is_moe_layer(self, layer: int) -> bool:
        """The same rule as transformers' Qwen3MoeDecoderLayer."""
        return (
            layer not in self.mlp_only_layers
            and self.num_experts > 0
            and (layer + 1) % self.decoder_sparse_step == 0
        )

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.is_moe_layer(i)]

    def is_linear_attention_layer(self, layer: int) -> bool:
        """A Gated DeltaNet layer (Qwen3-Next); every other layer is full attention."""
        return bool(self.layer_types) and self.layer_types[layer] == "linear_attention"

    @property
    def attention_layers(self) -> list[int]:
        """The layers with softmax attention (and hence a KV cache)."""
        return [i for i in range(self.num_hidden_layers) if not self.is_linear_attention_layer(i)]

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise CheckpointError(f"{path}: config.json not found") from None
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path}: not valid JSON ({e})") from None
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config") -> ModelConfig:
        archs = raw.get("architectures") or []
        model_type = raw.get("model_type")
        known = [SUPPORTED_ARCHITECTURES[a] for a in archs if a in SUPPORTED_ARCHITECTURES]
        if known:
            model_type = known[0]
        if model_type not in SUPPORTED_ARCHITECTURES.values():
            raise UnsupportedArchitectureError(
                f"{source}: unsupported architecture (architectures={archs}, "
                f"model_type={raw.get('model_type')!r}); supported: "
                + ", ".join(f"{a} ({t})" for a, t in SUPPORTED_ARCHITECTURES.items())
            )
        if raw.get("quantization_config"):
            method = raw["quantization_config"].get("quant_method", "unknown")
            raise UnsupportedArchitectureError(
                f"{source}: quantized checkpoints (quantization_config.quant_method={method!r}) "
                "are not supported; load the original float16/bfloat16/float32 checkpoint"
            )
        if raw.get("hidden_act", "silu") != "silu":
            raise UnsupportedArchitectureError(
                f"{source}: hidden_act={raw['hidden_act']!r} is not supported (only 'silu')"
            )
        if raw.get("use_sliding_window", False):
            raise UnsupportedArchitectureError(
                f"{source}: use_sliding_window=true is not supported (Qwen MoE checkpoints "
                "are released with it off)"
            )

        def need(key: str, *alts: str) -> Any:
            for k in (key, *alts):
                if raw.get(k) is not None:
                    return raw[k]
            raise CheckpointError(f"{source}: missing required field {key!r}")

        hidden = int(need("hidden_size"))
        heads = int(need("num_attention_heads"))
        head_dim = int(raw.get("head_dim") or hidden // heads)
        kv_heads = int(raw.get("num_key_value_heads") or heads)
        if heads % kv_heads != 0:
            raise CheckpointError(
                f"{source}: num_attention_heads={heads} is not a multiple of "
                f"num_key_value_heads={kv_heads}"
            )
        num_experts = int(raw.get("num_experts", raw.get("num_local_experts", 0)) or 0)
        eos = raw.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        qwen3 = model_type in ("qwen3_moe", "qwen3_next")
        attention_bias = bool(raw.get("attention_bias", False))
        layers = int(need("num_hidden_layers"))
        linear = _parse_linear_attention(raw, layers, source) if model_type == "qwen3_next" else {}
        return cls(
            model_type=str(model_type),
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(raw.get("intermediate_size") or 0),
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=int(raw.get("max_position_embeddings", 32768)),
            rope=_parse_rope(raw, source, str(model_type)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            qkv_bias=attention_bias if qwen3 else bool(raw.get("qkv_bias", True)),
            o_bias=attention_bias if qwen3 else False,
            qk_norm=qwen3,
            num_experts=num_experts,
            num_experts_per_tok=int(raw.get("num_experts_per_tok", 0) or 0),
            moe_intermediate_size=int(raw.get("moe_intermediate_size", 0) or 0),
            norm_topk_prob=bool(raw.get("norm_topk_prob", False)),
            decoder_sparse_step=int(raw.get("decoder_sparse_step", 1) or 1),
            mlp_only_layers=tuple(int(i) for i in (raw.get("mlp_only_layers") or [])),
            shared_expert_intermediate_size=(
                0
                if model_type == "qwen3_moe"
                else int(raw.get("shared_expert_intermediate_size", 0) or 0)
            ),
            eos_token_ids=tuple(int(i) for i in eos_ids),
            bos_token_id=raw.get("bos_token_id"),
            pad_token_id=raw.get("pad_token_id"),
            torch_dtype=raw.get("dtype") or raw.get("torch_dtype"),
            **linear,
            raw=raw,
        )


def _parse_linear_attention(raw: dict[str, Any], layers: int, source: str) -> dict[str, Any]:
    """Qwen3-Next's layer pattern and Gated DeltaNet shape (as transformers' Qwen3NextConfig:
    without `layer_types`, every `full_attention_interval`-th layer is full attention)."""
    types = raw.get("layer_types")
    if types is None:
        interval = int(raw.get("full_attention_interval", 4))
        types = [
            "full_attention" if (i + 1) % interval == 0 else "linear_attention"
            for i in range(layers)
        ]
    if len(types) != layers or any(t not in LAYER_TYPES for t in types):
        raise CheckpointError(
            f"{source}: layer_types must list {layers} entries, each one of "
            f"{', '.join(LAYER_TYPES)}; got {types}"
        )
    out = {"layer_types": tuple(str(t) for t in types)}
    defaults = {
        "linear_num_key_heads": 16,
        "linear_num_value_heads": 32,
        "linear_key_head_dim": 128,
        "linear_value_head_dim": 128,
        "linear_conv_kernel_dim": 4,
    }
    for key, default in defaults.items():
        out[key] = int(raw.get(key) or default)
    if out["linear_num_value_heads"] % out["linear_num_key_heads"]:
        raise CheckpointError(
            f"{source}: linear_num_value_heads={out['linear_num_value_heads']} is not a "
            f"multiple of linear_num_key_heads={out['linear_num_key_heads']}"
        )
    return out


def _parse_rope(raw: dict[str, Any], source: str, model_type: str = "") -> RopeConfig:
    params = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedArchitectureError(
            f"{source}: rope type {rope_type!r} is not supported; supported: "
            + ", ".join(SUPPORTED_ROPE_TYPES)
        )
    # Qwen3-Next rotates the first quarter of each head (transformers' default for it).
    default_partial = 0.25 if model_type == "qwen3_next" else 1.0
    partial = float(
        params.get("partial_rotary_factor", raw.get("partial_rotary_factor", default_partial))
    )
    if partial != 1.0 and model_type != "qwen3_next":
        raise UnsupportedArchitectureError(
            f"{source}: partial_rotary_factor={partial} is not supported (Qwen MoE models "
            "rotate the whole head)"
        )
    omax = params.get("original_max_position_embeddings")
    if rope_type == "yarn" and omax is None:
        omax = raw.get("original_max_position_embeddings", raw.get("max_position_embeddings"))
    factor = params.get("factor")
    if factor is None:
        if rope_type == "yarn" and omax:
            factor = raw.get("max_position_embeddings", omax) / omax
        elif rope_type != "default":
            raise CheckpointError(f"{source}: rope type {rope_type!r} needs a 'factor'")
        else:
            factor = 1.0

    def opt(key: str) -> float | None:
        return None if params.get(key) is None else float(params[key])

    return RopeConfig(
        rope_type=rope_type,
        theta=theta,
        factor=float(factor),
        original_max_position_embeddings=None if omax is None else int(omax),
        attention_factor=opt("attention_factor"),
        beta_fast=opt("beta_fast"),
        beta_slow=opt("beta_slow"),
        mscale=opt("mscale"),
        mscale_all_dim=opt("mscale_all_dim"),
        truncate=bool(params.get("truncate", True)),
        partial_rotary_factor=partial,
    )
