"""The whole-model GPU benchmark (benchmarks/bench_gpu_model.py) runs on a lent GPU only
once in a while; its dry run on tiny shapes and the CPU keeps its plumbing working."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_model_benchmark_dry_run(tmp_path) -> None:
    out = tmp_path / "out"
    # 4 layers: at 20% that is room for offload's cache (one layer's experts + staging).
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_gpu_model.py"), "--tiny",
           "--device", "cpu", "--out", str(out), "--work", str(tmp_path / "work"),
           "--layers", "4", "--cards", "20", "--batches", "1,2", "--steps", "6",
           "--prompt", "8", "--prefill", "32"]  # fmt: skip
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = json.loads((out / "gpu_model.json").read_text())
    rows = results["cards"]["20 GB"]
    engines = [k for k, v in rows.items() if isinstance(v, dict)]
    want = {"full bf16", "transformers bf16", "static int4", "dynamic int4/bf16", "offload bf16"}
    assert want <= set(engines)
    for name in engines:
        assert "error" not in rows[name], (name, rows[name])
        for b in ("1", "2"):
            assert rows[name]["batches"][b]["tokens_per_s"] > 0
    assert "| dynamic int2/int4/bf16 |" in (out / "gpu_model.md").read_text()
    assert rows["offload bf16"]["batches"]["1"]["transitions_finished"] > 0  # its misses
