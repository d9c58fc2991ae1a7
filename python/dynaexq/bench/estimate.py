"""Trace-driven decode-throughput estimate for full-size MoE models on real GPUs.

Nothing here runs a model. From a router trace (expert ids per token, per layer, per
decode step; recorded from the embedded model or synthetic with a measured skew), the
expert sizes of a full-size model and a GPU's figures, it estimates decode tokens/s of
three policies at equal device memory:

- ``static``: every expert resident at one low tier (the best uniform tier that fits);
- ``dynamic``: dynaexq, hot experts at the high tier, the rest at the low tier, the hot
  set re-planned every ``replan_every`` steps from an EMA of routed mass; promotions copy
  over PCIe asynchronously and count only once landed;
- ``offload``: an LRU cache of high-tier experts filling the same bytes; a miss copies the
  expert over PCIe on the critical path (as mixtral-offloading and MoE-Infinity do without
  a perfect prefetcher).

The cost model is memory-bound decode: a step reads the non-expert weights, the KV cache
and each touched expert once at its tier from HBM at ``hbm_efficiency`` of peak, plus a
fixed per-layer overhead. The assumptions are stated in ``ASSUMPTIONS`` and printed
next to every table.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

ASSUMPTIONS = """\
- Decode is memory-bound: step time = bytes read from HBM / (peak HBM bandwidth x efficiency)
  + per-layer overhead + PCIe time that cannot be overlapped.
- Bytes read per step: non-expert weights once, the KV cache of the batch at the given
  context, and every expert touched by any token of the step once, at its resident tier.
  Qwen3-Next also reads and writes every sequence's linear-attention state once per step
  (float32 recurrent state + bf16 convolution state of its 36 Gated DeltaNet layers, 73.7
  MiB per sequence, whatever the context); it is held in device memory beside the KV cache.
- Expert bytes per tier: bf16 = 2 bytes/param; INTb with group g and symmetric FP16
  scales = b/8 bytes/param + 2 bytes per g params.
- dynamic: promotions are copied on a separate stream at the effective PCIe bandwidth and
  become usable only when landed; the step never waits for them, their HBM writes are
  charged to the step. offload: misses are copied on the critical path (no prefetch).
- Equal device memory: every policy gets the same bytes for experts (GPU memory minus
  non-expert weights, KV cache and a fixed margin).
- Routing comes from the trace; full-size routing skew is taken from a measured skew (share
  of routed mass on the top 25% of experts), not from the full-size model itself.
"""


@dataclass(frozen=True)
class MoEShape:
    """The parts of a MoE model's shape that decide its memory traffic."""

    name: str
    layers: int
    experts: int
    top_k: int
    hidden: int
    moe_intermediate: int
    non_expert_params: float
    kv_layers: int
    kv_heads: int
    head_dim: int
    hi_tier: str
    lo_tier: str
    # Fixed-size generation state per sequence (Qwen3-Next's linear-attention layers):
    # held for every sequence of the batch, read and written once per decode step.
    state_bytes: float = 0.0

    @property
    def expert_params(self) -> int:
        return 3 * self.hidden * self.moe_intermediate

    def expert_bytes(self, tier: str) -> float:
        return tier_bytes_per_param(tier) * self.expert_params

    def kv_bytes(self, batch: int, context: int) -> float:
        # K and V, bf16, per full-attention layer.
        return 2.0 * 2 * self.kv_layers * self.kv_heads * self.head_dim * batch * context

    def cache_bytes(self, batch: int, context: int) -> float:
        """Device memory of the generation state: KV cache and linear-attention state."""
        return self.kv_bytes(batch, context) + batch * self.state_bytes

    def cache_traffic(self, batch: int, context: int) -> float:
        """HBM bytes one decode step moves for it: the KV read, the state read and written."""
        return self.kv_bytes(batch, context) + 2 * batch * self.state_bytes


# Shapes from the models' published configs. Non-expert parameter counts are totals minus
# routed-expert parameters (attention, embeddings, norms, routers, shared experts).
QWEN3_30B_A3B = MoEShape(
    name="Qwen3-30B-A3B",
    layers=48,
    experts=128,
    top_k=8,
    hidden=2048,
    moe_intermediate=768,
    non_expert_params=30.5e9 - 48 * 128 * 3 * 2048 * 768,
    kv_layers=48,
    kv_heads=4,
    head_dim=128,
    hi_tier="bf16",
    lo_tier="int4g128",
)
# Qwen3-Next-80B-A3B's published config.json (Qwen/Qwen3-Next-80B-A3B-Instruct), the fields
# dynaexq reads; tests check the shape below against dynaexq's own model built from it.
QWEN3_NEXT_80B_A3B_CONFIG: dict[str, object] = {
    "architectures": ["Qwen3NextForCausalLM"],
    "model_type": "qwen3_next",
    "vocab_size": 151936,
    "hidden_size": 2048,
    "intermediate_size": 5120,
    "num_hidden_layers": 48,
    "full_attention_interval": 4,
    "num_attention_heads": 16,
    "num_key_value_heads": 2,
    "head_dim": 256,
    "partial_rotary_factor": 0.25,
    "rope_theta": 10000000,
    "max_position_embeddings": 262144,
    "linear_num_key_heads": 16,
    "linear_num_value_heads": 32,
    "linear_key_head_dim": 128,
    "linear_value_head_dim": 128,
    "linear_conv_kernel_dim": 4,
    "num_experts": 512,
    "num_experts_per_tok": 10,
    "moe_intermediate_size": 512,
    "shared_expert_intermediate_size": 512,
    "norm_topk_prob": True,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "rms_norm_eps": 1e-06,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}
QWEN3_NEXT_80B_A3B = MoEShape(
    name="Qwen3-Next-80B-A3B",
    layers=48,
    experts=512,
    top_k=10,
    hidden=2048,
    moe_intermediate=512,
    # Embeddings and head 0.62B, 36 Gated DeltaNet layers 1.21B, 12 gated attention
    # layers 0.33B, routers + shared experts 0.20B (the MTP head is not loaded).
    non_expert_params=2_364_979_968,
    kv_layers=12,  # one full-attention layer in four; the others are linear attention
    kv_heads=2,
    head_dim=256,
    hi_tier="int4g128",
    lo_tier="int2g64",
    # 36 x (32 heads x 128 x 128 float32 + 8192 channels x 3 taps bf16)
    state_bytes=77_266_944,
)


@dataclass(frozen=True)
class GPU:
    name: str
    memory_gib: float
    hbm_gbs: float  # peak device memory bandwidth, GB/s
    pcie_gbs: float  # effective host-to-device bandwidth, GB/s


# Peak figures from the vendors' data sheets; PCIe as typically measured for pinned copies.
RTX_5090 = GPU("RTX 5090", 32.0, 1792.0, 50.0)  # PCIe 5.0 x16
RTX_A6000 = GPU("RTX A6000", 48.0, 768.0, 25.0)  # PCIe 4.0 x16
H200 = GPU("H200", 141.0, 4800.0, 55.0)  # PCIe 5.0 x16 (SXM host link)


def tier_bytes_per_param(tier: str) -> float:
    """Bytes per parameter of a tier string such as ``bf16``, ``int4g128``, ``int2g64``."""
    if tier in ("bf16", "fp16"):
        return 2.0
    if not tier.startswith("int") or "g" not in tier:
        raise ValueError(f"unknown tier {tier!r}: use bf16, fp16 or intBgG (e.g. int4g128)")
    bits_s, group_s = tier[3:].split("g", 1)
    bits, group = int(bits_s), int(group_s.rstrip("a"))
    zeros = 2.0 / group if group_s.endswith("a") else 0.0
    return bits / 8.0 + 2.0 / group + zeros


@dataclass
class Trace:
    """Routing of a decode run: ``ids[step, token, layer, k]`` expert ids and ``mass`` the
    router probabilities of those picks (same shape)."""

    ids: np.ndarray
    mass: np.ndarray

    @property
    def steps(self) -> int:
        return int(self.ids.shape[0])

    @property
    def batch(self) -> int:
        return int(self.ids.shape[1])

    @property
    def layers(self) -> int:
        return int(self.ids.shape[2])


def zipf_exponent_for_top_share(experts: int, share: float) -> float:
    """The Zipf exponent whose top 25% of experts carry ``share`` of the mass."""
    if not 0.25 <= share < 1.0:
        raise ValueError(f"top-25% share must be in [0.25, 1), got {share}")
    ranks = np.arange(1, experts + 1, dtype=np.float64)
    top = max(1, experts // 4)
    lo, hi = 0.0, 8.0
    for _ in range(60):
        mid = (lo + hi) / 2
        w = ranks**-mid
        if w[:top].sum() / w.sum() < share:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def synthetic_trace(
    *,
    steps: int,
    batch: int,
    layers: int,
    experts: int,
    top_k: int,
    top_share: float,
    shift_every: int = 0,
    shift_fraction: float = 0.5,
    seed: int = 0,
) -> Trace:
    """A router trace with a measured skew: each layer has a Zipf popularity over a random
    permutation of its experts; every ``shift_every`` steps (0: never) a fraction of the
    popularity ranks is reshuffled (a workload shift). Each token picks ``top_k`` distinct
    experts by Gumbel-top-k sampling from the popularity."""
    rng = np.random.default_rng(seed)
    s = zipf_exponent_for_top_share(experts, top_share)
    base = np.arange(1, experts + 1, dtype=np.float64) ** -s
    base /= base.sum()
    perms = np.stack([rng.permutation(experts) for _ in range(layers)])
    ids = np.empty((steps, batch, layers, top_k), dtype=np.int32)
    mass = np.empty((steps, batch, layers, top_k), dtype=np.float32)
    log_p = np.empty((layers, experts))
    for step in range(steps):
        if step == 0 or (shift_every and step % shift_every == 0):
            if step:
                for layer in range(layers):
                    k = int(round(shift_fraction * experts))
                    moved = rng.choice(experts, size=k, replace=False)
                    perms[layer, moved] = perms[layer, rng.permutation(moved)]
            for layer in range(layers):
                p = np.empty(experts)
                p[perms[layer]] = base
                log_p[layer] = np.log(p)
        g = rng.gumbel(size=(batch, layers, experts)) + log_p[None]
        pick = np.argpartition(-g, top_k - 1, axis=-1)[..., :top_k]
        ids[step] = pick
        w = np.take_along_axis(np.exp(log_p)[None].repeat(batch, 0), pick, axis=-1)
        mass[step] = w / w.sum(-1, keepdims=True)
    return Trace(ids=ids, mass=mass)


def top_share(trace: Trace, experts: int) -> float:
    """Share of expert assignments that go to each layer's top 25% of experts (mean)."""
    shares = []
    for layer in range(trace.layers):
        counts = np.bincount(trace.ids[:, :, layer].ravel(), minlength=experts)
        top = np.sort(counts)[::-1][: max(1, experts // 4)]
        shares.append(top.sum() / max(1, counts.sum()))
    return float(np.mean(shares))


@dataclass
class Budget:
    """Device bytes for experts and what each policy builds from them."""

    expert_bytes: float
    hot_slots: int  # dynamic: high-tier slots over all layers (beyond the low tier)
    cache_slots: int  # offload: high-tier experts resident at once, over all layers
    static_tier: str
    fits: bool
    note: str = ""


def plan_budget(
    model: MoEShape,
    gpu: GPU,
    *,
    batch: int,
    context: int,
    margin_gib: float = 2.0,
    in_flight: int = 4,
) -> Budget:
    """Split the GPU's memory: non-expert weights (bf16), KV cache and state, margin, the rest
    for experts; dynamic keeps every expert at the low tier except hot slots at the high
    tier (the paper's accounting) with ``in_flight`` staging slots."""
    total = gpu.memory_gib * 2**30
    fixed = 2.0 * model.non_expert_params + model.cache_bytes(batch, context) + margin_gib * 2**30
    avail = total - fixed
    n = model.layers * model.experts
    m_hi, m_lo = model.expert_bytes(model.hi_tier), model.expert_bytes(model.lo_tier)
    low_all = n * m_lo
    if avail < low_all:
        return Budget(avail, 0, 0, model.lo_tier, False, "the low tier does not fit")
    hot = int((avail - low_all - in_flight * m_hi) // (m_hi - m_lo))
    hot = max(0, min(hot, n))
    cache = int(avail // m_hi)
    static = model.hi_tier if n * m_hi <= avail else model.lo_tier
    return Budget(avail, hot, min(cache, n), static, True)


@dataclass
class PolicyResult:
    policy: str
    tokens_per_s: float
    step_ms: float
    pcie_stall_ms: float
    hi_share: float  # share of touched experts read at the high tier
    moved_gb: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)


def _step_time(
    model: MoEShape, gpu: GPU, batch: int, context: int, expert_bytes: float, eff: float
) -> float:
    fixed = 2.0 * model.non_expert_params + model.cache_traffic(batch, context)
    overhead = model.layers * 20e-6  # launches, routing, synchronisation per layer
    return (fixed + expert_bytes) / (gpu.hbm_gbs * 1e9 * eff) + overhead


def simulate(
    trace: Trace,
    model: MoEShape,
    gpu: GPU,
    *,
    context: int = 2048,
    hbm_efficiency: float = 0.75,
    replan_every: int = 50,
    alpha: float = 0.9,
    delta: float = 0.0,
    max_moves_per_plan: int | None = None,
    offload_cache: str = "lru",
) -> list[PolicyResult]:
    """Estimate static, dynamic and offload decode throughput on one trace."""
    batch, layers, experts = trace.batch, model.layers, model.experts
    if offload_cache not in ("lru", "lfu"):
        raise ValueError(f"offload cache policy must be lru or lfu, got {offload_cache!r}")
    if trace.layers < layers:
        # A shallower recorded trace stands in for the full depth, layers reused in turn.
        reps = -(-layers // trace.layers)
        ids = np.concatenate([trace.ids] * reps, axis=2)[:, :, :layers]
        mass = np.concatenate([trace.mass] * reps, axis=2)[:, :, :layers]
    else:
        ids, mass = trace.ids[:, :, :layers], trace.mass[:, :, :layers]
    if ids.max() >= experts:
        raise ValueError(f"trace routes to expert {ids.max()} but the model has {experts}")
    budget = plan_budget(model, gpu, batch=batch, context=context)
    if not budget.fits:
        raise ValueError(f"{model.name} does not fit on {gpu.name}: {budget.note}")
    m_hi, m_lo = model.expert_bytes(model.hi_tier), model.expert_bytes(model.lo_tier)
    m_static = model.expert_bytes(budget.static_tier)
    pcie = gpu.pcie_gbs * 1e9

    touched = [[np.unique(ids[s, :, layer]) for layer in range(layers)] for s in range(len(ids))]
    n_touched = np.array([[len(u) for u in row] for row in touched])

    # static
    t_static = [
        _step_time(model, gpu, batch, context, n_touched[s].sum() * m_static, hbm_efficiency)
        for s in range(len(ids))
    ]

    # dynamic: per-layer hot sets of equal size, re-planned from an EMA of routed mass.
    # A promotion becomes usable only once its copy has landed; copies proceed at PCIe
    # speed beside compute (the step never waits) and cost HBM write bandwidth.
    per_layer = budget.hot_slots // layers
    score = np.zeros((layers, experts))
    want_hot = np.zeros((layers, experts), dtype=bool)
    usable = np.zeros((layers, experts), dtype=bool)
    queue: list[tuple[int, int]] = []
    carry = 0.0  # PCIe bytes of the previous step not yet spent
    t_dyn, moved, hi_hits, total_hits = [], 0.0, 0, 0
    for s in range(len(ids)):
        c = np.zeros((layers, experts))
        for layer in range(layers):
            np.add.at(c[layer], ids[s, :, layer].ravel(), mass[s, :, layer].ravel())
        score = alpha * score + (1 - alpha) * c / batch
        if s % replan_every == 0 and per_layer > 0:
            moves = 0
            for layer in range(layers):
                new = np.zeros(experts, dtype=bool)
                new[np.argsort(-score[layer], kind="stable")[:per_layer]] = True
                if delta > 0 and want_hot[layer].any():
                    # Hysteresis: an incumbent stays unless beaten by more than delta.
                    order = np.argsort(-(score[layer] + delta * want_hot[layer]), kind="stable")
                    new[:] = False
                    new[order[:per_layer]] = True
                promote = np.flatnonzero(new & ~want_hot[layer])
                if max_moves_per_plan is not None:
                    promote = promote[: max(0, max_moves_per_plan - moves)]
                    new = (new & want_hot[layer]) | np.isin(np.arange(experts), promote)
                moves += len(promote)
                usable[layer] &= new  # demotions publish the resident low tier at once
                queue.extend((layer, int(e)) for e in promote)
                want_hot[layer] = new
        expert_bytes = 0.0
        for layer in range(layers):
            u = touched[s][layer]
            h = int(usable[layer][u].sum())
            hi_hits += h
            total_hits += len(u)
            expert_bytes += h * m_hi + (len(u) - h) * m_lo
        t = _step_time(model, gpu, batch, context, expert_bytes, hbm_efficiency)
        # Copies landing during this step: PCIe bytes available over the step's time.
        carry += t * pcie
        landed = 0.0
        while queue and carry >= m_hi:
            layer, e = queue.pop(0)
            carry -= m_hi
            landed += m_hi
            if want_hot[layer, e]:
                usable[layer, e] = True
        if not queue:
            carry = 0.0
        moved += landed
        t += landed / (gpu.hbm_gbs * 1e9 * hbm_efficiency)
        t_dyn.append(t)
    stall_dyn = [0.0] * len(t_dyn)

    # offload: one cache over all experts of all layers at the high tier; misses are
    # copied on the critical path. "lru" evicts the least recently used expert (as
    # mixtral-offloading); "lfu" the one with the lowest decayed use count (closer to
    # MoE-Infinity's activation-aware cache).
    t_off, stall_off, misses, lookups = [], [], 0, 0
    lru: OrderedDict[tuple[int, int], None] = OrderedDict()
    freq = np.zeros((layers, experts))
    cached = np.zeros((layers, experts), dtype=bool)
    for s in range(len(ids)):
        miss_bytes = 0.0
        freq *= 0.99
        for layer in range(layers):
            for e in touched[s][layer]:
                e = int(e)
                lookups += 1
                freq[layer, e] += 1
                if cached[layer, e]:
                    if offload_cache == "lru":
                        lru.move_to_end((layer, e))
                    continue
                misses += 1
                miss_bytes += m_hi
                cached[layer, e] = True
                if offload_cache == "lru":
                    lru[(layer, e)] = None
                    if len(lru) > budget.cache_slots:
                        old = lru.popitem(last=False)[0]
                        cached[old] = False
                elif cached.sum() > budget.cache_slots:
                    # Never evict an expert this step still needs (it was just loaded).
                    f = np.where(cached, freq, np.inf)
                    f[layer, e] = np.inf
                    cached[np.unravel_index(int(np.argmin(f)), f.shape)] = False
        t = _step_time(model, gpu, batch, context, n_touched[s].sum() * m_hi, hbm_efficiency)
        stall = miss_bytes / pcie
        t_off.append(t + stall)
        stall_off.append(stall)

    def result(name: str, times: list[float], stalls: list[float], hi: float, **kw) -> PolicyResult:
        step = float(np.mean(times))
        return PolicyResult(name, batch / step, step * 1e3, float(np.mean(stalls)) * 1e3, hi, **kw)

    return [
        result(
            f"static ({budget.static_tier})",
            t_static,
            [0.0] * len(t_static),
            1.0 if budget.static_tier == model.hi_tier else 0.0,
        ),
        result(
            "dynamic",
            t_dyn,
            stall_dyn,
            hi_hits / max(1, total_hits),
            moved_gb=moved / 1e9,
            extra={"hot_slots_per_layer": float(per_layer)},
        ),
        result(
            f"offload ({offload_cache})",
            t_off,
            stall_off,
            1.0,
            extra={"hit_rate": 1 - misses / max(1, lookups), "cache_slots": budget.cache_slots},
        ),
    ]
