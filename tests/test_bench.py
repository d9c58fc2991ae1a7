"""`dynaexq bench`: the closed-loop serving benchmark, in process and over HTTP."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from dynaexq.bench.serving import bench_in_process, bench_url, write_bench_report
from dynaexq.model.testing import make_hf_model, save_checkpoint

PROMPTS = [[int(t) for t in np.random.default_rng(i).integers(0, 120, size=8)] for i in range(4)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_checkpoint(make_hf_model(seed=7), tmp_path_factory.mktemp("bench") / "m")


@pytest.mark.parametrize("policy", ["full", "dynamic", "offload"])
def test_in_process_levels_report_latency_and_work(model_dir, policy, tmp_path, monkeypatch):
    monkeypatch.setenv("DYNAEXQ_CACHE", str(tmp_path))
    rows = bench_in_process(
        policy,
        model=model_dir,
        budget=None if policy == "full" else 8 << 20,
        tiers="int2,bf16",
        levels=[1, 2],
        requests_per_level=4,
        prompt_tokens=8,
        max_tokens=4,
        prompts=PROMPTS,
        calibration=[np.arange(512) % 120],
        pcie_gbs=0.05,  # a slow modelled link: offload must wait
    )
    assert [r.concurrency for r in rows] == [1, 2]
    for r in rows:
        assert r.requests == 4 and r.errors == 0
        assert r.tokens_per_s > 0 and r.ttft_p50 > 0
        assert r.tpot_p50 is not None and r.tpot_p50 > 0  # tokens arrive one by one
    if policy == "offload":
        assert rows[0].expert_wait_s > 0 and rows[0].bytes_moved > 0
    else:
        assert all(r.expert_wait_s == 0 for r in rows)
    report = write_bench_report(rows, tmp_path / "out", "test")
    assert "| " + policy + " | 2 | 4 | 0 |" in report.read_text()
    assert (tmp_path / "out" / "bench.png").stat().st_size > 0


def test_against_a_running_server(tmp_path: Path) -> None:
    from dynaexq.model.testing import train_tiny_tokenizer
    from dynaexq.tokenizer import Tokenizer
    from test_serve import start_server, stop_server

    path = tmp_path / "served"
    train_tiny_tokenizer(path, ["def f(x): return x", "the quick brown fox"], vocab_size=150)
    save_checkpoint(make_hf_model(seed=5, vocab_size=Tokenizer(path).vocab_size), path)
    server = start_server(path, tmp_path / "server.log")
    try:
        rows = bench_url(
            server.url, levels=[1, 2], prompts=PROMPTS, requests_per_level=3, max_tokens=3
        )
    finally:
        stop_server(server)
    assert [r.concurrency for r in rows] == [1, 2]
    assert all(r.requests == 3 and r.errors == 0 and r.tokens_per_s > 0 for r in rows)
