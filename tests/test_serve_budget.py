"""One budget parser everywhere: `serve`, `bench`, `eval`, `generate` and `dynaexq.load`
read the same forms (sizes and "20%"), refuse the same bad ones with the same words, and
the server's message for a too-small budget says what its KV cache costs."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytestmark = pytest.mark.timeout(300)

from dynaexq.cli import main  # noqa: E402
from dynaexq.model.testing import make_hf_model, save_checkpoint, train_tiny_tokenizer  # noqa: E402
from dynaexq.runtime.budget import Budget, BudgetError, kv_cache_bytes, parse_budget  # noqa: E402
from dynaexq.serve import runtime as serve_runtime  # noqa: E402
from dynaexq.tokenizer import Tokenizer  # noqa: E402

TEXTS = ["The quick brown fox jumps over the lazy dog. ", "def add(a, b): return a + b\n"] * 30


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("budget_model")
    train_tiny_tokenizer(path, TEXTS, vocab_size=200)
    save_checkpoint(make_hf_model(seed=2, vocab_size=Tokenizer(path).vocab_size), path)
    return path


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("20%", Budget(share=0.2)),
        (" 7.5 % ", Budget(share=0.075)),
        ("100%", Budget(share=1.0)),
        ("6GiB", Budget(nbytes=6 * 2**30)),
        ("512 MiB", Budget(nbytes=512 * 2**20)),
        ("1.5GB", Budget(nbytes=1_500_000_000)),
        ("4096", Budget(nbytes=4096)),
        (4096, Budget(nbytes=4096)),
    ],
)
def test_budget_forms(text: str | int, want: Budget) -> None:
    assert parse_budget(text) == want
    assert serve_runtime.parse_budget(text) == want


@pytest.mark.parametrize("text", ["", "20x", "120%", "-5%", "%", "6XB", "0", "-1GiB"])
def test_bad_budgets_are_refused(text: str) -> None:
    with pytest.raises(BudgetError):
        parse_budget(text)


@pytest.mark.parametrize(
    "argv",
    [
        ["serve", "--host", "127.0.0.1", "--port", "0"],
        ["bench"],
        ["eval"],
        ["generate", "hello"],
    ],
)
def test_every_command_refuses_a_bad_budget_alike(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    flag = "--budgets" if argv[0] == "eval" else "--budget"
    assert main([*argv, flag, "20x"]) == 2
    err = capsys.readouterr().err
    assert f"dynaexq {argv[0]}: error: cannot read '20x' as a byte size or a share" in err


def test_serve_runtime_takes_a_share(model_dir: Path) -> None:
    """What `dynaexq serve --budget 20%` builds: the bytes `dynaexq.load` resolves for it."""
    pytest.importorskip("dynaexq.runtime.load")
    engine, stats = serve_runtime.build_runtime(
        serve_runtime.RuntimeSpec(model_dir, "static-map", "20%", "float32", "cpu", batch=2,
                                  context=64, calibration=("".join(TEXTS),))
    )  # fmt: skip
    dep = engine.deployment
    store, fixed = dep.store, dep.fixed
    from dynaexq.runtime.load import resolve_budget

    assert dep.plan.budget == resolve_budget("20%", store, fixed.total)
    hot = round(0.2 * store.experts)
    assert dep.plan.per_layer is not None and dep.plan.per_layer[1] == hot
    assert stats.runtime_snapshot().budget_bytes == dep.plan.budget


def test_too_small_budget_names_the_kv_cache_cost(
    model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("dynaexq.runtime.load")
    argv = [
        "serve", "--model", str(model_dir), "--host", "127.0.0.1", "--port", "0",
        "--policy", "static", "--budget", "64KiB", "--max-batch", "4", "--max-context", "64",
        "--dtype", "float32", "--device", "cpu",
    ]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    from dynaexq.checkpoint import Checkpoint

    kv = kv_cache_bytes(Checkpoint(model_dir).config, 4, 64, 4)
    assert "cannot hold every expert at the lowest tier" in err
    assert "the KV cache for --max-batch 4 x context 64 tokens costs" in err
    assert f"({kv} bytes)" in err


def test_dynaexq_serve_takes_a_share(model_dir: Path, tmp_path: Path) -> None:
    """`dynaexq serve --budget 50%` starts, serves, and reports the bytes `dynaexq.load`
    resolves for 50% at its batch and context (at 20% this tiny model leaves dynamic no
    room for its staging slots, and the server says so)."""
    pytest.importorskip("openai")
    from test_serve import MODEL, start_server, stop_server

    srv = start_server(model_dir, tmp_path / "server.log", "--budget", "50%", "--policy", "dynamic")
    try:
        r = srv.client().completions.create(model=MODEL, prompt="The quick", max_tokens=4)
        assert r.usage.completion_tokens >= 1
        runtime = srv.stats()["runtime"]
        engine, _ = serve_runtime.build_runtime(
            serve_runtime.RuntimeSpec(model_dir, "dynamic", "50%", "float32", "cpu", batch=4,
                                      context=64)
        )  # fmt: skip
        assert runtime["policy"] == "dynamic"
        assert runtime["budget_bytes"] == engine.deployment.plan.budget
    finally:
        stop_server(srv)
    assert srv.proc.returncode == 0, srv.log.read_text()
