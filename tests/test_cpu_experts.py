"""The Rust CPU expert executor against the reference dequantizer (`dynaexq.quant`): every
tier, random shapes, group sizes and routings (experts with one token and with many)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from dynaexq import ExpertPool, ExpertTable
from dynaexq._core import CpuExperts
from dynaexq.quant import PackedExpertView, pack_expert, parse_tier
from dynaexq.quant.expert import dequantize_expert, expert_nbytes, reference_expert_forward
from hypothesis import given, settings
from hypothesis import strategies as st

TIERS = [
    "bf16",
    "fp16",
    "int8g128",
    "int4g128",
    "int4g32a",
    "int3g64",
    "int3g128a",
    "int2g64",
    "int2g32a",
    "int4g64-rtn",
]


def build(tiers: list[str], experts: int, h: int, i: int, seed: int):
    """A one-layer table whose expert e sits at table tier e % len(tiers), with the
    reference weights of every expert."""
    g = torch.Generator().manual_seed(seed)
    specs = [parse_tier(t) for t in tiers]
    sizes = {f"t{k}": expert_nbytes(s, h, i) for k, s in enumerate(specs)}
    pool = ExpertPool(sizes, {name: experts for name in sizes})
    initial = [[e % len(tiers) for e in range(experts)]]
    table = ExpertTable(pool, [experts], [[f"t{k}" for k in range(len(tiers))]], initial)
    refs = []
    for e in range(experts):
        spec = specs[e % len(tiers)]
        gate = torch.randn(i, h, generator=g) * 0.2
        up = torch.randn(i, h, generator=g) * 0.2
        down = torch.randn(h, i, generator=g) * 0.2
        blob = pack_expert(spec, gate, up, down)
        table.load(0, e, blob.numpy())
        refs.append(PackedExpertView(spec, h, i, blob))
    return table, refs


def int8_rounded(v: torch.Tensor, group: int) -> torch.Tensor:
    """`v` [T, K] rounded to 127 steps of each group's largest magnitude (how the executor's
    int8 activations see a matrix's input)."""
    t, k = v.shape
    padded = torch.nn.functional.pad(v, (0, -k % group)).reshape(t, -1, group)
    step = padded.abs().amax(dim=2, keepdim=True) / 127
    q = torch.where(step > 0, (padded / step).round().clamp(-127, 127) * step, 0.0)
    return q.reshape(t, -1)[:, :k]


def int8_reference_forward(view: PackedExpertView, x: torch.Tensor) -> torch.Tensor:
    """The reference dequantizer with both matrices' inputs rounded as int8 activations
    (16-bit tiers take float inputs)."""
    if not view.tier.is_quantized:
        return reference_expert_forward(view, x)
    g, u, d = dequantize_expert(view)
    group = view.tier.group_size
    xq = int8_rounded(x.to(torch.float32), group)
    a = torch.nn.functional.silu(xq @ g.T) * (xq @ u.T)
    return int8_rounded(a, group) @ d.T


def flip_allowance(refs, x, ids, w) -> torch.Tensor:
    """Per token, what two int8 steps of the down matrix's input can move an output by:
    the executor computes gate_up in float32 in another order than the reference, so an
    input that lands on a rounding boundary may round the other way (one step = the
    group's largest |input| / 127, times the largest |down weight|)."""
    out = torch.zeros(x.shape[0])
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            view = refs[int(ids[t, j])]
            if not view.tier.is_quantized:
                continue
            g, u, d = dequantize_expert(view)
            xq = int8_rounded(x[t : t + 1].float(), view.tier.group_size)
            a = torch.nn.functional.silu(xq @ g.T) * (xq @ u.T)
            out[t] += float(w[t, j]) * 2 * float(d.abs().max()) * float(a.abs().max()) / 127
    return out


def reference(refs, x, ids, w, activations: str = "float"):
    forward = reference_expert_forward if activations == "float" else int8_reference_forward
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            out[t] += w[t, j] * forward(refs[e], x[t : t + 1])[0]
    return out


@settings(max_examples=25, deadline=None)
@given(
    h=st.sampled_from([32, 48, 64, 100]),
    i=st.sampled_from([32, 40, 64, 96]),
    tokens=st.integers(1, 12),
    k=st.integers(1, 3),
    tiers=st.lists(st.sampled_from(TIERS), min_size=1, max_size=3, unique=True),
    threads=st.integers(1, 3),
    seed=st.integers(0, 2**16),
    activations=st.sampled_from(["float", "int8"]),
)
def test_matches_the_reference_dequantizer(
    h, i, tokens, k, tiers, threads, seed, activations
) -> None:
    experts = 5
    table, refs = build(tiers, experts, h, i, seed)
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.standard_normal((tokens, h)).astype(np.float32))
    # Skewed routing: expert 0 takes many tokens, others one or none.
    ids = torch.from_numpy(
        np.stack(
            [
                rng.choice(experts, size=k, replace=False, p=[0.6, 0.1, 0.1, 0.1, 0.1])
                for _ in range(tokens)
            ]
        ).astype(np.int64)
    )
    w = torch.from_numpy(rng.random((tokens, k)).astype(np.float32))
    core = CpuExperts(table, tiers, h, i, 256, threads, activations)
    assert core.activations == activations
    out = np.empty((tokens, h), dtype=np.float32)
    pairs, mass = core.forward(0, x.numpy(), ids.numpy(), w.numpy(), out)
    want = reference(refs, x, ids, w, activations)
    if activations == "float":
        torch.testing.assert_close(torch.from_numpy(out), want, rtol=2e-4, atol=2e-4)
    else:
        err = (torch.from_numpy(out) - want).abs()
        bound = 2e-4 * (1 + want.abs()) + flip_allowance(refs, x, ids, w)[:, None]
        assert bool((err <= bound).all()), (err - bound).max()
    tier_of = [e % len(tiers) for e in range(experts)]
    assert pairs == [
        int(sum(tier_of[int(e)] == t for e in ids.reshape(-1))) for t in range(len(tiers))
    ]
    assert sum(mass) == pytest.approx(float(w.sum()), rel=1e-5)


def test_results_do_not_depend_on_the_thread_count() -> None:
    table, _ = build(["int4g128", "bf16"], 4, 64, 64, 3)
    x = np.random.default_rng(0).standard_normal((9, 64)).astype(np.float32)
    ids = np.array([[t % 4, (t + 1) % 4] for t in range(9)], dtype=np.int64)
    w = np.full((9, 2), 0.5, dtype=np.float32)
    outs = []
    for threads in (1, 2, 3):
        out = np.empty_like(x)
        CpuExperts(table, ["int4g128", "bf16"], 64, 64, 256, threads).forward(0, x, ids, w, out)
        outs.append(out)
    assert np.array_equal(outs[0], outs[1]) and np.array_equal(outs[0], outs[2])


def test_bad_inputs_are_errors() -> None:
    table, _ = build(["int2g64"], 2, 32, 32, 0)
    core = CpuExperts(table, ["int2g64"], 32, 32)
    x = np.zeros((2, 32), dtype=np.float32)
    w = np.ones((2, 1), dtype=np.float32)
    with pytest.raises(ValueError, match="expert 7"):
        core.forward(0, x, np.array([[0], [7]], dtype=np.int64), w, np.empty_like(x))
    with pytest.raises(ValueError, match="writable float32"):
        core.forward(0, x, np.zeros((2, 1), dtype=np.int64), w, np.empty((1, 32), np.float32))
    with pytest.raises(ValueError, match="slots hold"):
        CpuExperts(table, ["bf16"], 32, 32)
    with pytest.raises(ValueError, match="cannot read tier"):
        CpuExperts(table, ["int9"], 32, 32)
    with pytest.raises(ValueError, match="activations must be"):
        CpuExperts(table, ["int2g64"], 32, 32, activations="int4")
