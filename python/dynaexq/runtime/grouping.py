"""Routed (token, expert) pairs grouped by expert and back (the torch executors' halves)."""

from __future__ import annotations

import torch


def _group(
    hidden: torch.Tensor, expert_ids: torch.Tensor, experts: int
) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """The T*k (token, expert) pairs sorted by expert: inputs [T*k, H] in that order, the
    order itself (for `_combine`) and how many pairs each expert received."""
    flat = expert_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=experts).tolist()  # the one host sync
    return hidden[order // expert_ids.shape[1]], order, counts


def _combine(out: torch.Tensor, order: torch.Tensor, t: int, k: int) -> torch.Tensor:
    """Expert outputs (sorted by expert) back to token order, summed over the k picks
    (a deterministic gather-sum, as the full-precision executor does)."""
    unsorted = torch.empty_like(out)
    unsorted[order] = out
    return unsorted.view(t, k, -1).sum(dim=1)
