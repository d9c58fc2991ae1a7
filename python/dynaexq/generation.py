"""Token generation: batched prefill, then decode with a KV cache, greedy or sampled.

Several prompts of different lengths run as one batch. The prompts are right-padded for
the prefill (padding is masked and skipped by the MoE layers); every sequence then decodes
at its own position. A sequence that finishes (EOS, a stop string, or its token budget) is
dropped from the batch, so routing hooks and the experts only see live sequences.

Sampling is per sequence: row i of a seeded call draws from its own generator seeded with
`seed + i`, so a prompt's sample does not depend on what else is in the batch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from dynaexq.model import CausalLM

if TYPE_CHECKING:
    from dynaexq.runtime.graphs import BucketedGraphs


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens and when to stop.

    temperature <= 0 means greedy (argmax). top_k <= 0 and top_p >= 1 disable those
    filters. stop: strings that end a sequence (the text is cut before them). EOS ids come
    from the model unless `ignore_eos`.
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


@dataclass
class TokenEvent:
    """One generated token of sequence `index` (its index in the prompt list)."""

    index: int
    token_id: int
    finish_reason: str | None  # None while running, else "eos", "stop" or "length"


@dataclass
class SequenceOutput:
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask (to -inf) everything outside the top-k and the top-p nucleus; logits [B, V]."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # Drop a token when the tokens before it already cover top_p (keeps at least one).
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(
    logits: torch.Tensor,
    params: SamplingParams,
    generators: Sequence[torch.Generator | None],
) -> torch.Tensor:
    """Next token per row of logits [B, V] -> [B]."""
    if params.greedy:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits.float() / params.temperature, params.top_k, params.top_p)
    probs = probs.softmax(dim=-1)
    out = torch.empty(probs.shape[0], dtype=torch.long, device=probs.device)
    for row, gen in enumerate(generators):
        out[row] = torch.multinomial(probs[row], 1, generator=gen)[0]
    return out


def iter_generate(
    model: CausalLM,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams,
    eos_token_ids: Sequence[int] = (),
    decode: Callable[[list[int]], str] | None = None,
    graphs: BucketedGraphs | None = None,
) -> Iterator[list[TokenEvent]]:
    """Yield, after each forward step, the tokens produced by that step.

    `decode` (token ids -> text) is needed only for stop strings. `graphs`: decode steps
    replay the CUDA graph of the batch's bucket (`runtime.graphs`; eager past the largest
    bucket); the prefill stays eager.
    """
    if not prompts:
        return
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if params.stop and decode is None:
        raise ValueError("stop strings need a decode function")
    cfg = model.config
    if any(not 0 <= t < cfg.vocab_size for p in prompts for t in p):
        raise ValueError(f"prompt token ids must be in [0, {cfg.vocab_size})")
    if params.max_new_tokens == 0:
        return
    device = model.model.embed_tokens.weight.device
    dtype = model.model.embed_tokens.weight.dtype
    lengths = torch.tensor([len(p) for p in prompts], device=device)
    batch, longest = len(prompts), int(lengths.max())
    capacity = longest + params.max_new_tokens
    eos = set() if params.ignore_eos else set(eos_token_ids)
    generators: list[torch.Generator | None] = [None] * batch
    if params.seed is not None and not params.greedy:
        generators = [
            torch.Generator(device=device).manual_seed(params.seed + i) for i in range(batch)
        ]

    ids = torch.zeros(batch, longest, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = torch.tensor(list(p), dtype=torch.long)
    positions = torch.arange(longest, device=device).unsqueeze(0).expand(batch, longest)
    # Padding only exists when prompt lengths differ.
    token_mask = positions < lengths.unsqueeze(1) if int(lengths.min()) < longest else None
    graphed = graphs is not None and graphs.fits(batch)
    # Under graphs the prefill's cache holds the prompts only: decode writes the graph's.
    cache = model.allocate_cache(batch, longest if graphed else capacity, dtype, device)
    session = None
    with torch.inference_mode():
        logits = model(ids, positions, cache, token_mask, logits_index=lengths - 1)[:, 0]
        if graphed:
            assert graphs is not None
            session = graphs.begin(cache, batch, capacity)
            cache = None  # type: ignore[assignment]

    rows = list(range(batch))  # prompt index of each live batch row
    generated: list[list[int]] = [[] for _ in range(batch)]
    pos = lengths.clone()
    for step in range(params.max_new_tokens):
        next_ids = sample_next(logits, params, [generators[i] for i in rows])
        events, keep = [], []
        for r, (i, tok) in enumerate(zip(rows, next_ids.tolist(), strict=True)):
            generated[i].append(tok)
            reason = None
            if tok in eos:
                reason = "eos"
            elif params.stop and decode is not None:
                text = decode(generated[i])
                if any(s in text for s in params.stop):
                    reason = "stop"
            if reason is None and step == params.max_new_tokens - 1:
                reason = "length"
            events.append(TokenEvent(i, tok, reason))
            if reason is None:
                keep.append(r)
        yield events
        if not keep:
            return
        if len(keep) < len(rows):
            sel = torch.tensor(keep, device=device)
            pos, next_ids = pos[sel], next_ids[sel]
            if session is None:
                cache = cache.select(sel)
            else:
                session.keep(keep)
            rows = [rows[r] for r in keep]
        with torch.inference_mode():
            if session is not None:
                logits = session.step(next_ids, pos)
            else:
                # Every row's position is at most longest + step: the mask needs no host read.
                logits = model(
                    next_ids.unsqueeze(1), pos.unsqueeze(1), cache, key_slots=longest + step + 1
                )[:, 0]
        pos = pos + 1


def generate_tokens(
    model: CausalLM,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams,
    eos_token_ids: Sequence[int] = (),
    decode: Callable[[list[int]], str] | None = None,
    graphs: BucketedGraphs | None = None,
) -> list[SequenceOutput]:
    """Run `iter_generate` to the end; one output per prompt, in prompt order."""
    outs = [SequenceOutput(prompt_token_ids=list(p)) for p in prompts]
    for events in iter_generate(model, prompts, params, eos_token_ids, decode, graphs):
        for ev in events:
            outs[ev.index].token_ids.append(ev.token_id)
            outs[ev.index].finish_reason = ev.finish_reason
    return outs
