"""Serving Qwen3-Next: the continuous-batching scheduler (sequences joining and leaving
the batch, prompts prefilled in chunks, rows compacted) produces exactly what
`engine.generate` produces for each prompt alone, at full precision and under a budget;
`dynaexq serve` answers the OpenAI client with it."""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("transformers")
openai = pytest.importorskip("openai")

import dynaexq  # noqa: E402
from dynaexq.model.testing import make_hf_model, save_checkpoint, train_tiny_tokenizer  # noqa: E402
from dynaexq.serve.metrics import ServerMetrics  # noqa: E402
from dynaexq.serve.scheduler import GenerationRequest, Scheduler, SequenceSpec  # noqa: E402
from dynaexq.tokenizer import Tokenizer  # noqa: E402

pytestmark = pytest.mark.timeout(300)

TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog. ",
    "int main(void) { return 0; }\n",
    "Linear attention keeps a state of fixed size per sequence. ",
] * 20
PROMPTS = [
    "The quick",
    "def add(a, b):\n    return",
    "L",
    "int main(void) { return 0; }\nint main(void) {",
    "a state of fixed",
    "a + b",
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("next_serve")
    train_tiny_tokenizer(path, TEXTS, vocab_size=200)
    vocab = Tokenizer(path).vocab_size
    save_checkpoint(make_hf_model(seed=21, architecture="qwen3_next", vocab_size=vocab), path)
    return path


@pytest.fixture(scope="module")
def engine(model_dir: Path) -> Any:
    return dynaexq.load(model_dir, dtype="float32", device="cpu")


def spec(engine: Any, prompt: str, max_new: int) -> SequenceSpec:
    return SequenceSpec(tuple(engine.encode(prompt)), max_new, eos_ids=frozenset())


async def drain(req: GenerationRequest) -> list[int]:
    ids: list[int] = []
    while True:
        ev = await asyncio.wait_for(req.events.get(), 60)
        assert not isinstance(ev, BaseException), ev
        ids.extend(ev.token_ids)
        if ev.finish_reason is not None:
            return ids


def schedule(engine: Any, lengths: list[int], **kw: Any) -> list[list[int]]:
    """Submit every prompt at once (more than the rows: they queue and join as others
    leave) and collect each one's tokens."""

    async def main() -> list[list[int]]:
        sched = Scheduler(engine, metrics=ServerMetrics(), **kw)
        sched.start()
        try:
            reqs = [
                sched.submit([spec(engine, p, n)]) for p, n in zip(PROMPTS, lengths, strict=True)
            ]
            return [await drain(r) for r in reqs]
        finally:
            sched.stop(drain=False, timeout=30)

    return asyncio.run(main())


def expected(engine: Any, prompt: str, max_new: int) -> list[int]:
    return engine.generate(prompt, max_new_tokens=max_new, ignore_eos=True).token_ids


def test_scheduler_rows_join_leave_and_prefill_in_chunks(engine: Any) -> None:
    lengths = [3, 17, 9, 1, 12, 6]
    got = schedule(engine, lengths, max_batch=3, max_prefill_tokens=4, max_context=96)
    for p, n, ids in zip(PROMPTS, lengths, got, strict=True):
        assert ids == expected(engine, p, n), p


def test_scheduler_under_a_budget(model_dir: Path) -> None:
    """static-map inside a budget: nothing moves, so batching must not change any token."""
    engine = dynaexq.load(
        model_dir, budget="30%", policy="static-map", calibration=["".join(TEXTS)]
    )
    lengths = [5, 11, 2, 8, 4, 7]
    got = schedule(engine, lengths, max_batch=2, max_prefill_tokens=5, max_context=64)
    for p, n, ids in zip(PROMPTS, lengths, got, strict=True):
        assert ids == expected(engine, p, n), p


def test_dynaexq_serve_answers_with_qwen3_next(model_dir: Path, engine: Any, tmp_path: Path):
    log = tmp_path / "server.log"
    cmd = [
        sys.executable, "-m", "dynaexq.cli", "serve", "--model", str(model_dir),
        "--served-model-name", "tiny-next", "--host", "127.0.0.1", "--port", "0",
        "--dtype", "float32", "--device", "cpu", "--max-batch", "2", "--max-context", "64",
        "--log-level", "warning",
    ]  # fmt: skip
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
    try:
        deadline, port = time.monotonic() + 120, None
        while port is None and time.monotonic() < deadline and proc.poll() is None:
            m = re.search(r"on http://127\.0\.0\.1:(\d+)/v1", log.read_text())
            port = int(m.group(1)) if m else None
            time.sleep(0.2)
        assert port is not None, log.read_text()
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="-", max_retries=3, timeout=60
        )
        lengths = [9, 4, 12, 6]

        def one(i: int) -> str:
            r = client.completions.create(
                model="tiny-next", prompt=PROMPTS[i], max_tokens=lengths[i], temperature=0
            )
            return r.choices[0].text

        with ThreadPoolExecutor(4) as pool:  # four requests over two rows
            texts = list(pool.map(one, range(4)))
        for i, text in enumerate(texts):
            assert text == engine.generate(PROMPTS[i], max_new_tokens=lengths[i]).text
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
