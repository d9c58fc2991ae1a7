"""The one narrow interface through which the model runs its routed experts.

The model file computes routing (softmax router, top-k, optional renormalisation) and hands
each MoE layer's tokens to an `ExpertExecutor`, which returns the weighted sum of the routed
experts' outputs. The precision runtime replaces `FullPrecisionExperts` with its own
executor (mixed-precision experts, leases, ...) without touching the model file.

Routing hooks observe each MoE layer's routing on every forward step (prefill and decode):
`hook(layer, expert_ids [T, k], router_probs [T, num_experts] float32)`. Only real tokens
are shown (no padding).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F

from dynaexq.checkpoint import Checkpoint, ExpertTensors

RoutingHook = Callable[[int, torch.Tensor, torch.Tensor], None]


@runtime_checkable
class ExpertExecutor(Protocol):
    """Runs the routed experts of one MoE layer."""

    def forward(
        self,
        layer: int,
        hidden: torch.Tensor,
        expert_ids: torch.Tensor,
        weights: torch.Tensor,
    ) -> torch.Tensor:
        """Combined expert output.

        hidden [T, H]; expert_ids [T, k] (int64); weights [T, k] (hidden's dtype).
        Returns [T, H] = sum_j weights[t, j] * expert_{expert_ids[t, j]}(hidden[t]).
        """
        ...


class FullPrecisionExperts:
    """The default executor: every expert at the model's compute dtype.

    Weights of a layer are kept stacked like transformers 5.x holds them in memory
    (`gate_up` [E, 2I, H] with gate rows first, `down` [E, H, I]); `expert(layer, e)`
    addresses one expert. The forward pass sorts the T*k (token, expert) pairs by expert
    and runs two grouped matmuls over all experts (`torch._grouped_mm`, where the build
    supports the device, dtype and shapes), else two matmuls per expert that received
    tokens: no per-token Python loop either way.
    """

    def __init__(
        self,
        gate_up: dict[int, torch.Tensor],
        down: dict[int, torch.Tensor],
        use_grouped_mm: bool = True,
    ) -> None:
        if gate_up.keys() != down.keys():
            raise ValueError("gate_up and down must cover the same layers")
        self.gate_up = gate_up
        self.down = down
        self.use_grouped_mm = use_grouped_mm

    @classmethod
    def from_checkpoint(
        cls,
        checkpoint: Checkpoint,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        layers: Iterable[int] | None = None,
    ) -> FullPrecisionExperts:
        """Read every routed expert expert-by-expert into preallocated stacked tensors."""
        c = checkpoint.config
        e, h, i = c.num_experts, c.hidden_size, c.moe_intermediate_size
        gate_up: dict[int, torch.Tensor] = {}
        down: dict[int, torch.Tensor] = {}
        for layer in c.moe_layers if layers is None else layers:
            gu = torch.empty(e, 2 * i, h, dtype=dtype, device=device)
            dn = torch.empty(e, h, i, dtype=dtype, device=device)
            for x in range(e):
                t = checkpoint.expert(layer, x, dtype)
                gu[x, :i].copy_(t.gate)
                gu[x, i:].copy_(t.up)
                dn[x].copy_(t.down)
            gate_up[layer], down[layer] = gu, dn
        return cls(gate_up, down)

    @property
    def layers(self) -> list[int]:
        return sorted(self.gate_up)

    def expert(self, layer: int, expert: int) -> ExpertTensors:
        gu = self.gate_up[layer][expert]
        i = gu.shape[0] // 2
        return ExpertTensors(gate=gu[:i], up=gu[i:], down=self.down[layer][expert])

    def forward(
        self,
        layer: int,
        hidden: torch.Tensor,
        expert_ids: torch.Tensor,
        weights: torch.Tensor,
    ) -> torch.Tensor:
        gate_up, down = self.gate_up[layer], self.down[layer]
        num_experts = gate_up.shape[0]
        t, k = expert_ids.shape
        if t == 0:
            return torch.zeros_like(hidden)
        flat = expert_ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        token_of = order // k
        x = hidden[token_of]  # [T*k, H], grouped by expert
        counts = torch.bincount(flat, minlength=num_experts)
        # torch's CPU grouped matmul walks every expert, hit or not: with few (token,
        # expert) pairs the per-expert loop over the hit ones is faster (measured
        # crossover near a quarter of the experts).
        grouped = self.use_grouped_mm and 4 * t * k >= num_experts
        out = self._grouped(gate_up, down, x, counts) if grouped else None
        if out is None:
            out = self._looped(gate_up, down, x, counts.tolist())
        out.mul_(weights.reshape(-1)[order].unsqueeze(-1))
        # Undo the sort and sum each token's k outputs in slot order: deterministic, and
        # unlike index_add_ it does not stall on a busy CPU.
        unsorted = torch.empty_like(out)
        unsorted[order] = out
        return unsorted.view(t, k, -1).sum(dim=1)

    def _grouped(
        self, gate_up: torch.Tensor, down: torch.Tensor, x: torch.Tensor, counts: torch.Tensor
    ) -> torch.Tensor | None:
        """All experts in two grouped matmuls (torch._grouped_mm), without a host sync.

        Returns None where this torch build, device, dtype or shape cannot (decided once
        per combination); the per-expert loop then runs instead.
        """
        key = (x.device.type, x.dtype, tuple(gate_up.shape))
        if not hasattr(torch, "_grouped_mm") or _GROUPED_OK.get(key) is False:
            return None
        offs = torch.cumsum(counts, 0, dtype=torch.int32)
        try:
            g, u = torch._grouped_mm(x, gate_up.transpose(1, 2), offs=offs).chunk(2, dim=-1)
            out = torch._grouped_mm(F.silu(g) * u, down.transpose(1, 2), offs=offs)
        except (RuntimeError, NotImplementedError):
            _GROUPED_OK[key] = False
            return None
        _GROUPED_OK[key] = True
        return out

    @staticmethod
    def _looped(
        gate_up: torch.Tensor, down: torch.Tensor, x: torch.Tensor, counts: list[int]
    ) -> torch.Tensor:
        """Two matmuls per expert that received tokens (x is sorted by expert)."""
        out = torch.empty_like(x)
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            xs = x[start : start + n]
            g, u = F.linear(xs, gate_up[e]).chunk(2, dim=-1)
            out[start : start + n] = F.linear(F.silu(g) * u, down[e])
            start += n
        return out


# (device type, dtype, gate_up shape) -> whether torch._grouped_mm ran there.
_GROUPED_OK: dict[tuple[str, torch.dtype, tuple[int, ...]], bool] = {}


class MappedExperts:
    """Experts read straight from the memory-mapped checkpoint on every call (CPU only).

    Nothing is copied when the checkpoint's dtype is the compute dtype: the weights are
    the file's pages, which the kernel reads in on first use and may drop under memory
    pressure. This runs a checkpoint larger than RAM, slowly; it is also the reference
    for executors that stage experts themselves.
    """

    def __init__(self, checkpoint: Checkpoint, dtype: torch.dtype) -> None:
        # Keep every file mapped: reopening a shard on each call would re-parse its header.
        self.checkpoint = Checkpoint(checkpoint.path, max_open_files=len(checkpoint.files))
        self.dtype = dtype

    @classmethod
    def factory(
        cls, checkpoint: Checkpoint, dtype: torch.dtype, device: torch.device | str = "cpu"
    ) -> MappedExperts:
        if torch.device(device).type != "cpu":
            raise ValueError("MappedExperts runs on the CPU only")
        return cls(checkpoint, dtype)

    def expert(self, layer: int, expert: int) -> ExpertTensors:
        return self.checkpoint.expert(layer, expert, self.dtype)

    def forward(
        self,
        layer: int,
        hidden: torch.Tensor,
        expert_ids: torch.Tensor,
        weights: torch.Tensor,
    ) -> torch.Tensor:
        t, k = expert_ids.shape
        if t == 0:
            return torch.zeros_like(hidden)
        flat = expert_ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        sorted_ids = flat[order].tolist()
        token_of = order // k
        x = hidden[token_of]
        out = torch.empty_like(x)
        start = 0
        while start < len(sorted_ids):
            e = sorted_ids[start]
            end = start
            while end < len(sorted_ids) and sorted_ids[end] == e:
                end += 1
            w = self.expert(layer, e)
            xs = x[start:end]
            out[start:end] = F.linear(F.silu(F.linear(xs, w.gate)) * F.linear(xs, w.up), w.down)
            start = end
        out.mul_(weights.reshape(-1)[order].unsqueeze(-1))
        unsorted = torch.empty_like(out)
        unsorted[order] = out
        return unsorted.view(t, k, -1).sum(dim=1)
