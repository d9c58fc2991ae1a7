"""`dynaexq serve` end to end: the real server in a subprocess on a loopback port, driven by
the official `openai` client (streaming and not, several requests at once) and by raw HTTP
for malformed input, the queue limit, disconnects, metrics and SIGTERM draining.

Greedy output through the server must equal `engine.generate` for the same prompt.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("transformers")
openai = pytest.importorskip("openai")

import dynaexq  # noqa: E402
from dynaexq.model.testing import make_hf_model, save_checkpoint, train_tiny_tokenizer  # noqa: E402
from dynaexq.tokenizer import Tokenizer  # noqa: E402

# Every test ends by itself: bounded waits everywhere, and a hard stop per test.
pytestmark = pytest.mark.timeout(300)

MODEL = "tiny-moe"
MAX_BATCH, MAX_QUEUE, MAX_CONTEXT = 4, 3, 64
TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog. ",
    "int main(void) { return 0; }\n",
    "Mixture-of-experts models route each token to a few experts. ",
] * 20
PROMPTS = ["The quick", "def add(a, b):\n    return", "M", "int main(void) {", "experts", "a + b"]


class Server:
    def __init__(self, proc: subprocess.Popen, host: str, port: int, log: Path) -> None:
        self.proc, self.host, self.port, self.log = proc, host, port, log
        self.url = f"http://{host}:{port}"

    def request(
        self,
        method: str,
        path: str,
        body: bytes | str | dict | None = None,
        headers: dict[str, str] | None = None,
        timeout: float = 60,
    ) -> tuple[int, dict[str, str], Any]:
        if isinstance(body, dict):
            body = json.dumps(body)
        conn = http.client.HTTPConnection(self.host, self.port, timeout=timeout)
        try:
            hdrs = {"Content-Type": "application/json", **(headers or {})}
            conn.request(method, path, body=body, headers=hdrs)
            resp = conn.getresponse()
            raw = resp.read()
            ctype = resp.getheader("content-type", "")
            data = json.loads(raw) if ctype.startswith("application/json") else raw.decode()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, data
        finally:
            conn.close()

    def stats(self) -> dict[str, Any]:
        return self.request("GET", "/stats")[2]

    def client(self) -> Any:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, timeout=60)


def start_server(model_dir: Path, log: Path, *extra: str) -> Server:
    cmd = [
        sys.executable, "-m", "dynaexq.cli", "serve",
        "--model", str(model_dir), "--served-model-name", MODEL,
        "--host", "127.0.0.1", "--port", "0", "--dtype", "float32", "--device", "cpu",
        "--max-batch", str(MAX_BATCH), "--max-queue", str(MAX_QUEUE),
        "--max-context", str(MAX_CONTEXT), "--log-level", "warning", *extra,
    ]  # fmt: skip
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    port = None
    while time.monotonic() < deadline and proc.poll() is None:
        m = re.search(r"on http://127\.0\.0\.1:(\d+)/v1", log.read_text())
        if m:
            port = int(m.group(1))
            server = Server(proc, "127.0.0.1", port, log)
            try:
                if server.request("GET", "/health", timeout=5)[0] == 200:
                    return server
            except OSError:
                pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"server did not start:\n{log.read_text()}")


def stop_server(server: Server) -> None:
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
        try:
            server.proc.wait(60)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait(10)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("serve_model")
    train_tiny_tokenizer(path, TEXTS, vocab_size=200)
    save_checkpoint(make_hf_model(seed=5, vocab_size=Tokenizer(path).vocab_size), path)
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


def chat_expected(engine: Any, content: str, max_new: int) -> tuple[str, str]:
    """engine.generate(chat=True), ended at <|im_end|> as the server does for chat."""
    r = engine.generate(content, max_new_tokens=max_new, chat=True)
    end = engine.tokenizer.token_to_id("<|im_end|>")
    ids = r.token_ids
    if end in ids:
        return engine.tokenizer.decode(ids[: ids.index(end) + 1]), "stop"
    return r.text, "length" if r.finish_reason == "length" else "stop"


# -- the happy path --------------------------------------------------------------------------
def test_models_health_and_metadata(server: Server) -> None:
    status, _, body = server.request("GET", "/health")
    assert status == 200 and body["status"] == "ok"
    models = server.client().models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert server.client().models.retrieve(MODEL).id == MODEL
    schema = server.request("GET", "/openapi.json")[2]
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models"} <= set(schema["paths"])


def test_concurrent_greedy_completions_equal_generate(server: Server, engine: Any) -> None:
    """Six requests (two more than the batch), mixed streaming, all at once."""
    lengths = [12, 5, 20, 9, 16, 3]

    def one(i: int) -> tuple[str, str | None, int | None]:
        client = server.client()
        kw = dict(model=MODEL, prompt=PROMPTS[i], max_tokens=lengths[i], temperature=0)
        if i % 2:
            text, reason, usage = "", None, None
            for chunk in client.completions.create(
                stream=True, stream_options={"include_usage": True}, **kw
            ):
                if chunk.usage is not None:
                    usage = chunk.usage.completion_tokens
                for c in chunk.choices:
                    text += c.text
                    reason = c.finish_reason or reason
            return text, reason, usage
        r = client.completions.create(**kw)
        return r.choices[0].text, r.choices[0].finish_reason, r.usage.completion_tokens

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        got = list(pool.map(one, range(len(PROMPTS))))
    for i, (text, reason, usage) in enumerate(got):
        want = engine.generate(PROMPTS[i], max_new_tokens=lengths[i])
        assert text == want.text, PROMPTS[i]
        assert reason == ("length" if want.finish_reason == "length" else "stop")
        assert usage == len(want.token_ids)


def test_chat_completions_stream_and_not(server: Server, engine: Any) -> None:
    client = server.client()
    msgs = [{"role": "user", "content": "The quick brown"}]
    want_text, want_reason = chat_expected(engine, "The quick brown", 14)
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=14, temperature=0)
    assert r.choices[0].message.role == "assistant"
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == (want_text, want_reason)
    pieces, reasons = [], []
    for chunk in client.chat.completions.create(
        model=MODEL, messages=msgs, max_completion_tokens=14, temperature=0, stream=True
    ):
        for c in chunk.choices:
            pieces.append(c.delta.content or "")
            reasons.append(c.finish_reason)
    assert "".join(pieces) == want_text and reasons[-1] == want_reason


def test_n_seed_and_stop(server: Server, engine: Any) -> None:
    client = server.client()
    kw = dict(max_tokens=10, temperature=0.9, top_p=0.95, seed=11, extra_body={"ignore_eos": True})
    r = client.completions.create(model=MODEL, prompt="experts", n=2, **kw)
    want = engine.generate(
        ["experts"] * 2, max_new_tokens=10, temperature=0.9, top_p=0.95, seed=11, ignore_eos=True
    )
    assert [c.text for c in r.choices] == [w.text for w in want]
    assert [c.index for c in r.choices] == [0, 1]
    r = client.completions.create(
        model=MODEL, prompt=PROMPTS[1], max_tokens=30, temperature=0, stop=["e", "a"]
    )
    want = engine.generate(PROMPTS[1], max_new_tokens=30, stop=["e", "a"])
    assert r.choices[0].text == want.text
    # several prompts in one request, and token-id prompts
    ids = engine.tokenizer.encode("The quick")
    r = client.completions.create(model=MODEL, prompt=[ids, ids[:1]], max_tokens=4, temperature=0)
    assert [c.text for c in r.choices] == [
        engine.generate([ids], max_new_tokens=4)[0].text,
        engine.generate([ids[:1]], max_new_tokens=4)[0].text,
    ]


# -- bad input -------------------------------------------------------------------------------
def assert_error(status: int, body: Any, expect: int | tuple[int, ...], why: Any = None) -> None:
    assert status in ((expect,) if isinstance(expect, int) else expect), (why, body)
    assert isinstance(body, dict) and set(body) == {"error"}, body
    err = body["error"]
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str) and {"param", "code"} <= set(err)


BAD_REQUESTS: list[tuple[str, str, Any, int]] = [
    ("POST", "/v1/completions", b"{not json", 400),
    ("POST", "/v1/completions", b"", 400),
    ("POST", "/v1/completions", b"[1, 2]", 400),
    ("POST", "/v1/completions", b"\xff\xfe", 400),
    ("POST", "/v1/completions", {"model": MODEL, "prompt": "a", "max_token": 3}, 400),
    ("POST", "/v1/completions", {"model": MODEL, "prompt": "a", "max_tokens": -1}, 400),
    ("POST", "/v1/completions", {"model": MODEL, "prompt": "a", "max_tokens": 0}, 400),
    ("POST", "/v1/completions", {"model": MODEL, "prompt": "a", "max_tokens": 10**12}, 400),
    ("POST", "/v1/completions", {"model": MODEL, "prompt": "a", "max_tokens": "5"}, 400),
    ("POST", "/v1/completions", {"model": MODEL, "prompt": "word " * 200}, 400),
    ("POST", "/v1/completions", {"model": MODEL, "prompt": "ab " * 6000}, 400),  # 18k chars
    ("POST", "/v1/completions", {"model": MODEL, "prompt": [[1, 2], []]}, 400),
    ("POST", "/v1/completions", {"model": MODEL, "prompt": [10**6]}, 400),
    ("POST", "/v1/completions", {"model": MODEL, "prompt": ""}, 400),
    ("POST", "/v1/completions", {"model": MODEL, "prompt": "a", "n": MAX_BATCH + 1}, 400),
    ("POST", "/v1/completions", {"model": MODEL, "prompt": "a", "temperature": -1}, 400),
    ("POST", "/v1/completions", {"model": MODEL, "prompt": "a", "top_p": 1.5}, 400),
    ("POST", "/v1/completions", {"model": MODEL, "prompt": "a", "stop": ["", "x"]}, 400),
    ("POST", "/v1/completions", {"model": MODEL, "prompt": "a", "logprobs": 21}, 400),
    ("POST", "/v1/completions", {"model": MODEL, "prompt": "a", "logprob": 2}, 400),
    ("POST", "/v1/completions", {"model": MODEL, "prompt": "a", "presence_penalty": 1}, 400),
    ("POST", "/v1/completions", {"model": MODEL, "prompt": "a", "seed": -3}, 400),
    ("POST", "/v1/completions", {"model": "gpt-4", "prompt": "a"}, 404),
    ("POST", "/v1/completions", {"prompt": "a"}, 400),
    ("POST", "/v1/chat/completions", {"model": MODEL, "messages": []}, 400),
    ("POST", "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "x"}]}, 400),
    ("POST", "/v1/chat/completions", {"model": "nope", "messages": [{"role": "user"}]}, 404),
    (
        "POST",
        "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 64},
        400,
    ),
    ("GET", "/v1/models/other", None, 404),
    ("GET", "/v1/nothing-here", None, 404),
    ("DELETE", "/v1/completions", None, 405),
]


def test_bad_requests_get_openai_style_errors(server: Server) -> None:
    for method, path, body, expect in BAD_REQUESTS:
        status, _, data = server.request(method, path, body)
        assert_error(status, data, expect, (method, path, body))
    big = b'{"model": "x", "prompt": "' + b"a" * (9 * 1024 * 1024) + b'"}'
    assert_error(*server.request("POST", "/v1/completions", big)[::2], 413)
    assert server.request("GET", "/health")[0] == 200
    # the official client maps them to its exception types
    client = server.client()
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="a")
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.completions.create(model=MODEL, prompt="a", max_tokens=10_000)


def test_queue_limit_gives_429(server: Server) -> None:
    """max_batch running + max_queue waiting; the rest are refused with 429."""
    body = {"model": MODEL, "prompt": "The", "max_tokens": 48, "ignore_eos": True}
    total = MAX_BATCH + MAX_QUEUE + 4
    with ThreadPoolExecutor(total) as pool:
        results = list(
            pool.map(lambda _: server.request("POST", "/v1/completions", body), range(total))
        )
    codes = sorted(status for status, _, _ in results)
    assert set(codes) <= {200, 429} and codes.count(429) >= 1, codes
    assert codes.count(200) >= MAX_BATCH
    for status, headers, data in results:
        if status == 429:
            assert_error(status, data, 429)
            assert data["error"]["type"] == "rate_limit_error" and "retry-after" in headers
        else:
            assert len(data["choices"][0]["text"]) > 0
    assert server.request("GET", "/health")[0] == 200


def wait_idle(server: Server, timeout: float = 30) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = server.stats()
        if s["running"] == 0 and s["queued"] == 0:
            return s
        time.sleep(0.05)
    raise AssertionError(f"server still busy: {server.stats()}")


def test_client_disconnect_frees_its_slot(server: Server) -> None:
    def send(stream: bool) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse | None]:
        conn = http.client.HTTPConnection(server.host, server.port, timeout=30)
        body = {"model": MODEL, "prompt": "The", "max_tokens": MAX_CONTEXT - 8}
        body |= {"ignore_eos": True, "stream": stream}
        conn.request(
            "POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"}
        )
        if not stream:
            return conn, None
        resp = conn.getresponse()
        assert resp.status == 200 and resp.readline().startswith(b"data: ")
        return conn, resp

    # Streams: fill every row, read one event, hang up. The rows are dropped before the
    # sequences run to their end (they would count as finished requests).
    before = wait_idle(server)
    conns = [send(stream=True) for _ in range(MAX_BATCH)]
    for conn, resp in conns:
        assert resp is not None
        resp.close()
        conn.close()
    after = wait_idle(server)
    assert after["requests_finished"] - before["requests_finished"] < MAX_BATCH
    # Non-streaming: hang up without reading; the server notices within its poll interval.
    conns = [send(stream=False) for _ in range(MAX_BATCH)]
    deadline = time.monotonic() + 30
    while server.stats()["running"] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)  # until they have been admitted
    for conn, _ in conns:
        conn.close()
    assert wait_idle(server)["running"] == 0
    # and the server still answers
    r = server.client().completions.create(model=MODEL, prompt="M", max_tokens=2)
    assert r.choices[0].finish_reason in ("length", "stop")


def test_metrics_in_prometheus_format(server: Server) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    server.client().completions.create(model=MODEL, prompt="M", max_tokens=3, temperature=0)
    status, headers, text = server.request("GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in (
        "dynaexq_time_to_first_token_seconds",
        "dynaexq_time_per_output_token_seconds",
        "dynaexq_tokens_per_second",
        "dynaexq_queue_depth",
        "dynaexq_generated_tokens",
        "dynaexq_experts",
        "dynaexq_transitions",
        "dynaexq_transfer_bytes",
        "dynaexq_pool_occupancy_ratio",
    ):
        assert name in families, name
    ttft_count = [
        s.value
        for s in families["dynaexq_time_to_first_token_seconds"].samples
        if s.name.endswith("_count")
    ]
    assert ttft_count and ttft_count[0] >= 1
    experts = {
        (s.labels["layer"], s.labels["tier"]): s.value for s in families["dynaexq_experts"].samples
    }
    assert experts and set(experts.values()) == {8.0}  # tiny model: 8 experts per MoE layer
    stats = server.stats()
    assert stats["runtime"]["policy"] == "full" and stats["generated_tokens"] > 0


# -- fuzz --------------------------------------------------------------------------------------
def test_fuzzed_bodies_get_well_formed_answers(server: Server) -> None:
    """Hypothesis-generated bodies (JSON values, near-valid requests, raw bytes)."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    scalars = (
        st.none()
        | st.booleans()
        | st.integers(-(2**70), 2**70)
        | st.floats()
        | st.text(max_size=20)
    )
    values = st.recursive(
        scalars,
        lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
        max_leaves=10,
    )
    fields = {
        "model": st.sampled_from([MODEL, "other"]) | values,
        "prompt": st.text(max_size=30) | st.lists(st.integers(-5, 300), max_size=5) | values,
        "messages": st.lists(
            st.fixed_dictionaries(
                {
                    "role": st.sampled_from(["user", "system", "assistant", "bot"]),
                    "content": st.text(max_size=20) | values,
                }
            ),
            max_size=3,
        )
        | values,
        "max_tokens": st.integers(-3, 80) | values,
        "temperature": st.floats(-1, 3) | values,
        "top_p": st.floats(-0.5, 1.5) | values,
        "n": st.integers(-1, 6),
        "stream": st.booleans(),
        "stop": st.text(max_size=3) | st.lists(st.text(max_size=3), max_size=5),
        "seed": st.integers(-5, 2**64),
        "bogus": values,
    }
    body = st.fixed_dictionaries({}, optional=fields).map(json.dumps) | values.map(json.dumps)
    raw = st.binary(max_size=64)
    path = st.sampled_from(["/v1/completions", "/v1/chat/completions"])

    @settings(
        max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck)
    )
    @given(path=path, payload=body | raw)
    def check(path: str, payload: str | bytes) -> None:
        status, headers, data = server.request("POST", path, payload)
        if status == 200:
            if headers["content-type"].startswith("text/event-stream"):
                assert data.rstrip().endswith("data: [DONE]")
            else:
                assert data["choices"] and data["usage"]["completion_tokens"] >= 1
        else:
            assert_error(status, data, (400, 404, 413, 429))

    check()
    assert server.request("GET", "/health")[0] == 200


def test_schemathesis_against_the_openapi_schema(server: Server) -> None:
    """Schema-driven fuzzing of every operation with valid and invalid data; responses are
    checked by schemathesis against the schema (status codes, content types, bodies)."""
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings
    from schemathesis import GenerationMode
    from schemathesis.specs.openapi.checks import positive_data_acceptance

    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    failures = []
    for result in schema.get_all_operations():
        operation = result.ok()
        strategy = operation.as_strategy(GenerationMode.POSITIVE) | operation.as_strategy(
            GenerationMode.NEGATIVE
        )

        @settings(
            max_examples=10,
            deadline=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=strategy)
        def run(case: Any) -> None:
            response = case.call(base_url=server.url, timeout=60)
            assert response.status_code < 500, (case.path, response.text)
            if response.status_code >= 400:
                assert_error(response.status_code, response.json(), (400, 404, 405, 413, 429))
            # A schema cannot say "prompt tokens + max_tokens <= context" or "prompts x n <=
            # batch": schema-valid data may be refused, but then only for those reasons.
            if case.meta.generation.mode.is_positive and response.status_code == 400:
                code = response.json()["error"]["code"]
                allowed = ("context_length_exceeded", "too_many_sequences")
                allowed += ("invalid_parameter_combination",)  # e.g. top_logprobs alone
                allowed += ("tools_not_supported",)  # this model's template has no tools
                assert code in allowed, response.text
            case.validate_response(response, excluded_checks=[positive_data_acceptance])

        try:
            run()
        except Exception as e:  # collect, report every operation at once
            failures.append(f"{operation.method.upper()} {operation.path}: {e}")
    assert not failures, "\n".join(failures)
    assert server.request("GET", "/health")[0] == 200


# -- shutdown ---------------------------------------------------------------------------------
def test_sigterm_drains_running_requests(model_dir: Path, tmp_path: Path) -> None:
    srv = start_server(model_dir, tmp_path / "drain.log")
    try:
        out: dict[int, tuple[str, str | None, int]] = {}
        first_chunk = threading.Barrier(3, timeout=60)

        def stream(i: int) -> None:
            text, reason, n = "", None, 0
            try:
                it = srv.client().completions.create(
                    model=MODEL,
                    prompt=PROMPTS[i],
                    max_tokens=40,
                    temperature=0,
                    stream=True,
                    extra_body={"ignore_eos": True},
                )
                for chunk in it:
                    n += 1
                    if n == 1:
                        first_chunk.wait()
                    for c in chunk.choices:
                        text += c.text
                        reason = c.finish_reason or reason
            finally:
                first_chunk.abort()  # never leave the others waiting
            out[i] = (text, reason, n)

        threads = [threading.Thread(target=stream, args=(i,)) for i in (0, 2)]
        for t in threads:
            t.start()
        first_chunk.wait()
        os.kill(srv.proc.pid, signal.SIGTERM)
        for t in threads:
            t.join(90)
        assert srv.proc.wait(90) == 0, srv.log.read_text()
        assert sorted(out) == [0, 2]
        assert all(reason == "length" for _, reason, _ in out.values()), out
        with pytest.raises(OSError):  # no longer listening
            srv.request("GET", "/health", timeout=5)
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()
            srv.proc.wait(10)
