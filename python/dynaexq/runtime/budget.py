"""From "this model, this many bytes" to a memory plan: what is fixed, what the expert pool
gets, and how many slots of each tier every policy builds from it.

Everything dynaexq owns is counted against the budget:

    budget >= non-expert weights + KV cache + workspace + margin + expert pool

and the expert pool of each policy is laid out from what is left:

- static(t):   every expert at tier t                        N * m_t
- static-map:  n_hot experts at the high tier, the rest low   n_hot * m_hi + (N - n_hot) * m_lo
- dynamic:     as static-map, plus staging slots for transitions in flight: K slots of
               every tier (staging="every"), or ceil(K / 2) slots of the lowest tier only
               (staging="lowest": a promotion into a full tier waits for a demotion out
               of it to land, so the upper tiers reserve nothing and their bytes hold
               experts; with a knapsack the assignment is the static one at the full
               budget whenever its leftover bytes pay for the K low slots). With
               staging_memory="host" (lowest only) those slots are host memory the
               device reads (the pool arena's tail): they cost no budget, and dynamic
               holds the static knapsack's assignment at the full budget exactly
- offload:     a cache of high-tier experts                   slots * m_hi, slots < N

so at one budget the policies hold the same device bytes, and dynamic pays for staging
slots in device memory (in host memory it pays with reads over the link while an expert
sits in one).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from dynaexq.model.config import ModelConfig

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}


class BudgetError(ValueError):
    """The budget cannot hold what the policy needs; the message names the minimum."""


def parse_bytes(text: str | int) -> int:
    """'6GiB', '512 MiB', '1.5GB', '123456' -> bytes."""
    if isinstance(text, int):
        if text <= 0:
            raise BudgetError(f"a byte size must be positive, got {text}")
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise BudgetError(
            f"cannot read {text!r} as a byte size: use a number with an optional unit "
            "(B, KB, MB, GB, KiB, MiB, GiB), e.g. 6GiB"
        )
    value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if value < 1:
        raise BudgetError(f"a byte size must be positive, got {text!r}")
    return int(value)


@dataclass(frozen=True)
class Budget:
    """A parsed budget: a byte size, or a share ("20%": the bytes at which a static hot
    map holds that share of every layer's experts at the highest tier, resolved against
    a model's tiers by `dynaexq.runtime.load.resolve_budget`)."""

    nbytes: int | None = None
    share: float | None = None

    def __str__(self) -> str:
        return f"{100 * self.share:g}%" if self.share is not None else str(self.nbytes)


def parse_budget(text: str | int | Budget) -> Budget:
    """The one reader of budgets (`load`, `serve`, `bench`, `eval`, `generate`):
    '6GiB', '512 MiB', '1.5GB', '123456' (bytes) or '20%' (a share, 0-100%)."""
    if isinstance(text, Budget):
        return text
    if isinstance(text, str) and text.strip().endswith("%"):
        number = text.strip()[:-1].strip()
        if not re.fullmatch(r"[0-9]*\.?[0-9]+", number):
            raise BudgetError(
                f"cannot read {text!r} as a budget: use a byte size such as 6GiB or a "
                "share of experts such as 20%"
            )
        share = float(number) / 100.0
        if not 0.0 <= share <= 1.0:
            raise BudgetError(f"a budget share must be within 0-100%, got {text}")
        return Budget(share=share)
    try:
        return Budget(nbytes=parse_bytes(text))
    except BudgetError as e:
        if isinstance(text, str) and "cannot read" in str(e):
            raise BudgetError(
                f"cannot read {text!r} as a byte size or a share: use a number with an "
                "optional unit (B, KB, MB, GB, KiB, MiB, GiB), e.g. 6GiB, or a share of "
                "experts such as 20%"
            ) from None
        raise


def format_bytes(n: float) -> str:
    for unit, size in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def non_expert_bytes(config: ModelConfig, dtype_bytes: int) -> int:
    """Bytes of every weight that is not a routed expert, at the compute dtype."""
    if config.model_type == "qwen3_next":
        from dynaexq.model.qwen3_next import non_expert_params

        return non_expert_params(config) * dtype_bytes
    h, v = config.hidden_size, config.vocab_size
    q = config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    attn = h * q + 2 * h * kv + q * h
    if config.qkv_bias:
        attn += q + 2 * kv
    if config.o_bias:
        attn += h
    if config.qk_norm:
        attn += 2 * config.head_dim
    params = v * h * (1 if config.tie_word_embeddings else 2) + h  # embeddings, head, norm
    for layer in range(config.num_hidden_layers):
        params += attn + 2 * h  # two RMSNorms
        if config.is_moe_layer(layer):
            params += config.num_experts * h  # router
            if config.shared_expert_intermediate_size:
                params += 3 * h * config.shared_expert_intermediate_size + h
        else:
            params += 3 * h * config.intermediate_size
    return params * dtype_bytes


def kv_cache_bytes(config: ModelConfig, batch: int, context: int, dtype_bytes: int) -> int:
    """The generation cache of `batch` sequences of `context` tokens (Qwen3-Next: the KV of
    its attention layers and the recurrent + convolution state of its linear layers)."""
    if config.model_type == "qwen3_next":
        from dynaexq.model.qwen3_next import HybridCache

        return HybridCache.bytes_for(config, batch, context, dtype_bytes)
    per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim
    return per_token * batch * context * dtype_bytes


def workspace_bytes(config: ModelConfig, batch: int, chunk: int, dtype_bytes: int) -> int:
    """Activations of the largest step: a few hidden-sized buffers per token, the router
    and logits rows, and one expert's dequantised weights (the CPU path's scratch)."""
    tokens = batch * chunk
    h = config.hidden_size
    act = tokens * (8 * h + config.num_experts + config.vocab_size) * 4
    scratch = 3 * h * config.moe_intermediate_size * 4
    return act + scratch


@dataclass(frozen=True)
class FixedMemory:
    """Everything besides the expert pool."""

    weights: int
    kv_cache: int
    workspace: int
    margin: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.workspace + self.margin


def fixed_memory(
    config: ModelConfig,
    *,
    dtype_bytes: int,
    batch: int,
    context: int,
    chunk: int,
    margin: int = 0,
) -> FixedMemory:
    return FixedMemory(
        weights=non_expert_bytes(config, dtype_bytes),
        kv_cache=kv_cache_bytes(config, batch, context, dtype_bytes),
        workspace=workspace_bytes(config, batch, chunk, dtype_bytes),
        margin=margin,
    )


@dataclass(frozen=True)
class PoolPlan:
    """Slot counts of the expert pool for one policy.

    `slots[t]` counts resident slots of tier t over all MoE layers (`per_layer[t]` per
    layer when the split is per layer), `staging[t]` the extra slots of tier t for
    transitions in flight, `slot_bytes[t]` the (aligned) size of one slot.
    """

    policy: str
    slot_bytes: tuple[int, ...]
    slots: tuple[int, ...]
    staging: tuple[int, ...]
    per_layer: tuple[int, ...] | None
    pool_bytes: int
    fixed: FixedMemory
    budget: int | None
    notes: list[str] = field(default_factory=list)
    # The knapsack's tier for every expert (layer-major), when it sized the tiers.
    assignment: tuple[int, ...] | None = None
    # The staging slots live in host memory (the arena's tail), outside `pool_bytes`.
    staging_host: bool = False

    @property
    def staging_bytes(self) -> int:
        """Bytes of every staging slot, wherever it lives."""
        return sum(g * b for g, b in zip(self.staging, self.slot_bytes, strict=True))

    @property
    def host_staging_bytes(self) -> int:
        """Bytes of the staging slots kept in host memory (0 when they are device memory)."""
        return self.staging_bytes if self.staging_host else 0

    @property
    def device_staging_bytes(self) -> int:
        """Bytes of the staging slots the device budget holds."""
        return self.staging_bytes - self.host_staging_bytes

    @property
    def total_bytes(self) -> int:
        return self.pool_bytes + self.fixed.total

    def describe(self) -> str:
        tiers = ", ".join(
            f"tier {t}: {s} slots + {g} staging x {format_bytes(b)}"
            for t, (s, g, b) in enumerate(
                zip(self.slots, self.staging, self.slot_bytes, strict=False)
            )
        )
        budget = "no budget" if self.budget is None else f"budget {format_bytes(self.budget)}"
        return (
            f"{self.policy}: {budget}; fixed {format_bytes(self.fixed.total)} "
            f"(weights {format_bytes(self.fixed.weights)}, KV {format_bytes(self.fixed.kv_cache)},"
            f" workspace {format_bytes(self.fixed.workspace)}); expert pool "
            f"{format_bytes(self.pool_bytes)}: {tiers}"
            + (
                f" (staging in host memory: {format_bytes(self.host_staging_bytes)})"
                if self.staging_host
                else ""
            )
        )


def plan_pool(
    policy: str,
    *,
    layers: int,
    experts: int,
    slot_bytes: list[int],
    fixed: FixedMemory,
    budget: int | None,
    in_flight: int = 4,
    static_tier: int = 0,
    split: str = "per-layer",
    values: list[float] | None = None,
    staging: str = "every",
    staging_memory: str = "device",
) -> PoolPlan:
    """Slot counts for `policy` within `budget` (bytes for everything dynaexq owns).

    `slot_bytes[t]` per tier, tier 0 the lowest precision and the last the highest.
    `split`: "per-layer" gives every layer the same number of high-tier slots (the paper's
    split for layers of equal expert count), "global" lets them go where they are needed.
    `values` (experts x tiers, e.g. calibration hotness x error reduction): size the tiers
    by a multiple-choice knapsack over the bytes instead (global split): every expert gets
    the tier of the best total value that fits, and the slot counts follow.
    `staging` (dynamic): "every" reserves `in_flight` slots of every tier, "lowest"
    ceil(in_flight / 2) of the lowest tier only (see the module docstring).
    `staging_memory`: "device" counts the staging slots in the budget; "host" (with
    staging "lowest") puts them in host memory the device reads, outside the budget.
    """
    if staging not in ("every", "lowest"):
        raise BudgetError(f"staging must be every or lowest, got {staging!r}")
    if staging_memory not in ("device", "host"):
        raise BudgetError(f"staging_memory must be device or host, got {staging_memory!r}")
    if staging_memory == "host" and staging != "lowest":
        raise BudgetError(
            "staging slots in host memory need staging 'lowest' (a slot of the lowest tier, "
            "read over the link while an expert sits in it)"
        )
    if layers <= 0 or experts <= 0:
        raise BudgetError("the model has no MoE layers")
    if not slot_bytes or any(b <= 0 for b in slot_bytes):
        raise BudgetError(f"slot sizes must be positive, got {slot_bytes}")
    if split not in ("per-layer", "global"):
        raise BudgetError(f"split must be per-layer or global, got {split!r}")
    n = layers * experts
    top = len(slot_bytes) - 1
    zero = (0,) * len(slot_bytes)

    host = staging_memory == "host"

    def pool_plan(slots: list[int], staging: list[int], per_layer=None, notes=()) -> PoolPlan:
        held = staging if not (host and any(staging)) else [0] * len(staging)
        pool = sum((s + g) * b for s, g, b in zip(slots, held, slot_bytes, strict=False))
        return PoolPlan(
            policy,
            tuple(slot_bytes),
            tuple(slots),
            tuple(staging),
            per_layer,
            pool,
            fixed,
            budget,
            list(notes),
            staging_host=host and any(staging),
        )

    def charged(stage: list[int]) -> list[int]:
        """The staging slots the budget pays for."""
        return [0] * len(stage) if host else stage

    if policy == "full":
        slots = [0] * len(slot_bytes)
        slots[top] = n
        return pool_plan(slots, list(zero))
    if budget is None:
        raise BudgetError(f"policy {policy!r} needs a budget")
    room = budget - fixed.total
    lowest_need = fixed.total + n * slot_bytes[0]
    if room < n * slot_bytes[0]:
        raise BudgetError(
            f"a budget of {format_bytes(budget)} cannot hold every expert at the lowest tier: "
            f"the minimum is {format_bytes(lowest_need)} ({lowest_need} bytes: fixed "
            f"{format_bytes(fixed.total)} + {n} experts x {format_bytes(slot_bytes[0])})"
        )
    if policy == "static":
        if not 0 <= static_tier <= top:
            raise BudgetError(f"static tier {static_tier} out of range (0..{top})")
        need = n * slot_bytes[static_tier]
        if need > room:
            raise BudgetError(
                f"static at tier {static_tier} needs {format_bytes(fixed.total + need)}, "
                f"the budget is {format_bytes(budget)}"
            )
        slots = [0] * len(slot_bytes)
        slots[static_tier] = n
        return pool_plan(slots, list(zero))
    if policy == "offload":
        k = in_flight
        cache = min(n, (room - k * slot_bytes[top]) // slot_bytes[top])
        if cache < experts:
            raise BudgetError(
                f"offload needs room for at least one layer's experts at the high tier "
                f"({format_bytes(fixed.total + (experts + k) * slot_bytes[top])})"
            )
        slots = [0] * len(slot_bytes)
        slots[top] = int(cache)
        staging = [0] * len(slot_bytes)
        staging[top] = k
        return pool_plan(slots, staging)
    if policy not in ("static-map", "dynamic"):
        raise BudgetError(
            f"unknown policy {policy!r}: use full, static, static-map, dynamic or offload"
        )
    k = in_flight if policy == "dynamic" else 0
    # Staging slots of each tier (transitions in flight).
    # "lowest": one slot per demote+promote pair in flight (the pair's promotion waits for
    # its demotion to free a slot of the upper tier, so only the demotion needs staging).
    stage = [k] * len(slot_bytes) if staging == "every" else [(k + 1) // 2] + [0] * top
    if values is not None:
        return _plan_knapsack(
            policy, layers, experts, slot_bytes, room, stage, charged(stage), values, pool_plan
        )
    if len(slot_bytes) != 2:
        return _plan_multi_tier(
            policy,
            layers,
            experts,
            slot_bytes,
            fixed,
            budget,
            room,
            stage,
            charged(stage),
            pool_plan,
        )
    lo, hi = slot_bytes
    staging_bytes = sum(g * b for g, b in zip(charged(stage), slot_bytes, strict=True))
    spare = room - n * lo - staging_bytes
    if spare < 0:
        need = fixed.total + n * lo + staging_bytes
        raise BudgetError(
            f"{policy} with {k} transitions in flight needs at least {format_bytes(need)} "
            f"({need} bytes: every expert at the low tier plus staging slots {stage}); "
            f"the budget is {format_bytes(budget)}"
        )
    hot = max(0, min(n, spare // (hi - lo))) if hi > lo else n
    per_layer = None
    notes = []
    if split == "per-layer":
        each = int(hot // layers)
        per_layer = (experts - each, each)
        hot = each * layers
        if each == 0:
            notes.append("the budget leaves no high-precision slot per layer")
    return pool_plan([n - int(hot), int(hot)], stage, per_layer, notes)


def plan_for_map(
    tier_map, slot_bytes: Sequence[int], fixed: FixedMemory, budget: int | None = None
) -> PoolPlan:
    """The static-map pool that holds exactly `tier_map` ([layers, experts] store tiers,
    e.g. a map another runtime published): one resident slot per expert at its tier, no
    staging, global split. `budget`, when given, must hold it."""
    counts = [int((tier_map == t).sum()) for t in range(len(slot_bytes))]
    if sum(counts) != tier_map.size:
        raise BudgetError(f"tier map holds tiers outside 0..{len(slot_bytes) - 1}")
    pool = sum(c * b for c, b in zip(counts, slot_bytes, strict=True))
    if budget is not None and fixed.total + pool > budget:
        raise BudgetError(
            f"the tier map needs {format_bytes(fixed.total + pool)}, "
            f"the budget is {format_bytes(budget)}"
        )
    return PoolPlan(
        "static-map",
        tuple(slot_bytes),
        tuple(counts),
        (0,) * len(slot_bytes),
        None,
        pool,
        fixed,
        budget,
        [f"holds a given tier map: {counts}"],
    )


def knapsack_choice(values: list[float], slot_bytes: list[int], space: int) -> list[int] | None:
    """Every expert's tier by the multiple-choice knapsack (values: experts x tiers) within
    `space` bytes: exact (dynamic programming in the Rust core) when its table is small
    enough, which it is for models of a few hundred experts, else the greedy over each
    expert's convex hull. None when every expert at the lowest tier does not fit."""
    from dynaexq._core import knapsack

    try:
        return knapsack(values, slot_bytes, space, exact=True)
    except ValueError as e:
        if "greedy" not in str(e):
            raise
        return knapsack(values, slot_bytes, space)


def peel(choice: list[int], values: list[float], slot_bytes: list[int], space: int):
    """`choice` (a tier per expert; values: experts x tiers) made to fit `space` bytes by
    demotions one tier at a time, the least value lost first (per byte freed it would
    be a hot expert's top tier, whose bytes are many: measured, that costs more than
    several cold experts one tier down); None if even every expert at the lowest tier
    does not fit."""
    tiers = len(slot_bytes)
    out = list(choice)
    used = sum(slot_bytes[t] for t in out)
    if len(slot_bytes) and len(out) * min(slot_bytes) > space:
        return None
    while used > space:
        best, key = -1, math.inf
        for i, t in enumerate(out):
            if t == 0:
                continue
            freed = slot_bytes[t] - slot_bytes[t - 1]
            if freed <= 0:
                continue
            k = values[i * tiers + t] - values[i * tiers + t - 1]
            if k < key:
                best, key = i, k
        if best < 0:
            return None
        used -= slot_bytes[out[best]] - slot_bytes[out[best] - 1]
        out[best] -= 1
    return out


def _plan_knapsack(policy, layers, experts, slot_bytes, room, staging, paid, values, mk):
    """`paid`: the staging slots the budget pays for (none when they are host memory)."""
    n = layers * experts
    reserve = sum(g * b for g, b in zip(paid, slot_bytes, strict=True))
    if len(values) != n * len(slot_bytes):
        raise BudgetError(f"expected {n} x {len(slot_bytes)} values, got {len(values)}")
    choice = None
    if reserve and not any(paid[1:]):
        # Staging of the lowest tier only: the static assignment at the full budget, less
        # the cheapest demotions that pay for the staging slots (none when the knapsack's
        # leftover bytes hold them: dynamic that never moves is then the static knapsack
        # exactly; otherwise it differs from it by those few demotions).
        full = knapsack_choice(list(values), list(slot_bytes), room)
        if full is not None:
            choice = peel(full, list(values), list(slot_bytes), room - reserve)
    if choice is None:
        choice = knapsack_choice(list(values), list(slot_bytes), max(0, room - reserve))
    if choice is None:
        raise BudgetError(
            f"{policy} with staging slots {list(staging)} needs at least "
            f"{format_bytes(n * slot_bytes[0] + reserve)} for experts"
        )
    slots = [choice.count(t) for t in range(len(slot_bytes))]
    plan = mk(slots, staging, None, [f"tiers sized by knapsack: {slots}"])
    return replace(plan, assignment=tuple(choice))


def _plan_multi_tier(policy, layers, experts, slot_bytes, fixed, budget, room, staging, paid, mk):
    """Three or more tiers: fill from the bottom, giving each upper tier an equal share of
    the spare bytes (the controller's knapsack decides who sits where)."""
    n = layers * experts
    spare = room - n * slot_bytes[0] - sum(g * b for g, b in zip(paid, slot_bytes, strict=True))
    if spare < 0:
        raise BudgetError(
            f"the budget leaves no room for staging: need {format_bytes(-spare)} more"
        )
    upper = len(slot_bytes) - 1
    slots = [n] + [0] * upper
    share = spare / upper
    for t in range(1, len(slot_bytes)):
        extra = slot_bytes[t] - slot_bytes[0]
        count = min(slots[0], int(math.floor(share / extra))) // layers * layers
        slots[t] = count
        slots[0] -= count
    per_layer = tuple(s // layers for s in slots)
    return mk(slots, staging, per_layer)
