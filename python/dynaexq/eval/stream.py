"""Causal, step-by-step evaluation of next-token loss over token streams.

A stream is read in windows of `window` tokens (the context the model attends over); each
window is fed in chunks of `chunk` tokens through the KV cache. One chunk of every
parallel stream is one *step*: after each step `on_step` runs, which is where a precision
runtime observes routing, plans and publishes transitions. A transition therefore only
affects later steps, as in serving: the evaluation is causal.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from dynaexq.model import CausalLM


@dataclass
class StreamResult:
    """Per-token results, `[streams, tokens]`, in stream order; `step_of` maps each token
    to the step that scored it."""

    nll: np.ndarray
    correct: np.ndarray
    step_of: np.ndarray
    steps: int

    def perplexity(self, sl: slice | None = None) -> float:
        nll = self.nll[:, sl] if sl is not None else self.nll
        return float(math.exp(nll.mean()))

    def accuracy(self, sl: slice | None = None) -> float:
        c = self.correct[:, sl] if sl is not None else self.correct
        return float(c.mean())

    @property
    def tokens(self) -> int:
        return int(self.nll.size)


def as_streams(tokens: np.ndarray, streams: int, window: int, max_tokens: int | None) -> np.ndarray:
    """Cut one token sequence into `streams` equal contiguous parts whose length is a
    multiple of `window` (+1 for the last target), capped at `max_tokens` in total."""
    tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
    total = len(tokens) - 1 if max_tokens is None else min(len(tokens) - 1, max_tokens)
    per = (total // streams) // window * window
    if per <= 0:
        raise ValueError(
            f"{len(tokens)} tokens cannot fill {streams} stream(s) of one {window}-token window"
        )
    return np.stack([tokens[i * per : i * per + per + 1] for i in range(streams)])


@torch.inference_mode()
def evaluate_streams(
    model: CausalLM,
    streams: np.ndarray,
    *,
    window: int = 256,
    chunk: int = 32,
    on_step: Callable[[int], None] | None = None,
    progress: Callable[[int], None] | None = None,
) -> StreamResult:
    """Score every token of `streams` ([B, N+1] token ids; N a multiple of `window`):
    token j+1 is predicted from the tokens of its window up to j."""
    if window <= 0 or chunk <= 0 or window % chunk:
        raise ValueError(f"window ({window}) must be a positive multiple of chunk ({chunk})")
    streams = np.asarray(streams, dtype=np.int64)
    b, n1 = streams.shape
    n = n1 - 1
    if n <= 0 or n % window:
        raise ValueError(f"stream length {n} is not a positive multiple of window {window}")
    device = next(model.parameters()).device
    dtype = model.model.embed_tokens.weight.dtype
    data = torch.from_numpy(streams).to(device)
    nll = np.empty((b, n), dtype=np.float64)
    correct = np.empty((b, n), dtype=bool)
    step_of = np.empty(n, dtype=np.int64)
    step = 0
    for w0 in range(0, n, window):
        cache = model.allocate_cache(b, window, dtype, device)
        for c0 in range(0, window, chunk):
            s = w0 + c0
            ids = data[:, s : s + chunk]
            target = data[:, s + 1 : s + chunk + 1]
            positions = torch.arange(c0, c0 + chunk, device=device).unsqueeze(0).expand(b, -1)
            logits = model(ids, positions=positions, cache=cache).float()
            loss = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none"
            )
            nll[:, s : s + chunk] = loss.view(b, chunk).cpu().numpy()
            correct[:, s : s + chunk] = (logits.argmax(-1) == target).cpu().numpy()
            step_of[s : s + chunk] = step
            if on_step is not None:
                on_step(step)
            step += 1
            if progress is not None:
                progress(b * chunk)
    return StreamResult(nll=nll, correct=correct, step_of=step_of, steps=step)


def gap_recovered(low: float, full: float, policy: float) -> float:
    """Share of the (uniform low -> full precision) gap that `policy` closes; works for
    metrics where lower is better (perplexity) and higher is better (accuracy) alike."""
    if full == low:
        return float("nan")
    return (low - policy) / (low - full)
