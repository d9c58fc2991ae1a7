"""scripts/train_embedded.py on a tiny corpus: seeded, resumable after a kill, continued
in a second phase, exported in the Hugging Face format that `dynaexq.load()` reads.

The corpus is text from this repository (three domains, like the real one), the model a
2-layer, 8-expert Qwen3-MoE, so each stage takes seconds.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "train_embedded.py"
REPORT_DIR = REPO / "scripts"
DOMAIN_SOURCES = {
    "python": sorted((REPO / "python" / "dynaexq").rglob("*.py")),
    "c": sorted((REPO / "kernels").rglob("*.c*")) + sorted((REPO / "kernels").rglob("*.h")),
    "prose": sorted(REPO.glob("*.md")) + sorted((REPO / "docs").rglob("*.md")),
}
TINY = [
    "--hidden", "32", "--layers", "2", "--heads", "2", "--kv-heads", "1",
    "--experts", "8", "--top-k", "2", "--moe-inter", "16", "--max-positions", "64",
    "--batch", "4", "--seq-len", "32", "--warmup", "2", "--eval-every", "4",
    "--eval-seqs", "2", "--log-every", "1", "--threads", "1", "--aux-coef", "0.02",
]  # fmt: skip
STEP_TOKENS = 4 * 32


def write_corpus(root: Path) -> None:
    root.mkdir(parents=True)
    for domain, files in DOMAIN_SOURCES.items():
        assert len(files) >= 4, f"not enough {domain} text in the repository"
        docs = [f.read_text(errors="replace") for f in files]
        with open(root / f"{domain}.train.jsonl", "w") as tr:
            for d in docs[1:]:
                tr.write(json.dumps({"text": d}) + "\n")
        with open(root / f"{domain}.heldout.jsonl", "w") as ho:
            ho.write(json.dumps({"text": docs[0]}) + "\n")


def run(dirs: dict[str, Path], stage: str, *extra: str, check: bool = True):
    cmd = [
        sys.executable,
        str(SCRIPT),
        stage,
        "--corpus", str(dirs["corpus"]),
        "--work", str(dirs["work"]),
        "--model-dir", str(dirs["model"]),
        *extra,
    ]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=300)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("train")
    d = {"corpus": root / "corpus", "work": root / "work", "model": root / "model"}
    write_corpus(d["corpus"])
    run(d, "prepare", "--vocab-size", "320", "--tokenizer-mb", "0.05", "--heldout-tokens", "800")
    return d


def weights(dirs: dict[str, Path], run_name: str) -> dict[str, torch.Tensor]:
    state = torch.load(dirs["work"] / "runs" / run_name / "ckpt.pt", weights_only=False)
    return state["model"]


def log_of(dirs: dict[str, Path], run_name: str) -> list[dict]:
    text = (dirs["work"] / "runs" / run_name / "train_log.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines()]


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_prepare_writes_tokens_and_heldout(dirs: dict[str, Path]) -> None:
    stats = json.loads((dirs["work"] / "tokens" / "stats.json").read_text())
    for domain in DOMAIN_SOURCES:
        assert stats[f"{domain}.train"]["tokens"] > 1000
        held = (dirs["model"] / "heldout" / f"{domain}.npy").read_bytes()
        assert len(held) > 0


def test_training_is_seeded(dirs: dict[str, Path]) -> None:
    tokens = str(8 * STEP_TOKENS)
    run(dirs, "train", "--run", "a", "--tokens", tokens, *TINY)
    run(dirs, "train", "--run", "b", "--tokens", tokens, *TINY)
    assert_same_weights(weights(dirs, "a"), weights(dirs, "b"))
    steps = [r["step"] for r in log_of(dirs, "a") if "loss" in r]
    assert steps == list(range(1, 9))


def test_a_killed_run_resumes_to_the_same_weights(dirs: dict[str, Path]) -> None:
    """Checkpoint every step, kill the process mid-run, rerun: same weights as run a."""
    tokens = str(8 * STEP_TOKENS)
    if not (dirs["work"] / "runs" / "a").exists():
        run(dirs, "train", "--run", "a", "--tokens", tokens, *TINY)
    cmd = [
        sys.executable, str(SCRIPT), "train", "--run", "k", "--tokens", tokens, *TINY,
        "--ckpt-minutes", "0", "--corpus", str(dirs["corpus"]), "--work", str(dirs["work"]),
        "--model-dir", str(dirs["model"]),
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    killed_at = None
    assert proc.stdout is not None
    for line in proc.stdout:  # kill right after the third step is logged
        if line.startswith("step 3/"):
            proc.kill()
            killed_at = 3
            break
    proc.wait(timeout=60)
    assert killed_at is not None, "the run ended before it could be killed"
    ckpt = torch.load(dirs["work"] / "runs" / "k" / "ckpt.pt", weights_only=False)
    assert 2 <= ckpt["step"] < 8  # it really stopped mid-run
    time.sleep(0.1)
    out = run(dirs, "train", "--run", "k", "--tokens", tokens, *TINY).stdout
    assert "resumed" in out
    assert_same_weights(weights(dirs, "a"), weights(dirs, "k"))


def test_continue_starts_a_second_phase_and_exports(dirs: dict[str, Path]) -> None:
    if not (dirs["work"] / "runs" / "a").exists():
        run(dirs, "train", "--run", "a", "--tokens", str(8 * STEP_TOKENS), *TINY)
    base = weights(dirs, "a")
    run(
        dirs, "train", "--run", "a2", "--continue-from", "a", "--tokens", str(4 * STEP_TOKENS),
        *TINY, "--lr", "1e-3",
    )  # fmt: skip
    log = log_of(dirs, "a2")
    # The new run's log is the parent's history followed by the new phase.
    assert log[: len(log_of(dirs, "a"))] == log_of(dirs, "a")
    cont = [r for r in log if r.get("event") == "continue"]
    assert len(cont) == 1 and cont[0]["step"] == 8 and cont[0]["horizon"] == 12
    new = [r for r in log[len(log_of(dirs, "a")) :] if "loss" in r]
    assert [r["step"] for r in new] == [9, 10, 11, 12]
    # Rewarm from a small lr (warmup is phase-relative), then cosine down.
    lrs = [r["lr"] for r in new]
    assert lrs[0] < lrs[1] and max(lrs) == pytest.approx(1e-3) and lrs[-1] < max(lrs)
    assert any(not torch.equal(base[k], v) for k, v in weights(dirs, "a2").items())

    sys.path.insert(0, str(REPO / "scripts"))
    import embedded_report

    summary = embedded_report.training_summary(dirs["work"] / "runs" / "a2" / "train_log.jsonl")
    phases = summary["phases"]
    assert [(p["first_step"], p["last_step"]) for p in phases] == [(0, 8), (8, 12)]  # type: ignore[index]
    assert summary["tokens"] == 12 * STEP_TOKENS

    run(dirs, "export", "--run", "a2", "--dtype", "float32", *TINY)
    import dynaexq
    from transformers import AutoModelForCausalLM

    engine = dynaexq.load(dirs["model"], dtype="float32", device="cpu")
    ref = AutoModelForCausalLM.from_pretrained(str(dirs["model"]), dtype=torch.float32)
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ref(input_ids=ids).logits
    assert (engine.forward(ids) - want).abs().max().item() <= 1e-4


def test_a_packed_run_moves_and_continues_with_another_batch(
    dirs: dict[str, Path], tmp_path: Path
) -> None:
    """pack -> unpack gives the same weights; a phase continued from it starts AdamW afresh,
    may use another batch size, and the log and report count its tokens right."""
    from safetensors import safe_open

    if not (dirs["work"] / "runs" / "a").exists():
        run(dirs, "train", "--run", "a", "--tokens", str(8 * STEP_TOKENS), *TINY)
    packed = tmp_path / "packed"
    run(dirs, "pack", "--run", "a", "--out", str(packed), "--shard-mb", "0.05")
    meta = json.loads((packed / "state.json").read_text())
    assert meta["step"] == 8 and meta["tokens"] == 8 * STEP_TOKENS and len(meta["files"]) > 1
    for f in meta["files"]:  # every shard under the limit unless one tensor alone is over it
        with safe_open(str(packed / f), "pt") as sf:
            sizes = [sf.get_tensor(k).numel() * 4 for k in sf.keys()]  # noqa: SIM118
        assert sum(sizes) <= 0.05 * 2**20 or len(sizes) == 1
    assert not (dirs["work"] / "runs" / "moved").exists()
    run(dirs, "unpack", "--src", str(packed), "--run", "moved")
    assert_same_weights(weights(dirs, "a"), weights(dirs, "moved"))
    again = run(dirs, "unpack", "--src", str(packed), "--run", "moved", check=False)
    assert again.returncode != 0 and "already has a checkpoint" in again.stderr
    resume = run(dirs, "train", "--run", "moved", *TINY, check=False)
    assert resume.returncode != 0 and "--continue-from moved" in resume.stderr

    run(
        dirs, "train", "--run", "moved2", "--continue-from", "moved",
        "--tokens", str(8 * 2 * STEP_TOKENS), *TINY, "--batch", "8",
    )  # fmt: skip
    log = log_of(dirs, "moved2")
    cont = [r for r in log if r.get("event") == "continue"]
    assert cont[0]["optimizer"] == "fresh" and cont[0]["tokens"] == 8 * STEP_TOKENS
    assert cont[0]["tokens_per_step"] == 2 * STEP_TOKENS
    new = [r for r in log if "loss" in r and r["step"] > 8]
    assert [r["tokens"] for r in new] == [
        8 * STEP_TOKENS + 2 * STEP_TOKENS * i for i in range(1, 9)
    ]

    sys.path.insert(0, str(REPO / "scripts"))
    import embedded_report

    summary = embedded_report.training_summary(dirs["work"] / "runs" / "moved2" / "train_log.jsonl")
    phases = summary["phases"]
    assert [p["tokens"] for p in phases] == [8 * STEP_TOKENS, 16 * STEP_TOKENS]  # type: ignore[index]
    assert [p["optimizer"] for p in phases] == ["new", "fresh"]  # type: ignore[index]
    assert summary["tokens"] == 24 * STEP_TOKENS
    # Both phases decay fully and are evaluated at their ends; 8 -> 24 steps' worth of
    # tokens is log2(3) doublings.
    ends = summary["decayed_phase_ends"]
    assert [e["tokens"] for e in ends] == [8 * STEP_TOKENS, 24 * STEP_TOKENS]  # type: ignore[index]
    first, second = ends  # type: ignore[misc]
    assert first["gain_per_doubling"] == {}
    for d, g in second["gain_per_doubling"].items():
        want = (first["loss"][d] - second["loss"][d]) / math.log2(3)
        assert g == pytest.approx(want, abs=1e-4)


def test_the_report_reads_only_the_history_the_weights_hold() -> None:
    """A run killed past its checkpoint (step 2) logged steps 3-4 it lost; the resumed
    run logs 3-4 again; a later phase continues from a checkpoint at step 5 after the
    parent logged step 6. The report keeps one record per step, from the runs that count."""
    sys.path.insert(0, str(REPORT_DIR))
    import embedded_report

    def rec(step: int, tag: str) -> dict:
        return {"step": step, "tokens": step * 10, "loss": 1.0, "lr": 1e-3, "tag": tag}

    def ev(step: int, tag: str) -> dict:
        return {"step": step, "tokens": step * 10, "eval": {"loss": {}}, "tag": tag}

    log = [
        {"event": "start", "params": 1, "horizon": 6, "tokens_per_step": 10},
        rec(1, "a"), rec(2, "a"), ev(2, "a"), rec(3, "lost"), {"event": "horizon", "step": 3},
        rec(4, "lost"), ev(4, "lost"),
        rec(3, "b"), rec(4, "b"), ev(4, "b"), rec(5, "b"), rec(6, "past-ckpt"),
        {"event": "continue", "step": 5, "tokens": 50},
        rec(6, "c"), ev(6, "c"),
    ]  # fmt: skip
    kept = embedded_report.trained_history(log)
    assert [(r.get("step"), r.get("tag")) for r in kept if "tag" in r] == [
        (1, "a"), (2, "a"), (2, "a"), (3, "b"), (4, "b"), (4, "b"), (5, "b"), (6, "c"), (6, "c"),
    ]  # fmt: skip
    assert [r["event"] for r in kept if "event" in r] == ["start", "continue"]
