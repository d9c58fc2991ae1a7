"""The static baselines of `dynaexq eval`: the knapsack's static assignment is the best
one that fits (checked against brute force), the best uniform tier, margins."""

from __future__ import annotations

import itertools
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from dynaexq.eval.run import (
    EvalConfig,
    RunResult,
    best_uniform_tier,
    parse_bits,
    summarize,
)
from dynaexq.runtime.budget import FixedMemory, plan_pool

FIXED = FixedMemory(weights=1000, kv_cache=0, workspace=0, margin=0)


def brute_force(values: np.ndarray, slot_bytes: list[int], space: int) -> float:
    """Best total value of one tier per item within `space` bytes, by enumeration."""
    items, tiers = values.shape
    best = -np.inf
    for choice in itertools.product(range(tiers), repeat=items):
        if sum(slot_bytes[t] for t in choice) <= space:
            best = max(best, sum(values[i, t] for i, t in enumerate(choice)))
    return float(best)


@pytest.mark.parametrize("seed", range(40))
def test_static_knapsack_is_the_best_assignment_that_fits(seed: int) -> None:
    rng = np.random.default_rng(seed)
    layers, experts = 2, int(rng.integers(2, 4))
    tiers = int(rng.integers(2, 4))
    slot_bytes = sorted(int(b) for b in rng.choice(np.arange(1, 13), size=tiers, replace=False))
    n = layers * experts
    # Hotness x error reduction: zero at the lowest tier, growing with precision.
    hot = rng.random(n)
    err = np.sort(rng.random((n, tiers)), axis=1)
    err[:, 0] = 0.0
    values = hot[:, None] * err
    space = int(rng.integers(n * slot_bytes[0], n * slot_bytes[-1] + 1))
    plan = plan_pool(
        "static-map",
        layers=layers,
        experts=experts,
        slot_bytes=slot_bytes,
        fixed=FIXED,
        budget=FIXED.total + space,
        values=values.ravel().tolist(),
    )
    assert plan.assignment is not None and plan.staging == (0,) * tiers
    choice = list(plan.assignment)
    used = sum(slot_bytes[t] for t in choice)
    assert used <= space and plan.pool_bytes == used
    got = sum(values[i, t] for i, t in enumerate(choice))
    assert got == pytest.approx(brute_force(values, slot_bytes, space), rel=1e-5, abs=1e-6)
    assert list(plan.slots) == [choice.count(t) for t in range(tiers)]


def test_static_knapsack_refuses_a_budget_below_the_lowest_tier() -> None:
    with pytest.raises(ValueError, match="cannot hold every expert"):
        plan_pool(
            "static-map",
            layers=1,
            experts=2,
            slot_bytes=[2, 5],
            fixed=FIXED,
            budget=FIXED.total + 3,
            values=[0.0, 1.0, 0.0, 1.0],
        )


@pytest.mark.parametrize("seed", range(20))
def test_best_uniform_tier_is_the_largest_that_fits(seed: int) -> None:
    rng = np.random.default_rng(seed)
    sizes = [int(x) for x in rng.integers(1, 50, size=5)]
    n, room = int(rng.integers(1, 10)), int(rng.integers(0, 400))
    t = best_uniform_tier(sizes, n, room)
    fitting = [s for s in sizes if n * s <= room]
    if not fitting:
        assert t is None
    else:
        assert t is not None and sizes[t] == max(fitting)


def test_bits_budgets() -> None:
    assert parse_bits("3bits") == 3.0 and parse_bits("2.5bit") == 2.5
    assert parse_bits("20%") is None and parse_bits("6GiB") is None
    with pytest.raises(ValueError):
        parse_bits("xbits")


def _run(policy, budget, domain, ppl, offset=0, calibration="domain", tier=None):
    return RunResult(
        policy, budget, None, domain, ppl, 0.5, 100, None, {}, 0.0, offset, calibration, tier
    )


def test_margin_is_over_the_best_static_that_fits() -> None:
    e = np.e
    runs = [
        _run("full", "-", "d", e**1.0, calibration="-"),
        _run("static", "-", "d", e**2.0, calibration="-", tier="int2"),
        _run("uniform", "20%", "d", e**1.2, calibration="-", tier="int4"),  # 80%
        _run("static-map", "20%", "d", e**1.5),  # 50%
        _run("static-knapsack", "20%", "d", e**1.4),  # 60%
        _run("dynamic", "20%", "d", e**1.3),  # 70%
        _run("static-map", "10%", "d", e**1.6),  # 40%
        _run("dynamic", "10%", "d", e**1.5),  # 50%
    ]
    s = summarize(runs, EvalConfig(budgets=("10%", "20%")))
    dyn = {g["budget"]: g for g in s["gaps"] if g["policy"] == "dynamic"}
    assert dyn["20%"]["best_static"] == "uniform (int4)"
    assert dyn["20%"]["margin_over_best_static"] == pytest.approx(-10.0)
    # No uniform run at 10%: the best static there is static-map.
    assert dyn["10%"]["best_static"] == "static-map"
    assert dyn["10%"]["margin_over_best_static"] == pytest.approx(10.0)
    rows = {(m["budget"], m["policy"]): m for m in s["margins"]}
    assert rows[("20%", "dynamic")]["margin_mean"] == pytest.approx(-10.0)
    assert ("20%", "static-map") not in rows


def _two_offsets(uniform: tuple[float, float], dynamic: tuple[float, float]) -> list:
    """Runs on 2 offsets: full at log-ppl 1, static int2 at 2, the knapsack at 60% / 70%,
    uniform int4 and dynamic at the given gaps recovered (%)."""
    e = np.e

    def at(g: float) -> float:
        return e ** (2.0 - g / 100.0)

    return [
        *(_run("full", "-", "d", e**1.0, o, "-") for o in range(2)),
        *(_run("static", "-", "d", e**2.0, o, "-", "int2") for o in range(2)),
        *(_run("uniform", "4bits", "d", at(g), o, "-", "int4") for o, g in enumerate(uniform)),
        *(_run("static-knapsack", "4bits", "d", at(g), o) for o, g in enumerate((60, 70))),
        *(_run("dynamic", "4bits", "d", at(g), o) for o, g in enumerate(dynamic)),
    ]


@pytest.mark.parametrize(
    "uniform,dynamic,per_slice,cell_best,over_cell",
    [
        # Two statics that take turns being best: the per-slice best is their maximum on
        # each offset (no one static reaches it); the cell's best is the knapsack (65
        # against uniform's 60). Per slice: 65 - 80 and 75 - 70.
        ((80, 40), (65, 75), -5.0, "static-knapsack", 70.0 - 65.0),
        # Uniform's mean (70) beats the knapsack's (65).
        ((90, 50), (70, 70), ((70 - 90) + (70 - 70)) / 2, "uniform (int4)", 0.0),
    ],
)
def test_cell_margin_is_over_the_best_single_static_by_mean(
    uniform, dynamic, per_slice, cell_best, over_cell
) -> None:
    s = summarize(_two_offsets(uniform, dynamic), EvalConfig(budgets=("4bits",)))
    (row,) = [m for m in s["margins"] if m["policy"] == "dynamic"]
    assert row["margin_mean"] == pytest.approx(per_slice)
    assert row["cell_best_static"] == cell_best
    assert row["margin_over_cell_best"] == pytest.approx(over_cell)


def test_offsets_and_mixed_batches_cut_disjoint_slices() -> None:
    from dynaexq.eval.run import eval_slices

    evals = {"a": np.arange(10_000), "b": 100_000 + np.arange(10_000)}
    cfg = EvalConfig(tokens_per_domain=512, streams=4, window=64, offsets=3, mixed=True)
    s = eval_slices(evals, cfg)
    assert set(s) == {(d, o) for d in ("a", "b", "mixed") for o in range(3)}
    assert s[("a", 0)].shape == (4, 129)
    # Offsets score disjoint tokens (the last target of one slice may start the next).
    firsts = [set(s[("a", o)][:, :-1].ravel()) for o in range(3)]
    assert not (firsts[0] & firsts[1]) and not (firsts[1] & firsts[2])
    # A mixed batch holds streams of both domains, each from that domain's slice.
    m = s[("mixed", 1)]
    assert m.shape == (4, 129)
    assert (m[0] < 100_000).all() and (m[1] >= 100_000).all()
    assert set(m[0]) <= set(range(512, 1024 + 1))


def _script(name: str):
    """A module of scripts/ loaded from its file."""
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _results_table(summary: dict, tmp_path: Path, capsys) -> str:
    """What scripts/results_table.py prints for `summary` (dynamic only)."""
    import json

    path = tmp_path / "results.json"
    path.write_text(json.dumps({"eval": summary, "shift": None}))
    assert _script("results_table").main([str(path), "--policies", "dynamic"]) == 0
    return capsys.readouterr().out


def test_results_table_reads_the_cells_margins(tmp_path, capsys) -> None:
    """scripts/results_table.py (the README's table): the cell's best static and the
    margins over it, from an eval's JSON."""

    runs = _two_offsets((90, 50), (70, 75))
    s = summarize(runs, EvalConfig(budgets=("4bits",)))
    out = _results_table(s, tmp_path, capsys)
    # uniform 70.0 mean, knapsack 65.0, dynamic 72.5: +2.5 over the cell's best.
    assert (
        "| 4bits | domain | 70.0-70.0 (int4) | - | 65.0-65.0 | 70.0-70.0 | **72.5-72.5** | +2.5 |"
        in out
    )
    assert "1 / 1 cells within 0.5" in out and "0 / 1 within 0.5 of the per-slice" in out


def _windowed(policy, budget, windows, offset, calibration="domain", tier=None) -> RunResult:
    r = _run(policy, budget, "d", float(np.exp(np.mean(windows))), offset, calibration, tier)
    return replace(r, window_nll=list(windows))


def test_the_cell_margin_carries_its_paired_standard_error(tmp_path, capsys) -> None:
    """The margin's error comes from the two policies' window losses paired on each
    offset, scaled by that slice's gap: by hand, offset 0's differences (0.1, -0.1, 0.2,
    -0.2) over a gap of 1 nat give a variance of the mean of 100^2 x (0.1 / 3) / 4;
    offset 1's constant difference adds none; the mean over 2 offsets halves the error."""

    knap = [1.5, 1.5, 1.7, 1.3]
    runs = [
        *(_windowed("full", "-", [1.0] * 4, o, "-") for o in range(2)),
        *(_windowed("static", "-", [2.0] * 4, o, "-", "int2") for o in range(2)),
        *(_windowed("static-knapsack", "4bits", knap, o) for o in range(2)),
        _windowed("dynamic", "4bits", [1.4, 1.6, 1.5, 1.5], 0),
        _windowed("dynamic", "4bits", [w + 0.1 for w in knap], 1),
    ]
    s = summarize(runs, EvalConfig(budgets=("4bits",)))
    (row,) = [m for m in s["margins"] if m["policy"] == "dynamic"]
    assert row["cell_best_static"] == "static-knapsack"
    assert row["margin_over_cell_best"] == pytest.approx(-5.0)
    se = np.sqrt(100.0**2 * (0.1 / 3) / 4) / 2
    assert row["margin_over_cell_best_se"] == pytest.approx(se)
    # The README's table counts a miss as clear only beyond two standard errors.
    out = _results_table(s, tmp_path, capsys)
    assert "cells below -0.5: 1; below it by more than two standard errors: none" in out
    assert f"4bits d domain -5.0 ± {se:.1f}" in out


def test_window_means_are_stream_by_stream() -> None:
    from dynaexq.eval.run import window_means

    nll = np.arange(16, dtype=np.float64).reshape(2, 8)
    assert window_means(nll, 4) == [1.5, 5.5, 9.5, 13.5]
    with pytest.raises(ValueError, match="not a multiple"):
        window_means(nll, 3)


def test_steady_state_scores_each_part_of_the_streams() -> None:
    """scripts/steady_state.py: the gap recovered of each stretch of the streams, from the
    per-token losses (static-low at 2 nats, full at 1: a policy at 1.5 then 1.25 recovers
    50% then 75%)."""

    from dynaexq.eval.stream import StreamResult

    mod = _script("steady_state")

    def res(first: float, second: float) -> StreamResult:
        nll = np.array([[first] * 4 + [second] * 4] * 2)
        return StreamResult(nll, np.zeros_like(nll, dtype=bool), np.arange(8), 8)

    got = mod.part_gaps(res(1.5, 1.25), res(2.0, 2.0), res(1.0, 1.0), 2)
    assert got == pytest.approx([50.0, 75.0])


def test_calibration_texts_of_each_source() -> None:
    """Which text each (calibration, domain) ranking is measured on; generic and mix share
    one text across domains, so it is measured once (`_per_text`)."""
    from dynaexq.eval.run import _per_text, calibration_texts

    a, b, g = np.arange(3), np.arange(4), np.arange(5)
    calib = {"a": a, "b": b}
    modes = ("domain", "mix", "generic", "domain+generic")
    texts = calibration_texts(modes, calib, [g], mixed=True)
    ids = {k: [id(x) for x in v] for k, v in texts.items()}
    assert ids[("domain", "a")] == [id(a)] and ids[("domain", "mixed")] == [id(a), id(b)]
    assert ids[("mix", "a")] == ids[("mix", "b")] == [id(a), id(b)]
    assert ids[("generic", "a")] == ids[("generic", "mixed")] == [id(g)]
    assert ids[("domain+generic", "b")] == [id(b), id(g)]
    assert ids[("domain+generic", "mixed")] == [id(a), id(b), id(g)]
    assert ("domain", "mixed") not in calibration_texts(modes, calib, [g], mixed=False)
    measured: list[int] = []

    def measure(t: list[np.ndarray]) -> int:
        measured.append(len(t))
        return sum(len(x) for x in t)

    got = _per_text(texts, measure)
    assert got[("generic", "a")] == got[("generic", "b")] == 5
    assert got[("domain+generic", "mixed")] == 12
    # one per distinct text: a, b, a+b (domain mixed, mix), g, a+g, b+g, a+b+g
    assert len(measured) == 7
    with pytest.raises(ValueError, match="calibration must be one of"):
        calibration_texts(("yesterday",), calib, [g], mixed=False)
