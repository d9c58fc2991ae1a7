"""Decode under CUDA graphs in the continuous-batching scheduler (`runtime.graphs.SlabGraphs`):
a step runs the graph of its (batch, key-slot) bucket over the slab's first rows, padded
with inert rows that may be prefilling or free. On the CPU the captured step is an eager
stand-in that does what `DecodeGraph` does, warm-up writes included, so that the
bucketing, the inert rows next to prompts being prefilled in chunks, and the reuse of
graphs are tested here; the capture itself only on a GPU."""

from __future__ import annotations

import asyncio
import logging

import numpy as np
import pytest
import torch
from dynaexq import load
from dynaexq.runtime.graphs import SlabGraphs
from dynaexq.serve.scheduler import GenerationRequest, Scheduler, SequenceSpec

pytestmark = pytest.mark.timeout(300)


class EagerSlabGraph:
    """`DecodeGraph` run eagerly: the same warm-up (writes of the cache's last slot with
    token 0), then each step over `key_slots` slots of `cache`."""

    made: list[tuple[int, int]] = []

    def __init__(self, engine, cache, batch: int, key_slots: int, pool=None) -> None:
        self.engine, self.cache, self.batch, self.key_slots = engine, cache, batch, key_slots
        self.capacity = int(cache.capacity)
        ids = torch.zeros(batch, 1, dtype=torch.long)
        pos = torch.full((batch, 1), self.capacity - 1, dtype=torch.long)
        for _ in range(2):
            engine.model(ids, pos, cache, key_slots=key_slots)
        EagerSlabGraph.made.append((batch, key_slots))

    def step(self, next_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        ids, pos = next_ids.view(-1, 1), positions.view(-1, 1)
        return self.engine.model(ids, pos, self.cache, key_slots=self.key_slots)[:, 0]


@pytest.fixture(scope="module")
def engine():
    return load(dtype="float32")  # the embedded model, full precision


def prompts(lengths: list[int], seed: int) -> list[tuple[int, ...]]:
    rng = np.random.default_rng(seed)
    return [tuple(rng.integers(0, 4000, size=n).tolist()) for n in lengths]


async def drain(req: GenerationRequest) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    done = 0
    while done < len(req.specs):
        ev = await asyncio.wait_for(req.events.get(), 120)
        assert not isinstance(ev, BaseException), ev
        out.setdefault(ev.index, []).extend(ev.token_ids)
        done += ev.finish_reason is not None
    return out


def serve(engine, first: list, later: list, **kw) -> list[list[int]]:
    """Greedy; each (prompt, max_new) its own request: `first` submitted together, `later`
    once the first request has its first token (so they prefill beside decoding rows)."""

    async def main() -> list[list[int]]:
        sched = Scheduler(engine, max_batch=6, max_context=192, max_prefill_tokens=24, **kw)
        sched.start()

        def submit(p: tuple[int, ...], m: int) -> GenerationRequest:
            return sched.submit([SequenceSpec(p, m, stream_text=True)])

        try:
            reqs = [submit(p, m) for p, m in first]
            head = await asyncio.wait_for(reqs[0].events.get(), 120)
            reqs += [submit(p, m) for p, m in later]
            outs = [await drain(r) for r in reqs]
            outs[0][0] = head.token_ids + outs[0][0]
            return [o[0] for o in outs]
        finally:
            sched.stop(drain=False, timeout=30)

    return asyncio.run(main())


def test_scheduler_under_slab_graphs_gives_the_eager_tokens(engine) -> None:
    """Three short prompts decoding while a 120-token prompt and three more arrive and
    prefill 24 tokens a step, some of them in inert rows of a decode bucket (7 requests
    over 6 rows: one queues): with graphs every request's tokens are eager's, under
    buckets of 1 to 6 rows and key slots growing from 64 to the context (192)."""
    short = prompts([5, 9, 7], seed=4)
    first = list(zip(short, [60, 70, 50], strict=True))
    later = list(zip(prompts([120, 12, 33, 21], seed=5), [20, 40, 8, 15], strict=True))
    want = serve(engine, first, later)
    EagerSlabGraph.made.clear()
    got = serve(engine, first, later, graph_step=EagerSlabGraph)
    assert got == want
    made = set(EagerSlabGraph.made)
    assert len(made) == len(EagerSlabGraph.made)  # a bucket is captured once
    assert {b for b, _ in made} >= {1, 4, 6}, made  # 6 = max_batch, the last bucket
    assert {k for _, k in made} == {64, 128, 192}, made  # 192: the context


def test_inert_rows_write_only_the_last_slot_and_repeat_a_live_token() -> None:
    seen = {}

    class Recorder:
        def __init__(self, engine, cache, batch, key_slots, pool=None) -> None:
            self.batch, self.key_slots = batch, key_slots

        def step(self, ids, pos):
            seen[(self.batch, self.key_slots)] = (ids.tolist(), pos.tolist())
            return torch.arange(float(self.batch))[:, None] + ids[:, None].float() / 1000

    class Slab:
        capacity = 300

        def rows(self, start, stop):
            return (start, stop)

    graphs = SlabGraphs(None, Slab(), max_batch=6, graph=Recorder)
    assert graphs.buckets == (1, 2, 4, 6)
    out = graphs.step(torch.tensor([7, 9, 11]), torch.tensor([3, 90, 5]), longest=91)
    assert seen[(4, 128)] == ([7, 9, 11, 7], [3, 90, 5, 299])
    assert out[:, 0].tolist() == pytest.approx([0.007, 1.009, 2.011])
    graphs.step(torch.tensor([1] * 5), torch.tensor([250] * 5), longest=251)
    assert (6, 256) in seen and graphs.key_slots_for(299) == 300  # at most the context
    with pytest.raises(ValueError):
        graphs.step(torch.tensor([1] * 7), torch.tensor([1] * 7), longest=2)


def test_graphs_fall_back_to_eager_with_a_reason(engine, caplog) -> None:
    from dynaexq.runtime.kv_share import KvShare

    with caplog.at_level(logging.WARNING, logger="dynaexq.serve"):
        sched = Scheduler(engine, max_batch=2, max_context=64, cuda_graphs=True)
    assert sched.graphs is None
    assert "CUDA graphs need a CUDA device" in caplog.text
    caplog.clear()
    share = KvShare(min_kv_tokens=64, max_kv_tokens=64, page_tokens=16)
    with caplog.at_level(logging.WARNING, logger="dynaexq.serve"):
        paged = Scheduler(
            engine, max_batch=2, max_context=64, kv_share=share, graph_step=EagerSlabGraph
        )
    assert paged.graphs is None and "not the paged one" in caplog.text


@pytest.mark.gpu
def test_scheduler_under_cuda_graphs_on_the_gpu() -> None:
    """The captured graphs themselves (a GPU): static-map at 20% (no transitions, so the
    two runs see the same tiers), float32; every request's tokens are eager's."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    engine = load(budget="20%", policy="static-map", device="cuda", dtype="float32")
    short = prompts([5, 9, 7], seed=4)
    first = list(zip(short, [60, 70, 50], strict=True))
    later = list(zip(prompts([120, 12, 33, 21], seed=5), [20, 40, 8, 15], strict=True))
    want = serve(engine, first, later)
    got = serve(engine, first, later, cuda_graphs=True)
    assert got == want
