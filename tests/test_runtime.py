"""The precision runtime end to end on a tiny model: budgets, policies, transitions,
contents of published versions, determinism and the memory limit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from dynaexq.eval.run import EvalConfig, Variant, run_policies
from dynaexq.eval.stream import as_streams, evaluate_streams
from dynaexq.model.testing import make_hf_model, save_checkpoint
from dynaexq.runtime.budget import (
    BudgetError,
    fixed_memory,
    format_bytes,
    parse_bytes,
)
from dynaexq.runtime.load import load_with_policy
from dynaexq.runtime.policy import ControllerSettings, Policy, PolicyError
from dynaexq.runtime.store import TierStore, tiered_checkpoint_for

TIERS = ("int2", "bf16")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_checkpoint(make_hf_model(seed=5), tmp_path_factory.mktemp("rt") / "src")


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tiered")


@pytest.fixture(scope="module")
def store(model_dir: Path, cache: Path) -> TierStore:
    return TierStore.from_tiered(tiered_checkpoint_for(model_dir, TIERS, cache_dir=cache))


def tokens(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 128, size=n)


def budget_for(store: TierStore, model_dir: Path, hot_per_layer: int, in_flight: int = 0) -> int:
    """The budget at which static-map holds `hot_per_layer` hot experts in every layer."""
    from dynaexq.checkpoint import Checkpoint

    fixed = fixed_memory(Checkpoint(model_dir).config, dtype_bytes=4, batch=2, context=64, chunk=16)
    lo, hi = store.slot_bytes
    layers, experts = len(store.layers), store.experts
    return fixed.total + layers * (experts * lo + hot_per_layer * (hi - lo)) + in_flight * (lo + hi)


def load(model_dir, cache, policy, budget, **kw):
    return load_with_policy(
        model_dir,
        policy=policy,
        budget=budget,
        tiers=TIERS,
        calibration=[tokens(1024, seed=9)],
        batch=2,
        context=64,
        chunk=16,
        progress=False,
        cache_dir=cache,
        **kw,
    )


def test_sizes_parse_and_bad_ones_are_refused() -> None:
    assert parse_bytes("6GiB") == 6 * 1024**3
    assert parse_bytes("1.5 MB") == 1_500_000
    assert parse_bytes(4096) == 4096
    for bad in ("six", "-1GiB", "0", "12 parsecs"):
        with pytest.raises(BudgetError):
            parse_bytes(bad)
    assert format_bytes(3 * 1024**2) == "3.00 MiB"
    with pytest.raises(PolicyError):
        Policy("fastest")


def test_a_budget_below_the_lowest_tier_names_the_minimum(store, model_dir, cache) -> None:
    need = budget_for(store, model_dir, 0)
    with pytest.raises(BudgetError, match=f"the minimum is .*{need} bytes"):
        load(model_dir, cache, "static-map", need - 1)


def test_policies_hold_equal_bytes_and_dynamic_pays_for_staging(store, model_dir, cache) -> None:
    budget = budget_for(store, model_dir, 3)
    plans = {}
    with pytest.raises(BudgetError, match="4 transitions in flight needs at least"):
        load(model_dir, cache, "dynamic", budget)  # 4 staging pairs do not fit in 3 hot slots
    for name in ("static", "static-map", "dynamic", "offload"):
        pol = Policy(name, tiers=TIERS).with_controller(in_flight=1)
        _, dep = load(model_dir, cache, pol, budget)
        assert dep is not None
        plans[name] = dep.plan
        assert dep.plan.total_bytes <= budget, name
    assert plans["static-map"].per_layer[1] == 3
    assert plans["dynamic"].per_layer[1] < 3  # its staging slots come out of the same bytes
    assert plans["dynamic"].staging == (1, 1)


def test_static_high_tier_matches_full_precision(store, model_dir, cache) -> None:
    x = torch.from_numpy(tokens(2 * 24).reshape(2, 24))
    full, _ = load_with_policy(model_dir, policy="full")
    ref = full.forward(x)
    big = budget_for(store, model_dir, store.experts)
    hi, _ = load(model_dir, cache, Policy("static", tiers=TIERS, static_tier="bf16"), big)
    lo, _ = load(model_dir, cache, Policy("static", tiers=TIERS, static_tier="int2"), big)
    # bf16 storage of float32 weights: equal up to bf16 rounding; int2 is clearly worse.
    err_hi = (hi.forward(x) - ref).abs().max().item()
    err_lo = (lo.forward(x) - ref).abs().max().item()
    assert err_hi < 0.05
    assert err_lo > 5 * err_hi


def published_bytes_match_the_store(rt) -> None:
    for li in range(rt.num_layers):
        for e in range(rt.experts):
            with rt.table.lease(li, e) as lease:
                got = torch.frombuffer(lease.view(), dtype=torch.uint8)
                want = rt.store.blob(li, e, rt.real[lease.tier])
                assert torch.equal(got[: want.numel()], want), (li, e)


@pytest.mark.parametrize("lockstep", [True, False])
def test_dynamic_moves_experts_and_every_published_version_is_complete(
    store, model_dir, cache, lockstep: bool
) -> None:
    pol = Policy("dynamic", tiers=TIERS).with_controller(replan_every=1, in_flight=2)
    budget = budget_for(store, model_dir, 3, in_flight=2)
    engine, dep = load(model_dir, cache, pol, budget, lockstep=lockstep)
    rt = engine.precision
    top_per_layer = dep.plan.per_layer[1]
    streams = as_streams(tokens(4000, seed=1), 2, 64, None)
    steps_seen: list[int] = []

    def check(step: int) -> None:
        steps_seen.append(step)
        # Capacity per layer is never exceeded, whatever is in flight.
        assert all(row[1] <= top_per_layer for row in rt.tiers_per_layer())

    evaluate_streams(engine.model, streams, window=64, chunk=16, on_step=check)
    rt.flush()
    totals = rt.telemetry.totals()
    assert totals["transitions_started"] > 0
    assert totals["transitions_finished"] > 0
    assert totals["wait_s"] == 0.0  # the forward pass never waited for a migration
    if not lockstep:
        assert totals["boundary_wait_s"] == 0.0  # serving: not even between steps
    published_bytes_match_the_store(rt)
    stats = rt.pool.stats()
    assert stats["high_water_bytes"] <= stats["host_from"] <= stats["total_bytes"]
    assert rt.pool.host_from + dep.fixed.total <= budget
    # Steps are counted by the runtime itself, one per forward pass.
    assert len(rt.telemetry.records) == len(steps_seen)
    snap = rt.snapshot()
    assert (
        snap["transitions"]["promote"] + snap["transitions"]["demote"]
        == (totals["transitions_finished"])
    )
    assert sum(snap["tier_counts"][store.layers[0]].values()) == store.experts


def test_runs_are_deterministic(store, model_dir, cache) -> None:
    pol = Policy("dynamic", tiers=TIERS).with_controller(replan_every=2)
    budget = budget_for(store, model_dir, 2, in_flight=4)
    streams = as_streams(tokens(3000, seed=2), 2, 64, None)
    outs = []
    for _ in range(2):
        engine, _ = load(model_dir, cache, pol, budget)
        r = evaluate_streams(engine.model, streams, window=64, chunk=16)
        engine.precision.flush()
        outs.append((r.nll.copy(), engine.precision.telemetry.totals()["transitions_started"]))
    np.testing.assert_array_equal(outs[0][0], outs[1][0])
    assert outs[0][1] == outs[1][1]


def test_offload_runs_at_full_tier_and_counts_waiting(store, model_dir, cache) -> None:
    x = torch.from_numpy(tokens(2 * 24, seed=3).reshape(2, 24))
    big = budget_for(store, model_dir, store.experts)
    hi, _ = load(model_dir, cache, Policy("static", tiers=TIERS, static_tier="bf16"), big)
    # A cache of one layer's experts: every layer change evicts, so misses repeat.
    budget = (
        budget_for(store, model_dir, 0)
        + 4 * store.slot_bytes[1]
        + store.experts * (store.slot_bytes[1])
    )
    off, dep = load(model_dir, cache, Policy("offload", tiers=TIERS, pcie_gbs=0.01), budget)
    assert dep.plan.slots[1] < len(store.layers) * store.experts
    torch.testing.assert_close(off.forward(x), hi.forward(x), rtol=0, atol=1e-5)
    off.forward(x)
    off.precision.flush()
    totals = off.precision.telemetry.totals()
    assert totals["bytes_moved"] > 0 and totals["wait_s"] > 0
    assert totals["steps"] == 2  # the second forward pass opened a new step by itself
    snap = off.precision.snapshot()
    assert snap["expert_wait_seconds"] == pytest.approx(totals["wait_s"])
    assert snap["pool_used_bytes"]["bf16"] <= snap["pool_capacity_bytes"]["bf16"]


def small_eval(**kw) -> EvalConfig:
    """The eval on the tiny model: two tiers, 25%, 1024 scored and calibration tokens, 2
    streams of 64-token windows scored 16 tokens a step (each `kw` replaces one)."""
    base = dict(
        tiers=TIERS,
        budgets=("25%",),
        tokens_per_domain=1024,
        calibration_tokens=1024,
        streams=2,
        window=64,
        chunk=16,
        controller=ControllerSettings(in_flight=1, replan_every=1),
    )
    return EvalConfig(**{**base, **kw})


def test_run_policies_reports_every_policy_and_the_gap(model_dir, cache, monkeypatch) -> None:
    monkeypatch.setenv("DYNAEXQ_CACHE", str(cache))
    domains = {"a": tokens(6000, seed=4), "b": tokens(6000, seed=5) % 64}
    cfg = small_eval(
        variants=(Variant("dynamic-slow", None, (("alpha", 0.9),)),),
        variant_budget="25%",
    )
    summary = run_policies(model_dir, domains, cfg, progress=lambda s: None)
    seen = {(r["policy"], r["domain"]) for r in summary["runs"]}
    want = (
        "full",
        "static",
        "uniform",
        "static-map",
        "static-knapsack",
        "dynamic",
        "dynamic-slow",
    )
    assert seen == {(p, d) for p in want for d in "ab"}
    assert {(g["policy"], g["domain"]) for g in summary["gaps"]} == {
        (p, d) for p in want[1:] for d in "ab"
    }
    # Every budgeted policy is measured against the best static one at its budget.
    for g in summary["gaps"]:
        if g["policy"] in ("dynamic", "dynamic-slow"):
            assert g["best_static"].split()[0] in (
                "static",
                "uniform",
                "static-map",
                "static-knapsack",
            )
            assert np.isfinite(g["margin_over_best_static"])
    # Each run keeps its windows' losses (2 streams of 512 tokens, 64-token windows),
    # whose mean is the run's log-perplexity; the cell margins carry their errors.
    for r in summary["runs"]:
        assert len(r["window_nll"]) == 16
        assert np.exp(np.mean(r["window_nll"])) == pytest.approx(r["perplexity"], rel=1e-6)
    for m in summary["margins"]:
        assert m["margin_over_cell_best_se"] >= 0 and np.isfinite(m["margin_over_cell_best_se"])


def test_dynaexq_load_takes_a_budget_and_a_policy(model_dir, cache) -> None:
    import dynaexq

    plain = dynaexq.load(model_dir)
    assert not hasattr(plain, "precision")
    with pytest.raises(ValueError, match="calibration"):
        dynaexq.load(model_dir, budget="1MiB", policy="static-map")
    cold = dynaexq.load(model_dir, budget="1MiB", context=64, progress=False, cache_dir=cache)
    assert cold.deployment.calibration is not None and not cold.deployment.calibration.any()
    engine = dynaexq.load(
        model_dir,
        budget="1MiB",
        calibration=[tokens(512)],
        context=64,
        progress=False,
        cache_dir=cache,
    )
    assert engine.deployment.policy.name == "dynamic"  # the default with a budget
    assert engine.deployment.plan.total_bytes <= 1024**2
    out = engine.generate([[1, 2, 3]], max_new_tokens=4)[0]
    assert len(out.token_ids) == 4


def test_three_tiers_sized_by_the_knapsack(model_dir, cache) -> None:
    tiers = ("int2", "int4", "bf16")
    tc = TierStore.from_tiered(tiered_checkpoint_for(model_dir, tiers, cache_dir=cache))
    lo, mid, hi = tc.slot_bytes
    n = len(tc.layers) * tc.experts
    from dynaexq.checkpoint import Checkpoint

    fixed = fixed_memory(Checkpoint(model_dir).config, dtype_bytes=4, batch=2, context=64, chunk=16)
    budget = fixed.total + n * lo + 4 * (lo + mid + hi) + 3 * (hi - lo) + 4 * (mid - lo)
    pol = Policy("dynamic", tiers=tiers).with_controller(planner="value", replan_every=1)
    engine, dep = load_with_policy(
        model_dir,
        policy=pol,
        budget=budget,
        calibration=[tokens(1024, seed=9)],
        batch=2,
        context=64,
        chunk=16,
        progress=False,
        cache_dir=cache,
    )
    plan = dep.plan
    assert plan.assignment is not None and plan.per_layer is None
    assert plan.total_bytes <= budget
    assert sum(plan.slots) == n and plan.slots[0] < n  # the knapsack bought precision
    # ... and as much value as the exact knapsack, up to the greedy's one-item slack.
    from dynaexq._core import knapsack

    values = (dep.calibration[..., None] * tc.gains()).reshape(-1)
    space = budget - dep.fixed.total - 4 * sum(tc.slot_bytes)
    exact = knapsack(values.tolist(), list(tc.slot_bytes), space, exact=True)
    worth = lambda c: sum(values[i * 3 + t] for i, t in enumerate(c))  # noqa: E731
    assert (
        worth(plan.assignment) >= worth(exact) - np.ptp(values.reshape(-1, 3), axis=1).max() - 1e-6
    )
    rt = engine.precision
    np.testing.assert_array_equal(rt.tier_map().reshape(-1), np.array(plan.assignment))
    evaluate_streams(
        engine.model, as_streams(tokens(2000, seed=6), 2, 64, None), window=64, chunk=16
    )
    rt.flush()
    counts = np.bincount(rt.tier_map().reshape(-1), minlength=3)
    assert all(counts[t] <= plan.slots[t] for t in (1, 2))  # global capacity holds


def test_a_budget_can_be_a_share_of_hot_experts(model_dir, cache) -> None:
    _, dep = load(model_dir, cache, "static-map", "25%")
    assert dep.plan.per_layer[1] == 2  # 25% of 8 experts per layer
    with pytest.raises(ValueError, match="0-100%"):
        load(model_dir, cache, "static-map", "150%")


def test_telemetry_keeps_running_totals_beyond_its_window() -> None:
    from dynaexq.runtime.telemetry import StepRecord, Telemetry

    t = Telemetry(keep=3)
    for i in range(10):
        t.add(StepRecord(i, 4, 0.5, 0.25, 1, 1, 0, 100, 0.0, 0.0, []))
    assert len(t.records) == 3 and t.records[0].step == 7
    tot = t.totals()
    assert tot["steps"] == 10 and tot["tokens"] == 40 and tot["bytes_moved"] == 1000
    assert tot["bytes_moved_per_token"] == 25 and tot["hi_share"] == 0.5


def test_dynamic_recal_calibrates_again_once_on_the_scored_text(
    model_dir, cache, monkeypatch
) -> None:
    """`dynaexq eval`'s dynamic-recal: once `recalibrate_tokens` scored tokens are behind
    it, one recalibration on exactly the text scored so far (every stream's first tokens),
    then it plans on it; plain dynamic never recalibrates."""
    import dynaexq.runtime.recalibrate as recal

    monkeypatch.setenv("DYNAEXQ_CACHE", str(cache))
    calls: list[list[int]] = []
    real = recal.recalibrate

    def spy(engine, dep, streams):
        calls.append([len(s) for s in streams])
        return real(engine, dep, streams)

    monkeypatch.setattr(recal, "recalibrate", spy)
    domains = {"a": tokens(6000, seed=4)}
    cfg = small_eval(
        policies=("full", "static", "dynamic", "dynamic-recal"),
        controller=ControllerSettings(in_flight=1, replan_every=1, planner="value"),
        recalibrate_tokens=250,  # 2 streams x 16 tokens a step: after 8 steps (256 tokens)
        recalibrate_on="first",
    )
    summary = run_policies(model_dir, domains, cfg, progress=lambda s: None)
    assert calls == [[8 * 16 + 1, 8 * 16 + 1]]
    runs = {r["policy"]: r for r in summary["runs"]}
    assert runs["dynamic-recal"]["tokens"] == runs["dynamic"]["tokens"] == 1024
    assert np.isfinite(runs["dynamic-recal"]["perplexity"])


def test_shift_reports_every_segment_and_where_dynamic_recal_recalibrated(
    model_dir, cache, monkeypatch
) -> None:
    """`dynaexq eval --shift a,b` with dynamic-recal on a timer ("window"): every
    policy's segments are scored, the dynamic ones carry a margin over the best static
    of each segment, and each recalibration is counted in the segment it ran in."""
    import dynaexq.runtime.recalibrate as recal
    from dynaexq.eval.shift import run_shift

    monkeypatch.setenv("DYNAEXQ_CACHE", str(cache))
    texts: list[int] = []
    monkeypatch.setattr(recal, "recalibrate", lambda e, d, s: texts.append(len(s[0])))
    domains = {"a": tokens(6000, seed=4), "b": tokens(6000, seed=5) % 64}
    cfg = small_eval(
        policies=("full", "static", "static-knapsack", "dynamic", "dynamic-recal"),
        controller=ControllerSettings(in_flight=1, replan_every=1, planner="value"),
        recalibrate_tokens=300,  # one stream: every 304 tokens (19 steps of 16)
        recalibrate_on="window",
    )
    res, _ = run_shift(
        model_dir, domains, ["a", "b"], cfg, budget="25%", segment_tokens=1024,
        progress=lambda s: None,
    )  # fmt: skip
    pols = res["policies"]
    assert {"full", "static", "static-knapsack", "dynamic", "dynamic-recal"} <= set(pols)
    assert all([s["domain"] for s in segs] == ["a", "b"] for segs in pols.values())
    # 2048 tokens: recalibrations at 304, 608, ..., 1824 (six), each on the last 304.
    assert texts == [305] * 6
    assert [s["recalibrations"] for s in pols["dynamic-recal"]] == [3, 3]
    for name in ("dynamic", "dynamic-recal"):
        assert all(np.isfinite(s["margin_over_best_static"]) for s in pols[name])
