"""Decode under CUDA graphs in `generate` (runtime/graphs.py: `BucketedGraphs`): a batch
runs under the graph of its bucket, padded with inert rows. On the CPU the captured step
is replaced by an eager step over the same bucket cache, so the bucketing, the padding,
the finished rows and the reuse of graphs across calls are tested here; the capture
itself only on a GPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from dynaexq import load
from dynaexq.generation import SamplingParams, generate_tokens
from dynaexq.runtime.graphs import BucketedGraphs, GraphSession, bucket_for, capacity_for


class EagerGraph:
    """DecodeGraph's interface, run eagerly: one decode step of `batch` rows over every
    key slot of `cache`."""

    made: list[int] = []

    def __init__(self, engine, cache, batch: int) -> None:
        self.engine, self.cache, self.batch = engine, cache, batch
        self.capacity = int(cache.capacity)
        EagerGraph.made.append(batch)

    def step(self, next_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        model = self.engine.model
        ids, pos = next_ids.view(-1, 1), positions.view(-1, 1)
        return model(ids, pos, self.cache, key_slots=self.capacity)[:, 0]


@pytest.fixture(scope="module")
def engine():
    return load()  # the embedded model, full precision


def prompts(lengths: list[int], seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 4000, size=n).tolist() for n in lengths]


def test_bucket_choice() -> None:
    assert [bucket_for(n) for n in (1, 2, 3, 4, 5, 9, 17, 32)] == [1, 2, 4, 4, 8, 16, 32, 32]
    assert bucket_for(33) is None  # past the largest: eager
    assert [capacity_for(n) for n in (1, 64, 65, 200)] == [64, 64, 128, 256]


def test_inert_rows_repeat_a_live_row_and_are_dropped() -> None:
    class Recorder:
        batch, capacity = 4, 64

        def step(self, ids, pos):
            self.seen = (ids.tolist(), pos.tolist())
            return torch.arange(4.0)[:, None] * 10 + ids[:, None].float()

    graph = Recorder()
    session = GraphSession(graph, 3)
    session.keep([0, 2])  # the sequence in graph row 1 finished
    out = session.step(torch.tensor([7, 9]), torch.tensor([3, 5]))
    assert graph.seen == ([7, 7, 9, 7], [3, 3, 5, 3])
    assert out[:, 0].tolist() == [7.0, 29.0]  # graph rows 0 and 2, in order


def test_generate_under_bucketed_graphs_gives_the_eager_tokens(engine) -> None:
    """Three prompts of different lengths (bucket 4: one inert row), one finishing early
    at an EOS: every sequence's tokens are eager decode's."""
    model = engine.model
    batch = prompts([5, 11, 8], seed=1)
    free = generate_tokens(model, batch, SamplingParams(max_new_tokens=10, ignore_eos=True))
    eos = [free[1].token_ids[2]]  # the second sequence stops at its third token
    params = SamplingParams(max_new_tokens=10)
    want = generate_tokens(model, batch, params, eos)
    EagerGraph.made.clear()
    graphs = BucketedGraphs(engine, graph=EagerGraph)
    got = generate_tokens(model, batch, params, eos, graphs=graphs)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert [o.finish_reason for o in got] == [o.finish_reason for o in want]
    assert "eos" in [o.finish_reason for o in got] and "length" in [o.finish_reason for o in got]
    assert EagerGraph.made == [4]
    # Reused by the next call of the same bucket; a new bucket and a longer request
    # capture once each.
    again = generate_tokens(model, prompts([4, 6, 9], seed=2), params, eos, graphs=graphs)
    assert len(again) == 3 and EagerGraph.made == [4]
    one = generate_tokens(model, prompts([6], seed=3), params, graphs=graphs)
    assert one[0].token_ids == generate_tokens(model, prompts([6], seed=3), params)[0].token_ids
    assert EagerGraph.made == [4, 1]
    long = SamplingParams(max_new_tokens=70, ignore_eos=True)
    generate_tokens(model, prompts([3], seed=4), long, graphs=graphs)
    assert EagerGraph.made == [4, 1, 1] and graphs.graphs[1].capacity == 128


def test_sampled_generation_under_graphs_is_eagers(engine) -> None:
    """Seeded sampling: each row draws from its own generator, graphs or not."""
    model = engine.model
    batch = prompts([4, 7], seed=5)
    params = SamplingParams(max_new_tokens=8, temperature=0.8, top_k=20, seed=3)
    graphs = BucketedGraphs(engine, graph=EagerGraph)
    got = generate_tokens(model, batch, params, graphs=graphs)
    want = generate_tokens(model, batch, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]


def test_generate_with_cuda_graphs_off_cuda_warns_and_decodes_eagerly(engine) -> None:
    with pytest.warns(RuntimeWarning, match="CUDA graphs need a CUDA device"):
        got = engine.generate([[1, 2, 3]], max_new_tokens=4, ignore_eos=True, cuda_graphs=True)
    want = engine.generate([[1, 2, 3]], max_new_tokens=4, ignore_eos=True)
    assert got[0].token_ids == want[0].token_ids


def test_cli_cuda_graphs_off_cuda_says_why(capsys) -> None:
    from dynaexq.cli import main

    rc = main(["generate", "--device", "cpu", "--cuda-graphs", "--max-new-tokens", "3",
               "--no-stream", "def f("])  # fmt: skip
    assert rc == 0
    err = capsys.readouterr().err
    assert "--cuda-graphs: CUDA graphs need a CUDA device" in err and "decoding eagerly" in err


# -- on a GPU -------------------------------------------------------------------------------
@pytest.mark.gpu
def test_generate_with_cuda_graphs_equals_eager_on_the_gpu() -> None:
    """Captured graphs, bucket 4 for three prompts (one inert row), reused by a second
    call: the greedy tokens of eager decode (static-map, float32)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    kw = dict(budget="20%", policy="static-map", device="cuda", dtype="float32", progress=False)
    graphed, eager = load(**kw), load(**kw)
    for seed in (1, 2):
        batch = prompts([5, 11, 8], seed=seed)
        a = graphed.generate(batch, max_new_tokens=16, ignore_eos=True, cuda_graphs=True)
        b = eager.generate(batch, max_new_tokens=16, ignore_eos=True)
        assert [r.token_ids for r in a] == [r.token_ids for r in b]
    assert graphed._graphs is not None and graphed._graphs.captures == 1
