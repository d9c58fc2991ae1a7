"""Causal stream evaluation: chunking through the KV cache must not change the scores."""

from __future__ import annotations

from pathlib import Path

import dynaexq
import numpy as np
import pytest
import torch
from dynaexq.eval.stream import as_streams, evaluate_streams, gap_recovered
from dynaexq.model.testing import make_hf_model, save_checkpoint


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> dynaexq.engine.Engine:
    path = save_checkpoint(make_hf_model(seed=3), Path(tmp_path_factory.mktemp("ckpt")))
    return dynaexq.load(path, dtype="float32", device="cpu")


def test_chunked_scores_equal_whole_window_scores(engine) -> None:
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, engine.config.vocab_size, size=200)
    streams = as_streams(tokens, streams=2, window=32, max_tokens=None)
    assert streams.shape == (2, 97)
    whole = evaluate_streams(engine.model, streams, window=32, chunk=32)
    steps: list[int] = []
    chunked = evaluate_streams(engine.model, streams, window=32, chunk=8, on_step=steps.append)
    assert steps == list(range(12))
    assert chunked.steps == 12 and whole.steps == 3
    np.testing.assert_allclose(chunked.nll, whole.nll, atol=1e-4)
    assert (chunked.correct == whole.correct).mean() > 0.99
    # The scores are those of a plain forward over each window.
    with torch.inference_mode():
        logits = engine.forward(torch.from_numpy(streams[:, :32]))
    ref = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        torch.from_numpy(streams[:, 1:33]).reshape(-1),
        reduction="none",
    )
    np.testing.assert_allclose(whole.nll[:, :32].reshape(-1), ref.numpy(), atol=1e-4)


def test_bad_shapes_are_refused(engine) -> None:
    with pytest.raises(ValueError, match="multiple of chunk"):
        evaluate_streams(engine.model, np.zeros((1, 33), dtype=np.int64), window=32, chunk=5)
    with pytest.raises(ValueError, match="cannot fill"):
        as_streams(np.arange(10), streams=2, window=32, max_tokens=None)


def test_gap_recovered_for_both_directions() -> None:
    assert gap_recovered(low=10.0, full=6.0, policy=7.0) == pytest.approx(0.75)
    assert gap_recovered(low=0.40, full=0.50, policy=0.48) == pytest.approx(0.8)


def test_settle_steps_finds_when_the_hot_set_turns_over() -> None:
    from dynaexq.eval.shift import settle_steps

    steps, experts = 40, 10
    maps = np.zeros((steps, 1, experts), dtype=np.uint8)
    maps[:, 0, :3] = 1  # the old hot set ...
    for s in range(5, steps):  # ... replaced one expert per step from step 5 on
        k = min(3, s - 4)
        maps[s, 0, :3] = 0
        maps[s, 0, 3 - k : 3] = 0
        maps[s, 0, :3] = 1
        maps[s, 0, : 3 - k] = 1
        maps[s, 0, 3 - k : 3] = 0
        maps[s, 0, 7 : 7 + k] = 1
    # Steady set {7, 8, 9} from step 7; 90% of full overlap is reached there.
    assert settle_steps(maps, 0, steps, top=1) == 7
    assert settle_steps(maps, 10, steps, top=1) == 0
