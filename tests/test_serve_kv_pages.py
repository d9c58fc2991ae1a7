"""The scheduler on the paged KV cache: admission by pages, prefix pages shared between
requests, preemption of the newest sequence when pages run out (recomputed later, never
failed), and a budget shared with the precision runtime, which lends top-tier expert bytes
to the KV pages under load and takes them back when the load passes."""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("transformers")
pytestmark = pytest.mark.timeout(600)

import dynaexq  # noqa: E402
from dynaexq.model.testing import make_hf_model, save_checkpoint, train_tiny_tokenizer  # noqa: E402
from dynaexq.runtime.kv_share import KvShare  # noqa: E402
from dynaexq.serve.metrics import ServerMetrics  # noqa: E402
from dynaexq.serve.scheduler import GenerationRequest, Scheduler, SequenceSpec  # noqa: E402
from dynaexq.tokenizer import Tokenizer  # noqa: E402

TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog. ",
    "int main(void) { return 0; }\n",
    "Mixture-of-experts models route each token to a few experts. ",
] * 20
PROMPTS = [
    "The quick",
    "def add(a, b):\n    return",
    "M",
    "int main(void) { return 0; }\nint main(void) {",
    "experts route",
    "a + b",
]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    path = tmp_path_factory.mktemp("kv_model")
    train_tiny_tokenizer(path, TEXTS, vocab_size=200)
    save_checkpoint(make_hf_model(seed=3, vocab_size=Tokenizer(path).vocab_size), path)
    return dynaexq.load(path, dtype="float32", device="cpu")


def spec(engine, prompt: str, max_new: int) -> SequenceSpec:
    return SequenceSpec(tuple(engine.encode(prompt)), max_new)


async def drain(req: GenerationRequest) -> list[int]:
    ids: list[int] = []
    while True:
        ev = await asyncio.wait_for(req.events.get(), 120)
        assert not isinstance(ev, BaseException), ev
        ids.extend(ev.token_ids)
        if ev.finish_reason is not None:
            return ids


def run_with(engine, body, **kw):
    async def main():
        sched = Scheduler(engine, metrics=ServerMetrics(), **kw)
        sched.start()
        try:
            return sched, await body(sched)
        finally:
            sched.stop(drain=False, timeout=30)

    return asyncio.run(main())


def expected(engine, prompt: str, max_new: int) -> list[int]:
    return engine.generate(prompt, max_new_tokens=max_new, ignore_eos=True).token_ids


def test_page_pressure_preempts_and_recomputes_without_changing_outputs(engine) -> None:
    """64 tokens of KV for six requests of 20-49 tokens each: most of them cannot run
    together, the newest are preempted and recomputed, and every greedy output is still
    exactly what engine.generate gives for the prompt alone."""
    lengths = [30, 24, 36, 18, 28, 33]

    async def body(sched):
        reqs = [sched.submit([spec(engine, p, n)]) for p, n in zip(PROMPTS, lengths, strict=True)]
        return [await drain(r) for r in reqs]

    share = KvShare(min_kv_tokens=64, max_kv_tokens=64, page_tokens=4)
    sched, got = run_with(engine, body, max_batch=6, max_context=96, kv_share=share)
    for p, n, ids in zip(PROMPTS, lengths, got, strict=True):
        assert ids == expected(engine, p, n), p
    stats = sched.kv_stats()
    assert stats["preemptions"] > 0, stats
    assert stats["pages_used"] == 0 and stats["kv_bytes"] == 0, stats
    metrics = sched.metrics.render().decode()
    assert "dynaexq_kv_preemptions_total" in metrics


def test_shared_prompt_prefix_pages_are_reused(engine) -> None:
    system = "int main(void) { return 0; }\n" * 3
    prompts = [system + "The quick", system + "a + b", system + "experts route"]

    async def body(sched):
        first = sched.submit([SequenceSpec(tuple(engine.encode(prompts[0])), 40, stream_text=True)])
        # Once the first prompt is decoding, its pages are published: the others share them.
        ev = await asyncio.wait_for(first.events.get(), 120)
        assert not isinstance(ev, BaseException), ev
        rest = [sched.submit([spec(engine, p, 8)]) for p in prompts[1:]]
        out = [ev.token_ids + await drain(first)]
        return out + [await drain(r) for r in rest]

    share = KvShare(min_kv_tokens=512, max_kv_tokens=512, page_tokens=4)
    sched, got = run_with(engine, body, max_batch=4, max_context=192, kv_share=share)
    for p, n, ids in zip(prompts, [40, 8, 8], got, strict=True):
        want = expected(engine, p, n)
        # Shared pages were computed in another batch: equal up to float rounding, so
        # compare the tokens, which a rounding-level difference does not flip here.
        assert ids == want, p
    assert sched.kv_stats()["prefix_hit_pages"] > 0


def test_requests_larger_than_the_kv_bounds_are_refused(engine) -> None:
    share = KvShare(min_kv_tokens=16, max_kv_tokens=32, page_tokens=4)

    async def body(sched):
        with pytest.raises(ValueError, match="max-kv-tokens"):
            sched.submit([spec(engine, PROMPTS[0], 40)])
        return None

    run_with(engine, body, max_batch=2, max_context=96, kv_share=share)
    with pytest.raises(ValueError, match="max_kv_tokens"):
        KvShare(min_kv_tokens=64, max_kv_tokens=32)
