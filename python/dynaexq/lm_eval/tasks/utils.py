"""Datasets of the example tasks, cut from the embedded model's held-out text
(`dynaexq/data/embedded/heldout/*.npy`: Python, C and prose the model never trained on).

Deterministic: every document comes from the end of a domain's held-out stream (the start
is `dynaexq eval`'s calibration text), the distractors of the multiple-choice task from
fixed strides of it.
"""

from __future__ import annotations

from typing import Any

DOCS = 16  # per task (and per domain for the perplexity tasks)
WINDOW = 256  # tokens per perplexity document


def _heldout(domain: str) -> str:
    """The last quarter of a held-out stream, decoded."""
    import numpy as np
    from dynaexq.engine import EMBEDDED_MODEL_DIR
    from dynaexq.tokenizer import Tokenizer

    ids = np.load(EMBEDDED_MODEL_DIR / "heldout" / f"{domain}.npy").astype(np.int64)
    return Tokenizer(EMBEDDED_MODEL_DIR).decode(ids[-len(ids) // 4 :].tolist())


def _windows(domain: str) -> list[dict[str, str]]:
    import numpy as np
    from dynaexq.engine import EMBEDDED_MODEL_DIR
    from dynaexq.tokenizer import Tokenizer

    tok = Tokenizer(EMBEDDED_MODEL_DIR)
    ids = np.load(EMBEDDED_MODEL_DIR / "heldout" / f"{domain}.npy").astype(np.int64)
    tail = ids[-DOCS * WINDOW :]
    return [{"text": tok.decode(tail[i * WINDOW : (i + 1) * WINDOW].tolist())} for i in range(DOCS)]


def _lines(domain: str) -> list[str]:
    return [line for line in _heldout(domain).split("\n") if len(line.strip()) >= 12]


def _dataset(rows: list[dict[str, Any]]) -> Any:
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def heldout_python(**_: Any) -> Any:
    return _dataset(_windows("python"))


def heldout_c(**_: Any) -> Any:
    return _dataset(_windows("c"))


def heldout_prose(**_: Any) -> Any:
    return _dataset(_windows("prose"))


def next_line(**_: Any) -> Any:
    """Python and C: eight lines, and the line that follows (multiple choice: against
    three lines from elsewhere in the same domain; generate_until: its rest, given its
    indentation and first four characters)."""
    rows = []
    for domain in ("python", "c"):
        text = _heldout(domain)
        lines = text.split("\n")
        pool = _lines(domain)
        picked = 0
        step = max(1, len(lines) // (DOCS * 2))
        for i in range(8, len(lines) - 1, step):
            target = lines[i]
            if len(target.strip()) < 12 or picked == DOCS // 2:
                continue
            others = [pool[(i * 7 + k * 997) % len(pool)] for k in range(1, 4)]
            if target in others:
                continue
            choices = ["\n" + line for line in (target, *others)]
            answer = i % 4  # deterministic position of the right line
            choices[0], choices[answer] = choices[answer], choices[0]
            # (no newline at the end: "\n" and the indentation after it are one token)
            context = "\n".join(lines[i - 8 : i])
            # generate_until: the line's indentation and first 4 characters are given
            cut = len(target) - len(target.lstrip()) + 4
            rows.append(
                {
                    "context": context,
                    "choices": choices,
                    "answer": answer,
                    "prefix": context + "\n" + target[:cut],
                    "rest": target[cut:],
                }
            )
            picked += 1
    return _dataset(rows)


def prefix_chars(references: list[str], predictions: list[str]) -> float:
    """Characters of the true line the model got right before its first mistake, as a
    share of the line (exact match is rare for a 8M-parameter model)."""
    ref, pred = references[0], predictions[0]
    n = 0
    while n < min(len(ref), len(pred)) and ref[n] == pred[n]:
        n += 1
    return n / max(1, len(ref))
