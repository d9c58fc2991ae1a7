"""Small random checkpoints and tokenizers for tests and benchmarks.

Uses `transformers` (a test-only dependency, imported lazily) so that the checkpoints are
exactly what `save_pretrained` writes.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

# A tiny configuration that still exercises everything: GQA, q/k norm, top-k > 1,
# renormalised weights and one dense (mlp_only) layer.
TINY_CONFIG: dict[str, Any] = dict(
    vocab_size=128,
    hidden_size=48,
    intermediate_size=40,
    num_hidden_layers=3,
    num_attention_heads=6,
    num_key_value_heads=2,
    head_dim=12,
    moe_intermediate_size=16,
    num_experts=8,
    num_experts_per_tok=3,
    norm_topk_prob=True,
    mlp_only_layers=[1],
    max_position_embeddings=256,
    rope_theta=10000.0,
)

# Qwen3-Next in small: three Gated DeltaNet layers then one gated full-attention layer
# (partial RoPE), grouped value heads (4 value heads over 2 q/k heads), a shared expert.
TINY_NEXT_CONFIG: dict[str, Any] = dict(
    vocab_size=128,
    hidden_size=48,
    intermediate_size=40,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    linear_num_key_heads=2,
    linear_num_value_heads=4,
    linear_key_head_dim=8,
    linear_value_head_dim=12,
    linear_conv_kernel_dim=4,
    moe_intermediate_size=16,
    shared_expert_intermediate_size=24,
    num_experts=8,
    num_experts_per_tok=3,
    norm_topk_prob=True,
    max_position_embeddings=256,
    rope_theta=10000.0,
    # larger than the default 0.02, so that the token mixers move the logits visibly
    initializer_range=0.1,
)

# The benchmark stand-in for the embedded model (hidden 128, 6 layers, 64 experts, top-4).
BENCH_CONFIG: dict[str, Any] = dict(
    vocab_size=8192,
    hidden_size=128,
    intermediate_size=384,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    moe_intermediate_size=32,
    num_experts=64,
    num_experts_per_tok=4,
    norm_topk_prob=True,
    max_position_embeddings=2048,
    rope_theta=10000.0,
    tie_word_embeddings=True,
)


def make_hf_model(seed: int = 0, architecture: str = "qwen3_moe", **overrides: Any):
    """A randomly initialised transformers model (float32, eval mode)."""
    import transformers

    torch.manual_seed(seed)
    kw = {**(TINY_NEXT_CONFIG if architecture == "qwen3_next" else TINY_CONFIG), **overrides}
    config: Any
    model: Any
    if architecture == "qwen3_moe":
        config = transformers.Qwen3MoeConfig(**kw)
        model = transformers.Qwen3MoeForCausalLM(config)
    elif architecture == "qwen2_moe":
        kw.pop("head_dim", None)
        config = transformers.Qwen2MoeConfig(**kw)
        model = transformers.Qwen2MoeForCausalLM(config)
    elif architecture == "qwen3_next":
        config = transformers.Qwen3NextConfig(**kw)
        model = transformers.Qwen3NextForCausalLM(config)
    else:
        raise ValueError(architecture)
    # Random init leaves norms at 1 and a zero router in some versions; perturb everything
    # so that q/k norms, routing and the final norm are actually tested.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
            elif name.endswith("mlp.gate.weight") or "experts" in name:
                p.normal_(0.0, 0.2)
    return model.eval()


def save_checkpoint(model: Any, path: str | Path, max_shard_size: str | None = None) -> Path:
    path = Path(path)
    if max_shard_size is None:
        model.save_pretrained(path)
    else:
        model.save_pretrained(path, max_shard_size=max_shard_size)
    return path


def save_fused_checkpoint(model: Any, path: str | Path) -> Path:
    """Save with the fused expert tensors transformers 5.x holds in memory
    (`mlp.experts.gate_up_proj` [E, 2I, H], `mlp.experts.down_proj` [E, H, I])."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    assert any(k.endswith("experts.gate_up_proj") for k in state), "not a fused in-memory layout"
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    model.config.save_pretrained(path)
    return path


def train_tiny_tokenizer(path: str | Path, texts: Iterable[str], vocab_size: int = 128) -> Path:
    """A byte-level BPE tokenizer trained in well under a second, with `<|endoftext|>` as
    EOS and a minimal chat template, saved as tokenizer.json + tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer)
    tok.save(str(path / "tokenizer.json"))
    template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    (path / "tokenizer_config.json").write_text(
        json.dumps(
            {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "chat_template": template}
        )
    )
    return path
