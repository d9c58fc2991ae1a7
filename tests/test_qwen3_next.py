"""Our Qwen3-Next matches transformers' Qwen3NextForCausalLM on random checkpoints.

float32, max abs logit difference <= 1e-4 for a prefill (one and several delta-rule chunks)
and for 16 cached decode steps, identical greedy tokens; batched generation, chunked
prefill through the cache and scheduler-style row moves equal one sequence alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

pytest.importorskip("transformers")

import dynaexq  # noqa: E402
from dynaexq.generation import SamplingParams, generate_tokens  # noqa: E402
from dynaexq.model.qwen3_next import (  # noqa: E402
    HybridCache,
    delta_rule_chunked,
    delta_rule_recurrent,
)
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
L, F = "linear_attention", "full_attention"

# name -> (config overrides, how to save)
CONFIGS: dict[str, tuple[dict[str, Any], str]] = {
    # 3 linear + 1 full (the released pattern in small), GQA 4/2, grouped value heads 4/2,
    # shared expert, untied, k=3 renormalised, sharded save
    "interval4_shared_untied": ({}, "sharded"),
    # full attention first and last, odd heads (3 heads over 1 KV head; 3/3 linear heads),
    # tied embeddings, no shared expert, k=1 without renormalisation
    "tied_no_shared_odd_heads": (
        dict(
            num_hidden_layers=5,
            layer_types=[F, L, L, F, L],
            tie_word_embeddings=True,
            num_attention_heads=3,
            num_key_value_heads=1,
            head_dim=8,
            linear_num_key_heads=3,
            linear_num_value_heads=3,
            linear_key_head_dim=6,
            linear_value_head_dim=6,
            shared_expert_intermediate_size=0,
            num_experts_per_tok=1,
            norm_topk_prob=False,
        ),
        "single",
    ),
    # MHA with attention biases, half of each head rotated, a dense (mlp_only) layer,
    # 3 value heads per q/k head, a kernel-2 convolution, MoE every second layer
    "mha_bias_dense_gva3": (
        dict(
            layer_types=[L, F, L, F],
            num_attention_heads=2,
            num_key_value_heads=2,
            attention_bias=True,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 10000.0,
                "partial_rotary_factor": 0.5,
            },
            linear_num_key_heads=1,
            linear_num_value_heads=3,
            linear_conv_kernel_dim=2,
            mlp_only_layers=[0],
            decoder_sparse_step=2,
            num_experts_per_tok=2,
        ),
        "single",
    ),
    # YaRN on the rotated quarter of each head (decode runs past the original 16 positions)
    "yarn_partial_rope": (
        dict(
            rope_parameters={
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": 4.0,
                "original_max_position_embeddings": 16,
                "partial_rotary_factor": 0.25,
            },
            max_position_embeddings=64,
        ),
        "single",
    ),
    # fused expert tensors (transformers 5.x in-memory layout), only linear layers but one
    "fused_mostly_linear": (
        dict(layer_types=[L, L, L, L, F], num_hidden_layers=5, num_experts_per_tok=2),
        "fused",
    ),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    overrides, save = CONFIGS[request.param]
    hf = make_hf_model(seed=len(request.param), architecture="qwen3_next", **overrides)
    path = tmp_path_factory.mktemp(request.param)
    if save == "fused":
        save_fused_checkpoint(hf, path)
    else:
        save_checkpoint(hf, path, max_shard_size="40KB" if save == "sharded" else None)
    if save == "sharded":
        assert (Path(path) / "model.safetensors.index.json").is_file()
    engine = dynaexq.load(path, dtype="float32", device="cpu")
    return hf, engine


def _prompt(vocab: int, n: int, seed: int, batch: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (batch, n), generator=g)


@pytest.mark.parametrize("n", [13, 150])  # one delta-rule chunk; three, the last partial
def test_prefill_logits_match(pair, n: int) -> None:
    hf, engine = pair
    ids = _prompt(hf.config.vocab_size, n, 1)
    with torch.no_grad():
        ref = hf(ids).logits
    ours = engine.forward(ids)
    assert ours.shape == (2, n, hf.config.vocab_size)
    assert (ours - ref).abs().max().item() <= TOL


def test_cached_decode_logits_match(pair) -> None:
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
    cache = model.allocate_cache(2, ids.shape[1] + DECODE_STEPS + 1, torch.float32, "cpu")
    assert isinstance(cache, HybridCache)
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


def test_rows_leaving_the_batch_keep_the_others_exact(pair) -> None:
    """A sequence that ends at EOS is dropped from the batch (cache.select): the others
    continue from their own recurrent state."""
    hf, engine = pair
    g = torch.Generator().manual_seed(9)
    prompts = [
        torch.randint(0, hf.config.vocab_size, (n,), generator=g).tolist() for n in (4, 7, 2)
    ]
    free = SamplingParams(max_new_tokens=10, ignore_eos=True)
    eos = generate_tokens(engine.model, [prompts[0]], free)[0].token_ids[2]
    params = SamplingParams(max_new_tokens=10)
    together = generate_tokens(engine.model, prompts, params, eos_token_ids=[eos])
    alone = [generate_tokens(engine.model, [p], params, eos_token_ids=[eos])[0] for p in prompts]
    assert together[0].finish_reason == "eos" and len(together[0].token_ids) <= 3
    assert [o.token_ids for o in together] == [o.token_ids for o in alone]


def test_chunked_prefill_with_padding_equals_one_shot(pair) -> None:
    """The scheduler's prefill: rows continue from their cached state at different offsets,
    shorter rows padded at the end, a new sequence taking a row another one left."""
    hf, engine = pair
    model = engine.model
    vocab = hf.config.vocab_size
    a, b = _prompt(vocab, 23, 5, batch=1)[0], _prompt(vocab, 11, 6, batch=1)[0]
    with torch.inference_mode():
        want_a = model(a[None])[0, -1]
        want_b = model(b[None])[0, -1]
        cache = model.allocate_cache(2, 32, torch.float32, "cpu")
        # Fill row 1 with an unrelated sequence first: b must not see any of it.
        model(_prompt(vocab, 9, 7, batch=2), torch.arange(9).expand(2, -1), cache)
        # step 1: a[0:10] on row 0 (from 0), b[0:4] on row 1 (from 0, padded to 10)
        # step 2: a[10:16] on row 0, b[4:11] on row 1 (a padded to 7)
        # step 3: a[16:23] alone
        plan = [((0, 10), (0, 4)), ((10, 16), (4, 11))]
        for (a0, a1), (b0, b1) in plan:
            t = max(a1 - a0, b1 - b0)
            ids = torch.zeros(2, t, dtype=torch.long)
            ids[0, : a1 - a0], ids[1, : b1 - b0] = a[a0:a1], b[b0:b1]
            offsets = torch.arange(t)
            positions = torch.stack([a0 + offsets, b0 + offsets])
            mask = torch.stack([offsets < a1 - a0, offsets < b1 - b0])
            out = model(
                ids, positions, cache, mask, logits_index=torch.tensor([a1 - a0 - 1, b1 - b0 - 1])
            )
        got_b = out[1, 0]
        row_a = cache.rows(0, 1)
        got_a = model(a[None, 16:], torch.arange(16, 23)[None], row_a)[0, -1]
    assert (got_a - want_a).abs().max().item() <= TOL
    assert (got_b - want_b).abs().max().item() <= TOL


def test_copy_row_moves_a_sequence(pair) -> None:
    """A row moved to another slab row (the scheduler compacting) decodes as before."""
    hf, engine = pair
    model = engine.model
    ids = _prompt(hf.config.vocab_size, 8, 8, batch=1)
    with torch.inference_mode():
        ref_cache = model.allocate_cache(1, 16, torch.float32, "cpu")
        model(ids, torch.arange(8)[None], ref_cache)
        want = model(ids[:, -1:], torch.tensor([[8]]), ref_cache)[0, -1]
        slab = model.allocate_cache(3, 16, torch.float32, "cpu")
        model(ids, torch.arange(8)[None], slab.rows(2, 3))
        slab.copy_row(2, 0, used=8)
        got = model(ids[:, -1:], torch.tensor([[8]]), slab.rows(0, 1))[0, -1]
    assert (got - want).abs().max().item() <= TOL
    assert slab.nbytes == HybridCache.bytes_for(model.config, 3, 16, 4)


def test_chunked_and_recurrent_delta_rule_agree() -> None:
    """The two formulations of the gated delta rule, from a non-zero state, with strong and
    weak decay, over several chunks and a partial one."""
    g = torch.Generator().manual_seed(0)
    b, h, n, dk, dv = 2, 3, 37, 5, 4
    q = torch.nn.functional.normalize(torch.randn(b, h, n, dk, generator=g), dim=-1)
    k = torch.nn.functional.normalize(torch.randn(b, h, n, dk, generator=g), dim=-1)
    v = torch.randn(b, h, n, dv, generator=g)
    decay = -torch.rand(b, h, n, generator=g) * torch.tensor([0.01, 1.0, 8.0])[None, :, None]
    beta = torch.rand(b, h, n, generator=g)
    state = torch.randn(b, h, dk, dv, generator=g)
    o1, s1 = delta_rule_recurrent(q, k, v, decay, beta, state)
    o2, s2 = delta_rule_chunked(q, k, v, decay, beta, state, chunk=8)
    assert (o1 - o2).abs().max().item() <= 1e-5
    assert (s1 - s2).abs().max().item() <= 1e-5
    # padding (decay 0, beta 0) leaves the state as it was
    zeros = torch.zeros(b, h, 5)
    _, s3 = delta_rule_chunked(q[:, :, :5], k[:, :, :5], v[:, :, :5], zeros, zeros, s1)
    assert torch.allclose(s3, s1)


def test_flash_linear_attention_calling_convention(monkeypatch) -> None:
    """On CUDA the delta rule goes to flash-linear-attention's kernels. Stand-ins with their
    documented convention (q, k, v [B, T, H, D]; g, beta [B, T, H] keywords; scale;
    initial_state [B, H, K, V]; returns (o [B, T, H, V], final state)) must give what the
    torch path gives."""
    from dynaexq.model import qwen3_next

    calls: list[str] = []

    def stand_in(name: str):
        def kernel(q, k, v, *, g, beta, scale, initial_state, output_final_state):
            calls.append(name)
            assert output_final_state and q.shape[:3] == g.shape == beta.shape
            args = (x.transpose(1, 2) for x in (q * scale, k, v, g, beta))
            o, final = delta_rule_recurrent(*args, initial_state)
            return o.transpose(1, 2).to(torch.bfloat16), final

        return kernel

    gen = torch.Generator().manual_seed(1)
    q, k = (
        torch.nn.functional.normalize(torch.randn(1, 2, 9, 4, generator=gen), dim=-1) for _ in "qk"
    )
    v = torch.randn(1, 2, 9, 3, generator=gen)
    g, beta = -torch.rand(1, 2, 9, generator=gen), torch.rand(1, 2, 9, generator=gen)
    state = torch.randn(1, 2, 4, 3, generator=gen)
    want = qwen3_next.gated_delta_rule(q, k, v, g, beta, state)
    kernels = (stand_in("chunk"), stand_in("recurrent"))
    monkeypatch.setattr(qwen3_next, "_fla_kernels", lambda x: kernels)
    got = qwen3_next.gated_delta_rule(q, k, v, g, beta, state)
    one = qwen3_next.gated_delta_rule(
        q[:, :, :1], k[:, :, :1], v[:, :, :1], g[:, :, :1], beta[:, :, :1], state
    )
    assert calls == ["chunk", "recurrent"]
    assert got[0].dtype == torch.float32 and got[0].shape == want[0].shape
    assert (got[0] - want[0]).abs().max().item() <= 1e-2  # the stand-in returns bf16 outputs
    assert (got[1] - want[1]).abs().max().item() <= 1e-5
    assert one[0].shape == (1, 2, 1, 3)


def test_token_mixers_change_the_logits(pair) -> None:
    """The checkpoints are not degenerate: the linear-attention layers move the logits
    far more than the tolerance (so the exactness checks above test them)."""
    hf, engine = pair
    ids = _prompt(hf.config.vocab_size, 13, 1)
    base = engine.forward(ids)
    layer = next(x for x in engine.model.model.layers if x.is_linear)
    saved = layer.linear_attn.A_log.clone()
    try:
        layer.linear_attn.A_log.add_(1.0)
        assert (engine.forward(ids) - base).abs().max().item() > 100 * TOL
    finally:
        layer.linear_attn.A_log.copy_(saved)


def test_config_layer_pattern_and_its_errors() -> None:
    from dynaexq.bench.estimate import QWEN3_NEXT_80B_A3B_CONFIG
    from dynaexq.checkpoint import CheckpointError
    from dynaexq.model.config import ModelConfig

    raw = dict(QWEN3_NEXT_80B_A3B_CONFIG)
    c = ModelConfig.from_dict(raw)  # released configs give full_attention_interval
    assert c.attention_layers == [3, 7, 11, 15, 19, 23, 27, 31, 35, 39, 43, 47]
    assert c.rope.partial_rotary_factor == 0.25 and c.qk_norm and c.shared_expert_intermediate_size
    with pytest.raises(CheckpointError, match="layer_types must list 48"):
        ModelConfig.from_dict({**raw, "layer_types": [L, F]})
    with pytest.raises(CheckpointError, match="layer_types"):
        ModelConfig.from_dict({**raw, "layer_types": ["sliding_attention"] * 48})
    with pytest.raises(CheckpointError, match="not a multiple"):
        ModelConfig.from_dict({**raw, "linear_num_value_heads": 24})
