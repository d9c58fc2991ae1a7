"""The embedded default model through `dynaexq.load()`: it loads, matches transformers,
generates text, and is what `dynaexq generate` uses by default.

Skipped while python/dynaexq/data/embedded/ holds no checkpoint.
"""

from __future__ import annotations

import pytest
import torch
from dynaexq.engine import EMBEDDED_MODEL_DIR

pytestmark = pytest.mark.skipif(
    not (EMBEDDED_MODEL_DIR / "config.json").is_file(), reason="embedded model not present"
)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def engine():
    import dynaexq

    return dynaexq.load(dtype="float32", device="cpu")


def test_embedded_model_matches_transformers(engine) -> None:
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        EMBEDDED_MODEL_DIR, dtype=torch.float32
    ).eval()
    ids = engine.tokenizer.encode("def fibonacci(n):\n    if n < 2:\n        return n\n")
    ids = torch.tensor([ids[:48]])
    with torch.no_grad():
        ref = hf(ids).logits
    assert (engine.forward(ids) - ref).abs().max().item() <= 1e-4
    with torch.no_grad():
        want = hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=16,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )[0, ids.shape[1] :].tolist()
    got = engine.generate([ids[0].tolist()], max_new_tokens=16, ignore_eos=True)[0]
    assert got.token_ids == want


def test_embedded_model_generates_text(engine) -> None:
    r = engine.generate("The", max_new_tokens=24, ignore_eos=True)
    assert len(r.token_ids) == 24 and r.text.strip()


def test_cli_defaults_to_the_embedded_model(engine, capsys) -> None:
    from dynaexq.cli import main

    rc = main(["generate", "--device", "cpu", "--dtype", "float32", "--max-new-tokens", "8", "int"])
    assert rc == 0
    assert capsys.readouterr().out == engine.generate("int", max_new_tokens=8).text + "\n"
