"""The expert-executor interface and the routing hook."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("transformers")

import dynaexq  # noqa: E402
from dynaexq.checkpoint import Checkpoint  # noqa: E402
from dynaexq.generation import SamplingParams, generate_tokens  # noqa: E402
from dynaexq.model.experts import ExpertExecutor, FullPrecisionExperts  # noqa: E402
from dynaexq.model.testing import make_hf_model, save_checkpoint  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models: one thread is faster, and two stall when the 2 CPUs are busy."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    path = save_checkpoint(make_hf_model(seed=3), tmp_path_factory.mktemp("m"))
    return dynaexq.load(path, dtype="float32", device="cpu")


def _reference(gate_up, down, hidden, ids, weights):
    """Token by token, expert by expert: the definition the executor must meet."""
    out = torch.zeros_like(hidden)
    i = gate_up.shape[1] // 2
    for t in range(hidden.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            g = gate_up[e, :i] @ hidden[t]
            u = gate_up[e, i:] @ hidden[t]
            out[t] += weights[t, j] * (down[e] @ (F.silu(g) * u))
    return out


@settings(max_examples=25, deadline=None)
@given(
    tokens=st.integers(1, 12),
    experts=st.integers(1, 9),
    k=st.integers(1, 4),
    seed=st.integers(0, 2**16),
    inter=st.sampled_from([6, 8]),  # 6: rows of 24 bytes, which grouped_mm refuses
    grouped=st.booleans(),
)
def test_full_precision_executor_matches_definition(
    tokens, experts, k, seed, inter, grouped
) -> None:
    k = min(k, experts)
    g = torch.Generator().manual_seed(seed)
    h, i = 8, inter
    gate_up = torch.randn(experts, 2 * i, h, generator=g)
    down = torch.randn(experts, h, i, generator=g)
    hidden = torch.randn(tokens, h, generator=g)
    ids = torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(tokens)])
    weights = torch.rand(tokens, k, generator=g)
    ex = FullPrecisionExperts({0: gate_up}, {0: down}, use_grouped_mm=grouped)
    got = ex.forward(0, hidden, ids, weights)
    assert torch.allclose(got, _reference(gate_up, down, hidden, ids, weights), atol=1e-5)


def test_grouped_and_looped_expert_paths_agree(engine) -> None:
    ex = engine.experts
    looped = FullPrecisionExperts(ex.gate_up, ex.down, use_grouped_mm=False)
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(40, engine.config.hidden_size, generator=g)
    ids = torch.stack([torch.randperm(8, generator=g)[:3] for _ in range(40)])
    w = torch.rand(40, 3, generator=g)
    assert torch.allclose(
        ex.forward(0, hidden, ids, w), looped.forward(0, hidden, ids, w), atol=1e-6
    )
    if hasattr(torch, "_grouped_mm"):  # the fast path really ran (no silent fallback)
        from dynaexq.model.experts import _GROUPED_OK

        assert _GROUPED_OK[("cpu", torch.float32, tuple(ex.gate_up[0].shape))] is True


def test_executors_accept_zero_tokens(engine) -> None:
    from dynaexq.model.experts import MappedExperts

    h = torch.zeros(0, engine.config.hidden_size)
    ids, w = torch.zeros(0, 3, dtype=torch.long), torch.zeros(0, 3)
    ck = engine.checkpoint
    for ex in (engine.experts, MappedExperts(ck, torch.float32)):
        assert ex.forward(0, h, ids, w).shape == (0, engine.config.hidden_size)


def test_executor_weights_are_addressable_per_expert(engine) -> None:
    ck = Checkpoint(engine.checkpoint.path)
    ex = engine.experts
    assert isinstance(ex, ExpertExecutor) and isinstance(ex, FullPrecisionExperts)
    assert ex.layers == [0, 2]  # layer 1 is dense (mlp_only_layers)
    for layer in ex.layers:
        for e in range(ck.config.num_experts):
            a, b = ex.expert(layer, e), ck.expert(layer, e)
            assert torch.equal(a.gate, b.gate) and torch.equal(a.up, b.up)
            assert torch.equal(a.down, b.down)


class Recording:
    """Delegates to another executor and records what it was asked."""

    def __init__(self, inner: ExpertExecutor, scale: float = 1.0) -> None:
        self.inner, self.scale, self.calls = inner, scale, []

    def forward(self, layer, hidden, expert_ids, weights):
        self.calls.append((layer, hidden.shape[0], tuple(expert_ids.shape)))
        return self.scale * self.inner.forward(layer, hidden, expert_ids, weights)


def test_swapping_the_executor_changes_only_expert_execution(engine) -> None:
    ids = torch.randint(0, 128, (2, 5), generator=torch.Generator().manual_seed(0))
    base = engine.forward(ids)
    default = engine.experts
    try:
        rec = Recording(default)
        engine.experts = rec
        assert torch.equal(engine.forward(ids), base)
        k = engine.config.num_experts_per_tok
        assert rec.calls == [(0, 10, (10, k)), (2, 10, (10, k))]
        engine.experts = Recording(default, scale=0.0)
        assert not torch.allclose(engine.forward(ids), base)
    finally:
        engine.experts = default


def test_routing_hook_sees_each_real_token_once_per_layer_and_step(engine) -> None:
    seen: list[tuple[int, int]] = []
    probs_ok: list[bool] = []

    def hook(layer, expert_ids, probs):
        seen.append((layer, expert_ids.shape[0]))
        top = probs.gather(1, expert_ids)
        # expert_ids are the top-k of the router probabilities
        probs_ok.append(
            probs.dtype == torch.float32
            and bool(torch.allclose(probs.sum(-1), torch.ones(len(probs))))
            and bool((top.min(1).values >= probs.topk(expert_ids.shape[1]).values[:, -1]).all())
        )

    remove = engine.add_routing_hook(hook)
    try:
        prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11]]
        generate_tokens(engine.model, prompts, SamplingParams(max_new_tokens=3, ignore_eos=True))
    finally:
        remove()
    # prefill: 11 real tokens (padding to 3x7 is not shown); then 3 rows per decode step
    assert seen == [(0, 11), (2, 11), (0, 3), (2, 3), (0, 3), (2, 3)]
    assert all(probs_ok)
    generate_tokens(engine.model, [[1]], SamplingParams(max_new_tokens=2))
    assert len(seen) == 6  # removed hooks are not called


def test_finished_sequences_leave_the_batch(engine) -> None:
    params = SamplingParams(max_new_tokens=4, ignore_eos=True)
    first, second = (
        o.token_ids for o in generate_tokens(engine.model, [[5, 6], [7, 8, 9]], params)
    )
    eos = next((t for t in first[:3] if t not in second), None)
    if eos is None:
        pytest.skip("no token separates the two generations")
    stop = first.index(eos) + 1
    rows: list[int] = []
    remove = engine.add_routing_hook(
        lambda layer, ids, p: rows.append(ids.shape[0]) if layer == 0 else None
    )
    try:
        outs = generate_tokens(
            engine.model, [[5, 6], [7, 8, 9]], SamplingParams(max_new_tokens=4), eos_token_ids=[eos]
        )
    finally:
        remove()
    assert outs[0].token_ids == first[:stop] and outs[0].finish_reason == "eos"
    assert outs[1].token_ids == second and outs[1].finish_reason == "length"
    # prefill shows 5 real tokens; decode steps show 2 rows until the first one ends, then 1
    assert rows == [5] + [2] * (stop - 1) + [1] * (3 - (stop - 1))


def test_mapped_experts_give_the_same_logits(engine) -> None:
    from dynaexq.model.experts import MappedExperts

    mapped = dynaexq.load(
        engine.checkpoint.path, dtype="float32", device="cpu", experts=MappedExperts.factory
    )
    assert isinstance(mapped.experts, MappedExperts)
    ids = torch.randint(0, 128, (3, 7), generator=torch.Generator().manual_seed(1))
    assert torch.allclose(mapped.forward(ids), engine.forward(ids), atol=1e-5)
    assert mapped.generate(ids.tolist(), max_new_tokens=6, ignore_eos=True)[1].token_ids == (
        engine.generate(ids.tolist(), max_new_tokens=6, ignore_eos=True)[1].token_ids
    )
