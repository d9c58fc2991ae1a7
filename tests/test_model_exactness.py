"""Our Qwen3-MoE matches transformers' Qwen3MoeForCausalLM on random checkpoints.

float32, max abs logit difference <= 1e-4 for a prefill and for 16 KV-cached decode
steps, and identical greedy tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("transformers")

import dynaexq  # noqa: E402
from dynaexq.generation import SamplingParams, generate_tokens  # noqa: E402
from dynaexq.model.qwen3_moe import KVCache  # noqa: E402
from dynaexq.model.testing import make_hf_model, save_checkpoint, save_fused_checkpoint  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models: one thread is faster, and two stall when the 2 CPUs are busy."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


TOL = 1e-4
DECODE_STEPS = 16

# name -> (architecture, config overrides, how to save)
CONFIGS: dict[str, tuple[str, dict[str, Any], str]] = {
    # untied, GQA 6/2, k=3 renormalised, a dense mlp_only layer, sharded save
    "untied_k3_dense_sharded": ("qwen3_moe", {}, "sharded"),
    # tied, odd head count 5 with one KV head, k=1, no renormalisation, sparse step 2
    "tied_k1_odd_heads": (
        "qwen3_moe",
        dict(
            tie_word_embeddings=True,
            num_attention_heads=5,
            num_key_value_heads=1,
            head_dim=8,
            num_experts_per_tok=1,
            norm_topk_prob=False,
            mlp_only_layers=[],
            decoder_sparse_step=2,
        ),
        "single",
    ),
    # odd head count 3 (MHA), attention biases, yarn RoPE
    "mha_bias_yarn": (
        "qwen3_moe",
        dict(
            num_attention_heads=3,
            num_key_value_heads=3,
            head_dim=16,
            attention_bias=True,
            num_experts_per_tok=2,
            rope_scaling={
                "rope_type": "yarn",
                "factor": 4.0,
                "original_max_position_embeddings": 8,
            },
        ),
        "single",
    ),
    "rope_linear": (
        "qwen3_moe",
        dict(rope_scaling={"rope_type": "linear", "factor": 2.0}),
        "single",
    ),
    # dynamic NTK kicks in once positions pass max_position_embeddings during decode
    "rope_dynamic": (
        "qwen3_moe",
        dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}, max_position_embeddings=16),
        "single",
    ),
    # fused expert tensors (transformers 5.x in-memory layout) in the safetensors file
    "fused_experts": ("qwen3_moe", dict(num_experts_per_tok=2), "fused"),
    # Qwen2-MoE: shared expert + sigmoid gate, q/k/v biases, no q/k norm
    "qwen2_shared_expert": (
        "qwen2_moe",
        dict(shared_expert_intermediate_size=24, num_experts_per_tok=2, mlp_only_layers=[2]),
        "sharded",
    ),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    arch, overrides, save = CONFIGS[request.param]
    hf = make_hf_model(seed=len(request.param), architecture=arch, **overrides)
    path = tmp_path_factory.mktemp(request.param)
    if save == "fused":
        save_fused_checkpoint(hf, path)
    else:
        save_checkpoint(hf, path, max_shard_size="40KB" if save == "sharded" else None)
    if save == "sharded":
        assert (Path(path) / "model.safetensors.index.json").is_file()
    engine = dynaexq.load(path, dtype="float32", device="cpu")
    return hf, engine


def _prompt(vocab: int, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (2, n), generator=g)


def test_prefill_logits_match(pair) -> None:
    hf, engine = pair
    ids = _prompt(hf.config.vocab_size, 13, 1)
    with torch.no_grad():
        ref = hf(ids).logits
    ours = engine.forward(ids)
    assert ours.shape == (2, 13, hf.config.vocab_size)
    assert (ours - ref).abs().max().item() <= TOL


def test_kv_cache_decode_logits_match(pair) -> None:
    hf, engine = pair
    ids = _prompt(hf.config.vocab_size, 7, 2)
    with torch.no_grad():
        ref = hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=DECODE_STEPS + 1,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            eos_token_id=None,
            pad_token_id=0,
        )
    tokens = ref.sequences[:, ids.shape[1] :]
    model = engine.model
    cache = KVCache.allocate(model.config, 2, ids.shape[1] + DECODE_STEPS + 1, torch.float32, "cpu")
    with torch.inference_mode():
        pos = torch.arange(ids.shape[1]).expand(2, -1)
        logits = model(ids, pos, cache)[:, -1]
        assert (logits - ref.logits[0]).abs().max().item() <= TOL
        for step in range(DECODE_STEPS):
            p = torch.full((2, 1), ids.shape[1] + step)
            logits = model(tokens[:, step : step + 1], p, cache)[:, 0]
            assert (logits - ref.logits[step + 1]).abs().max().item() <= TOL, step


def test_greedy_generation_matches(pair) -> None:
    hf, engine = pair
    ids = _prompt(hf.config.vocab_size, 5, 3)
    with torch.no_grad():
        ref = hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=20,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )[:, ids.shape[1] :]
    ours = engine.generate(ids.tolist(), max_new_tokens=20, ignore_eos=True)
    assert [r.token_ids for r in ours] == ref.tolist()
    assert all(r.finish_reason == "length" for r in ours)


def test_batched_generation_equals_one_by_one(pair) -> None:
    hf, engine = pair
    g = torch.Generator().manual_seed(4)
    prompts = [
        torch.randint(0, hf.config.vocab_size, (n,), generator=g).tolist() for n in (3, 9, 1, 6)
    ]
    params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    together = generate_tokens(engine.model, prompts, params)
    alone = [generate_tokens(engine.model, [p], params)[0] for p in prompts]
    assert [o.token_ids for o in together] == [o.token_ids for o in alone]
