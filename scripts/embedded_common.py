"""Helpers shared by scripts/train_embedded.py and scripts/embedded_report.py.

Routing statistics used to judge whether experts specialise:

* ``load_entropy``: entropy of a layer's expert-use distribution (share of top-k
  assignments per expert over all tokens) divided by log(num_experts). 1.0 = flat.
* ``token_entropy``: mean per-token entropy of the router softmax / log(num_experts).
* ``top25_share``: share of top-k assignments that go to the 25% most used experts
  (0.25 = flat).
* ``jaccard``: overlap of two domains' favourite experts (their top 25% by use);
  1.0 = the same favourites, low = different experts are hot per domain.
* ``js``: Jensen-Shannon divergence (nats) between two domains' expert-use distributions.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

DOMAINS = ("python", "c", "prose")
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def load_heldout(directory: Path) -> dict[str, np.ndarray]:
    """Held-out token streams (uint16) per domain, as committed next to the model."""
    out = {}
    for d in DOMAINS:
        p = directory / f"{d}.npy"
        if not p.is_file():
            raise FileNotFoundError(f"held-out split missing: {p}")
        out[d] = np.load(p)
    return out


def heldout_batches(tokens: np.ndarray, seq_len: int, max_seqs: int) -> torch.Tensor:
    """Non-overlapping windows of seq_len+1 tokens from the start of a held-out stream."""
    n = min(max_seqs, (len(tokens) - 1) // seq_len)
    if n <= 0:
        raise ValueError("held-out stream shorter than one sequence")
    idx = np.arange(n)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    return torch.from_numpy(tokens[idx].astype(np.int64))


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    heldout: dict[str, np.ndarray],
    seq_len: int,
    max_seqs: int,
    batch: int = 16,
) -> dict[str, object]:
    """Held-out loss per domain plus routing statistics, in one pass over the held-out windows."""
    was_training = model.training
    model.eval()
    cfg = model.config
    num_experts, top_k = cfg.num_experts, cfg.num_experts_per_tok
    losses: dict[str, float] = {}
    counts: dict[str, np.ndarray] = {}  # domain -> [layers, experts] assignment counts
    tok_entropy: dict[str, np.ndarray] = {}
    device = next(model.parameters()).device
    for d in DOMAINS:
        seqs = heldout_batches(heldout[d], seq_len, max_seqs)
        nll, ntok = 0.0, 0
        cnt = np.zeros((cfg.num_hidden_layers, num_experts))
        ent = np.zeros(cfg.num_hidden_layers)
        for i in range(0, len(seqs), batch):
            x = seqs[i : i + batch].to(device)
            out = model(input_ids=x[:, :-1], output_router_logits=True, use_cache=False)
            logits = out.logits.float()
            nll += torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"
            ).item()
            ntok += x[:, 1:].numel()
            for layer, rl in enumerate(out.router_logits):
                probs = torch.softmax(rl.float(), dim=-1)
                picks = torch.topk(probs, top_k, dim=-1).indices
                cnt[layer] += np.bincount(picks.reshape(-1).cpu().numpy(), minlength=num_experts)
                ent[layer] += (-(probs * torch.log(probs.clamp_min(1e-12))).sum(-1)).sum().item()
        losses[d] = nll / ntok
        counts[d] = cnt
        tok_entropy[d] = ent / ntok / math.log(num_experts)
    if was_training:
        model.train()
    stats = routing_stats(counts)
    stats["token_entropy"] = np.mean([tok_entropy[d] for d in DOMAINS], axis=0).round(4).tolist()
    return {"loss": {d: round(v, 5) for d, v in losses.items()}, "routing": stats}


def _entropy(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def _top_set(c: np.ndarray, frac: float = 0.25) -> set[int]:
    k = max(1, int(round(len(c) * frac)))
    # Stable tie-break by expert id so the set is deterministic.
    order = sorted(range(len(c)), key=lambda e: (-c[e], e))
    return set(order[:k])


def routing_stats(counts: dict[str, np.ndarray]) -> dict[str, object]:
    """Per-layer skew and per-domain divergence from assignment counts [layers, experts]."""
    domains: Sequence[str] = list(counts)
    total = sum(counts.values())
    layers, num_experts = total.shape
    k = max(1, int(round(num_experts * 0.25)))
    load_entropy, top25, jacc, js = [], [], [], []
    for layer in range(layers):
        p = total[layer] / total[layer].sum()
        load_entropy.append(_entropy(p) / math.log(num_experts))
        top25.append(float(np.sort(p)[::-1][:k].sum()))
        pj, pd = [], []
        for a, b in itertools.combinations(domains, 2):
            sa, sb = _top_set(counts[a][layer]), _top_set(counts[b][layer])
            pj.append(len(sa & sb) / len(sa | sb))
            qa = counts[a][layer] / counts[a][layer].sum()
            qb = counts[b][layer] / counts[b][layer].sum()
            m = (qa + qb) / 2
            pd.append(_entropy(m) - (_entropy(qa) + _entropy(qb)) / 2)
        jacc.append(float(np.mean(pj)))
        js.append(float(np.mean(pd)))
    per_domain_top25 = {
        d: [float(np.sort(c[la] / c[la].sum())[::-1][:k].sum()) for la in range(layers)]
        for d, c in counts.items()
    }
    r = lambda xs: [round(x, 4) for x in xs]  # noqa: E731
    return {
        "load_entropy": r(load_entropy),
        "top25_share": r(top25),
        "domain_top25_share": {d: r(v) for d, v in per_domain_top25.items()},
        "jaccard_top25": r(jacc),
        "js_divergence": r(js),
    }
