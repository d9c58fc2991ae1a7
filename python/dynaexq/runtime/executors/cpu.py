"""The CPU expert executor: one call per MoE layer into the Rust core, which groups the
routed pairs by expert, leases every hit expert's published version and runs gate_up +
SiLU + down straight from its packed bytes in the pool, in parallel over experts and
output rows, with the GIL released (`dynaexq._core.CpuExperts`)."""

from __future__ import annotations

import numpy as np
import torch

from dynaexq._core import CpuExperts, ExpertTable
from dynaexq.quant.expert import DEFAULT_ALIGNMENT, expert_nbytes
from dynaexq.runtime.store import TierStore


class CpuExecutor:
    """Runs one MoE layer from the table's published versions; counts what each tier
    served. `real[k]` is the store tier of table tier k. `activations`: "int8" (integer
    tiers take their inputs rounded to int8 per weight group and run on integer dot
    products, as llama.cpp's quantized CPU kernels do) or "float" (exact float32 inputs)."""

    def __init__(
        self,
        table: ExpertTable,
        store: TierStore,
        real: list[int],
        threads: int = 1,
        activations: str = "int8",
    ) -> None:
        h, i = store.hidden_size, store.intermediate_size
        align = int(getattr(store, "alignment", DEFAULT_ALIGNMENT))
        tiers = [store.tiers[t] for t in real]
        for t, spec in zip(real, tiers, strict=True):
            if expert_nbytes(spec, h, i, align) != store.slot_bytes[t]:
                raise ValueError(
                    f"tier {spec.name}: the store's blobs are {store.slot_bytes[t]} B, the "
                    f"packed layout at alignment {align} is {expert_nbytes(spec, h, i, align)} B"
                )
        self.core = CpuExperts(table, [s.name for s in tiers], h, i, align, threads, activations)
        self.hidden_size = h

    def forward(
        self, layer_pos: int, hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor
    ) -> tuple[torch.Tensor, list[int], list[float]]:
        """hidden [T, H], expert_ids / weights [T, k] -> (sum over picks of weight x expert
        output [T, H] in hidden's dtype, pairs served per table tier, routing weight served
        per table tier)."""
        x = hidden.detach().to(torch.float32).contiguous()
        out = np.empty((x.shape[0], self.hidden_size), dtype=np.float32)
        ids = expert_ids.detach().to(torch.int64).contiguous().numpy()
        w = weights.detach().to(torch.float32).contiguous().numpy()
        pairs, mass = self.core.forward(layer_pos, x.numpy(), ids, w, out)
        return torch.from_numpy(out).to(hidden.dtype), pairs, mass
