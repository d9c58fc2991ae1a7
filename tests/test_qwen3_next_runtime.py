"""Qwen3-Next under the precision runtime: its checkpoints (with the multi-token-prediction
head the released ones carry) quantize into tiered checkpoints, the budget counts its real
weights and generation state, every policy loads and generates, and eval's chunked
scoring through the hybrid cache equals one forward pass."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

import dynaexq  # noqa: E402
from dynaexq.checkpoint import Checkpoint  # noqa: E402
from dynaexq.eval.stream import as_streams, evaluate_streams  # noqa: E402
from dynaexq.model.testing import make_hf_model, save_checkpoint  # noqa: E402
from dynaexq.quant.tiered import TieredCheckpoint  # noqa: E402
from dynaexq.runtime.budget import fixed_memory  # noqa: E402
from dynaexq.runtime.load import load_with_policy  # noqa: E402
from dynaexq.runtime.policy import Policy  # noqa: E402
from dynaexq.runtime.store import TierStore, tiered_checkpoint_for  # noqa: E402

TIERS = ("int2", "bf16")
POLICIES = ("full", "static", "static-map", "dynamic", "offload")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _add_mtp_head(path: Path) -> None:
    """Append tensors shaped like the released checkpoints' MTP head (`mtp.*`, one layer
    with routed experts) as a shard of their own, listed in the index."""
    from safetensors.torch import save_file

    index_path = path / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    cfg = json.loads((path / "config.json").read_text())
    h, i = cfg["hidden_size"], cfg["moe_intermediate_size"]
    g = torch.Generator().manual_seed(0)
    mtp = {
        "mtp.fc.weight": torch.randn(h, 2 * h, generator=g),
        "mtp.norm.weight": torch.zeros(h),
        "mtp.layers.0.mlp.gate.weight": torch.randn(cfg["num_experts"], h, generator=g),
    }
    for e in range(cfg["num_experts"]):
        for proj, shape in (("gate_proj", (i, h)), ("up_proj", (i, h)), ("down_proj", (h, i))):
            mtp[f"mtp.layers.0.mlp.experts.{e}.{proj}.weight"] = torch.randn(*shape, generator=g)
    save_file(mtp, str(path / "mtp.safetensors"))
    index["weight_map"].update({name: "mtp.safetensors" for name in mtp})
    index_path.write_text(json.dumps(index))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    hf = make_hf_model(seed=11, architecture="qwen3_next")
    path = save_checkpoint(hf, tmp_path_factory.mktemp("next") / "src", max_shard_size="60KB")
    _add_mtp_head(path)
    return path


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tiered")


def tokens(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 128, size=n)


def load(model_dir: Path, cache: Path, policy: Policy | str, budget: int | str | None):
    return load_with_policy(
        model_dir,
        policy=policy,
        budget=budget,
        tiers=TIERS,
        calibration=[tokens(512, seed=9)],
        batch=2,
        context=64,
        chunk=16,
        progress=False,
        cache_dir=cache,
    )


def test_tiered_checkpoint_leaves_out_the_mtp_head(model_dir: Path, cache: Path) -> None:
    tc = tiered_checkpoint_for(model_dir, TIERS, cache_dir=cache, progress=False)
    assert isinstance(tc, TieredCheckpoint)
    config = Checkpoint(model_dir).config
    assert tc.manifest["moe_layers"] == config.moe_layers
    names = set(tc.manifest["nonexpert"])
    assert not any(n.startswith("mtp.") for n in names)
    assert "model.layers.0.linear_attn.in_proj_qkvz.weight" in names
    assert "model.layers.3.self_attn.q_proj.weight" in names
    assert "model.layers.0.mlp.shared_expert.gate_proj.weight" in names
    store = TierStore.from_tiered(tc)
    assert store.layers == config.moe_layers and store.experts == config.num_experts
    # The tiered checkpoint is itself a checkpoint the loader reads (non-expert weights).
    ids = torch.from_numpy(tokens(20, seed=1)).view(2, 10)
    full = dynaexq.load(model_dir, dtype="float32", device="cpu")
    engine, _ = load(tc.root, cache, "static", "100%")
    assert engine.forward(ids).shape == full.forward(ids).shape


def test_budget_counts_the_real_weights_and_generation_state(model_dir: Path) -> None:
    full = dynaexq.load(model_dir, dtype="float32", device="cpu")
    fixed = fixed_memory(full.config, dtype_bytes=4, batch=3, context=40, chunk=16)
    params = sum(p.numel() * p.element_size() for p in full.model.parameters())
    assert fixed.weights == params
    assert fixed.kv_cache == full.model.allocate_cache(3, 40, torch.float32, "cpu").nbytes


@pytest.mark.parametrize("policy", POLICIES)
def test_every_policy_loads_and_generates(model_dir: Path, cache: Path, policy: str) -> None:
    engine, dep = load(model_dir, cache, policy, None if policy == "full" else "30%")
    prompts = [tokens(5, seed=2).tolist(), tokens(9, seed=3).tolist()]
    out = engine.generate(prompts, max_new_tokens=10, ignore_eos=True)
    assert [len(o.token_ids) for o in out] == [10, 10]
    if policy == "full":
        return
    assert dep is not None and dep.plan.total_bytes <= dep.plan.budget
    rt = engine.precision
    rt.flush()
    totals = rt.telemetry.totals()
    assert totals["steps"] >= 10  # one per forward pass: a prefill and nine decode steps
    # Batched generation through the runtime equals each prompt alone.
    alone = [engine.generate([p], max_new_tokens=10, ignore_eos=True)[0] for p in prompts]
    if policy in ("static", "static-map"):  # nothing moves between runs: same experts
        assert [o.token_ids for o in out] == [a.token_ids for a in alone]


def test_dynamic_moves_experts_of_qwen3_next(model_dir: Path, cache: Path) -> None:
    pol = Policy("dynamic", tiers=TIERS).with_controller(replan_every=1, in_flight=2)
    engine, _ = load(model_dir, cache, pol, "40%")
    streams = as_streams(tokens(600, seed=4), 2, 64, None)
    evaluate_streams(engine.model, streams, window=64, chunk=16)
    engine.precision.flush()
    totals = engine.precision.telemetry.totals()
    assert totals["transitions_finished"] > 0
    assert totals["wait_s"] == 0.0


def test_static_high_tier_matches_full_precision(model_dir: Path, cache: Path) -> None:
    x = torch.from_numpy(tokens(2 * 24, seed=5).reshape(2, 24))
    ref = dynaexq.load(model_dir, dtype="float32", device="cpu").forward(x)
    hi, _ = load(model_dir, cache, Policy("static", tiers=TIERS, static_tier="bf16"), "100%")
    lo, _ = load(model_dir, cache, Policy("static", tiers=TIERS, static_tier="int2"), "100%")
    # Per token: bf16 storage of float32 experts is equal up to rounding, except where the
    # rounding flips a near-tie of the router (a few tokens); int2 is clearly worse.
    err_hi = (hi.forward(x) - ref).abs().amax(-1).median().item()
    err_lo = (lo.forward(x) - ref).abs().amax(-1).median().item()
    assert err_hi < 0.05
    assert err_lo > 5 * err_hi


def test_eval_chunks_through_the_hybrid_cache_equal_one_pass(model_dir: Path) -> None:
    """eval scores a window in chunks through the cache: the same log-likelihoods as one
    forward pass over the window."""
    engine = dynaexq.load(model_dir, dtype="float32", device="cpu")
    streams = as_streams(tokens(200, seed=6), 2, 48, None)
    got = evaluate_streams(engine.model, streams, window=48, chunk=16)
    x = torch.from_numpy(streams[:, :48])
    logp = torch.log_softmax(engine.forward(x), dim=-1)
    want = -logp.gather(-1, torch.from_numpy(streams[:, 1:49]).unsqueeze(-1)).squeeze(-1)
    np.testing.assert_allclose(got.nll[:, :48], want.numpy(), rtol=0, atol=1e-4)


def test_quantize_command_and_a_budget_load(model_dir: Path, tmp_path: Path) -> None:
    from dynaexq.cli import main

    out = tmp_path / "tiered"
    argv = ["quantize", str(model_dir), "--tiers", "int2,int4,bf16", "--out", str(out)]
    assert main([*argv, "--no-progress"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert [t["name"] for t in manifest["tiers"]] == ["int2g64", "int4g128", "bf16"]
    # A tiered checkpoint holds no full-precision experts to calibrate on: dynamic starts
    # cold and learns the hot set from the workload.
    engine = dynaexq.load(out, budget="30%", policy="dynamic", tiers="int2,bf16")
    got = engine.generate([tokens(6, seed=7).tolist()], max_new_tokens=6, ignore_eos=True)
    assert len(got[0].token_ids) == 6


def test_qwen3_next_runs_on_the_device_executor(model_dir: Path, cache: Path, torch_launch) -> None:
    """The same model through the grouped executor (the device path's runtime, its
    kernels' contract in torch here): the CPU runtime's logits and greedy tokens."""
    from dynaexq.runtime.executors.cpu import CpuExecutor
    from dynaexq.runtime.executors.grouped import GroupedExecutor

    kw = dict(policy="static-map", budget="30%", tiers=TIERS, calibration=[tokens(512, seed=9)],
              batch=2, context=64, chunk=16, progress=False, cache_dir=cache)  # fmt: skip
    grouped, _ = load_with_policy(model_dir, launch=torch_launch, **kw)
    cpu, _ = load_with_policy(model_dir, **kw)
    rt = cpu.precision
    rt.executor = CpuExecutor(rt.table, rt.store, rt.real, activations="float")
    assert isinstance(grouped.precision.executor, GroupedExecutor)
    ids = torch.from_numpy(tokens(24, seed=4)).view(2, 12)
    torch.testing.assert_close(grouped.forward(ids), cpu.forward(ids), rtol=1e-4, atol=1e-4)
    prompts = [tokens(5, seed=2).tolist(), tokens(9, seed=3).tolist()]
    a = grouped.generate(prompts, max_new_tokens=6, ignore_eos=True)
    b = cpu.generate(prompts, max_new_tokens=6, ignore_eos=True)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
