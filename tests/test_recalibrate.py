"""Calibration again on served text (runtime/recalibrate.py): the ranking, the tier values
and the regime prior are those of the new text, the measurement feeds nothing to the
runtime's routing observers, and the controller then moves towards the static knapsack
of that text; `PrecisionRuntime.use_calibration` refuses bad rankings."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from dynaexq.eval.stream import as_streams, evaluate_streams
from dynaexq.runtime.calibration import calibrate, layer_share
from dynaexq.runtime.policy import DEFAULT_CONTROLLER, ControllerSettings, Policy
from dynaexq.runtime.recalibrate import recalibrate

TIERS = ("int2", "int4", "bf16")
VALUED = dict(
    planner="value", split="global", staging="lowest", value="fisher", value_scale="layer"
)


def texts() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    low = rng.integers(0, 48, size=4096)  # two texts of disjoint tokens: other experts
    high = rng.integers(80, 128, size=4096)
    return low, high


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    return float((np.asarray(a) == np.asarray(b)).mean())


def test_recalibration_plans_on_the_served_text(small_engine) -> None:
    """Calibrated on one text, serving another: recalibrated on the first half of what it
    served, dynamic ends much nearer the static knapsack of the served text than the same
    dynamic following the served text's routing alone."""
    low, high = texts()
    # The default controller (the regime signal), its moves free.
    ctl = replace(DEFAULT_CONTROLLER, step_tokens=32, move_gain=0.0, move_z=0.0)
    knap = Policy("static-map", tiers=TIERS, controller=ctl)
    target = small_engine(knap, "15%", [high])[0].precision.tier_map()
    ends = {}
    for recal in (False, True):
        engine, dep = small_engine(Policy("dynamic", tiers=TIERS, controller=ctl), "15%", [low])
        rt = engine.precision
        start = rt.tier_map().copy()
        if recal:
            before_gains = rt._gains_override.copy()
            calls = []
            hooks = engine.model.runtime.routing_hooks
            hooks[:] = [lambda *a, calls=calls, rt=rt: calls.append(1) or rt.observe(*a)]
            with torch.inference_mode():  # as from a scoring loop's step: fisher needs grads
                scores = recalibrate(engine, dep, [high[:2048]])
            assert calls == [] and len(hooks) == 1  # the measurement's routing: not observed
            again = calibrate(engine, dep.store, [high[:2048]], progress=False, cache=False)
            np.testing.assert_allclose(scores, again)
            np.testing.assert_allclose(rt.prior, scores)
            assert rt.regime is not None
            share = layer_share(scores, ctl.hotness_floor)
            np.testing.assert_allclose(rt.regime.prior, share, rtol=1e-6)
            assert not np.allclose(rt._gains_override, before_gains)
        streams = as_streams(high[2048:], 2, 64, 1024)
        evaluate_streams(engine.model, streams, window=64, chunk=16)
        rt.flush()
        ends[recal] = agreement(rt.tier_map(), target)
    assert agreement(start, target) < 0.5
    assert ends[True] >= 0.75 and ends[True] > ends[False] + 0.1, (agreement(start, target), ends)


def test_recalibration_needs_a_dynamic_runtime_and_text(small_engine) -> None:
    low, _ = texts()
    engine, dep = small_engine(Policy("static", tiers=TIERS), "15%", None)
    with pytest.raises(ValueError, match="precision runtime"):
        recalibrate(engine, dep, [low])
    ctl = ControllerSettings(**VALUED)
    engine, dep = small_engine(Policy("dynamic", tiers=TIERS, controller=ctl), "15%", [low])
    with pytest.raises(ValueError, match="16 served tokens"):
        recalibrate(engine, dep, [low[:8]])
    rt = engine.precision
    shape = (rt.num_layers, rt.experts)
    for bad in (np.ones((1, 1)), np.full(shape, np.nan), -np.ones(shape)):
        with pytest.raises(ValueError, match="calibration ranking"):
            rt.use_calibration(bad)


def _serve_one_at_a_time(monkeypatch, **kw):
    """Four requests served one after another by a dynamic engine's scheduler (`kw`: its
    recalibration settings); the texts each recalibration was given."""
    import asyncio

    import dynaexq.runtime.recalibrate as recal
    from dynaexq import load
    from dynaexq.serve.scheduler import Scheduler, SequenceSpec

    engine = load(budget="20%", policy="dynamic", dtype="float32", progress=False)
    seen: list[list[np.ndarray]] = []
    real = recal.recalibrate

    def spy(eng, dep, streams):
        seen.append([np.asarray(s) for s in streams])
        return real(eng, dep, streams)

    monkeypatch.setattr(recal, "recalibrate", spy)
    rng = np.random.default_rng(2)
    prompts = [tuple(rng.integers(0, 4000, size=n).tolist()) for n in (60, 70, 50, 40)]

    async def main(sched) -> list[list[int]]:
        sched.start()
        try:
            out = []
            for p in prompts:  # one at a time: each finishes before the next is sent
                req = sched.submit([SequenceSpec(p, 10)])
                toks: list[int] = []
                while True:
                    ev = await asyncio.wait_for(req.events.get(), 120)
                    assert not isinstance(ev, BaseException), ev
                    toks += ev.token_ids
                    if ev.finish_reason is not None:
                        break
                out.append(toks)
            return out
        finally:
            sched.stop(drain=False, timeout=30)

    sched = Scheduler(engine, max_batch=2, max_context=128, **kw)
    outs = asyncio.run(main(sched))
    assert all(len(o) == 10 for o in outs)
    texts = [np.asarray(p + tuple(o)).tolist() for p, o in zip(prompts, outs, strict=True)]
    return sched, [[s.tolist() for s in call] for call in seen], texts


def test_the_server_recalibrates_once_on_what_it_served(monkeypatch, caplog) -> None:
    """`Scheduler(recalibrate_tokens=N)` (`dynaexq serve --recalibrate-tokens`): once the
    finished sequences hold N tokens, one recalibration on exactly their prompts and
    completions, between steps; later requests are served on; a static engine only
    warns."""
    import logging

    from dynaexq import load
    from dynaexq.serve.scheduler import Scheduler

    sched, seen, texts = _serve_one_at_a_time(monkeypatch, recalibrate_tokens=130)
    assert sched.recalibrations == 1
    assert seen == [texts[:2]]  # 70 + 80 tokens
    static = load(budget="20%", policy="static-map", dtype="float32", progress=False)
    with caplog.at_level(logging.WARNING, logger="dynaexq.serve"):
        Scheduler(static, max_batch=1, max_context=64, recalibrate_tokens=10)
    assert "needs the dynamic policy" in caplog.text
    with pytest.raises(ValueError, match="recalibrate_on"):
        Scheduler(static, max_batch=1, max_context=64, recalibrate_on="regime")


def test_the_server_recalibrates_on_each_window_it_served(monkeypatch) -> None:
    """`recalibrate_on="window"` (`dynaexq serve --recalibrate-on window`): again on the
    next N tokens of finished requests, each time on those alone."""
    sched, seen, texts = _serve_one_at_a_time(
        monkeypatch, recalibrate_tokens=100, recalibrate_on="window"
    )
    # 70 + 80 tokens, then 60 + 50: each pair reaches 100.
    assert sched.recalibrations == 2
    assert seen == [texts[:2], texts[2:]]


def _regime_recalibrations(small_engine, monkeypatch, stream: np.ndarray, tokens: int, step=32):
    """The calls a regime-triggered Recalibration makes over `stream` (one stream), as (start, end,
    text length); the recalibration itself is recorded, not run."""
    import dynaexq.runtime.recalibrate as recal_mod

    low, _ = texts()
    ctl = replace(DEFAULT_CONTROLLER, step_tokens=step)
    engine, dep = small_engine(Policy("dynamic", tiers=TIERS, controller=ctl), "15%", [low])
    calls: list[tuple[int, int]] = []
    monkeypatch.setattr(recal_mod, "recalibrate", lambda e, d, text: calls.append(len(text[0])))
    tracker = recal_mod.Recalibration(engine, dep, tokens, trigger="regime")
    data = stream[None, :]

    def on_step(step: int) -> None:
        tracker.step((step + 1) * 16, lambda a, b: list(data[:, a : b + 1]))

    evaluate_streams(engine.model, data, window=64, chunk=16, on_step=on_step)
    assert tracker.recalibrations == len(calls) == len(tracker.positions)
    return list(zip(tracker.positions, calls, strict=True)), engine.precision.regime


WINDOWS = [(a, a + 32) for a in range(0, 1024, 32)]


@pytest.mark.parametrize(
    "trigger,expected",
    [("first", [(0, 32)]), ("regime", [(0, 32), (320, 384)]), ("window", WINDOWS)],
)
def test_recalibration_triggers(monkeypatch, trigger, expected) -> None:
    """Driven by a stand-in regime signal. "regime": once in the first regime, once more
    after a change to a new workload, none after a change the signal recalls (a false
    alarm or a workload seen before), and a recalibration's own new regime is not a
    change. "first": once. "window": every 64 tokens (32 positions of 2 streams) on the
    last 64, whatever the signal says."""
    import types

    import dynaexq.runtime.recalibrate as recal_mod

    class Regime:
        changes, recalled, recall_due = 0, 0, True

    rt = types.SimpleNamespace(regime=Regime())
    engine = types.SimpleNamespace(precision=rt)
    calls: list[tuple[int, int]] = []

    def fake(e, d, text):
        calls.append(text)
        rt.regime = Regime()  # as use_calibration: a new regime from the new ranking
        rt.regime.recall_due = False

    monkeypatch.setattr(recal_mod, "recalibrate", fake)
    tracker = recal_mod.Recalibration(engine, None, 64, streams=2, trigger=trigger)
    at = []
    for pos in range(16, 1025, 16):
        if pos == 320:  # a change to a new workload, not recalled
            rt.regime.changes += 1
            rt.regime.recall_due = True
        if pos == 384:
            rt.regime.recall_due = False
        if pos == 640:  # a false alarm: recalled after its warm-up
            rt.regime.changes += 1
            rt.regime.recall_due = True
        if pos == 704:
            rt.regime.recall_due, rt.regime.recalled = False, 1
        if tracker.step(pos, lambda a, b: (a, b)):
            at.append(pos)
    assert calls == expected
    assert tracker.positions == at == [b for _, b in expected]
    assert tracker.recalibrations == len(expected)


def test_regime_recalibration_runs_again_on_the_new_regimes_text(small_engine, monkeypatch) -> None:
    """low then high (disjoint tokens, other experts): one recalibration on low's first
    tokens, then one on high's own text, begun after the change was declared."""
    low, high = texts()
    stream = np.concatenate([low[:1024], high[:1025]])
    done, regime = _regime_recalibrations(small_engine, monkeypatch, stream, 256)
    assert regime.changes >= 1
    assert done[0] == (256, 257)
    assert len(done) == 2, done
    end, length = done[1]
    start = end - length + 1
    assert 1024 <= start <= 1024 + 8 * 32 and length >= 257  # high's text only


def test_regime_recalibration_needs_the_regime_signal(small_engine) -> None:
    from dynaexq.runtime.recalibrate import Recalibration

    low, _ = texts()
    ctl = replace(DEFAULT_CONTROLLER, signal="ema")
    engine, dep = small_engine(Policy("dynamic", tiers=TIERS, controller=ctl), "15%", [low])
    with pytest.raises(ValueError, match="signal 'regime'"):
        Recalibration(engine, dep, 256, trigger="regime")
    engine, dep = small_engine(Policy("dynamic", tiers=TIERS, controller=DEFAULT_CONTROLLER),
                               "15%", [low])  # fmt: skip
    with pytest.raises(ValueError, match="at least 16 tokens"):
        Recalibration(engine, dep, 8, trigger="regime")
    with pytest.raises(ValueError, match="trigger must be"):
        Recalibration(engine, dep, 256, trigger="often")
