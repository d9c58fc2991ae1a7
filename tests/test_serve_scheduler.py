"""The continuous-batching scheduler, in process: sequences that join and leave a running
batch (and prompts prefilled in chunks) produce exactly what `engine.generate` produces for
each prompt alone."""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("transformers")
pytestmark = pytest.mark.timeout(300)

import dynaexq  # noqa: E402
from dynaexq.model.testing import make_hf_model, save_checkpoint, train_tiny_tokenizer  # noqa: E402
from dynaexq.serve.metrics import ServerMetrics  # noqa: E402
from dynaexq.serve.scheduler import (  # noqa: E402
    GenerationRequest,
    QueueFullError,
    Scheduler,
    SequenceSpec,
    ShuttingDownError,
)
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
    path = tmp_path_factory.mktemp("sched_model")
    train_tiny_tokenizer(path, TEXTS, vocab_size=200)
    save_checkpoint(make_hf_model(seed=3, vocab_size=Tokenizer(path).vocab_size), path)
    return dynaexq.load(path, dtype="float32", device="cpu")


def spec(engine, prompt: str, max_new: int, **kw) -> SequenceSpec:
    kw.setdefault("eos_ids", frozenset(engine.eos_token_ids))
    return SequenceSpec(tuple(engine.encode(prompt)), max_new, **kw)


async def drain(req: GenerationRequest) -> dict[int, tuple[list[int], str, str]]:
    """index -> (token ids, text, finish reason) once every sequence has finished."""
    out: dict[int, tuple[list[int], str, str]] = {}
    ids: dict[int, list[int]] = {}
    text: dict[int, str] = {}
    while len(out) < len(req.specs):
        ev = await asyncio.wait_for(req.events.get(), 60)
        assert not isinstance(ev, BaseException), ev
        ids.setdefault(ev.index, []).extend(ev.token_ids)
        text[ev.index] = text.get(ev.index, "") + ev.text
        if ev.finish_reason is not None:
            out[ev.index] = (ids[ev.index], text[ev.index], ev.finish_reason)
    return out


def run_with(engine, body, **kw):
    async def main():
        sched = Scheduler(engine, metrics=ServerMetrics(), **kw)
        sched.start()
        try:
            return await body(sched)
        finally:
            sched.stop(drain=False, timeout=30)

    return asyncio.run(main())


def expected(engine, prompt: str, max_new: int, **kw):
    r = engine.generate(prompt, max_new_tokens=max_new, **kw)
    return r.token_ids, r.text, "length" if r.finish_reason == "length" else "stop"


def test_queued_requests_join_as_others_leave(engine) -> None:
    """More requests than rows: they queue, join when rows free up, and stay exact."""
    lengths = [3, 17, 9, 1, 12, 6]

    async def body(sched):
        reqs = [
            sched.submit([spec(engine, p, n, stream_text=i % 2 == 0)])
            for i, (p, n) in enumerate(zip(PROMPTS, lengths, strict=True))
        ]
        return [await drain(r) for r in reqs]

    results = run_with(engine, body, max_batch=3, max_context=96)
    for p, n, got in zip(PROMPTS, lengths, results, strict=True):
        assert got[0] == expected(engine, p, n), p


def test_join_mid_decode_and_chunked_prefill(engine) -> None:
    """New prompts are prefilled in 4-token chunks between decode steps of a running one."""

    async def body(sched):
        first = sched.submit([spec(engine, PROMPTS[1], 30, eos_ids=frozenset(), stream_text=True)])
        # wait until the first sequence is decoding, then add two more
        got_tokens = 0
        events = []
        while got_tokens < 5:
            ev = await asyncio.wait_for(first.events.get(), 60)
            events.append(ev)
            got_tokens += len(ev.token_ids)
        later = [
            sched.submit([spec(engine, PROMPTS[3], 11, eos_ids=frozenset())]),
            sched.submit([spec(engine, PROMPTS[0], 7, eos_ids=frozenset(), stream_text=True)]),
        ]
        rest = await drain(first)
        ids = [t for ev in events for t in ev.token_ids] + rest[0][0]
        return ids, [await drain(r) for r in later]

    first_ids, later = run_with(engine, body, max_batch=4, max_prefill_tokens=4, max_context=96)
    assert first_ids == expected(engine, PROMPTS[1], 30, ignore_eos=True)[0]
    assert later[0][0] == expected(engine, PROMPTS[3], 11, ignore_eos=True)
    assert later[1][0] == expected(engine, PROMPTS[0], 7, ignore_eos=True)


def test_seeded_sampling_and_stop_strings_match_generate(engine) -> None:
    kw = dict(temperature=0.8, top_p=0.9, top_k=20)

    async def body(sched):
        a = sched.submit(
            [spec(engine, PROMPTS[0], 20, seed=7 + j, eos_ids=frozenset(), **kw) for j in range(2)]
        )
        b = sched.submit([spec(engine, PROMPTS[2], 40, stop=("e", "x"), stream_text=True)])
        return await drain(a), await drain(b)

    sampled, stopped = run_with(engine, body, max_batch=4, max_context=96)
    for j in range(2):
        want = engine.generate(PROMPTS[0], max_new_tokens=20, seed=7 + j, ignore_eos=True, **kw)
        assert sampled[j][0] == want.token_ids
    want = engine.generate(PROMPTS[2], max_new_tokens=40, stop=["e", "x"])
    assert stopped[0][1] == want.text and stopped[0][0] == want.token_ids


def test_cancel_frees_rows_queue_limit_and_shutdown(engine) -> None:
    async def body(sched):
        long = sched.submit([spec(engine, PROMPTS[0], 80, eos_ids=frozenset(), stream_text=True)])
        await asyncio.wait_for(long.events.get(), 60)
        queued = sched.submit([spec(engine, PROMPTS[2], 5, eos_ids=frozenset())])
        with pytest.raises(QueueFullError):
            sched.submit([spec(engine, PROMPTS[2], 5)])
        long.cancel()
        out = await drain(queued)  # runs once the cancelled sequence's row is free
        for _ in range(200):
            if sched.running == 0:
                break
            await asyncio.sleep(0.01)
        running = sched.running
        sched.stop(drain=True, timeout=30)
        with pytest.raises(ShuttingDownError):
            sched.submit([spec(engine, PROMPTS[2], 5)])
        return out, running

    out, running = run_with(engine, body, max_batch=1, max_queue=1, max_context=96)
    assert running == 0
    assert out[0][0] == expected(engine, PROMPTS[2], 5, ignore_eos=True)[0]


def test_bad_specs_are_refused(engine) -> None:
    async def body(sched):
        for bad in (
            [],
            [spec(engine, "The", 90)],  # does not fit max_context=64
            [spec(engine, "The", 1)] * 5,  # more sequences than rows
        ):
            with pytest.raises(ValueError):
                sched.submit(bad)
        return sched.running

    assert run_with(engine, body, max_batch=4, max_context=64) == 0


def test_a_failing_step_fails_its_requests_and_the_worker_goes_on(engine) -> None:
    """A model step that raises ends the requests in the batch with an error; the worker
    survives and later requests are served exactly."""
    from types import SimpleNamespace

    from dynaexq.serve.scheduler import GenerationError

    class FailOnce:
        def __init__(self, model) -> None:
            self.model, self.failed = model, False

        def __call__(self, *args, **kw):
            if not self.failed:
                self.failed = True
                raise RuntimeError("injected failure")
            return self.model(*args, **kw)

        def __getattr__(self, name: str):  # allocate_cache & co. of the real model
            return getattr(self.model, name)

    flaky = SimpleNamespace(
        config=engine.config,
        dtype=engine.dtype,
        device=engine.device,
        tokenizer=engine.tokenizer,
        model=FailOnce(engine.model),
    )

    async def body(sched):
        first = sched.submit([spec(engine, PROMPTS[0], 5)])
        err = await asyncio.wait_for(first.events.get(), 60)
        second = sched.submit([spec(engine, PROMPTS[2], 6, eos_ids=frozenset())])
        return err, await drain(second), sched.alive

    err, out, alive = run_with(flaky, body, max_batch=2, max_context=64)
    assert isinstance(err, GenerationError) and "injected failure" in str(err)
    assert alive and out[0] == expected(engine, PROMPTS[2], 6, ignore_eos=True)


def test_rows_leave_while_others_are_mid_prefill(engine) -> None:
    """3-token prefill chunks: a short sequence finishes (and a request is cancelled) while
    long prompts are still being prefilled; their rows shift down and stay exact."""
    long_a = PROMPTS[3] + " " + PROMPTS[1]
    long_b = PROMPTS[1] + " " + PROMPTS[4]

    async def body(sched):
        short = sched.submit([spec(engine, "M", 2, eos_ids=frozenset())])
        cancelled = sched.submit([spec(engine, long_b, 9, eos_ids=frozenset())])
        a = sched.submit([spec(engine, long_a, 7, eos_ids=frozenset(), stream_text=True)])
        b = sched.submit([spec(engine, long_b, 5, eos_ids=frozenset())])
        cancelled.cancel()
        return await drain(short), await drain(a), await drain(b)

    short, a, b = run_with(engine, body, max_batch=4, max_prefill_tokens=3, max_context=96)
    assert short[0] == expected(engine, "M", 2, ignore_eos=True)
    assert a[0] == expected(engine, long_a, 7, ignore_eos=True)
    assert b[0] == expected(engine, long_b, 5, ignore_eos=True)
