"""Streaming detokenizes incrementally: the scheduler decodes each new token once (no
whole-sequence decode per step), and the streamed pieces still add up to exactly what
`Tokenizer.decode` gives, multi-byte characters and stop strings included."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

pytest.importorskip("transformers")
pytestmark = pytest.mark.timeout(300)

import dynaexq  # noqa: E402
from dynaexq.model.testing import make_hf_model, save_checkpoint, train_tiny_tokenizer  # noqa: E402
from dynaexq.serve.detokenize import IncrementalDetokenizer, OffsetTracker  # noqa: E402
from dynaexq.serve.scheduler import Scheduler, SequenceSpec  # noqa: E402
from dynaexq.tokenizer import Tokenizer  # noqa: E402

TEXTS = ["caf\u00e9 \u2713 na\u00efve \u00fcber \u65e5\u672c ", "def f(x):\n    return x\n"] * 30


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Any:
    path = tmp_path_factory.mktemp("detok_model")
    train_tiny_tokenizer(path, TEXTS, vocab_size=300)
    save_checkpoint(make_hf_model(seed=7, vocab_size=Tokenizer(path).vocab_size), path)
    return dynaexq.load(path, dtype="float32", device="cpu")


def test_pieces_add_up_to_decode(engine: Any) -> None:
    tok = engine.tokenizer
    # the emoji: bytes the tokenizer never saw together, so several tokens make one character
    text = "caf\u00e9 \u2713 \u65e5\u672c \U0001f642 def f(x):\n    return x"
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok)
    pieces = [detok.step(t) for t in ids]
    assert "".join(pieces) == tok.decode(ids) == detok.text == text
    assert "" in pieces  # some token only started a multi-byte character
    offsets = OffsetTracker(tok).offsets(ids)
    assert offsets[0] == 0 and offsets == sorted(offsets)
    for off, t in zip(offsets, ids, strict=True):
        piece = tok.decode([t])
        if "\ufffd" not in piece:
            assert text[off:].startswith(piece)


def test_streaming_decodes_each_token_once(engine: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    tok = engine.tokenizer
    prompts = ["caf\u00e9", "\u65e5", "def f(x):"]
    n = 40
    want = [engine.generate(p, max_new_tokens=n, ignore_eos=True) for p in prompts]
    calls = {"decode": 0}
    decode = tok.decode

    def counting(ids: list[int], *a: Any, **kw: Any) -> str:
        calls["decode"] += 1
        return decode(ids, *a, **kw)

    monkeypatch.setattr(tok, "decode", counting)

    async def main() -> list[str]:
        sched = Scheduler(engine, max_batch=4, max_context=128)
        sched.start()
        try:
            reqs = [
                sched.submit([SequenceSpec(tuple(tok.encode(p)), n, stream_text=True)])
                for p in prompts
            ]
            out = []
            for r in reqs:
                text, pieces = "", 0
                while True:
                    ev = await asyncio.wait_for(r.events.get(), 60)
                    assert not isinstance(ev, BaseException)
                    text += ev.text
                    pieces += bool(ev.text)
                    if ev.finish_reason is not None:
                        break
                assert pieces > 5  # streamed piece by piece
                out.append(text)
            return out
        finally:
            sched.stop(drain=False, timeout=30)

    got = asyncio.run(main())
    assert got == [w.text for w in want]
    # one whole decode per sequence (at its end), none per step
    assert calls["decode"] <= len(prompts)


def test_stop_strings_found_across_pieces(engine: Any) -> None:
    tok = engine.tokenizer
    prompt = tok.encode("def f(x):")
    full = engine.generate([prompt], max_new_tokens=30, ignore_eos=True)[0].text
    stop = full[7:10]  # a stop string that spans several tokens, mid-generation
    want = engine.generate([prompt], max_new_tokens=30, ignore_eos=True, stop=[stop])[0].text

    async def main() -> tuple[str, str | None]:
        sched = Scheduler(engine, max_batch=2, max_context=128)
        sched.start()
        try:
            spec = SequenceSpec(tuple(prompt), 30, stop=(stop,), stream_text=True)
            r = sched.submit([spec])
            text = ""
            while True:
                ev = await asyncio.wait_for(r.events.get(), 60)
                assert not isinstance(ev, BaseException)
                text += ev.text
                if ev.finish_reason is not None:
                    return text, ev.finish_reason
        finally:
            sched.stop(drain=False, timeout=30)

    text, reason = asyncio.run(main())
    assert (text, reason) == (want, "stop") and stop not in text
