"""Tools, reasoning and structured output through `dynaexq serve`.

- The Hermes / Qwen3 output parser on model outputs this test supplies, whole and streamed
  in every split, gives the same reasoning, content and tool calls.
- A checkpoint with a Qwen3-format chat template: tools and `enable_thinking` reach the
  template; a named / required `tool_choice` forces a call whose arguments follow the
  tool's schema (constrained decoding), returned as `tool_calls` with finish_reason
  "tool_calls", streaming and not; a thinking template's output comes back as
  `reasoning_content`.
- `response_format` json_schema / json_object: the outputs parse and validate.
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("transformers")
openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("xgrammar")

import dynaexq  # noqa: E402
from dynaexq.model.testing import make_hf_model, save_checkpoint, train_tiny_tokenizer  # noqa: E402
from dynaexq.serve.chat import render_chat  # noqa: E402
from dynaexq.serve.parsers import ChatOutputParser  # noqa: E402
from dynaexq.tokenizer import Tokenizer  # noqa: E402
from test_serve import MODEL, Server, start_server, stop_server  # noqa: E402

pytestmark = pytest.mark.timeout(300)

# A chat template in Qwen3's format (written for this test): tools listed as JSON inside
# <tools></tools> in the system turn, calls as <tool_call> blocks, tool results as
# <tool_response> user turns, reasoning as <think> blocks; enable_thinking=false closes an
# empty think block in the generation prompt. OPEN_THINK opens one instead (as Qwen3's
# thinking-only checkpoints do, whose output then starts inside the block).
QWEN3_TEMPLATE = """\
{%- if tools %}
{{- '<|im_start|>system\\n' }}
{%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}
{{- '# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n' }}
{{- 'You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}
{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}
{{- '\\n</tools>\\n\\nFor each function call, return a json object with function name and ' }}
{{- 'arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n' }}
{{- '{"name": <function-name>, "arguments": <args-json-object>}\\n</tool_call><|im_end|>\\n' }}
{%- elif messages[0].role == 'system' %}
{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- for message in messages %}
{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}
{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
{%- elif message.role == 'assistant' %}
{{- '<|im_start|>assistant\\n' }}
{%- if message.reasoning_content %}
{{- '<think>\\n' + message.reasoning_content + '\\n</think>\\n\\n' }}
{%- endif %}
{{- message.content }}
{%- for call in message.tool_calls or [] %}
{%- if call.function %}{%- set call = call.function %}{%- endif %}
{{- '\\n<tool_call>\\n{"name": "' + call.name + '", "arguments": ' }}
{%- if call.arguments is string %}{{- call.arguments }}
{%- else %}{{- call.arguments | tojson }}{%- endif %}
{{- '}\\n</tool_call>' }}
{%- endfor %}
{{- '<|im_end|>\\n' }}
{%- elif message.role == 'tool' %}
{{- '<|im_start|>user\\n<tool_response>\\n' + message.content }}
{{- '\\n</tool_response><|im_end|>\\n' }}
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
{{- '<|im_start|>assistant\\n' }}
{%- if enable_thinking is defined and enable_thinking is false %}
{{- '<think>\\n\\n</think>\\n\\n' }}
{%- elif OPEN_THINK %}
{{- '<think>\\n' }}
{%- endif %}
{%- endif %}"""

TEXTS = [
    'get_weather {"city": "Paris", "unit": "celsius"} <tool_call> </tool_call> ',
    "<think> The user asks about the weather. </think> It is sunny. ",
    '{"name": "Ada", "age": 36, "pet": "cat"} [1, 2, 3] true false null ',
] * 20
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 12},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
CLOCK = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"enum": ["UTC", "CET"]}},
            "required": ["zone"],
        },
    },
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 99},
        "pet": {"enum": ["cat", "dog"]},
    },
    "required": ["name", "age", "pet"],
    "additionalProperties": False,
}


# -- the parser on supplied outputs ------------------------------------------------------
def parse_whole(text: str, **kw: Any) -> tuple[str, str, list[tuple[str, str]]]:
    p = ChatOutputParser(**kw)
    a, b = p.feed(text), p.finish()
    calls = [(c.name, c.arguments) for c in a.tool_calls + b.tool_calls]
    return a.reasoning + b.reasoning, a.content + b.content, calls


def parse_pieces(pieces: list[str], **kw: Any) -> tuple[str, str, list[tuple[str, str]]]:
    p = ChatOutputParser(**kw)
    reasoning, content, calls = "", "", []
    for d in [*(p.feed(x) for x in pieces), p.finish()]:
        reasoning += d.reasoning
        content += d.content
        calls += [(c.name, c.arguments) for c in d.tool_calls]
    return reasoning, content, calls


CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
PARSER_CASES: list[tuple[str, dict[str, bool], tuple[str, str, list[tuple[str, str]]]]] = [
    (
        "<think>\nThe user wants a sum.\n</think>\n\nIt is 4.",
        {"reasoning": True, "tools": False},
        ("\nThe user wants a sum.\n", "It is 4.", []),
    ),
    ("It is 4.", {"reasoning": True, "tools": False}, ("", "It is 4.", [])),
    (
        "a <think>b</think> c",
        {"reasoning": False, "tools": False},
        ("", "a <think>b</think> c", []),
    ),
    (
        "thinking inside\n</think>\n\nanswer",
        {"reasoning": True, "tools": False, "in_reasoning": True},
        ("thinking inside\n", "answer", []),
    ),
    ("cut short", {"reasoning": True, "tools": False, "in_reasoning": True}, ("cut short", "", [])),
    (CALL, {"reasoning": True, "tools": True}, ("", "", [("get_weather", '{"city": "Paris"}')])),
    (
        "<think>\nweather needed\n</think>\n\nLet me check.\n"
        + CALL
        + "\n"
        + CALL.replace("Paris", "Rome"),
        {"reasoning": True, "tools": True},
        (
            "\nweather needed\n",
            "Let me check.",
            [("get_weather", '{"city": "Paris"}'), ("get_weather", '{"city": "Rome"}')],
        ),
    ),
    (
        '<tool_call>\n{"name": "f", "arguments": "{\\"x\\": 1}"}\n</tool_call>',
        {"reasoning": False, "tools": True},
        ("", "", [("f", '{"x": 1}')]),
    ),
    (
        "<tool_call>\nnot json\n</tool_call> after",
        {"reasoning": False, "tools": True},
        ("", "<tool_call>\nnot json\n</tool_call> after", []),
    ),
    (  # cut by the token limit after complete JSON: still a call
        '<tool_call>\n{"name": "f", "arguments": {}}',
        {"reasoning": False, "tools": True},
        ("", "", [("f", "{}")]),
    ),
    ("a < b <tool", {"reasoning": False, "tools": True}, ("", "a < b <tool", [])),
    (CALL, {"reasoning": False, "tools": False}, ("", CALL, [])),
]


@pytest.mark.parametrize(("text", "kw", "want"), PARSER_CASES)
def test_parser_whole_and_streamed_in_every_split(
    text: str, kw: dict[str, bool], want: tuple[str, str, list[tuple[str, str]]]
) -> None:
    assert parse_whole(text, **kw) == want
    for size in range(1, len(text) + 1):
        pieces = [text[i : i + size] for i in range(0, len(text), size)]
        assert parse_pieces(pieces, **kw) == want, size
    rng = random.Random(0)
    for _ in range(50):
        cuts = sorted(rng.sample(range(1, len(text)), min(4, len(text) - 1)))
        pieces = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        assert parse_pieces(pieces, **kw) == want, cuts


# -- a checkpoint with a Qwen3-format template -------------------------------------------
def make_checkpoint(path: Path, template: str | None) -> Path:
    # The tokenizer also learns the template's boilerplate, so that prompts with tools fit.
    boilerplate = QWEN3_TEMPLATE.replace("\\n", "\n")
    train_tiny_tokenizer(path, [*TEXTS, boilerplate * 5, json.dumps(WEATHER)], vocab_size=700)
    if template is not None:
        cfg = json.loads((path / "tokenizer_config.json").read_text())
        cfg["chat_template"] = template
        (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    model = make_hf_model(
        seed=4, vocab_size=Tokenizer(path).vocab_size, max_position_embeddings=1024
    )
    save_checkpoint(model, path)
    return path


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("qwen3"), QWEN3_TEMPLATE)


@pytest.fixture(scope="module")
def thinking_dir(qwen3_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("qwen3_thinking")
    for f in qwen3_dir.iterdir():
        shutil.copy(f, path / f.name)
    cfg = json.loads((path / "tokenizer_config.json").read_text())
    cfg["chat_template"] = QWEN3_TEMPLATE.replace("elif OPEN_THINK", "else")
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    return path


@pytest.fixture(scope="module")
def engine(qwen3_dir: Path) -> Any:
    return dynaexq.load(qwen3_dir, dtype="float32", device="cpu")


def serve(path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("log") / "server.log"
    srv = start_server(path, log, "--max-context", "1024")
    yield srv
    stop_server(srv)
    assert srv.proc.returncode == 0, srv.log.read_text()


@pytest.fixture(scope="module")
def server(qwen3_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    yield from serve(qwen3_dir, tmp_path_factory)


@pytest.fixture(scope="module")
def thinking_server(
    thinking_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    yield from serve(thinking_dir, tmp_path_factory)


def prompt_tokens(engine: Any, messages: list[dict[str, Any]], **kw: Any) -> int:
    text = render_chat(engine.tokenizer, messages, **kw)
    return len(engine.tokenizer.encode(text, add_special_tokens=False))


def test_tools_and_thinking_reach_the_template(server: Server, engine: Any) -> None:
    tok = engine.tokenizer
    text = render_chat(tok, ASK, [WEATHER], {"enable_thinking": False})
    assert "<tools>\n" + json.dumps(WEATHER, ensure_ascii=False) + "\n</tools>" in text
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    history = [
        *ASK,
        {
            "role": "assistant",
            "content": "",
            "reasoning_content": "need weather",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
    ]
    text = render_chat(tok, history, [WEATHER])
    assert '<think>\nneed weather\n</think>\n\n\n<tool_call>\n{"name": "get_weather", ' in text
    assert '"arguments": {"city": "Paris"}}\n</tool_call>' in text
    assert '<tool_response>\n{"temp": 21}\n</tool_response>' in text
    # the server renders the same prompt (counted in usage), tools and all
    client = server.client()
    kw = dict(model=MODEL, max_tokens=2, temperature=0)
    r = client.chat.completions.create(messages=ASK, tools=[WEATHER], **kw)
    assert r.usage.prompt_tokens == prompt_tokens(engine, ASK, tools=[WEATHER])
    r = client.chat.completions.create(messages=history, tools=[WEATHER], **kw)
    assert r.usage.prompt_tokens == prompt_tokens(engine, history, tools=[WEATHER])
    r = client.chat.completions.create(messages=ASK, tools=[WEATHER], tool_choice="none", **kw)
    assert r.usage.prompt_tokens == prompt_tokens(engine, ASK)  # none: tools not shown
    r = client.chat.completions.create(
        messages=ASK, extra_body={"chat_template_kwargs": {"enable_thinking": False}}, **kw
    )
    closed = prompt_tokens(engine, ASK, template_kwargs={"enable_thinking": False})
    assert r.usage.prompt_tokens == closed > prompt_tokens(engine, ASK)


def assemble_stream(stream: Any) -> tuple[str, str, list[tuple[str, str, str]], str | None]:
    reasoning, content, calls, reason = "", "", {}, None
    for chunk in stream:
        for c in chunk.choices:
            d = c.delta
            content += d.content or ""
            reasoning += getattr(d, "reasoning_content", None) or ""
            for tc in d.tool_calls or []:
                prev = calls.setdefault(tc.index, ["", "", ""])
                prev[0] = tc.id or prev[0]
                prev[1] += tc.function.name or ""
                prev[2] += tc.function.arguments or ""
            reason = c.finish_reason or reason
    return reasoning, content, [tuple(calls[i]) for i in sorted(calls)], reason


def test_named_tool_choice_forces_a_valid_call(server: Server) -> None:
    client = server.client()
    kw = dict(
        model=MODEL, messages=ASK, tools=[WEATHER, CLOCK], max_tokens=80, temperature=0,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )  # fmt: skip
    r = client.chat.completions.create(**kw)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert choice.message.content is None and len(choice.message.tool_calls) == 1
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    _, content, calls, reason = assemble_stream(client.chat.completions.create(stream=True, **kw))
    assert reason == "tool_calls" and content == ""
    assert [(n, a) for _, n, a in calls] == [("get_weather", call.function.arguments)]
    # required: a call to one of the tools
    kw["tool_choice"] = "required"
    r = client.chat.completions.create(**kw)
    (call,) = r.choices[0].message.tool_calls
    tool = {"get_weather": WEATHER, "get_time": CLOCK}[call.function.name]
    jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])
    assert r.choices[0].finish_reason == "tool_calls"


def test_tool_errors(server: Server) -> None:
    msgs = ASK
    for body, param in [
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "x"}}},
         "tool_choice"),
        ({"tool_choice": "auto"}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools"),
        ({"tools": [WEATHER], "response_format": {"type": "json_object"}}, "response_format"),
    ]:  # fmt: skip
        status, _, data = server.request(
            "POST", "/v1/chat/completions", {"model": MODEL, "messages": msgs, **body}
        )
        assert status == 400 and data["error"]["param"] == param, (body, data)


@pytest.fixture(scope="module")
def model_dir_plain(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("plain"), None)


def test_template_without_tools_refuses_them(
    model_dir_plain: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    for srv in serve(model_dir_plain, tmp_path_factory):
        status, _, data = srv.request(
            "POST", "/v1/chat/completions", {"model": MODEL, "messages": ASK, "tools": [WEATHER]}
        )
        assert status == 400 and data["error"]["param"] == "tools", data
        assert data["error"]["code"] == "tools_not_supported"
        assert "does not render tools" in data["error"]["message"]


def test_reasoning_content_from_a_thinking_template(
    thinking_server: Server, thinking_dir: Path
) -> None:
    """The template opens <think>: what the model writes is reasoning until </think>;
    enable_thinking=false closes the block in the prompt, so the output is content."""
    engine = dynaexq.load(thinking_dir, dtype="float32", device="cpu")
    tok = engine.tokenizer
    end = tok.token_to_id("<|im_end|>")

    def greedy(template_kwargs: dict[str, Any] | None) -> str:
        text = render_chat(tok, ASK, None, template_kwargs)
        ids = tok.encode(text, add_special_tokens=False)
        out = engine.generate([ids], max_new_tokens=12)[0].token_ids
        return tok.decode(out[: out.index(end)] if end in out else out)

    client = thinking_server.client()
    kw = dict(model=MODEL, messages=ASK, max_tokens=12, temperature=0)
    want = greedy(None)
    assert "</think>" not in want  # an untrained model never closes the block
    r = client.chat.completions.create(**kw)
    assert r.choices[0].message.reasoning_content == want
    assert r.choices[0].message.content == ""
    reasoning, content, _, _ = assemble_stream(client.chat.completions.create(stream=True, **kw))
    assert (reasoning, content) == (want, "")
    # a grammar decides the whole output: JSON content, no reasoning
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    r = client.chat.completions.create(response_format=fmt, **{**kw, "max_tokens": 120})
    assert r.choices[0].message.reasoning_content is None
    jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)
    off = {"chat_template_kwargs": {"enable_thinking": False}}
    want = greedy({"enable_thinking": False})
    r = client.chat.completions.create(extra_body=off, **kw)
    assert r.choices[0].message.content == want
    assert r.choices[0].message.reasoning_content is None


def test_json_schema_outputs_validate(server: Server) -> None:
    client = server.client()
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    msgs = [{"role": "user", "content": "Describe a person as JSON."}]
    texts = []
    for seed in range(3):
        r = client.chat.completions.create(
            model=MODEL, messages=msgs, response_format=fmt, max_tokens=120, temperature=0.8,
            seed=seed,
        )  # fmt: skip
        assert r.choices[0].finish_reason == "stop", r
        text = r.choices[0].message.content
        jsonschema.validate(json.loads(text), PERSON)
        texts.append(text)
    assert len(set(texts)) > 1  # sampled, yet always valid
    # streaming gives the same text (greedy)
    kw = dict(model=MODEL, messages=msgs, response_format=fmt, max_tokens=120, temperature=0)
    whole = client.chat.completions.create(**kw).choices[0].message.content
    _, streamed, _, reason = assemble_stream(client.chat.completions.create(stream=True, **kw))
    assert streamed == whole and reason == "stop"
    jsonschema.validate(json.loads(whole), PERSON)
    # completions too, and json_object
    r = client.completions.create(
        model=MODEL, prompt="person:", max_tokens=120, temperature=0,
        extra_body={"response_format": fmt},
    )  # fmt: skip
    jsonschema.validate(json.loads(r.choices[0].text), PERSON)
    r = client.chat.completions.create(
        model=MODEL, messages=msgs, response_format={"type": "json_object"}, max_tokens=120,
        temperature=0,
    )  # fmt: skip
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    else:  # cut by max_tokens: still the start of an object
        assert r.choices[0].message.content.startswith("{")


def test_bad_schema_is_a_400(server: Server) -> None:
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frobnicate"}}}
    status, _, data = server.request(
        "POST", "/v1/chat/completions", {"model": MODEL, "messages": ASK, "response_format": fmt}
    )
    assert status == 400 and data["error"]["param"] == "response_format", data
    assert 'Unsupported type "frobnicate"' in data["error"]["message"], data
