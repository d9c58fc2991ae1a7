"""Dynamic starts from, and holds, the best static assignment at equal bytes (issue 13):
staging of the lowest tier only, the knapsack's assignment at the full budget less the
cheapest demotions that pay for it, and moves only when they pay."""

from __future__ import annotations

import numpy as np
import pytest
from dynaexq._core import plan_transitions
from dynaexq.runtime.budget import FixedMemory, knapsack_choice, peel, plan_pool
from hypothesis import given, settings
from hypothesis import strategies as st

FIXED = FixedMemory(weights=1000, kv_cache=0, workspace=0, margin=0)


@st.composite
def instances(draw):
    items = draw(st.integers(2, 12))
    tiers = draw(st.integers(2, 4))
    slot_bytes = sorted(
        draw(st.lists(st.integers(1, 40), min_size=tiers, max_size=tiers, unique=True))
    )
    hot = np.asarray(draw(st.lists(st.floats(0, 1), min_size=items, max_size=items)))
    err = np.sort(
        np.asarray(
            draw(st.lists(st.floats(0, 1), min_size=items * tiers, max_size=items * tiers))
        ).reshape(items, tiers),
        axis=1,
    )
    err[:, 0] = 0.0
    values = (hot[:, None] * err).ravel().tolist()
    choice = draw(st.lists(st.integers(0, tiers - 1), min_size=items, max_size=items))
    space = draw(st.integers(0, items * slot_bytes[-1]))
    return values, slot_bytes, choice, space


@settings(max_examples=200, deadline=None)
@given(instances())
def test_peel_only_demotes_and_fits(inst) -> None:
    values, slot_bytes, choice, space = inst
    out = peel(choice, values, slot_bytes, space)
    if len(choice) * slot_bytes[0] > space:
        assert out is None
        return
    assert out is not None
    assert sum(slot_bytes[t] for t in out) <= space
    assert all(o <= c for o, c in zip(out, choice, strict=True))
    if sum(slot_bytes[t] for t in choice) <= space:
        assert out == list(choice)  # nothing to pay for: unchanged


def test_peel_demotes_cold_experts_before_a_hot_one() -> None:
    # Two tiers of 1 and 10 bytes: one hot expert at the top (value 1.0), three cold
    # ones at an upper tier of 2 bytes (value 0.01 each); 3 bytes must be freed.
    slot_bytes = [1, 2, 10]
    values = [0, 0.5, 1.0] + [0, 0.01, 0.02] * 3
    out = peel([2, 1, 1, 1], values, slot_bytes, 10 + 2 + 2 + 2 - 3)
    assert out == [2, 0, 0, 0]


@pytest.mark.parametrize("seed", range(10))
def test_lowest_staging_keeps_the_full_budget_assignment_when_it_leaves_room(seed: int) -> None:
    rng = np.random.default_rng(seed)
    layers, experts, k = 2, 6, 2
    slot_bytes = [3, 5, 11]
    n = layers * experts
    err = np.sort(rng.random((n, 3)), axis=1)
    err[:, 0] = 0
    values = (rng.random(n)[:, None] * err).ravel().tolist()
    space = int(rng.integers(n * slot_bytes[0] + slot_bytes[0], n * slot_bytes[-1]))
    full = list(knapsack_choice(values, slot_bytes, space))
    leftover = space - sum(slot_bytes[t] for t in full)

    def plan(policy, staging="lowest"):
        return plan_pool(
            policy,
            layers=layers,
            experts=experts,
            slot_bytes=slot_bytes,
            fixed=FIXED,
            budget=FIXED.total + space,
            in_flight=k,
            values=values,
            staging=staging,
        )

    static, dyn = plan("static-map"), plan("dynamic")
    assert list(static.assignment) == full
    assert dyn.staging == (1, 0, 0)  # one slot per demote+promote pair in flight
    assert dyn.pool_bytes <= space
    if leftover >= slot_bytes[0]:
        assert list(dyn.assignment) == full
    else:
        assert list(dyn.assignment) == peel(full, values, slot_bytes, space - slot_bytes[0])
    # Staging of every tier pays for K slots of each.
    if space < n * slot_bytes[0] + k * sum(slot_bytes):
        return
    every = plan("dynamic", "every")
    assert every.staging == (k, k, k)
    assert every.pool_bytes <= space


def test_lowest_staging_two_tier_top_n_reserves_only_low_slots() -> None:
    kw = dict(layers=2, experts=8, slot_bytes=[2, 16], fixed=FIXED, in_flight=2)
    budget = FIXED.total + 16 * 2 + 2 * (16 - 2) * 2 + 2 * 2
    low = plan_pool("dynamic", budget=budget, staging="lowest", **kw)
    every = plan_pool("dynamic", budget=budget, staging="every", **kw)
    static = plan_pool("static-map", budget=budget, **kw)
    assert low.staging == (1, 0) and every.staging == (2, 2)
    assert low.per_layer == static.per_layer == (6, 2)  # the staging costs no hot expert here
    assert every.per_layer[1] < low.per_layer[1]


def test_a_move_that_does_not_pay_is_dropped_and_one_that_pays_is_made() -> None:
    # One layer of 4 experts, one hot slot held by expert 0; the signal says expert 1.
    kw = dict(
        current=[1, 0, 0, 0],
        busy=[False] * 4,
        tier_bytes=[100, 400],
        capacity=[4, 1],
        delta=0.0,
        max_in_flight=4,
    )
    scores = [0.30, 0.36, 0.1, 0.1]
    _, moves, _ = plan_transitions(1, 4, scores, **kw)
    assert len(moves) == 2
    _, moves, _ = plan_transitions(1, 4, scores, min_gain_per_byte=0.07 / 500, **kw)
    assert moves == []
    _, moves, _ = plan_transitions(1, 4, [0.30, 0.9, 0.1, 0.1], min_gain_per_byte=0.07 / 500, **kw)
    assert [(m[1], m[3]) for m in moves] == [(0, 0), (1, 1)]


def _knapsack_policy():
    """Three tiers, and the static knapsack over them (the baseline dynamic must hold)."""
    from dynaexq.runtime.policy import ControllerSettings, Policy

    tiers = ("int2", "int4", "bf16")
    return tiers, Policy(
        "static-map", tiers=tiers, controller=ControllerSettings(planner="value", split="global")
    )


def _stationary_case():
    """Random tokens (calibration: the tail) scored as 2 streams of 64, and the knapsack."""
    from dynaexq.eval.stream import as_streams

    text = np.random.default_rng(3).integers(0, 128, size=1024 + 513)
    return (text, as_streams(text[:1024], 2, 64, 1024), *_knapsack_policy())


@pytest.mark.parametrize(
    "how",
    [
        (("gate", "skill"), ("gate_margin", 1e9)),  # the no-harm gate never opens
        (("move_gain", 1e9),),  # no move ever pays
    ],
)
def test_dynamic_that_does_not_move_is_the_static_knapsack(small_engine, how) -> None:
    """End to end: at a budget whose knapsack leaves room for the staging slot, dynamic
    with moves gated off holds the static knapsack's assignment and scores its loss
    exactly; at every budget its pool fits the same bytes."""
    from dynaexq.eval.stream import evaluate_streams
    from dynaexq.runtime.policy import ControllerSettings, Policy

    text, streams, tiers, knap = _stationary_case()
    ctl = ControllerSettings(
        **{"planner": "value", "staging": "lowest", "in_flight": 2, "step_tokens": 32, **dict(how)}
    )
    dyn = Policy("dynamic", tiers=tiers, controller=ctl)
    exact = 0
    for share in ("10%", "25%", "40%", "60%"):
        s_engine, s_dep = small_engine(knap, share, [text[1024:]])
        d_engine, d_dep = small_engine(dyn, s_dep.plan.budget, [text[1024:]])
        assert d_dep.plan.total_bytes <= s_dep.plan.budget
        room = s_dep.plan.budget - s_dep.plan.fixed.total
        staged = sum(g * b for g, b in zip(d_dep.plan.staging, d_dep.plan.slot_bytes, strict=True))
        if s_dep.plan.pool_bytes + staged > room:
            continue  # the staging slot costs a demotion here (test_lowest_staging_...)
        exact += 1
        assert d_dep.plan.assignment == s_dep.plan.assignment
        s = evaluate_streams(s_engine.model, streams, window=64, chunk=16)
        d = evaluate_streams(d_engine.model, streams, window=64, chunk=16)
        d_engine.precision.flush()
        assert d_engine.precision.telemetry.totals()["transitions_started"] == 0
        assert d.perplexity() == s.perplexity()
    assert exact >= 1, "no budget left room for the staging slot: pick others"


def test_moves_that_do_not_pay_are_not_made_on_stationary_text(small_engine) -> None:
    """The no-harm rule of moves that pay: on stationary text (tokens drawn independently
    from one distribution, calibrated on another draw) dynamic with the move threshold
    of the defaults makes no transition; without it, the noise moves experts."""
    from dynaexq.eval.stream import as_streams, evaluate_streams
    from dynaexq.runtime.policy import DEFAULT_CONTROLLER, ControllerSettings, Policy

    rng = np.random.default_rng(9)
    text = rng.integers(0, 128, size=2048 + 1025)
    started = {}
    default = (DEFAULT_CONTROLLER.move_gain, DEFAULT_CONTROLLER.move_z)
    assert default != (0.0, 0.0)
    for gain, z in (default, (0.0, 0.0)):
        ctl = ControllerSettings(
            planner="value",
            staging="lowest",
            in_flight=2,
            step_tokens=32,
            alpha=0.9,
            move_gain=gain,
            move_z=z,
        )
        pol = Policy("dynamic", tiers=("int2", "int4", "bf16"), controller=ctl)
        engine, _ = small_engine(pol, "40%", [text[2048:]])
        evaluate_streams(engine.model, as_streams(text[:2048], 2, 64, 2048), window=64, chunk=16)
        engine.precision.flush()
        started[(gain, z)] = engine.precision.telemetry.totals()["transitions_started"]
    assert started[default] == 0
    assert started[(0.0, 0.0)] > 0


def test_a_hotness_floor_of_one_ignores_the_calibration(small_engine) -> None:
    from dynaexq.runtime.policy import ControllerSettings, Policy

    rng = np.random.default_rng(4)
    calibs = [rng.integers(0, 128, size=512), np.full(512, 7)]
    assign = {}
    for f in (0.0, 1.0):
        ctl = ControllerSettings(planner="value", split="global", hotness_floor=f)
        pol = Policy("static-map", tiers=("int2", "int4", "bf16"), controller=ctl)
        assign[f] = [small_engine(pol, "30%", [c])[1].plan.assignment for c in calibs]
    assert assign[1.0][0] == assign[1.0][1]
    assert assign[0.0][0] != assign[0.0][1]


@pytest.mark.parametrize("seed", range(10))
def test_host_staging_holds_the_full_budget_assignment_at_every_budget(seed: int) -> None:
    """Staging slots in host memory cost no budget: dynamic's assignment is the static
    knapsack's at the full budget whatever the leftover bytes, its device pool the same
    bytes, and the slots are counted apart."""
    rng = np.random.default_rng(100 + seed)
    layers, experts = 2, 6
    slot_bytes = [3, 5, 11]
    n = layers * experts
    err = np.sort(rng.random((n, 3)), axis=1)
    err[:, 0] = 0
    values = (rng.random(n)[:, None] * err).ravel().tolist()
    # From every expert at the lowest tier (no byte left for a device staging slot) up.
    space = int(rng.integers(n * slot_bytes[0], n * slot_bytes[-1]))
    kw = dict(layers=layers, experts=experts, slot_bytes=slot_bytes, fixed=FIXED, in_flight=2)
    kw.update(budget=FIXED.total + space, values=values)
    static = plan_pool("static-map", **kw)
    dyn = plan_pool("dynamic", staging="lowest", staging_memory="host", **kw)
    assert dyn.assignment == static.assignment
    assert dyn.pool_bytes == static.pool_bytes <= space
    assert dyn.staging == (1, 0, 0) and dyn.staging_host
    assert dyn.host_staging_bytes == slot_bytes[0]
    assert "staging in host memory" in dyn.describe()
    if space < n * slot_bytes[0] + slot_bytes[0]:
        from dynaexq.runtime.budget import BudgetError

        with pytest.raises(BudgetError, match="staging slots"):  # no byte for a device slot
            plan_pool("dynamic", staging="lowest", **kw)
        return
    device = plan_pool("dynamic", staging="lowest", **kw)
    assert not device.staging_host and device.host_staging_bytes == 0
    assert device.pool_bytes == sum(slot_bytes[t] for t in device.assignment) + slot_bytes[0]


def test_host_staging_needs_lowest_staging() -> None:
    from dynaexq.runtime.budget import BudgetError
    from dynaexq.runtime.policy import ControllerSettings, PolicyError

    kw = dict(layers=1, experts=4, slot_bytes=[2, 8], fixed=FIXED, budget=FIXED.total + 40)
    with pytest.raises(BudgetError, match="need staging 'lowest'"):
        plan_pool("dynamic", staging="every", staging_memory="host", **kw)
    with pytest.raises(BudgetError, match="device or host"):
        plan_pool("dynamic", staging="lowest", staging_memory="disk", **kw)
    with pytest.raises(PolicyError, match="needs staging 'lowest'"):
        ControllerSettings(staging="every", staging_memory="host")
    with pytest.raises(PolicyError, match="device or host"):
        ControllerSettings(staging="lowest", staging_memory="gpu")


def test_dynamic_with_host_staging_is_the_static_knapsack_at_every_budget(small_engine) -> None:
    """End to end, at budgets where a device staging slot would cost a demotion too:
    dynamic that does not move scores the static knapsack's loss exactly, its staging
    slot is the pool's host-memory tail, and the budget tracker never holds it."""
    from dynaexq.eval.stream import evaluate_streams
    from dynaexq.runtime.policy import ControllerSettings, Policy

    text, streams, tiers, knap = _stationary_case()
    ctl = ControllerSettings(
        planner="value", staging="lowest", staging_memory="host", in_flight=2, step_tokens=32,
        move_gain=1e9,
    )  # fmt: skip
    dyn = Policy("dynamic", tiers=tiers, controller=ctl)
    for share in ("10%", "25%", "40%", "60%"):
        s_engine, s_dep = small_engine(knap, share, [text[1024:]])
        d_engine, d_dep = small_engine(dyn, s_dep.plan.budget, [text[1024:]])
        assert d_dep.plan.assignment == s_dep.plan.assignment
        assert d_dep.plan.pool_bytes == s_dep.plan.pool_bytes
        pool = d_engine.precision.pool
        stats = pool.stats()
        host = [n for n, c in stats["classes"].items() if c["host_memory"]]
        assert host == ["t0s"] and stats["classes"]["t0s"]["region_offset"] == pool.host_from
        assert pool.host_from == pool.total_bytes - stats["classes"]["t0s"]["region_bytes"]
        assert stats["reserved_bytes"] == s_dep.plan.pool_bytes
        s = evaluate_streams(s_engine.model, streams, window=64, chunk=16)
        d = evaluate_streams(d_engine.model, streams, window=64, chunk=16)
        d_engine.precision.flush()
        assert d_engine.precision.telemetry.totals()["transitions_started"] == 0
        assert d.perplexity() == s.perplexity()


def test_where_the_staging_slot_lives_does_not_change_what_is_computed(small_engine) -> None:
    """With moves on, at a budget whose knapsack leaves room for a device staging slot,
    the two placements plan the same tiers and make the same moves: experts demoted into
    the host-memory slot are read from it exactly as from a device slot. Meanwhile the
    device bytes reserved never pass the budget's pool and the host slot is used."""
    from dynaexq.eval.stream import as_streams, evaluate_streams
    from dynaexq.runtime.policy import ControllerSettings, Policy

    rng = np.random.default_rng(9)
    text = rng.integers(0, 128, size=2048 + 1025)
    tiers, knap = _knapsack_policy()
    compared = 0
    for share in ("25%", "40%", "60%"):
        _, s_dep = small_engine(knap, share, [text[2048:]])
        runs = {}
        for where in ("device", "host"):
            ctl = ControllerSettings(
                planner="value", staging="lowest", staging_memory=where, in_flight=2,
                step_tokens=32, alpha=0.5,
            )  # fmt: skip
            engine, dep = small_engine(
                Policy("dynamic", tiers=tiers, controller=ctl), s_dep.plan.budget, [text[2048:]]
            )
            res = evaluate_streams(
                engine.model, as_streams(text[:2048], 2, 64, 2048), window=64, chunk=16
            )
            engine.precision.flush()
            stats = engine.precision.pool.stats()
            assert stats["high_water_bytes"] <= dep.plan.pool_bytes
            runs[where] = (dep.plan.assignment, res.perplexity(), engine.precision, stats)
        if runs["device"][0] != runs["host"][0]:
            continue  # the device slot cost a demotion at this budget
        compared += 1
        moved = runs["host"][2].telemetry.totals()["transitions_started"]
        assert moved > 0
        assert runs["device"][2].telemetry.totals()["transitions_started"] == moved
        assert runs["device"][1] == runs["host"][1]
        assert runs["host"][3]["classes"]["t0s"]["high_water"] == 1
    assert compared >= 1, "no budget left room for a device staging slot: pick others"
