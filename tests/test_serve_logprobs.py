"""Log-probabilities through `dynaexq serve` with the official `openai` client: completions
`logprobs` + `echo` (prompt log-probabilities equal those of `engine.forward`), chat
`logprobs` + `top_logprobs`, streaming and not; the tokenizer endpoints lm-eval uses;
neutral client fields accepted while a misspelt field is still a 400."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("transformers")
openai = pytest.importorskip("openai")
torch = pytest.importorskip("torch")

import dynaexq  # noqa: E402
from dynaexq.generation import filter_logits  # noqa: E402
from dynaexq.model.testing import make_hf_model, save_checkpoint, train_tiny_tokenizer  # noqa: E402
from dynaexq.tokenizer import Tokenizer  # noqa: E402
from test_serve import MODEL, Server, chat_expected, start_server, stop_server  # noqa: E402

pytestmark = pytest.mark.timeout(300)

TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog. ",
    "Mixture-of-experts models route each token to a few experts. ",
    "caf\u00e9 na\u00efve \u2713 ",
] * 20
ATOL = 2e-4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("logprob_model")
    train_tiny_tokenizer(path, TEXTS, vocab_size=220)
    save_checkpoint(make_hf_model(seed=9, vocab_size=Tokenizer(path).vocab_size), path)
    return path


@pytest.fixture(scope="module")
def engine(model_dir: Path) -> Any:
    return dynaexq.load(model_dir, dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(model_dir, tmp_path_factory.mktemp("log") / "server.log")
    yield srv
    stop_server(srv)
    assert srv.proc.returncode == 0, srv.log.read_text()


def forward_logprobs(engine: Any, ids: list[int]) -> Any:
    """log-softmax of engine.forward: row j is the distribution of token j + 1."""
    return torch.log_softmax(engine.forward([ids])[0], dim=-1)


def token_text(engine: Any, t: int) -> str:
    return engine.tokenizer.decode([t], skip_special_tokens=False)


def test_echo_prompt_logprobs_equal_engine_forward(server: Server, engine: Any) -> None:
    client = server.client()
    prompt = "The quick brown fox caf\u00e9"
    ids = engine.tokenizer.encode(prompt)
    r = client.completions.create(
        model=MODEL, prompt=prompt, echo=True, logprobs=3, max_tokens=0, temperature=0
    )
    choice = r.choices[0]
    assert choice.text == prompt and choice.finish_reason == "length"
    assert r.usage.completion_tokens == 0 and r.usage.prompt_tokens == len(ids)
    lp = choice.logprobs
    assert lp.tokens == [token_text(engine, t) for t in ids]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    want = forward_logprobs(engine, ids)
    for j in range(1, len(ids)):
        assert lp.token_logprobs[j] == pytest.approx(float(want[j - 1, ids[j]]), abs=ATOL)
        top = torch.topk(want[j - 1], 3)
        # the 3 most likely and the chosen token, by text (texts shared by several ids,
        # such as the halves of a multi-byte character, keep the highest value)
        expect: dict[str, float] = {}
        pairs = [(ids[j], float(want[j - 1, ids[j]]))]
        pairs += [(int(i), float(v)) for v, i in zip(*top, strict=True)]
        for t, v in pairs:
            key = token_text(engine, t)
            expect[key] = max(expect.get(key, -math.inf), v)
        assert set(lp.top_logprobs[j]) == set(expect)
        for key, value in expect.items():
            assert lp.top_logprobs[j][key] == pytest.approx(value, abs=ATOL)
    # offsets: where each token's text begins in the prompt (the multi-byte é at the end
    # is two tokens sharing an offset, or one)
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    for off, tok in zip(lp.text_offset, lp.tokens, strict=True):
        if "\ufffd" not in tok:
            assert prompt[off:].startswith(tok)


def test_lm_eval_style_batch_of_token_prompts(server: Server, engine: Any) -> None:
    """What lm-eval's local-completions sends: token-id prompts, echo, logprobs 1, one
    generated token (greedy): the prompt's scores plus that token's."""
    client = server.client()
    a = engine.tokenizer.encode("def add(a, b):")
    b = engine.tokenizer.encode("The lazy dog")
    r = client.completions.create(
        model=MODEL, prompt=[a, b], echo=True, logprobs=1, max_tokens=1, temperature=0, seed=1234
    )
    assert [c.index for c in r.choices] == [0, 1]
    for ids, choice in zip([a, b], r.choices, strict=True):
        lp = choice.logprobs
        assert len(lp.token_logprobs) == len(ids) + 1
        want = forward_logprobs(engine, ids)
        for j in range(1, len(ids)):
            assert lp.token_logprobs[j] == pytest.approx(float(want[j - 1, ids[j]]), abs=ATOL)
            # lm-eval's greediness check: the token is the argmax iff its value is the max
            greedy = int(want[j - 1].argmax()) == ids[j]
            assert (lp.token_logprobs[j] >= max(lp.top_logprobs[j].values()) - 1e-6) == greedy
        # the generated token is the argmax and carries its log-probability
        assert lp.token_logprobs[-1] == pytest.approx(float(want[-1].max()), abs=ATOL)
        assert choice.text.startswith(engine.tokenizer.decode(ids, skip_special_tokens=False))


def test_generated_logprobs_are_those_sampled_from(server: Server, engine: Any) -> None:
    client = server.client()
    ids = engine.tokenizer.encode("experts route")
    # greedy: the model's own distribution, the chosen token its most likely
    r = client.completions.create(
        model=MODEL,
        prompt=ids,
        logprobs=2,
        max_tokens=6,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    lp = r.choices[0].logprobs
    gen = engine.generate([ids], max_new_tokens=6, ignore_eos=True)[0].token_ids
    assert lp.tokens == [token_text(engine, t) for t in gen]
    want = forward_logprobs(engine, ids + gen)
    for j, t in enumerate(gen):
        row = want[len(ids) - 1 + j]
        assert lp.token_logprobs[j] == pytest.approx(float(row[t]), abs=ATOL)
        assert lp.token_logprobs[j] == pytest.approx(float(row.max()), abs=ATOL)
    prompt_len = len(engine.tokenizer.decode(ids, skip_special_tokens=False))
    assert lp.text_offset[0] == prompt_len  # offsets into prompt + completion
    # sampling with top_k 4 at temperature 0.7: log-probabilities of that distribution,
    # so at most 4 alternatives exist (asked for 10)
    r = client.completions.create(
        model=MODEL, prompt=ids, logprobs=10, max_tokens=5, temperature=0.7, seed=3,
        extra_body={"top_k": 4, "ignore_eos": True},
    )  # fmt: skip
    lp = r.choices[0].logprobs
    want_ids = engine.generate(
        [ids], max_new_tokens=5, temperature=0.7, top_k=4, seed=3, ignore_eos=True
    )[0].token_ids
    assert lp.tokens == [token_text(engine, t) for t in want_ids]
    full = engine.forward([ids + want_ids])[0]
    for j, t in enumerate(want_ids):
        dist = torch.log_softmax(
            filter_logits(full[len(ids) - 1 + j : len(ids) + j] / 0.7, 4, 1.0), -1
        )[0]
        assert lp.token_logprobs[j] == pytest.approx(float(dist[t]), abs=ATOL)
        # only the 4 tokens the sample was drawn among are listed (10 were asked for)
        expect: dict[str, float] = {}
        for i in torch.nonzero(torch.isfinite(dist))[:, 0].tolist():
            key = token_text(engine, i)
            expect[key] = max(expect.get(key, -math.inf), float(dist[i]))
        top = lp.top_logprobs[j]
        assert set(top) == set(expect) and len(top) <= 4
        for key, value in expect.items():
            assert top[key] == pytest.approx(value, abs=ATOL)


def test_streamed_logprobs_equal_the_whole_response(server: Server) -> None:
    client = server.client()
    kw = dict(model=MODEL, prompt="The quick", echo=True, logprobs=2, max_tokens=8, temperature=0)
    whole = client.completions.create(**kw).choices[0]
    text, tokens, values, offsets = "", [], [], []
    for chunk in client.completions.create(stream=True, **kw):
        for c in chunk.choices:
            text += c.text
            if c.logprobs is not None:
                tokens += c.logprobs.tokens
                values += c.logprobs.token_logprobs
                offsets += c.logprobs.text_offset
    assert text == whole.text
    assert tokens == whole.logprobs.tokens and offsets == whole.logprobs.text_offset
    assert values == whole.logprobs.token_logprobs


def test_chat_logprobs_stream_and_not(server: Server, engine: Any) -> None:
    client = server.client()
    msgs = [{"role": "user", "content": "The quick brown"}]
    want_text, _ = chat_expected(engine, "The quick brown", 10)
    kw = dict(model=MODEL, messages=msgs, max_tokens=10, temperature=0, logprobs=True)
    r = client.chat.completions.create(top_logprobs=2, **kw)
    assert r.choices[0].message.content == want_text
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    prompt = engine.tokenizer.apply_chat_template(msgs)
    ids = engine.tokenizer.encode(prompt, add_special_tokens=False)
    gen = engine.generate("The quick brown", max_new_tokens=10, chat=True).token_ids
    gen = gen[: len(content)]  # the server ends the turn at <|im_end|>
    assert [c.token for c in content] == [token_text(engine, t) for t in gen]
    want = forward_logprobs(engine, ids + gen)
    for j, c in enumerate(content):
        assert c.logprob == pytest.approx(float(want[len(ids) - 1 + j].max()), abs=ATOL)
        assert len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob == pytest.approx(c.logprob)
        assert c.bytes == list(c.token.encode())
    streamed = []
    for chunk in client.chat.completions.create(stream=True, **kw):
        for ch in chunk.choices:
            if ch.logprobs is not None:
                streamed += ch.logprobs.content
    assert [(c.token, c.logprob) for c in streamed] == [(c.token, c.logprob) for c in content]
    assert all(c.top_logprobs == [] for c in streamed)  # top_logprobs unset: none listed


def test_logprob_and_echo_bounds(server: Server) -> None:
    for body in (
        {"model": MODEL, "prompt": "a", "logprobs": 21},
        {"model": MODEL, "prompt": "a", "max_tokens": 0},  # 0 only with echo
        {"model": MODEL, "prompt": "a", "echo": "yes"},
        {"model": MODEL, "messages": [{"role": "user", "content": "a"}], "top_logprobs": 2},
        {"model": MODEL, "messages": [{"role": "user", "content": "a"}], "logprobs": 1},
    ):
        status, _, data = server.request(
            "POST", "/v1/completions" if "prompt" in body else "/v1/chat/completions", body
        )
        assert status == 400, (body, data)
    status, _, data = server.request(
        "POST", "/v1/completions", {"model": MODEL, "prompt": "ab", "echo": True, "max_tokens": 0}
    )
    assert status == 200 and data["choices"][0]["text"] == "ab", data


def test_tokenizer_endpoints(server: Server, engine: Any) -> None:
    status, _, info = server.request("GET", "/tokenizer_info")
    assert status == 200 and info["eos_token"] == "<|endoftext|>"
    assert info["chat_template"] == engine.tokenizer.chat_template
    text = "def add(a, b):"
    status, _, tok = server.request(
        "POST", "/tokenize", {"prompt": text, "add_special_tokens": False}
    )
    assert status == 200 and tok["tokens"] == engine.tokenizer.encode(text, False)
    assert tok["count"] == len(tok["tokens"]) and tok["max_model_len"] == 64
    status, _, detok = server.request("POST", "/detokenize", {"tokens": tok["tokens"]})
    assert status == 200 and detok["prompt"] == text
    status, _, err = server.request("POST", "/detokenize", {"tokens": [10**6]})
    assert status == 400 and err["error"]["param"] == "tokens"


def test_neutral_client_fields_are_accepted_and_typos_refused(server: Server) -> None:
    client = server.client()
    neutral = {
        "user": "u-1",
        "metadata": {"run": "7"},
        "store": False,
        "service_tier": "auto",
        "prompt_cache_key": "k",
        "safety_identifier": "s",
    }
    msgs = [{"role": "user", "content": "hi"}]
    r = client.chat.completions.create(
        model=MODEL, messages=msgs, max_tokens=3, parallel_tool_calls=True,
        response_format={"type": "text"}, extra_body={**neutral, "modalities": ["text"]},
    )  # fmt: skip
    assert r.choices[0].message.role == "assistant"
    r = client.completions.create(
        model=MODEL,
        prompt="a",
        max_tokens=2,
        extra_body={**neutral, "response_format": {"type": "text"}},
    )
    assert r.choices[0].finish_reason in ("stop", "length")
    # lm-eval's completions client sends a task's stop strings plus EOS: often more than 4
    stops = ["\nclass", "\ndef", "\n#", "\nif", "\nprint", "<|endoftext|>"]
    r = client.completions.create(model=MODEL, prompt="def", max_tokens=3, stop=stops)
    assert r.choices[0].finish_reason in ("stop", "length")
    for path, body in [
        ("/v1/chat/completions", {"model": MODEL, "messages": msgs, "servce_tier": "auto"}),
        ("/v1/completions", {"model": MODEL, "prompt": "a", "metdata": {}}),
        (
            "/v1/chat/completions",
            {"model": MODEL, "messages": msgs, "response_format": {"type": "yaml"}},
        ),
    ]:
        status, _, data = server.request("POST", path, body)
        assert status == 400, data
    status, _, data = server.request(
        "POST", "/v1/chat/completions", {"model": MODEL, "messages": msgs, "servce_tier": "auto"}
    )
    assert data["error"]["message"] == "unknown field: servce_tier"


def test_prompt_scores_across_prefill_chunks(engine: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """In process: a prompt prefilled in 5-token chunks beside other rows, scored 3
    positions at a time, has the scores of one engine.forward over it."""
    import asyncio

    from dynaexq.serve import scheduler as sched_mod

    monkeypatch.setattr(sched_mod, "PROMPT_SCORE_ROWS", 3)
    ids = engine.tokenizer.encode("The quick brown fox jumps over the lazy dog. def add(a, b):")
    other = engine.tokenizer.encode("experts route")

    async def main() -> Any:
        s = sched_mod.Scheduler(engine, max_batch=3, max_context=64, max_prefill_tokens=5)
        s.start()
        try:
            reqs = [
                s.submit([sched_mod.SequenceSpec(tuple(other), 4)]),
                s.submit([sched_mod.SequenceSpec(tuple(ids), 0, prompt_logprobs=2)]),
                s.submit([sched_mod.SequenceSpec(tuple(ids), 2, prompt_logprobs=0, logprobs=1)]),
            ]
            out = []
            for r in reqs:
                events = []
                while not events or events[-1].finish_reason is None:
                    ev = await asyncio.wait_for(r.events.get(), 60)
                    assert not isinstance(ev, BaseException), ev
                    events.append(ev)
                out.append(events)
            return out
        finally:
            s.stop(drain=False, timeout=30)

    _, scored, both = asyncio.run(main())
    assert len(ids) > 15  # several chunks
    want = forward_logprobs(engine, ids)
    (ev,) = scored
    assert ev.token_ids == [] and ev.finish_reason == "length"
    lp = ev.prompt_logprobs
    assert len(lp) == len(ids) and lp[0] is None
    for j in range(1, len(ids)):
        assert lp[j].token_id == ids[j]
        assert lp[j].logprob == pytest.approx(float(want[j - 1, ids[j]]), abs=ATOL)
        top = torch.topk(want[j - 1], 2)
        assert [t for t, _ in lp[j].top] == top.indices.tolist()
    # with generation: the prompt's scores come with the first event, no alternatives
    first = both[0].prompt_logprobs
    assert [e.logprob for e in first[1:]] == pytest.approx([e.logprob for e in lp[1:]], abs=ATOL)
    assert all(e.top == () for e in first[1:])
    gen = [t for ev in both for t in ev.token_ids]
    assert len(gen) == 2 and sum(len(ev.logprobs or []) for ev in both) == 2
