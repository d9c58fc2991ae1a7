"""Qwen3-MoE (and Qwen2-MoE) decoder in plain torch, one readable file.

Inference only. Module and parameter names follow the Hugging Face checkpoints
(`model.layers.N.self_attn.q_proj.weight`, `model.layers.N.mlp.gate.weight`, `lm_head.weight`),
so the non-expert weights load by name. Routed experts are not parameters of this file:
each MoE layer calls an `ExpertExecutor` (see experts.py) given at construction, so the
precision runtime swaps the expert implementation without touching this file.

Sequences of different lengths run together: every token carries its own position, the KV
cache stores token p of sequence b at slot p, and a query at position p attends to slots
0..p of its own row. Padding (and finished rows) is marked by `token_mask` and skipped by
the MoE layers, so routing hooks only ever see real tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from dynaexq.model.config import ModelConfig, RopeConfig
from dynaexq.model.experts import ExpertExecutor, RoutingHook


# ----------------------------------------------------------------------------------------
# KV cache
# ----------------------------------------------------------------------------------------
@dataclass
class KVCache:
    """Per-layer key/value tensors [batch, kv_heads, capacity, head_dim]; slot = position."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @classmethod
    def allocate(
        cls,
        config: ModelConfig,
        batch: int,
        capacity: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ) -> KVCache:
        shape = (batch, config.num_key_value_heads, capacity, config.head_dim)
        n = config.num_hidden_layers
        return cls(
            keys=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(n)],
            values=[torch.zeros(shape, dtype=dtype, device=device) for _ in range(n)],
        )

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    def select(self, rows: torch.Tensor) -> KVCache:
        """Keep only the given batch rows (used to drop finished sequences)."""
        return KVCache(
            keys=[k.index_select(0, rows) for k in self.keys],
            values=[v.index_select(0, rows) for v in self.values],
        )

    def rows(self, start: int, stop: int) -> KVCache:
        """Rows start..stop-1 as views (no copy): a scheduler's slice of its slab."""
        return KVCache(
            keys=[k[start:stop] for k in self.keys], values=[v[start:stop] for v in self.values]
        )

    def copy_row(self, src: int, dst: int, used: int) -> None:
        """Copy row src's first `used` slots (its cached positions) onto row dst."""
        for k, v in zip(self.keys, self.values, strict=True):
            k[dst, :, :used].copy_(k[src, :, :used])
            v[dst, :, :used].copy_(v[src, :, :used])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def write_and_read(
        self,
        layer: int,
        k: torch.Tensor,
        v: torch.Tensor,
        positions: torch.Tensor,
        key_slots: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's keys/values [B, kv_heads, T, D] at their positions [B, T],
        then return slots 0..key_slots-1 of every row ([B, kv_heads, key_slots, D])."""
        return write_slots(self.keys[layer], self.values[layer], k, v, positions, key_slots)


def write_slots(
    ck: torch.Tensor,
    cv: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    key_slots: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A contiguous cache layer [B, kv_heads, capacity, D] (slot = position): store k/v
    [B, kv_heads, T, D] at positions [B, T], return slots 0..key_slots-1 of every row."""
    b, t = positions.shape
    rows = torch.arange(b, device=k.device).unsqueeze(1).expand(b, t)
    ck[rows, :, positions] = k.transpose(1, 2)
    cv[rows, :, positions] = v.transpose(1, 2)
    return ck[:, :, :key_slots], cv[:, :, :key_slots]


def step_mask(
    positions: torch.Tensor, from_zero: torch.Tensor, cached: bool, key_slots: int | None
) -> tuple[int, torch.Tensor | None]:
    """(key slots to read, the attention mask of every layer; None = plain causal).

    A step whose rows all hold positions 0..T-1 and read only their own T keys is plain
    causal attention (padding sits after the real tokens, so real queries never see it);
    otherwise a query at position p sees slots <= p. Finding that out reads the positions
    on the host; with `key_slots` given the mask is built on the device without asking."""
    t = positions.shape[1]
    if key_slots is None:
        key_slots = int(positions.max()) + 1 if cached else t
        if key_slots == t and torch.equal(positions, from_zero):
            return key_slots, None
    key_pos = torch.arange(key_slots, device=positions.device) if cached else positions
    return key_slots, key_pos.view(-1, 1, 1, key_pos.shape[-1]) <= positions[:, None, :, None]


class LayerKV(Protocol):
    """What an attention layer needs of a generation cache (`KVCache`, or the paged
    cache's `PagedKVView`)."""

    def write_and_read(
        self,
        layer: int,
        k: torch.Tensor,
        v: torch.Tensor,
        positions: torch.Tensor,
        key_slots: int,
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclass
class MoeRuntime:
    """What the MoE layers call out to: the expert executor and the routing observers."""

    experts: ExpertExecutor
    routing_hooks: list[RoutingHook] = field(default_factory=list)


@dataclass
class Step:
    """What every layer needs to know about the current forward step (built once)."""

    positions: torch.Tensor  # [B, T] position of each token
    cos: torch.Tensor  # [B, 1, T, head_dim]
    sin: torch.Tensor
    cache: LayerKV | None
    token_mask: torch.Tensor | None  # [B, T], False = padding (skipped by the MoE layers)
    key_slots: int  # attention reads key slots 0..key_slots-1
    attn_mask: torch.Tensor | None  # [B, 1, T, key_slots]; None = plain causal attention


# ----------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32, scale in the input dtype (as transformers does).
        if x.dtype == torch.float32:
            return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def _rope_inv_freq(
    rope: RopeConfig, dim: int, max_pos: int, seq_len: torch.Tensor | None = None
) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [dim/2] and the cos/sin scale for one RoPE variant.

    Computed on the CPU whatever the default device (the model may be built on "meta").
    """
    arange = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float()
    base: float | torch.Tensor = rope.theta
    if rope.rope_type == "dynamic" and seq_len is not None and int(seq_len) > max_pos:
        # NTK-aware: grow the base with the current length (computed as transformers does).
        s = seq_len.to("cpu", torch.float32)  # the frequencies are computed on the CPU
        base = rope.theta * ((rope.factor * s / max_pos) - (rope.factor - 1)) ** (dim / (dim - 2))
    inv_freq = 1.0 / (base ** (arange / dim))
    if rope.rope_type == "linear":
        return inv_freq / rope.factor, 1.0
    if rope.rope_type != "yarn":
        return inv_freq, 1.0

    # YaRN: interpolate low frequencies, keep high ones, blend in between.
    factor = rope.factor
    omax = rope.original_max_position_embeddings or max_pos

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = rope.attention_factor
    if attention is None:
        if rope.mscale and rope.mscale_all_dim:
            attention = mscale(factor, rope.mscale) / mscale(factor, rope.mscale_all_dim)
        else:
            attention = mscale(factor)
    beta_fast = rope.beta_fast or 32.0
    beta_slow = rope.beta_slow or 1.0

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(omax / (rotations * 2 * math.pi))) / (2 * math.log(rope.theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp(
        (torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low), 0, 1
    )
    pos_freqs = rope.theta ** (torch.arange(0, dim, 2, device="cpu").float() / dim)
    extrapolation = 1.0 - ramp
    inv = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv, float(attention)


class RotaryEmbedding(nn.Module):
    inv_freq: torch.Tensor

    def __init__(self, config: ModelConfig, dim: int | None = None) -> None:
        super().__init__()
        self.rope = config.rope
        self.dim = config.head_dim if dim is None else dim  # rotated dims of a head
        self.max_pos = config.max_position_embeddings
        inv_freq, self.scale = _rope_inv_freq(self.rope, self.dim, self.max_pos)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(
        self, positions: torch.Tensor, dtype: torch.dtype, token_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, ...]:
        """cos, sin of shape [B, 1, T, head_dim] for positions [B, T]."""
        inv_freq = self.inv_freq.float().expand(positions.shape[0], -1)  # [B, dim/2]
        if self.rope.rope_type == "dynamic":
            # Each row scales by its own length (its furthest real token), so a sequence
            # gets the same frequencies alone or in a batch.
            real = positions if token_mask is None else positions.masked_fill(~token_mask, 0)
            seq_lens = real.max(dim=1).values + 1
            rows = [
                _rope_inv_freq(self.rope, self.dim, self.max_pos, n)[0].to(positions.device)
                if int(n) > self.max_pos
                else self.inv_freq.float()
                for n in seq_lens
            ]
            inv_freq = torch.stack(rows)
        freqs = positions[..., None].float() * inv_freq[:, None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.scale).to(dtype)
        sin = (emb.sin() * self.scale).to(dtype)
        return cos.unsqueeze(1), sin.unsqueeze(1)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    """Grouped-query attention with optional q/k RMSNorm (Qwen3) and RoPE."""

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = d = config.head_dim
        h = config.hidden_size
        self.q_proj = nn.Linear(h, self.num_heads * d, bias=config.qkv_bias)
        self.k_proj = nn.Linear(h, self.num_kv_heads * d, bias=config.qkv_bias)
        self.v_proj = nn.Linear(h, self.num_kv_heads * d, bias=config.qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * d, h, bias=config.o_bias)
        if config.qk_norm:
            self.q_norm = RMSNorm(d, config.rms_norm_eps)
            self.k_norm = RMSNorm(d, config.rms_norm_eps)
        self.qk_norm = config.qk_norm

    def forward(self, x: torch.Tensor, step: Step) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, T, D]
        q = q * step.cos + _rotate_half(q) * step.sin
        k = k * step.cos + _rotate_half(k) * step.sin

        scale = self.head_dim**-0.5
        if getattr(step.cache, "fused_attention", False):
            # A paged cache whose kernel reads the pages in place (FlexAttention).
            out = step.cache.attend(  # type: ignore[union-attr]
                self.layer, q, k, v, step.positions, step.key_slots, scale
            )
            return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))
        if step.cache is not None:
            # Slot p of row b holds position p: write this step's keys and values, then
            # read slots 0..key_slots-1 (slots past a row's own position are masked).
            k, v = step.cache.write_and_read(self.layer, k, v, step.positions, step.key_slots)
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=step.attn_mask,
            is_causal=step.attn_mask is None,
            scale=scale,
            enable_gqa=True,
        )
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    """SwiGLU feed-forward: dense layers and the Qwen2-MoE shared expert."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class SparseMoeBlock(nn.Module):
    """Softmax router -> top-k -> routed experts (via the executor) [+ shared expert]."""

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.top_k = config.num_experts_per_tok
        self.norm_topk_prob = config.norm_topk_prob
        self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        self.has_shared = config.shared_expert_intermediate_size > 0
        if self.has_shared:
            self.shared_expert = MLP(config.hidden_size, config.shared_expert_intermediate_size)
            self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)

    def forward(self, x: torch.Tensor, runtime: MoeRuntime) -> torch.Tensor:
        """x: [N, H] real tokens only."""
        probs = F.softmax(self.gate(x), dim=-1, dtype=torch.float32)
        weights, expert_ids = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        for hook in runtime.routing_hooks:
            hook(self.layer, expert_ids, probs)
        out = runtime.experts.forward(self.layer, x, expert_ids, weights.to(x.dtype))
        if self.has_shared:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.self_attn = Attention(config, layer)
        self.is_moe = config.is_moe_layer(layer)
        self.mlp: nn.Module = (
            SparseMoeBlock(config, layer)
            if self.is_moe
            else MLP(config.hidden_size, config.intermediate_size)
        )
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, step: Step, runtime: MoeRuntime) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), step)
        h = self.post_attention_layernorm(x)
        if not self.is_moe:
            return x + self.mlp(h)
        # Only real tokens go through the router and the experts.
        if step.token_mask is None:
            return x + self.mlp(h.reshape(-1, h.shape[-1]), runtime).view_as(h)
        out = torch.zeros_like(h)
        out[step.token_mask] = self.mlp(h[step.token_mask], runtime)
        return x + out


class Embedding(nn.Module):
    """A lookup table with no initialiser: weights always come from the checkpoint (and
    nn.Embedding's normal_ init on the meta device drags in a large part of torch)."""

    def __init__(self, num: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num, dim))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight)


class Qwen3MoeModel(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            [DecoderLayer(config, i) for i in range(config.num_hidden_layers)]
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Qwen3MoeForCausalLM(nn.Module):
    """The whole decoder; `forward` returns logits."""

    def __init__(self, config: ModelConfig, experts: ExpertExecutor) -> None:
        super().__init__()
        self.config = config
        self.model = Qwen3MoeModel(config)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(config)
        self.runtime = MoeRuntime(experts=experts)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        if self.config.tie_word_embeddings:
            return self.model.embed_tokens.weight
        return self.lm_head.weight

    def allocate_cache(
        self, batch: int, capacity: int, dtype: torch.dtype, device: torch.device | str
    ) -> KVCache:
        """The generation state for `batch` sequences of up to `capacity` tokens."""
        return KVCache.allocate(self.config, batch, capacity, dtype, device)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: LayerKV | None = None,
        token_mask: torch.Tensor | None = None,
        logits_index: torch.Tensor | None = None,
        key_slots: int | None = None,
    ) -> torch.Tensor:
        """Logits for input_ids [B, T].

        positions [B, T]: each token's position (default 0..T-1). cache: written at those
        positions and attended over (a `KVCache`, or a `PagedKVView` of the paged
        cache). token_mask [B, T]: False marks padding, which the MoE
        layers skip. logits_index [B]: if given, logits only for that token of each row,
        shape [B, 1, V]; else [B, T, V]. key_slots: with a cache, how many key slots
        to read (at least the largest position + 1); a caller that knows it saves the
        host from waiting for the device to tell (decode on a GPU).
        """
        b, t = input_ids.shape
        device = input_ids.device
        from_zero = torch.arange(t, device=device).unsqueeze(0).expand(b, t)
        if positions is None:
            positions = from_zero
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.rotary(positions, x.dtype, token_mask)
        key_slots, attn_mask = step_mask(positions, from_zero, cache is not None, key_slots)
        step = Step(positions, cos, sin, cache, token_mask, key_slots, attn_mask)
        for layer in self.model.layers:
            x = layer(x, step, self.runtime)
        if logits_index is not None:
            x = x[torch.arange(b, device=device), logits_index].unsqueeze(1)
        return F.linear(self.model.norm(x), self.lm_head_weight)
