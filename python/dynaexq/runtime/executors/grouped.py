"""The grouped executor: one MoE layer in two kernel launches (kernels/moe.cu), whatever
the batch and however the experts are spread over tiers.

Per step it pins the expert table once (`ExpertTable.pin_step`: every published version
leased) and copies the table image — per expert the tier and the byte offset of its block
in the pool's arena — into a [layers, experts] device tensor the kernels read. Per layer
it sorts the routed (token, expert) pairs by expert on the device, launches gate_up+SiLU
and down for every expert at once (each thread block reads its expert's entry and
dispatches on the tier), and combines the picks with their routing weights in pick order.
At the end of the step `end_step` records one use mark for every block of the image and
gives the leases back, so a block retired meanwhile is reclaimed only after the step that
still pointed at it (the rule of `StepPin` in the Rust core).

Routing, sorting and combining are torch ops with shapes fixed by the batch (no host
synchronisation on the way to the kernels). From `dense_from` tokens (prefill) a layer
runs eagerly instead: its hit experts are dequantized into a dense workspace
(`dq_moe_dequant_*`, `workspace_experts` at a time) and multiplied as dense matrices
(tensor cores on a GPU) instead of re-reading packed weights every eight tokens.
`launch(kernel, grid, pointers, ints)` runs one kernel: `CudaKernels.launch_moe` on a
GPU, the CPU emulation of the same source in tests.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from dynaexq._core import ExpertTable
from dynaexq.quant.cuda import ACT_KINDS
from dynaexq.quant.expert import DEFAULT_ALIGNMENT, expert_layout
from dynaexq.quant.tiers import TierSpec

# struct DqTierDesc / DqExpertEntry of kernels/moe.cu.
TIER_DESC = np.dtype(
    [("bits", "<i4"), ("group_size", "<i4"), ("gate_up_weight", "<i8"),
     ("gate_up_scales", "<i8"), ("gate_up_zeros", "<i8"), ("down_weight", "<i8"),
     ("down_scales", "<i8"), ("down_zeros", "<i8")]
)  # fmt: skip
EXPERT_ENTRY = np.dtype([("offset", "<i8"), ("tier", "<i4"), ("reserved", "<i4")])

Launch = Callable[[str, tuple[int, int], Sequence[int], Sequence[int]], None]

# Prefill: tokens from which a layer's experts run as dense matmuls, and how many experts'
# dense weights the workspace holds at once.
DENSE_FROM = 64
WORKSPACE_EXPERTS = 16
MAX_EXPERTS = 1024  # DQ_MOE_MAX_EXPERTS of kernels/moe.cu


def dense_workspace_bytes(
    hidden: int, intermediate: int, dtype_bytes: int, experts: int = WORKSPACE_EXPERTS
) -> int:
    """Device bytes of the prefill workspace: `experts` dense experts (gate_up + down)."""
    return experts * 3 * hidden * intermediate * dtype_bytes


def tier_descriptors(
    tiers: Sequence[TierSpec], hidden: int, intermediate: int, alignment: int
) -> np.ndarray:
    """One DqTierDesc per table tier: bits (16 bf16, 17 fp16 weights), group size and the
    byte offsets of the blob's sections (zeros -1 for symmetric tiers)."""
    out = np.zeros(len(tiers), dtype=TIER_DESC)
    for k, t in enumerate(tiers):
        offs = {s.name: s.offset for s in expert_layout(t, hidden, intermediate, alignment)}
        d = out[k]
        d["bits"] = t.bits if t.is_quantized else (16 if t.dtype == "bf16" else 17)
        d["group_size"] = t.group_size
        for m in ("gate_up", "down"):
            d[f"{m}_weight"] = offs[f"{m}.qweight" if t.is_quantized else f"{m}.weight"]
            d[f"{m}_scales"] = offs.get(f"{m}.scales", 0)
            d[f"{m}_zeros"] = offs.get(f"{m}.zeros", -1)
    return out


class GroupedExecutor:
    """Runs one MoE layer from the table's published versions with the grouped kernels;
    counts what each tier served. `real[k]` is the store tier of table tier k."""

    def __init__(
        self,
        table: ExpertTable,
        store,
        real: list[int],
        launch: Launch,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        dense_from: int = DENSE_FROM,
        workspace_experts: int = WORKSPACE_EXPERTS,
    ) -> None:
        if dtype not in ACT_KINDS:
            raise ValueError(f"activations must be one of {list(ACT_KINDS)}, not {dtype}")
        h, i = store.hidden_size, store.intermediate_size
        align = int(getattr(store, "alignment", DEFAULT_ALIGNMENT))
        self.table, self.launch = table, launch
        self.device, self.dtype = torch.device(device), dtype
        self.hidden_size, self.intermediate_size = h, i
        self.layers = table.num_layers
        self.experts = table.experts(0)
        if self.experts > MAX_EXPERTS:
            raise ValueError(f"the routing kernel takes up to {MAX_EXPERTS} experts a layer")
        if any(table.experts(li) != self.experts for li in range(self.layers)):
            raise ValueError("the grouped executor needs the same experts in every layer")
        self.tiers = len(real)
        descs = tier_descriptors([store.tiers[t] for t in real], h, i, align)
        self.descs = torch.from_numpy(descs.view(np.uint8).copy()).to(self.device)
        entries = self.layers * self.experts
        self.image = torch.zeros(entries, 2, dtype=torch.int64, device=self.device)
        # The host side of the image copy: pinned on a GPU, so the copy is asynchronous,
        # and two of them, so a step never rewrites a buffer whose copy may still be
        # queued (each is reused only after its copy's event).
        cuda = self.device.type == "cuda"
        self._host = [torch.zeros(entries, 2, dtype=torch.int64, pin_memory=cuda) for _ in "ab"]
        self._copied = [torch.cuda.Event() if cuda else None for _ in "ab"]
        self._steps = 0
        self._pin = None
        self._arena = 0
        self.dense_from, self.workspace_experts = dense_from, workspace_experts
        self._workspace: torch.Tensor | None = None

    # -- one step ------------------------------------------------------------------------
    def begin_step(self) -> None:
        """Pin the table for a step now (a CUDA graph's replay: before it is queued);
        the first layer does it otherwise."""
        if self._pin is None:
            self._begin_step()

    def _begin_step(self) -> None:
        pin = self.table.pin_step()
        b = self._steps % 2
        self._steps += 1
        done = self._copied[b]
        if done is not None and not done.query():  # its copy of two steps ago: landed, as a
            done.synchronize()  # rule (the step between was sampled); else wait for it
        host = self._host[b].numpy()
        host[:, 0] = np.frombuffer(pin.offsets, dtype="<i8")
        host[:, 1] = np.frombuffer(pin.tiers, dtype=np.uint8)  # tier, reserved = 0
        # On the compute stream: ordered after the previous step's kernels (which read the
        # old image) and before this step's.
        self.image.copy_(self._host[b], non_blocking=True)
        if self._copied[b] is not None:
            self._copied[b].record()
        self._pin, self._arena = pin, pin.base_address

    def end_step(self) -> None:
        """The step's kernels are enqueued: mark the image's blocks used, release them."""
        if self._pin is not None:
            self._pin.record()
            self._pin = None

    def forward(
        self, layer_pos: int, hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor
    ) -> tuple[torch.Tensor, list[int], list[float]]:
        """hidden [T, H], expert_ids / weights [T, k] -> (sum over picks of weight x expert
        output [T, H] in hidden's dtype, pairs served per table tier, routing weight served
        per table tier)."""
        out, served, mass = self.forward_device(layer_pos, hidden, expert_ids, weights)
        return out, served.tolist(), mass.tolist()

    def forward_device(
        self,
        layer_pos: int,
        hidden: torch.Tensor,
        expert_ids: torch.Tensor,
        weights: torch.Tensor,
        stats: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`forward` with what each tier served left on the device: float64 [2, tiers]
        (pairs, routing weight), added into `stats` when given (a runtime's running sums)
        or returned fresh. Nothing on the way waits for the device: routing, the two
        matrices and combining are four launches (decode)."""
        if self._pin is None:
            self._begin_step()
        dev, e_count = self.device, self.experts
        t_count, k = expert_ids.shape
        h = self.hidden_size
        flat = expert_ids.reshape(-1).to(device=dev, dtype=torch.int64).contiguous()
        pairs = flat.numel()
        # Pairs grouped by expert: each expert's first pair, each pair's token, and each
        # pick's pair (kernels/moe.cu: dq_moe_route).
        start = torch.empty(e_count + 1, dtype=torch.int32, device=dev)
        pair_token = torch.empty(pairs, dtype=torch.int32, device=dev)
        slot = torch.empty(pairs, dtype=torch.int32, device=dev)
        self.launch(
            "dq_moe_route",
            (1, 1),
            [flat.data_ptr(), start.data_ptr(), pair_token.data_ptr(), slot.data_ptr()],
            [pairs, e_count, k],
        )
        x = hidden.detach().to(device=dev, dtype=self.dtype).contiguous()
        entries = self.image.data_ptr() + layer_pos * e_count * EXPERT_ENTRY.itemsize
        common = [self._arena, entries, self.descs.data_ptr(), start.data_ptr()]
        suffix = ACT_KINDS[self.dtype]
        if t_count >= self.dense_from:
            y = self._dense(common, start, pair_token, x, suffix)
        else:
            y = self._grouped_gemv(common, pair_token, x, suffix, pairs)
        # Each token's picks in pick order, weighted; what each tier served.
        w = weights.detach().to(device=dev, dtype=self.dtype).contiguous()
        out = torch.empty(t_count, h, dtype=self.dtype, device=dev)
        if stats is None:
            stats = torch.zeros(2, self.tiers, dtype=torch.float64, device=dev)
        self.launch(
            f"dq_moe_combine_{suffix}",
            ((h + 127) // 128, t_count),
            [y.data_ptr(), slot.data_ptr(), w.data_ptr(), out.data_ptr(), entries,
             flat.data_ptr(), stats.data_ptr()],
            [t_count, k, h, self.tiers],
        )  # fmt: skip
        return out.to(hidden.dtype), stats[0], stats[1]

    def _grouped_gemv(self, common, pair_token, x, suffix: str, pairs: int) -> torch.Tensor:
        """Decode: gate_up+SiLU and down for every pair of every expert, two launches."""
        e_count, h, i, dev = self.experts, self.hidden_size, self.intermediate_size, self.device
        act = torch.empty(pairs, i, dtype=self.dtype, device=dev)
        y = torch.empty(pairs, h, dtype=self.dtype, device=dev)
        self.launch(
            f"dq_moe_gate_up_{suffix}",
            ((i + 3) // 4, e_count),
            [*common, pair_token.data_ptr(), x.data_ptr(), act.data_ptr()],
            [e_count, h, i],
        )
        self.launch(
            f"dq_moe_down_{suffix}",
            ((h + 3) // 4, e_count),
            [*common, 0, act.data_ptr(), y.data_ptr()],
            [e_count, h, i],
        )
        return y

    def _dense(self, common, start, pair_token, x, suffix: str) -> torch.Tensor:
        """Prefill (eager: it reads the per-expert counts on the host): the hit experts
        dequantized into the workspace a chunk at a time, then dense matmuls per expert."""
        h, i, dev = self.hidden_size, self.intermediate_size, self.device
        starts = start.tolist()
        hit = [e for e in range(self.experts) if starts[e + 1] > starts[e]]
        rows = x[pair_token.long()]  # the pairs' inputs, sorted by expert
        y = torch.empty(rows.shape[0], h, dtype=self.dtype, device=dev)
        if self._workspace is None:
            self._workspace = torch.empty(
                self.workspace_experts, 3 * i * h, dtype=self.dtype, device=dev
            )
        ws = self._workspace
        for c in range(0, len(hit), self.workspace_experts):
            chunk = hit[c : c + self.workspace_experts]
            ids = torch.tensor(chunk, dtype=torch.int32, device=dev)
            self.launch(
                f"dq_moe_dequant_{suffix}",
                ((2 * i + h + 3) // 4, len(chunk)),
                [*common[:3], 0, ids.data_ptr(), 0, ws.data_ptr()],
                [len(chunk), h, i],
            )
            for j, e in enumerate(chunk):
                a, b = starts[e], starts[e + 1]
                gate_up = ws[j, : 2 * i * h].view(2 * i, h)
                down = ws[j, 2 * i * h :].view(h, i)
                g = (rows[a:b] @ gate_up.T).float()
                act = (F.silu(g[:, :i]) * g[:, i:]).to(self.dtype)
                y[a:b] = act @ down.T
        return y
