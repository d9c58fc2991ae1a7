"""`dynaexq serve` plumbing without a running server: argument checks, byte sizes, policy
wiring to the precision runtime and its statistics, request validation."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytestmark = pytest.mark.timeout(300)

from dynaexq.cli import main  # noqa: E402
from dynaexq.model.testing import make_hf_model, save_checkpoint, train_tiny_tokenizer  # noqa: E402
from dynaexq.serve.protocol import ChatCompletionRequest, CompletionRequest  # noqa: E402
from dynaexq.serve.runtime import (  # noqa: E402
    POLICIES,
    RuntimeSnapshot,
    RuntimeSpec,
    build_runtime,
    check_policy,
    parse_bytes,
)
from dynaexq.serve.scheduler import Scheduler, SequenceSpec  # noqa: E402
from dynaexq.tokenizer import Tokenizer  # noqa: E402

TEXTS = ["The quick brown fox jumps over the lazy dog. ", "def add(a, b): return a + b\n"] * 30


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cli_model")
    train_tiny_tokenizer(path, TEXTS, vocab_size=200)
    save_checkpoint(make_hf_model(seed=2, vocab_size=Tokenizer(path).vocab_size), path)
    return path


@pytest.mark.parametrize(
    ("text", "value"),
    [("6GiB", 6 * 2**30), ("1.5GB", 1_500_000_000), ("4096", 4096), ("512 MiB", 512 * 2**20)],
)
def test_parse_bytes(text: str, value: int) -> None:
    assert parse_bytes(text) == value


@pytest.mark.parametrize("text", ["", "6XB", "-1GiB", "0", "GiB", "1e3"])
def test_parse_bytes_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        parse_bytes(text)


def test_policies_are_checked() -> None:
    for p in POLICIES:
        check_policy(p)
    with pytest.raises(ValueError, match="unknown policy"):
        check_policy("fast")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--budget", "6XB"], "byte size"),
        (["--max-batch", "0"], "--max-batch"),
        (["--max-queue", "-1"], "--max-queue"),
        (["--max-context", "1"], "--max-context"),
        (["--recalibrate-tokens", "-1"], "--recalibrate-tokens"),
        (["--recalibrate-tokens", "512", "--policy", "full"], "needs --policy dynamic"),
        (["--recalibrate-on", "window"], "needs --recalibrate-tokens"),
        (
            ["--replicas", "2", "--recalibrate-tokens", "512", "--policy", "full"],
            "needs --policy dynamic",
        ),
        (["--model", "/nonexistent/model"], "config.json"),
        (["--calibration", "/nonexistent/calibration.txt", "--policy", "dynamic"], "No such"),
    ],
)
def test_serve_refuses_bad_arguments(
    args: list[str], message: str, model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["serve", "--model", str(model_dir), "--host", "127.0.0.1", "--port", "0", *args]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "dynaexq serve: error:" in err and message in err


def test_serve_refuses_unknown_policy(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["serve", "--policy", "fast"])
    assert e.value.code == 2


def test_request_validation_takes_json_integers_and_refuses_the_rest() -> None:
    ok = CompletionRequest.model_validate_json('{"model": "m", "prompt": [1, 2.0], "n": 2.0}')
    assert ok.prompts() == [[1, 2]] and ok.n == 2
    for body in (
        '{"model": "m", "prompt": "a", "max_tokens": "5"}',
        '{"model": "m", "prompt": "a", "max_tokens": true}',
        '{"model": "m", "prompt": "a", "max_tokens": 2.5}',
        json.dumps({"model": "m", "prompt": "a", "stop": [str(i) for i in range(17)]}),
        '{"model": "m", "prompt": "a", "presence_penalty": 0.5}',
        '{"model": "m", "prompt": []}',
        '{"model": "m", "prompt": "a", "extra": 1}',
    ):
        with pytest.raises(ValueError):
            CompletionRequest.model_validate_json(body)
    chat = ChatCompletionRequest.model_validate(
        {
            "model": "m",
            "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
            "max_tokens": 9,
            "max_completion_tokens": 5,
        }
    )
    assert chat.messages[0].text() == "hi" and chat.token_limit == 5


def test_precision_policy_serves_and_reports_its_snapshot(model_dir: Path, tmp_path: Path) -> None:
    """static (no transitions, so deterministic): greedy through the scheduler equals
    engine.generate on the same engine; the snapshot comes from the runtime."""
    pytest.importorskip("dynaexq.runtime.load")
    engine, stats = build_runtime(
        RuntimeSpec(model_dir, "static", 64 * 2**20, "float32", "cpu", batch=2, context=64)
    )
    snap = stats.runtime_snapshot()
    assert isinstance(snap, RuntimeSnapshot) and snap.policy == "static"
    assert snap.budget_bytes == 64 * 2**20 and snap.tier_counts
    assert all(sum(c.values()) == engine.config.num_experts for c in snap.tier_counts.values())
    prompts = ["The quick", "def add("]
    want = [engine.generate(p, max_new_tokens=8, ignore_eos=True).token_ids for p in prompts]

    async def serve() -> list[list[int]]:
        sched = Scheduler(engine, max_batch=2, max_context=64)
        sched.start()
        try:
            reqs = [sched.submit([SequenceSpec(tuple(engine.encode(p)), 8)]) for p in prompts]
            out = []
            for r in reqs:
                ev = await asyncio.wait_for(r.events.get(), 60)
                assert not isinstance(ev, BaseException)
                out.append(ev.token_ids)
            return out
        finally:
            sched.stop(drain=False, timeout=30)

    assert asyncio.run(serve()) == want


def test_runtime_stats_are_exported_at_scrape_time() -> None:
    """Gauges and counters come from the provider's snapshot when /metrics is rendered."""
    from dynaexq.serve.metrics import ServerMetrics
    from prometheus_client.parser import text_string_to_metric_families

    class Provider:
        def __init__(self) -> None:
            self.n = 0

        def runtime_snapshot(self) -> RuntimeSnapshot:
            self.n += 1
            return RuntimeSnapshot(
                policy="dynamic",
                budget_bytes=1000,
                tier_counts={0: {"bf16": self.n, "int2": 8 - self.n}, 2: {"int2": 8}},
                transitions={"promote": 3 * self.n, "demote": 2 * self.n},
                transitions_in_flight=1,
                bytes_moved={"h2d": 100 * self.n},
                pool_used_bytes={"bf16": 300, "int2": 100},
                pool_capacity_bytes={"bf16": 400, "int2": 400},
                expert_wait_seconds=0.5,
            )

    metrics = ServerMetrics(Provider())

    def scrape() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        text = metrics.render().decode()
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text)
            for s in f.samples
        }

    first, second = scrape(), scrape()
    assert first[("dynaexq_experts", (("layer", "0"), ("tier", "bf16")))] == 1
    assert second[("dynaexq_experts", (("layer", "0"), ("tier", "bf16")))] == 2
    assert second[("dynaexq_transitions_total", (("kind", "promote"),))] == 6
    assert second[("dynaexq_transfer_bytes_total", (("direction", "h2d"),))] == 200
    assert second[("dynaexq_pool_occupancy_ratio", ())] == 0.5
    assert second[("dynaexq_expert_wait_seconds_total", ())] == 0.5
    assert second[("dynaexq_policy_info", (("policy", "dynamic"),))] == 1


@pytest.mark.parametrize(
    ("config", "want"),
    [
        (None, (1.0, 1.0, 0)),
        ({"do_sample": True, "temperature": 0.8, "top_p": 0.95, "top_k": 50}, (0.8, 0.95, 50)),
        ({"do_sample": False, "temperature": 0.8}, (0.0, 1.0, 0)),
        ({"temperature": "hot", "top_p": 7, "top_k": True}, (1.0, 1.0, 0)),
        ([1, 2], (1.0, 1.0, 0)),
    ],
)
def test_sampling_defaults_from_generation_config(config, want, tmp_path: Path) -> None:
    import json

    from dynaexq.serve.app import SamplingDefaults

    if config is not None:
        (tmp_path / "generation_config.json").write_text(json.dumps(config))
    d = SamplingDefaults.from_checkpoint(tmp_path)
    assert (d.temperature, d.top_p, d.top_k) == want


def test_ray_options_take_the_recalibration_and_refuse_bad_ones() -> None:
    from dynaexq.serve.ray.options import RayServeOptions

    opts = RayServeOptions.from_args(
        {"budget": "20%", "recalibrate_tokens": 512, "recalibrate_on": "window"}
    )
    assert (opts.policy, opts.recalibrate_tokens, opts.recalibrate_on) == ("dynamic", 512, "window")
    with pytest.raises(ValueError, match="recalibrate_on"):
        RayServeOptions.from_args({"recalibrate_on": "often"})
    with pytest.raises(ValueError, match="needs the dynamic policy"):
        RayServeOptions.from_args({"policy": "full", "recalibrate_tokens": 512})
