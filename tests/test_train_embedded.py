"""scripts/train_embedded.py on a tiny corpus: seeded, resumable after a kill, continued
in a second phase, exported in the Hugging Face format that `dynaexq.load()` reads.

The corpus is text from this repository (three domains, like the real one), the model a
2-layer, 8-expert Qwen3-MoE, so each stage takes seconds.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "train_embedded.py"
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
