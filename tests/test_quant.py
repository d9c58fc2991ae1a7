"""Quantization tiers: specs, bit packing, RTN/ALS round trips, expert blobs, CPU execution."""

from __future__ import annotations

import pytest
import torch
from dynaexq.quant import (
    ExpertScratch,
    PackedExpertError,
    PackedExpertView,
    QuantizationError,
    TierError,
    TierSpec,
    dequantize_expert,
    dequantize_matrix,
    expert_forward,
    expert_layout,
    expert_nbytes,
    pack_codes,
    pack_expert,
    parse_tier,
    parse_tiers,
    quantize_expert,
    quantize_matrix,
    reference_expert_forward,
    relative_error,
    swiglu_reference,
    unpack_codes,
)
from dynaexq.quant.packing import MatrixGeometry
from hypothesis import given, settings
from hypothesis import strategies as st

INT_TIERS = [
    TierSpec(bits=b, group_size=g, symmetric=s, method=m)
    for b in (8, 4, 3, 2)
    for g in (32, 64, 128)
    for s in (True, False)
    for m in ("rtn", "als")
]
SOME_TIERS = ["bf16", "fp16", "int8", "int4", "int3", "int2", "int4g32a", "int2g64a-rtn"]

# ------------------------------------------------------------------ tier specs


def test_tier_defaults_follow_the_paper():
    assert parse_tier("int4") == TierSpec(bits=4, group_size=128, symmetric=True, method="als")
    assert parse_tier("int2") == TierSpec(bits=2, group_size=64, symmetric=True, method="als")
    assert parse_tier("int2g64a-rtn") == TierSpec(2, 64, False, "rtn")
    assert parse_tier("BF16").bits == 16 and parse_tier("fp16").dtype == "fp16"


@pytest.mark.parametrize("tier", INT_TIERS + [TierSpec(16), TierSpec(16, dtype="fp16")])
def test_tier_name_round_trips(tier):
    assert parse_tier(tier.name) == tier


@pytest.mark.parametrize(
    "bad", ["int5", "int4g100", "int4g128-gptq", "fp8", "", "int4g128ax", "int16"]
)
def test_bad_tier_strings_are_rejected(bad):
    with pytest.raises(TierError):
        parse_tier(bad)


def test_parse_tiers_list():
    assert [t.name for t in parse_tiers("bf16, int4,int2")] == ["bf16", "int4g128", "int2g64"]
    with pytest.raises(TierError, match="duplicate"):
        parse_tiers("int4,int4g128")


# ------------------------------------------------------------------ bit packing


@settings(max_examples=60, deadline=None)
@given(
    bits=st.sampled_from([2, 3, 4, 8]),
    n=st.integers(1, 5),
    blocks=st.integers(1, 4),
    seed=st.integers(0, 2**31 - 1),
)
def test_pack_unpack_round_trip(bits, n, blocks, seed):
    g = torch.Generator().manual_seed(seed)
    k32 = 32 * blocks
    codes = torch.randint(0, 1 << bits, (n, k32), generator=g, dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.shape == (n, k32 * bits // 8)
    assert torch.equal(unpack_codes(packed, bits, k32), codes)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_bit_stream_order_is_little_endian(bits):
    # Column k lives at bits [b*k, b*k + b) of the row's little-endian byte stream.
    codes = torch.zeros(1, 32, dtype=torch.uint8)
    codes[0, 1] = 1
    packed = pack_codes(codes, bits)
    stream = int.from_bytes(bytes(packed[0].tolist()), "little")
    assert stream == 1 << bits


def test_three_bit_layout_is_two_streams():
    codes = torch.zeros(1, 64, dtype=torch.uint8)
    codes[0, 5] = 0b110  # low bits 2 -> 2-bit stream, high bit -> 1-bit stream
    packed = pack_codes(codes, 3)[0].tolist()
    low = int.from_bytes(bytes(packed[:16]), "little")
    high = int.from_bytes(bytes(packed[16:]), "little")
    assert low == 0b10 << 10 and high == 1 << 5


def test_pack_rejects_codes_too_wide():
    with pytest.raises(ValueError):
        pack_codes(torch.full((1, 32), 4, dtype=torch.uint8), 2)
    with pytest.raises(ValueError):
        pack_codes(torch.zeros(1, 33, dtype=torch.uint8), 4)


# ------------------------------------------------------------------ quantization round trips


def _gauss(n, k, seed=0):
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed))


# Upper bounds of the relative Frobenius error on N(0, 1) weights [128, 256], from
# measurements (benchmarks/bench_quant.py and the test itself) with ~15% margin; ALS must
# stay under the RTN figure of the same tier.
RTN_BOUND = {8: 0.0085, 4: 0.13, 3: 0.28, 2: 0.64}
ALS_BOUND = {8: 0.0085, 4: 0.12, 3: 0.23, 2: 0.45}


@pytest.mark.parametrize("tier", INT_TIERS, ids=lambda t: t.name)
def test_round_trip_error_bounds(tier):
    w = _gauss(128, 256)
    err = relative_error(w, dequantize_matrix(quantize_matrix(w, tier)))
    bound = (ALS_BOUND if tier.method == "als" else RTN_BOUND)[tier.bits]
    assert err < bound
    if tier.method == "als":
        rtn = TierSpec(tier.bits, tier.group_size, tier.symmetric, "rtn")
        assert err <= relative_error(w, dequantize_matrix(quantize_matrix(w, rtn))) + 1e-7


def test_als_beats_rtn_at_two_bits():
    w = _gauss(64, 512, seed=3)
    rtn = relative_error(w, dequantize_matrix(quantize_matrix(w, parse_tier("int2-rtn"))))
    als = relative_error(w, dequantize_matrix(quantize_matrix(w, parse_tier("int2"))))
    assert als < 0.85 * rtn


@settings(max_examples=40, deadline=None)
@given(
    bits=st.sampled_from([2, 3, 4, 8]),
    group=st.sampled_from([32, 64, 128]),
    sym=st.booleans(),
    method=st.sampled_from(["rtn", "als"]),
    n=st.integers(1, 6),
    k=st.integers(1, 300),
    seed=st.integers(0, 2**31 - 1),
)
def test_any_shape_round_trips_within_one_step(bits, group, sym, method, n, k, seed):
    """Odd K and groups that do not divide K: the last group is partial (documented)."""
    w = _gauss(n, k, seed) * 0.05
    tier = TierSpec(bits, group, sym, method)
    qm = quantize_matrix(w, tier)
    geo = MatrixGeometry(bits, n, k, group)
    assert qm.codes.shape == (n, geo.k32) and qm.scales.shape == (n, geo.groups)
    assert int(qm.codes.max()) < (1 << bits)
    w_hat = dequantize_matrix(qm)
    assert w_hat.shape == (n, k)
    # Every weight is within one quantization step of its group (clipping included).
    col_group = torch.arange(k) // group
    s = qm.scales.float()[:, col_group]
    assert torch.all((w_hat - w).abs() <= (1 << bits) * s + 1e-6)
    # Padded columns hold the code of 0.0.
    if geo.k32 > k:
        z = (
            torch.full((n,), float(1 << (bits - 1)))
            if sym
            else qm.zeros.float()[:, (geo.k32 - 1) // group]
        )
        assert torch.equal(qm.codes[:, -1].float(), torch.clamp(torch.round(z), 0, (1 << bits) - 1))


def test_all_zero_and_constant_groups():
    w = torch.zeros(4, 64)
    w[1] = 0.5
    for name in ("int4", "int2g32a", "int3-rtn", "int8g64a", "int2g64a-rtn"):
        t = parse_tier(name)
        w_hat = dequantize_matrix(quantize_matrix(w, t))
        assert torch.allclose(w_hat[0], torch.zeros(64))
        # Asymmetric grids contain 0 and the constant exactly (up to FP16 scale rounding);
        # symmetric RTN clips the largest value by at most half a step (1/(2^b - 1)).
        bound = 1e-3 if not t.symmetric else 1 / ((1 << t.bits) - 1) + 1e-3
        assert relative_error(w[1], w_hat[1]) < bound


def test_quantize_rejects_bad_input():
    with pytest.raises(QuantizationError, match="non-finite"):
        quantize_matrix(torch.tensor([[float("nan")] * 32]), parse_tier("int4"))
    with pytest.raises(QuantizationError, match="FP16"):
        quantize_matrix(torch.full((1, 32), 1e9), parse_tier("int4"))
    with pytest.raises(QuantizationError, match="2-D"):
        quantize_matrix(torch.zeros(32), parse_tier("int4"))


def test_activation_weighting_lowers_output_error():
    """ALS with activations (a few loud input columns) cuts the output error vs without."""
    g = torch.Generator().manual_seed(1)
    h, i = 128, 64
    gate, up, down = (torch.randn(*s, generator=g) * 0.05 for s in ((i, h), (i, h), (h, i)))
    x = torch.randn(256, h, generator=g)
    x[:, :8] *= 20
    tier = parse_tier("int2g64")
    with_x = quantize_expert(tier, gate, up, down, activations=x).metrics
    without = quantize_expert(tier, gate, up, down).metrics
    qe = quantize_expert(tier, gate, up, down)
    y = swiglu_reference(gate, up, down, x)
    g2, u2, d2 = (
        dequantize_matrix(qe.gate_up)[:i],
        dequantize_matrix(qe.gate_up)[i:],
        dequantize_matrix(qe.down),
    )
    without_out = relative_error(y, swiglu_reference(g2, u2, d2, x))
    assert "output" in with_x and "output" not in without
    assert with_x["output"] < without_out


# ------------------------------------------------------------------ expert blobs


def _expert(h, i, seed=0, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(*s, generator=g) * scale for s in ((i, h), (i, h), (h, i)))


@pytest.mark.parametrize("tier", SOME_TIERS)
@pytest.mark.parametrize("shape", [(64, 32), (100, 40), (2048, 768)])
def test_layout_is_aligned_and_sized(tier, shape):
    t = parse_tier(tier)
    secs = expert_layout(t, *shape)
    nbytes = expert_nbytes(t, *shape)
    assert nbytes % 256 == 0
    end = 0
    for s in secs:
        assert s.offset % 256 == 0 and s.offset >= end
        end = s.offset + s.nbytes
    assert end <= nbytes < end + 256


def test_qwen3_30b_expert_sizes():
    # gate_up [1536, 2048] + down [2048, 768] at int4 g128: 2.25 MiB codes + FP16 scales
    codes = (1536 * 2048 + 2048 * 768) // 2
    scales = 2 * (1536 * 16 + 2048 * 6)
    assert expert_nbytes(parse_tier("int4"), 2048, 768) == codes + scales
    assert expert_nbytes(parse_tier("bf16"), 2048, 768) == 3 * 2048 * 768 * 2


@pytest.mark.parametrize("tier", SOME_TIERS)
def test_pack_expert_has_exact_size_and_round_trips(tier):
    t = parse_tier(tier)
    h, i = 100, 40
    gate, up, down = _expert(h, i)
    blob = pack_expert(t, gate, up, down)
    assert blob.dtype == torch.uint8 and blob.numel() == expert_nbytes(t, h, i)
    g2, u2, d2 = dequantize_expert(PackedExpertView(t, h, i, blob))
    qe = quantize_expert(t, gate, up, down)
    for ref, got, name in ((gate, g2, "gate_proj"), (up, u2, "up_proj"), (down, d2, "down_proj")):
        assert relative_error(ref, got) == pytest.approx(qe.metrics[name], rel=1e-5, abs=1e-9)


def test_view_is_zero_copy_into_a_pool():
    t = parse_tier("int4g64a")
    h, i = 64, 32
    n = expert_nbytes(t, h, i)
    pool = torch.zeros(3 * n, dtype=torch.uint8)
    blob = pack_expert(t, *_expert(h, i))
    pool[n : 2 * n] = blob
    view = PackedExpertView(t, h, i, pool[n : 2 * n])
    for name, sec in view.sections.items():
        assert pool.data_ptr() + n <= sec.data_ptr() < pool.data_ptr() + 2 * n, name
    x = torch.randn(3, h)
    y1 = expert_forward(view, x)
    pool[n : 2 * n] = 0  # the view reads the pool, not a copy
    assert not torch.allclose(expert_forward(view, x), y1)


def test_view_rejects_bad_blobs():
    t = parse_tier("int4")
    n = expert_nbytes(t, 64, 32)
    with pytest.raises(PackedExpertError, match="needs"):
        PackedExpertView(t, 64, 32, torch.zeros(n - 1, dtype=torch.uint8))
    with pytest.raises(PackedExpertError, match="uint8"):
        PackedExpertView(t, 64, 32, torch.zeros(n, dtype=torch.int8))
    with pytest.raises(PackedExpertError, match="aligned"):
        PackedExpertView(t, 64, 32, torch.zeros(n + 1, dtype=torch.uint8)[1:])
    with pytest.raises(PackedExpertError, match="shape"):
        pack_expert(t, *_expert(64, 32)[:2], torch.zeros(32, 64))


# ------------------------------------------------------------------ CPU execution


@pytest.mark.parametrize("tier", SOME_TIERS + ["int3g32a", "int8g128a-rtn"])
# (160, 48): a full group followed by a partial one (K32 = 160 with g = 128).
@pytest.mark.parametrize("shape", [(64, 32), (100, 40), (160, 48)])
@pytest.mark.parametrize("tokens", [1, 7])
def test_expert_forward_matches_reference(tier, shape, tokens):
    t = parse_tier(tier)
    h, i = shape
    view = PackedExpertView(t, h, i, pack_expert(t, *_expert(h, i)))
    x = torch.randn(tokens, h, generator=torch.Generator().manual_seed(5))
    ref = reference_expert_forward(view, x)
    got = expert_forward(view, x)
    assert got.shape == (tokens, h) and got.dtype == x.dtype
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))
    # bf16 compute: bf16-level agreement; bf16 input keeps its dtype.
    got16 = expert_forward(view, x.bfloat16(), compute_dtype=torch.bfloat16)
    assert got16.dtype == torch.bfloat16
    assert relative_error(ref, got16.float()) < 0.02


def test_expert_forward_reuses_scratch():
    t = parse_tier("int4")
    view = PackedExpertView(t, 128, 64, pack_expert(t, *_expert(128, 64)))
    sc = ExpertScratch()
    x = torch.randn(2, 128)
    expert_forward(view, x, scratch=sc)
    ptrs = {k: b.data_ptr() for k, b in sc._bufs.items()}
    expert_forward(view, torch.randn(5, 128), scratch=sc)
    assert {k: b.data_ptr() for k, b in sc._bufs.items()} == ptrs


def test_expert_forward_rejects_wrong_width():
    t = parse_tier("int4")
    view = PackedExpertView(t, 64, 32, pack_expert(t, *_expert(64, 32)))
    with pytest.raises(PackedExpertError, match="x: expected"):
        expert_forward(view, torch.randn(2, 63))
