"""Where the bytes are: the memory report of a loaded engine (printed by `dynaexq serve`
at start, served by `/stats` as `memory`) and the same figures projected for a model's
config from the formulas below.

Host memory is split the way the kernel counts it (/proc/self/status): anonymous memory
(`RssAnon`: what the process allocated: non-expert weights, the pool on the CPU backend,
the staging ring or a resident host store, activations) and file pages (`RssFile`: the
memory-mapped tiered checkpoint and the source weights, which the page cache holds and
may drop). Device bytes are the budget's components (on the CPU backend the "device" is
host memory, so they are part of `RssAnon` too).

Formulas (per model, tiers t, L MoE layers x E experts, b(t) packed bytes of an expert):
- mapped tiered bytes = L * E * sum_t b(t)            (the tiered checkpoint's shards)
- pinned host store  = L * E * sum_t b(t)             (host_store="pinned" only)
- staging ring       = slots * max_t b(t)             (host_store="mapped")
- device             = non-expert weights + KV cache + workspace + pool + pool staging,
                       pool = sum_t slots(t) * b(t) as the budget planner sized it
- host anonymous     = baseline (interpreter, torch, tokenizer) + staging ring or pinned
                       store + (CPU backend) device
"""

from __future__ import annotations

import json
import sys
from typing import Any

from dynaexq.model.config import ModelConfig

GIB = 1024**3


def process_memory(pid: int | str = "self") -> dict[str, int]:
    """RssAnon, RssFile, RssShmem, VmRSS, VmHWM (peak RSS) of a process, in bytes."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile", "RssShmem", "VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out


def memory_report(engine: Any) -> dict[str, Any]:
    """The engine's memory by component, bytes (cheap: a /proc read and the plan)."""
    from dynaexq.runtime.store import mem_available

    proc = process_memory()
    report: dict[str, Any] = {
        "host": {
            "anonymous": proc.get("RssAnon", 0),
            "file_mapped": proc.get("RssFile", 0),
            "rss": proc.get("VmRSS", 0),
            "peak_rss": proc.get("VmHWM", 0),
            "available": mem_available(),
        },
        "host_store": None,
        "device": None,
    }
    dep = getattr(engine, "deployment", None)
    rt = getattr(engine, "precision", None)
    if dep is None or rt is None:
        return report
    store = dep.store
    mover = getattr(rt, "mover", None)
    host = getattr(mover, "host", None)
    source = getattr(rt, "host", None) if host is None else None
    if source is not None and hasattr(source, "nbytes"):
        # Device offload (runtime/offload_device.py): its own copy of the top tier's bytes
        # to upload from, every expert resident or a ring of staging slots, page-locked
        # on a CUDA device.
        ring_slots = len(source.ring) if hasattr(source, "ring") else 0
        nbytes = int(source.nbytes)
        report["host_store"] = {
            "mode": store.host_mode,
            "mapped_tiered_bytes": store.mapped_bytes,
            "pinned_bytes": nbytes if engine.device.type == "cuda" else 0,
            "resident_store_bytes": 0 if ring_slots else nbytes,
            "staging_ring_bytes": nbytes if ring_slots else 0,
            "staging_ring_slots": ring_slots,
        }
    ring = host.staging_stats() if host is not None else None
    resident = int(host.resident_bytes) if host is not None else 0
    if source is None:
        report["host_store"] = {
            "mode": store.host_mode if host is not None else "none (no transfer engine)",
            "mapped_tiered_bytes": store.mapped_bytes,
            # Page-locked host memory: the resident store or the staging ring of a CUDA
            # device's transfer engine (on the CPU backend they are ordinary memory).
            "pinned_bytes": (int(ring["total_bytes"]) if ring else resident)
            if host is not None and engine.device.type == "cuda"
            else 0,
            "resident_store_bytes": resident if ring is None else 0,
            "staging_ring_bytes": int(ring["total_bytes"]) if ring else 0,
            "staging_ring_slots": int(ring["slots"]) if ring else 0,
        }
    plan, fixed = dep.plan, dep.fixed
    names = [t.name for t in store.tiers]
    pool = {n: plan.slots[t] * plan.slot_bytes[t] for t, n in enumerate(names)}
    staging = {n: plan.staging[t] * plan.slot_bytes[t] for t, n in enumerate(names)}
    host_staging = plan.host_staging_bytes
    if host_staging:  # page-locked host memory the device reads, outside the budget
        report["host_staging_bytes"] = host_staging
        staging = dict.fromkeys(names, 0)
    report["device"] = {
        "kind": str(engine.device),
        "budget": plan.budget,
        "weights": fixed.weights,
        "kv_cache": fixed.kv_cache,
        "workspace": fixed.workspace,
        "pool_by_tier": pool,
        "pool_staging_by_tier": staging,
        "total": fixed.total + sum(pool.values()) + sum(staging.values()),
    }
    return report


def _fmt(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / 2**20:.1f} MiB"


def format_memory_report(report: dict[str, Any]) -> str:
    h = report["host"]
    lines = [
        f"memory: host anonymous {_fmt(h['anonymous'])}, file-mapped {_fmt(h['file_mapped'])} "
        f"(rss {_fmt(h['rss'])}, peak {_fmt(h['peak_rss'])}, available {_fmt(h['available'])})"
    ]
    s = report.get("host_store")
    if s:
        lines.append(
            f"  host store: {s['mode']}; mapped tiered checkpoint "
            f"{_fmt(s['mapped_tiered_bytes'])}, "
            f"pinned {_fmt(s['pinned_bytes'])}, resident {_fmt(s['resident_store_bytes'])}, "
            f"staging ring {_fmt(s['staging_ring_bytes'])} ({s['staging_ring_slots']} slots)"
        )
    d = report.get("device")
    if d:
        pool = ", ".join(f"{k} {_fmt(v)}" for k, v in d["pool_by_tier"].items() if v)
        lines.append(
            f"  device ({d['kind']}): weights {_fmt(d['weights'])}, KV cache "
            f"{_fmt(d['kv_cache'])}, workspace {_fmt(d['workspace'])}, pool [{pool}], "
            f"pool staging {_fmt(sum(d['pool_staging_by_tier'].values()))}; total "
            f"{_fmt(d['total'])} of budget {_fmt(d['budget'] or 0)}"
            + (
                f"; staging in host memory {_fmt(report['host_staging_bytes'])}"
                if report.get("host_staging_bytes")
                else ""
            )
        )
    return "\n".join(lines)


# Qwen3-30B-A3B's published config.json (Qwen/Qwen3-30B-A3B), the fields dynaexq reads.
QWEN3_30B_A3B_CONFIG: dict[str, object] = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "model_type": "qwen3_moe",
    "vocab_size": 151936,
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "moe_intermediate_size": 768,
    "num_hidden_layers": 48,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "norm_topk_prob": True,
    "max_position_embeddings": 40960,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": False,
}


def projected_memory(
    config: ModelConfig,
    *,
    tiers: tuple[str, ...] = ("int2", "bf16"),
    share: float = 0.2,
    batch: int = 1,
    context: int = 4096,
    chunk: int = 32,
    host_store: str = "mapped",
    staging_slots: int = 8,
    dtype_bytes: int = 2,
    baseline_anon: int = 600 << 20,
    cpu_backend: bool = False,
) -> dict[str, int]:
    """The report's figures for `config` from the formulas above, at a budget where a
    static hot map holds `share` of every layer's experts at the highest tier."""
    from dynaexq.quant import expert_nbytes, parse_tier
    from dynaexq.runtime.budget import fixed_memory, plan_pool
    from dynaexq.runtime.store import precision_order

    specs = precision_order([parse_tier(t) for t in tiers])
    h, i = config.hidden_size, config.moe_intermediate_size
    b = [expert_nbytes(t, h, i, 256) for t in specs]
    layers, e = len(config.moe_layers), config.num_experts
    fixed = fixed_memory(config, dtype_bytes=dtype_bytes, batch=batch, context=context, chunk=chunk)
    hot = int(round(share * e))
    budget = fixed.total + layers * (e * b[0] + hot * (b[-1] - b[0]))
    plan = plan_pool(
        "dynamic",
        layers=layers,
        experts=e,
        slot_bytes=b,
        fixed=fixed,
        budget=budget,
        in_flight=4,
        static_tier=0,
        split="per-layer",
        values=None,
    )
    device = plan.total_bytes
    mapped = layers * e * sum(b)
    ring = staging_slots * max(b) if host_store == "mapped" else 0
    pinned = mapped if host_store == "pinned" else 0
    anon = baseline_anon + ring + pinned + (device if cpu_backend else 0)
    return {
        "expert_bytes_by_tier": dict(zip([t.name for t in specs], b, strict=True)),
        "mapped_tiered_bytes": mapped,
        "pinned_bytes": pinned,
        "staging_ring_bytes": ring,
        "device_bytes": device,
        "device_weights": fixed.weights,
        "device_kv_cache": fixed.kv_cache,
        "device_pool": plan.pool_bytes,
        "host_anonymous": anon,
    }


def main(argv: list[str] | None = None) -> int:
    """Projected memory of Qwen3-30B-A3B and Qwen3-Next-80B-A3B (JSON on stdout)."""
    from dynaexq.bench.estimate import QWEN3_NEXT_80B_A3B_CONFIG

    out = {}
    for name, cfg in (
        ("Qwen3-30B-A3B", QWEN3_30B_A3B_CONFIG),
        ("Qwen3-Next-80B-A3B", QWEN3_NEXT_80B_A3B_CONFIG),
    ):
        config = ModelConfig.from_dict(dict(cfg), source=name)
        out[name] = {
            "gpu, host_store=mapped": projected_memory(config, host_store="mapped"),
            "gpu, host_store=pinned": projected_memory(config, host_store="pinned"),
            "cpu backend, host_store=mapped": projected_memory(
                config, host_store="mapped", cpu_backend=True, dtype_bytes=4
            ),
        }
    json.dump(out, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
