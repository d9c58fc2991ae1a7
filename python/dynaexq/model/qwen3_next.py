"""Qwen3-Next (hybrid Gated DeltaNet / gated attention MoE) in plain torch, one readable file.

Inference only, beside qwen3_moe.py and in its style; parameter names follow the Hugging
Face checkpoints (`model.layers.N.linear_attn.in_proj_qkvz.weight`, ...), so the non-expert
weights load by name. What differs from Qwen3-MoE:

- Token mixers follow `config.layer_types`: most layers are Gated DeltaNet linear attention
  (a causal depthwise convolution over q/k/v, then the gated delta rule over a recurrent
  state of [v_heads, key_dim, value_dim] per sequence, then a gated RMSNorm), every few
  layers full attention whose output is gated by a sigmoid of a second half of q_proj, with
  RoPE on only the first `partial_rotary_factor` of each head.
- Every RMSNorm of the decoder (input, post-attention, q/k and the final one) is zero-centred:
  it scales by (1 + weight). The gated norm inside the linear attention is not.
- The MoE block is Qwen3-MoE's with a shared expert behind a sigmoid gate (qwen3_moe's
  `SparseMoeBlock`); routed experts run through the same `ExpertExecutor`, so every policy
  of the precision runtime applies unchanged.
- Multi-token-prediction weights (`mtp.*` in the released checkpoints) are ignored: this
  runtime decodes one token per step, and the MTP head only drafts tokens for speculative
  decoding. They are never read (tiered checkpoints do not copy them).

Generation state (`HybridCache`): KV slots of the attention layers exactly as `KVCache`
(slot = position), and per row the recurrent and convolution state of every linear layer.
The recurrent state has no slots, so two rules replace "slot = position":
- a row whose step starts at position 0 starts from a zero state (a new sequence may take a
  row another one left);
- padding (`token_mask` False) must come after a row's real tokens in a step; it leaves the
  state untouched (decay 1, write strength 0) and the convolution state is taken after the
  row's last real token.
Prefill runs the chunked form of the delta rule (all matmuls), decode (one token) the
recurrent one; on CUDA the flash-linear-attention kernels are used when installed.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from dynaexq.model.config import ModelConfig
from dynaexq.model.experts import ExpertExecutor
from dynaexq.model.paged_kv import PagedKVView
from dynaexq.model.qwen3_moe import (
    MLP,
    Embedding,
    MoeRuntime,
    RotaryEmbedding,
    SparseMoeBlock,
    _rotate_half,
    step_mask,
    write_slots,
)

DELTA_RULE_CHUNK = 64


# ----------------------------------------------------------------------------------------
# Generation state
# ----------------------------------------------------------------------------------------
@dataclass
class HybridCache:
    """Per-layer generation state, batch rows first; entries a layer does not use are None.

    full attention:   keys[i], values[i]  [B, kv_heads, capacity, head_dim] (slot = position)
    linear attention: recurrent[i]        [B, v_heads, key_dim, value_dim]  (float32)
                      conv[i]             [B, conv_channels, kernel - 1]    (last inputs)
    """

    keys: list[torch.Tensor | None]
    values: list[torch.Tensor | None]
    recurrent: list[torch.Tensor | None]
    conv: list[torch.Tensor | None]
    capacity: int

    @classmethod
    def allocate(
        cls,
        config: ModelConfig,
        batch: int,
        capacity: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> HybridCache:
        kv = (batch, config.num_key_value_heads, capacity, config.head_dim)
        state = (
            batch,
            config.linear_num_value_heads,
            config.linear_key_head_dim,
            config.linear_value_head_dim,
        )
        conv = (batch, _conv_channels(config), config.linear_conv_kernel_dim - 1)
        n = config.num_hidden_layers
        linear = [config.is_linear_attention_layer(i) for i in range(n)]

        def make(shape: tuple[int, ...], want: bool, dt: torch.dtype) -> torch.Tensor | None:
            return torch.zeros(shape, dtype=dt, device=device) if want else None

        return cls(
            keys=[make(kv, not lin, dtype) for lin in linear],
            values=[make(kv, not lin, dtype) for lin in linear],
            recurrent=[make(state, lin, torch.float32) for lin in linear],
            conv=[make(conv, lin, dtype) for lin in linear],
            capacity=capacity,
        )

    @staticmethod
    def bytes_for(config: ModelConfig, batch: int, context: int, dtype_bytes: int) -> int:
        """What `allocate` reserves, from the config alone (for budgets)."""
        attn = len(config.attention_layers)
        linear = config.num_hidden_layers - attn
        kv = 2 * attn * config.num_key_value_heads * config.head_dim * context * dtype_bytes
        state = (
            config.linear_num_value_heads
            * config.linear_key_head_dim
            * config.linear_value_head_dim
            * 4
        )
        conv = _conv_channels(config) * (config.linear_conv_kernel_dim - 1) * dtype_bytes
        return batch * (kv + linear * (state + conv))

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> HybridCache:
        def each(ts: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
            return [None if t is None else fn(t) for t in ts]

        return HybridCache(
            each(self.keys), each(self.values), each(self.recurrent), each(self.conv), self.capacity
        )

    def select(self, rows: torch.Tensor) -> HybridCache:
        """Keep only the given batch rows (used to drop finished sequences)."""
        return self._map(lambda t: t.index_select(0, rows))

    def rows(self, start: int, stop: int) -> HybridCache:
        """Rows start..stop-1 as views (no copy): a scheduler's slice of its slab."""
        return self._map(lambda t: t[start:stop])

    def copy_row(self, src: int, dst: int, used: int) -> None:
        """Copy row src onto row dst: its first `used` KV slots and its whole state."""
        for k, v in zip(self.keys, self.values, strict=True):
            if k is not None and v is not None:
                k[dst, :, :used].copy_(k[src, :, :used])
                v[dst, :, :used].copy_(v[src, :, :used])
        for t in (*self.recurrent, *self.conv):
            if t is not None:
                t[dst].copy_(t[src])

    @property
    def nbytes(self) -> int:
        every = (*self.keys, *self.values, *self.recurrent, *self.conv)
        return sum(t.numel() * t.element_size() for t in every if t is not None)

    def write_and_read(
        self,
        layer: int,
        k: torch.Tensor,
        v: torch.Tensor,
        positions: torch.Tensor,
        key_slots: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store an attention layer's keys/values [B, kv_heads, T, D] at their positions
        [B, T], then return slots 0..key_slots-1 of every row."""
        ck, cv = self.keys[layer], self.values[layer]
        assert ck is not None and cv is not None
        return write_slots(ck, cv, k, v, positions, key_slots)


@dataclass
class PagedHybridView:
    """A batch's generation state with a paged KV cache: the attention layers' keys and
    values in pages (`PagedKVView`), the linear layers' recurrent and convolution state
    in rows of a HybridCache slab (fixed size per sequence; its KV capacity unused)."""

    state: HybridCache
    pages: PagedKVView

    @property
    def recurrent(self) -> list[torch.Tensor | None]:
        return self.state.recurrent

    @property
    def conv(self) -> list[torch.Tensor | None]:
        return self.state.conv

    def write_and_read(
        self,
        layer: int,
        k: torch.Tensor,
        v: torch.Tensor,
        positions: torch.Tensor,
        key_slots: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.pages.write_and_read(layer, k, v, positions, key_slots)


def _conv_channels(config: ModelConfig) -> int:
    """The short convolution runs over q, k and v together."""
    key_dim = config.linear_num_key_heads * config.linear_key_head_dim
    return 2 * key_dim + config.linear_num_value_heads * config.linear_value_head_dim


@dataclass
class Step:
    """What every layer needs to know about the current forward step (built once)."""

    positions: torch.Tensor  # [B, T]
    cos: torch.Tensor  # [B, 1, T, rotary_dim]
    sin: torch.Tensor
    cache: HybridCache | PagedHybridView | None
    token_mask: torch.Tensor | None  # [B, T], False = padding (after the row's real tokens)
    lengths: torch.Tensor | None  # [B] real tokens per row; None = all T
    fresh: torch.Tensor  # [B] bool: the row starts here at position 0 (zero state)
    key_slots: int
    attn_mask: torch.Tensor | None  # [B, 1, T, key_slots]; None = plain causal attention


# ----------------------------------------------------------------------------------------
# Norms
# ----------------------------------------------------------------------------------------
class ZeroCentredRMSNorm(nn.Module):
    """RMSNorm that scales by (1 + weight), computed in float32 (a zero weight = identity)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.float())).to(x.dtype)


class GatedRMSNorm(nn.Module):
    """RMSNorm of the linear-attention output, then times SiLU(gate): weight * norm(x) * silu(z)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        h = self.weight * h.to(x.dtype)
        return (h * F.silu(gate.float())).to(x.dtype)


# ----------------------------------------------------------------------------------------
# The gated delta rule
# ----------------------------------------------------------------------------------------
# Per head, with a state S [key_dim, value_dim], decay a_t = exp(g_t) and write strength b_t:
#     S_t = a_t S_{t-1} + b_t k_t (v_t - a_t S_{t-1}^T k_t)^T        o_t = S_t^T q_t
# i.e. decay the state, then move what it recalls for k_t towards v_t by a fraction b_t.
# All tensors here are float32, [B, H, T, ...], with q and k L2-normalised and q scaled.


def delta_rule_recurrent(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token by token (decode). q, k [B,H,T,dk]; v [B,H,T,dv]; g, beta [B,H,T];
    state [B,H,dk,dv]. Returns the outputs [B,H,T,dv] and the final state."""
    out = torch.empty_like(v)
    for t in range(q.shape[2]):
        state = state * g[:, :, t].exp()[..., None, None]
        k_t = k[:, :, t].unsqueeze(-2)  # [B, H, 1, dk]
        recalled = k_t @ state  # [B, H, 1, dv]
        delta = (v[:, :, t].unsqueeze(-2) - recalled) * beta[:, :, t, None, None]
        state = state + k_t.transpose(-1, -2) @ delta
        out[:, :, t] = (q[:, :, t].unsqueeze(-2) @ state).squeeze(-2)
    return out, state


def delta_rule_chunked(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
    chunk: int = DELTA_RULE_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same recurrence in chunks of `chunk` tokens (prefill): matmuls inside a chunk,
    one state update per chunk.

    Within a chunk starting from state S0, with G_i = exp(g_1 + ... + g_i) the decay from
    the chunk start to token i, the state after token i is
        S_i = G_i S0 + sum_{j<=i} (G_i / G_j) k_j u_j^T
    where the "pseudo-values" u_j = b_j (v_j - a_j S_{j-1}^T k_j) solve the unit
    lower-triangular system
        u_i + sum_{j<i} b_i (G_i / G_j) (k_i . k_j) u_j = b_i v_i - b_i G_i S0^T k_i,
    so u = W - Kc S0 with W and Kc from two triangular solves shared by all chunks. Then
        o_i = G_i S0^T q_i + sum_{j<=i} (G_i / G_j) (q_i . k_j) u_j.
    Tokens past the end (padding to a whole chunk) have g = b = 0: they change nothing.
    """
    b, h, n, dk = k.shape
    dv = v.shape[-1]
    pad = (-n) % chunk
    if pad:
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        g, beta = (F.pad(x, (0, pad)) for x in (g, beta))
    chunks = (n + pad) // chunk
    q, k, v = (x.reshape(b, h, chunks, chunk, x.shape[-1]) for x in (q, k, v))
    g, beta = (x.reshape(b, h, chunks, chunk) for x in (g, beta))

    log_decay = g.cumsum(-1)  # log G_i
    causal = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()
    # G_i / G_j for j <= i, 0 above the diagonal (masked before exp: no overflow)
    pair_decay = (log_decay[..., :, None] - log_decay[..., None, :]).masked_fill(~causal, -math.inf)
    pair_decay = pair_decay.exp()
    k_beta = k * beta[..., None]
    eye = torch.eye(chunk, dtype=q.dtype, device=q.device)
    system = eye + ((k_beta @ k.transpose(-1, -2)) * pair_decay).tril(-1)
    w = torch.linalg.solve_triangular(system, v * beta[..., None], upper=False, unitriangular=True)
    kc = torch.linalg.solve_triangular(
        system, k_beta * log_decay.exp()[..., None], upper=False, unitriangular=True
    )
    scores = (q @ k.transpose(-1, -2)) * pair_decay  # (G_i / G_j) q_i . k_j, j <= i
    q_from_start = q * log_decay.exp()[..., None]  # G_i q_i
    k_to_end = k * (log_decay[..., -1:] - log_decay).exp()[..., None]  # (G_C / G_j) k_j
    chunk_decay = log_decay[..., -1].exp()[..., None, None]  # G_C

    out = torch.empty(b, h, chunks, chunk, dv, dtype=q.dtype, device=q.device)
    for c in range(chunks):
        u = w[:, :, c] - kc[:, :, c] @ state
        out[:, :, c] = q_from_start[:, :, c] @ state + scores[:, :, c] @ u
        state = state * chunk_decay[:, :, c] + k_to_end[:, :, c].transpose(-1, -2) @ u
    return out.reshape(b, h, chunks * chunk, dv)[:, :, :n], state


def _fla_kernels(
    x: torch.Tensor,
) -> tuple[Callable[..., tuple[torch.Tensor, torch.Tensor]], ...] | None:
    """flash-linear-attention's chunked and fused-recurrent kernels for CUDA tensors, if
    installed and not turned off with DYNAEXQ_LINEAR_ATTENTION=torch."""
    if not x.is_cuda or os.environ.get("DYNAEXQ_LINEAR_ATTENTION", "").lower() == "torch":
        return None
    try:
        from fla.ops.gated_delta_rule import (  # type: ignore[import-not-found]
            chunk_gated_delta_rule,
            fused_recurrent_gated_delta_rule,
        )
    except ImportError:
        return None
    return chunk_gated_delta_rule, fused_recurrent_gated_delta_rule


def gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dispatch: flash-linear-attention on CUDA where installed, else torch (recurrent for
    one token, chunked otherwise). Same shapes as `delta_rule_chunked`."""
    fla = _fla_kernels(q)
    if fla is not None:
        chunked, recurrent = fla
        kernel = recurrent if q.shape[2] == 1 else chunked
        # fla takes [B, T, H, ...] and the scale separately; q here is already scaled.
        # (The calling convention is tested with stand-in kernels; the kernels themselves
        # have not run here: no GPU with fla installed was at hand.)
        qt, kt, vt, gt, bt = (x.transpose(1, 2).contiguous() for x in (q, k, v, g, beta))
        o, final = kernel(
            qt,
            kt,
            vt,
            g=gt,
            beta=bt,
            scale=1.0,
            initial_state=state.contiguous(),
            output_final_state=True,
        )
        return o.transpose(1, 2).float(), final.float()
    if q.shape[2] == 1:
        return delta_rule_recurrent(q, k, v, g, beta, state)
    return delta_rule_chunked(q, k, v, g, beta, state)


def _l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)


# ----------------------------------------------------------------------------------------
# Token mixers
# ----------------------------------------------------------------------------------------
class GatedDeltaNet(nn.Module):
    """Linear attention: projections -> short causal conv (SiLU) -> gated delta rule ->
    gated RMSNorm -> out_proj."""

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.k_heads = config.linear_num_key_heads
        self.v_heads = config.linear_num_value_heads
        self.dk = config.linear_key_head_dim
        self.dv = config.linear_value_head_dim
        self.kernel = config.linear_conv_kernel_dim
        self.channels = _conv_channels(config)
        h = config.hidden_size
        per_k_head = self.v_heads // self.k_heads  # value heads sharing one q/k head
        # Per q/k head: its q, its k, then the v and z (output gate) of its value heads.
        self.in_proj_qkvz = nn.Linear(
            h, self.k_heads * (2 * self.dk + 2 * per_k_head * self.dv), bias=False
        )
        # Per q/k head: b (write strength) then a (decay) of its value heads.
        self.in_proj_ba = nn.Linear(h, 2 * self.v_heads, bias=False)
        self.conv1d = nn.Conv1d(
            self.channels, self.channels, self.kernel, groups=self.channels, bias=False
        )
        self.dt_bias = nn.Parameter(torch.ones(self.v_heads))
        self.A_log = nn.Parameter(torch.zeros(self.v_heads))
        self.norm = GatedRMSNorm(self.dv, config.rms_norm_eps)
        self.out_proj = nn.Linear(self.v_heads * self.dv, h, bias=False)

    def forward(self, x: torch.Tensor, step: Step) -> torch.Tensor:
        b, t, _ = x.shape
        per = self.v_heads // self.k_heads
        qkvz = self.in_proj_qkvz(x).view(b, t, self.k_heads, -1)
        q, k, v, z = qkvz.split([self.dk, self.dk, per * self.dv, per * self.dv], dim=-1)
        write, decay = self.in_proj_ba(x).view(b, t, self.k_heads, 2 * per).split(per, dim=-1)
        mixed = torch.cat([q.reshape(b, t, -1), k.reshape(b, t, -1), v.reshape(b, t, -1)], -1)
        mixed = self._conv(mixed.transpose(1, 2), step).transpose(1, 2)
        key_dim = self.k_heads * self.dk
        q, k, v = mixed.split([key_dim, key_dim, self.v_heads * self.dv], dim=-1)

        # Decay (log space, <= 0) and write strength per value head, float32.
        beta = write.reshape(b, t, self.v_heads).float().sigmoid()
        g = -self.A_log.float().exp() * F.softplus(
            decay.reshape(b, t, self.v_heads).float() + self.dt_bias
        )
        if step.token_mask is not None:  # padding: decay 1, no write
            keep = step.token_mask.unsqueeze(-1)
            beta, g = beta * keep, g * keep

        def heads(y: torch.Tensor, d: int) -> torch.Tensor:  # [B, T, n*d] -> [B, H_v, T, d]
            y = y.reshape(b, t, -1, d).float()
            if y.shape[2] != self.v_heads:  # q and k heads serve `per` value heads each
                y = y.repeat_interleave(per, dim=2)
            return y.transpose(1, 2)

        qh = _l2norm(heads(q, self.dk)) * self.dk**-0.5
        kh = _l2norm(heads(k, self.dk))
        vh = heads(v, self.dv)
        state = self._initial_state(b, step, x.device)
        out, state = gated_delta_rule(qh, kh, vh, g.transpose(1, 2), beta.transpose(1, 2), state)
        if step.cache is not None:
            cached = step.cache.recurrent[self.layer]
            assert cached is not None
            cached.copy_(state)

        out = out.transpose(1, 2).to(x.dtype)  # [B, T, H_v, dv]
        out = self.norm(out, z.reshape(b, t, self.v_heads, self.dv))
        return self.out_proj(out.reshape(b, t, -1))

    def _initial_state(self, b: int, step: Step, device: torch.device) -> torch.Tensor:
        shape = (b, self.v_heads, self.dk, self.dv)
        if step.cache is None:
            return torch.zeros(shape, dtype=torch.float32, device=device)
        cached = step.cache.recurrent[self.layer]
        assert cached is not None
        return cached.masked_fill(step.fresh[:, None, None, None], 0.0)

    def _conv(self, x: torch.Tensor, step: Step) -> torch.Tensor:
        """Causal depthwise convolution + SiLU over x [B, C, T], continuing each row from
        the inputs it saw last (the cache's conv state), which it then updates."""
        b, c, t = x.shape
        keep = self.kernel - 1
        cached = None if step.cache is None else step.cache.conv[self.layer]
        if cached is None:
            prev = x.new_zeros(b, c, keep)
        else:
            prev = cached.masked_fill(step.fresh[:, None, None], 0.0)
        full = torch.cat([prev, x.to(prev.dtype)], dim=-1)  # [B, C, keep + T]
        out = F.silu(F.conv1d(full, self.conv1d.weight, groups=c))
        if cached is not None and keep > 0:
            # The last `keep` inputs up to each row's last real token.
            if step.lengths is None:
                last = full[:, :, -keep:]
            else:
                idx = step.lengths[:, None] + torch.arange(keep, device=x.device)[None]
                last = full.gather(2, idx[:, None, :].expand(b, c, keep))
            cached.copy_(last)
        return out


class GatedAttention(nn.Module):
    """Grouped-query attention with zero-centred q/k norms, partial RoPE and a sigmoid
    output gate (q_proj yields, per head, the query then the gate)."""

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = d = config.head_dim
        h = config.hidden_size
        self.q_proj = nn.Linear(h, 2 * self.num_heads * d, bias=config.qkv_bias)
        self.k_proj = nn.Linear(h, self.num_kv_heads * d, bias=config.qkv_bias)
        self.v_proj = nn.Linear(h, self.num_kv_heads * d, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * d, h, bias=config.o_bias)
        self.q_norm = ZeroCentredRMSNorm(d, config.rms_norm_eps)
        self.k_norm = ZeroCentredRMSNorm(d, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, step: Step) -> torch.Tensor:
        b, t, _ = x.shape
        q, gate = self.q_proj(x).view(b, t, self.num_heads, 2 * self.head_dim).chunk(2, dim=-1)
        gate = gate.reshape(b, t, -1)
        q = self.q_norm(q).transpose(1, 2)  # [B, heads, T, D]
        k = self.k_norm(self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim))
        k = k.transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = _partial_rope(q, step), _partial_rope(k, step)

        if step.cache is not None:
            k, v = step.cache.write_and_read(self.layer, k, v, step.positions, step.key_slots)
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=step.attn_mask,
            is_causal=step.attn_mask is None,
            scale=self.head_dim**-0.5,
            enable_gqa=True,
        )
        out = out.transpose(1, 2).reshape(b, t, -1) * torch.sigmoid(gate)
        return self.o_proj(out)


def _partial_rope(x: torch.Tensor, step: Step) -> torch.Tensor:
    """Rotate the first rotary_dim channels of each head; the rest pass through."""
    r = step.cos.shape[-1]
    rot, rest = x[..., :r], x[..., r:]
    return torch.cat([rot * step.cos + _rotate_half(rot) * step.sin, rest], dim=-1)


# ----------------------------------------------------------------------------------------
# Decoder
# ----------------------------------------------------------------------------------------
class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.is_linear = config.is_linear_attention_layer(layer)
        if self.is_linear:
            self.linear_attn = GatedDeltaNet(config, layer)
        else:
            self.self_attn = GatedAttention(config, layer)
        self.is_moe = config.is_moe_layer(layer)
        self.mlp: nn.Module = (
            SparseMoeBlock(config, layer)
            if self.is_moe
            else MLP(config.hidden_size, config.intermediate_size)
        )
        self.input_layernorm = ZeroCentredRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = ZeroCentredRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, step: Step, runtime: MoeRuntime) -> torch.Tensor:
        mixer = self.linear_attn if self.is_linear else self.self_attn
        x = x + mixer(self.input_layernorm(x), step)
        h = self.post_attention_layernorm(x)
        if not self.is_moe:
            return x + self.mlp(h)
        # Only real tokens go through the router and the experts.
        if step.token_mask is None:
            return x + self.mlp(h.reshape(-1, h.shape[-1]), runtime).view_as(h)
        out = torch.zeros_like(h)
        out[step.token_mask] = self.mlp(h[step.token_mask], runtime)
        return x + out


class Qwen3NextModel(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            [DecoderLayer(config, i) for i in range(config.num_hidden_layers)]
        )
        self.norm = ZeroCentredRMSNorm(config.hidden_size, config.rms_norm_eps)


class Qwen3NextForCausalLM(nn.Module):
    """The whole decoder; `forward` returns logits (same interface as Qwen3MoeForCausalLM)."""

    def __init__(self, config: ModelConfig, experts: ExpertExecutor) -> None:
        super().__init__()
        self.config = config
        self.model = Qwen3NextModel(config)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        rotary_dim = int(config.head_dim * config.rope.partial_rotary_factor)
        self.rotary = RotaryEmbedding(config, dim=rotary_dim)
        self.runtime = MoeRuntime(experts=experts)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        if self.config.tie_word_embeddings:
            return self.model.embed_tokens.weight
        return self.lm_head.weight

    def allocate_cache(
        self, batch: int, capacity: int, dtype: torch.dtype, device: torch.device | str
    ) -> HybridCache:
        """The generation state for `batch` sequences of up to `capacity` tokens."""
        return HybridCache.allocate(self.config, batch, capacity, dtype, device)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: HybridCache | PagedHybridView | None = None,
        token_mask: torch.Tensor | None = None,
        logits_index: torch.Tensor | None = None,
        key_slots: int | None = None,
    ) -> torch.Tensor:
        """Logits for input_ids [B, T]; arguments as Qwen3MoeForCausalLM.forward. With a
        cache, a row whose first position here is 0 starts a new sequence; padding in
        token_mask must follow the row's real tokens."""
        if cache is not None and not isinstance(cache, HybridCache | PagedHybridView):
            raise TypeError(
                f"Qwen3-Next keeps recurrent state beside its KV cache: pass the HybridCache "
                f"from model.allocate_cache(...), not a {type(cache).__name__}"
            )
        b, t = input_ids.shape
        device = input_ids.device
        from_zero = torch.arange(t, device=device).unsqueeze(0).expand(b, t)
        if positions is None:
            positions = from_zero
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.rotary(positions, x.dtype, token_mask)
        key_slots, attn_mask = step_mask(positions, from_zero, cache is not None, key_slots)
        lengths = None if token_mask is None else token_mask.sum(dim=1)
        fresh = positions[:, 0] == 0
        step = Step(positions, cos, sin, cache, token_mask, lengths, fresh, key_slots, attn_mask)
        for layer in self.model.layers:
            x = layer(x, step, self.runtime)
        if logits_index is not None:
            x = x[torch.arange(b, device=device), logits_index].unsqueeze(1)
        return F.linear(self.model.norm(x), self.lm_head_weight)


def non_expert_params(config: ModelConfig) -> int:
    """Parameters of everything but the routed experts (the shared experts included),
    counted on a model built on the meta device: nothing is allocated."""
    with torch.device("meta"):
        model = Qwen3NextForCausalLM(config, experts=None)  # type: ignore[arg-type]
    return sum(p.numel() for p in model.parameters())
