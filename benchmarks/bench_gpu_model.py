"""The whole model on one GPU at Qwen3-30B-A3B's shapes, side by side in one run.

    python benchmarks/bench_gpu_model.py --out DIR [--layers 4] [--work DIR]

A random bf16 checkpoint with Qwen3-30B-A3B's shapes (hidden 2048, 128 experts, top-8,
moe_intermediate 768, 32 query / 4 KV heads, head_dim 128, vocab 151936) and `--layers`
of its 48 layers is written and quantized (int2, int4, bf16) once into `--work`. Budgets
emulate a 24 GB and a 32 GB card: what the 48-layer model leaves for its experts on that
card (less its non-expert weights, KV cache and workspace) scaled to the layers kept.
Measured at each budget, every engine loaded in turn:

- decode tokens/s at batch 1, 8 and 32 (greedy, the next token read back every step as
  a server does) and prefill tokens/s of one `--prefill`-token prompt, for full bf16
  (reference: it does not fit the card), static int4, static int2, static-map int4/bf16,
  dynamic int4/bf16, dynamic int2/int4/bf16, a cold-started dynamic (no calibration,
  moves at any gain: promotions stream beside decode) against the frozen static-map, and
  offload (an LRU cache of bf16 experts in the same bytes, misses uploaded from pinned
  host memory: what MoE-Infinity-style offloading does at this budget);
  transformers' Qwen3MoeForCausalLM in bf16 on the same checkpoint;
- the bandwidth bound of a decode step: the bytes it must read (non-expert weights but
  the embedding table, the KV cache read, every expert the step routes to once at its
  tier) over a device-to-device copy bandwidth measured in the same run;
  achieved / bound;
- transitions and bytes moved while decoding, and the step time against the frozen
  plan at the same bytes (the migration overhead);
- decode at batch 1 and 8 with the step replayed from a CUDA graph
  (`runtime.graphs.DecodeGraph`) against eager.

Results go to DIR/gpu_model.json (written after every engine, so a run cut short keeps
what it measured) and DIR/gpu_model.md. Reports, asserts nothing. The offload row's
"transitions" are its cache misses (each one an expert uploaded).
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
SHAPE = dict(hidden=2048, inter=768, experts=128, top_k=8, heads=32, kv_heads=4, head_dim=128)
VOCAB = 151936
# --tiny: the same script on small shapes and any device (a dry run of its plumbing).
TINY = dict(hidden=128, inter=64, experts=16, top_k=4, heads=4, kv_heads=2, head_dim=32)
DEV = torch.device("cuda")


def sync() -> None:
    if DEV.type == "cuda":
        torch.cuda.synchronize()


FULL_LAYERS = 48
TIERS = "int2,int4,bf16"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def copy_bandwidth() -> float:
    """GB/s read + written by a 1 GiB device-to-device copy (median of 10)."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device=DEV)
    dst = torch.empty_like(src)
    times = []
    for i in range(13):
        sync()
        t0 = time.perf_counter()
        dst.copy_(src)
        sync()
        if i >= 3:
            times.append(time.perf_counter() - t0)
    del src, dst
    return 2 * (1 << 30) / float(np.median(times)) / 1e9


def make_checkpoint(work: Path, layers: int, shape: dict, vocab: int) -> tuple[Path, Path]:
    """The bf16 source and its tiered checkpoint (int2, int4, bf16), made once."""
    sys.path.insert(0, str(ROOT / "tests"))
    from dynaexq.runtime.store import tiered_checkpoint_for
    from fullsize_workload import write_synthetic

    name = "qwen3-30b-a3b-shape" if shape == SHAPE else "tiny-shape"
    src = work / f"{name}-{layers}l"
    t0 = time.perf_counter()
    write_synthetic(src, layers=layers, vocab=vocab, progress=True, **shape)
    log(f"checkpoint {src} ({time.perf_counter() - t0:.0f} s)")
    t0 = time.perf_counter()
    tc = tiered_checkpoint_for(src, TIERS, cache_dir=work / "tiered", progress=True)
    log(f"tiered checkpoint {tc.root} ({time.perf_counter() - t0:.0f} s)")
    return src, tc.root


def card_budget(config, layers: int, card_bytes: int, batch: int, context: int) -> int:
    """Budget for `layers` layers emulating a card of `card_bytes` for the 48-layer model:
    the fixed bytes of the kept model plus the 48-layer model's expert room, scaled."""
    from dataclasses import replace

    from dynaexq.runtime.budget import fixed_memory

    def fixed(cfg):
        return fixed_memory(cfg, dtype_bytes=2, batch=batch, context=context, chunk=256).total

    full = replace(config, num_hidden_layers=FULL_LAYERS)
    room48 = card_bytes - fixed(full)
    return fixed(config) + int(room48 * layers / FULL_LAYERS)


def routed_calibration(engine, vocab: int, tokens: int = 8192) -> np.ndarray:
    """[layers, experts] routed mass of the full model on random tokens (on the GPU)."""
    cfg = engine.config
    mass = torch.zeros(len(cfg.moe_layers), cfg.num_experts, device=DEV, dtype=torch.float64)
    pos = {layer: i for i, layer in enumerate(cfg.moe_layers)}

    def hook(layer: int, ids: torch.Tensor, probs: torch.Tensor) -> None:
        mass[pos[layer]].index_add_(0, ids.reshape(-1), probs.gather(1, ids).double().reshape(-1))

    remove = engine.add_routing_hook(hook)
    g = torch.Generator(device=DEV).manual_seed(1)
    with torch.inference_mode():
        for _ in range(tokens // 512):
            engine.model(torch.randint(0, vocab, (4, 128), device=DEV, generator=g))
    remove()
    return mass.float().cpu().numpy()


def nonexpert_read_bytes(model) -> int:
    """Bytes of every non-expert parameter a decode step reads (the embedding table is
    looked up, not read)."""
    total = 0
    for name, p in model.named_parameters():
        if "embed_tokens" in name or ".experts." in name:
            continue
        total += p.numel() * p.element_size()
    return total


def decode(step_fn, batch: int, prompt: int, steps: int, warm: int = 4) -> tuple[float, list]:
    """Median seconds per decode step of `step_fn(next_ids, positions, key_slots)`."""
    times = []
    pos = torch.full((batch,), prompt, device=DEV, dtype=torch.long)
    nxt = torch.zeros(batch, dtype=torch.long, device=DEV)
    for s in range(warm + steps):
        t0 = time.perf_counter()
        logits = step_fn(nxt, pos, prompt + s + 1)
        nxt = logits.argmax(-1)
        nxt.cpu()  # the token goes back to the host, as a server streams it
        if s >= warm:
            times.append(time.perf_counter() - t0)
        pos = pos + 1
    return float(np.median(times)), times


def graph_decode(engine, batch: int, steps: int, prompt: int, vocab: int) -> dict:
    """Decode tokens/s of the same engine with the step replayed from a CUDA graph."""
    from dynaexq.runtime.graphs import DecodeGraph

    model = engine.model
    cap = prompt + steps + 8
    cache = model.allocate_cache(batch, cap, engine.dtype, DEV)
    g = torch.Generator(device=DEV).manual_seed(3)
    ids = torch.randint(0, vocab, (batch, prompt), device=DEV, generator=g)
    with torch.inference_mode():
        model(ids, torch.arange(prompt, device=DEV).expand(batch, -1), cache)
        t0 = time.perf_counter()
        graph = DecodeGraph(engine, cache, batch)
        capture_s = time.perf_counter() - t0
        t_step, _ = decode(lambda nxt, pos, _k: graph.step(nxt, pos), batch, prompt, steps)
    return {"tokens_per_s": batch / t_step, "step_ms": 1e3 * t_step, "capture_s": capture_s}


def bench_dynaexq(engine, batches, steps, prompt, prefill, vocab, bw) -> dict:
    model = engine.model
    cfg = engine.config
    rt = getattr(engine, "precision", None)
    out: dict = {"batches": {}}
    kv_token = (
        len(cfg.attention_layers)
        * 2
        * cfg.num_key_value_heads
        * cfg.head_dim
        * engine.dtype.itemsize
    )
    ne = nonexpert_read_bytes(model)
    slot = None
    if rt is not None:
        slot = np.asarray(rt.plan.slot_bytes)
    g = torch.Generator(device=DEV).manual_seed(2)
    for b in batches:
        routed: list[torch.Tensor] = []

        def hook(layer, ids, probs, routed=routed):
            routed.append(ids.reshape(-1))

        ids = torch.randint(0, vocab, (b, prompt), device=DEV, generator=g)
        cache = model.allocate_cache(b, prompt + steps + 8, engine.dtype, DEV)
        before = rt.telemetry.totals() if rt is not None and hasattr(rt, "telemetry") else None
        with torch.inference_mode():
            model(ids, torch.arange(prompt, device=DEV).expand(b, -1), cache)

            def step(nxt, pos, key_slots, cache=cache):
                return model(nxt[:, None], pos[:, None], cache, key_slots=key_slots)[:, 0]

            remove = engine.add_routing_hook(hook)
            try:
                t_step, _ = decode(step, b, prompt, steps)
            finally:
                remove()
        sync()
        layers = len(cfg.moe_layers)
        # Bytes the median step must read: every routed expert once at its tier.
        picks = routed[-layers * steps :]
        # Offload reads every routed expert at bf16 (the dense bytes below).
        tier_map = rt.tier_map() if hasattr(rt, "tier_map") else None
        expert_bytes = []
        for s in range(steps):
            total = 0
            for li in range(layers):
                hit = torch.unique(picks[s * layers + li]).cpu().numpy()
                if tier_map is not None and slot is not None:
                    total += int(slot[tier_map[li, hit]].sum())
                else:
                    total += len(hit) * 3 * cfg.hidden_size * cfg.moe_intermediate_size * 2
            expert_bytes.append(total)
        step_bytes = ne + float(np.median(expert_bytes)) + b * (prompt + steps / 2) * kv_token
        bound = step_bytes / (bw * 1e9)
        row = {
            "tokens_per_s": b / t_step,
            "step_ms": 1e3 * t_step,
            "step_ms_per_layer": 1e3 * t_step / layers,
            "bytes_per_step": step_bytes,
            "bound_ms": 1e3 * bound,
            "achieved_over_bound": bound / t_step,
        }
        if rt is not None and hasattr(rt, "flush"):
            rt.flush()
            after = rt.telemetry.totals()
            row["transitions_finished"] = after["transitions_finished"] - (
                before["transitions_finished"] if before else 0
            )
            moved = after["bytes_moved"] - (before["bytes_moved"] if before else 0)
            row["bytes_moved"] = moved
            row["h2d_gbs_while_decoding"] = moved / (t_step * (steps + 4)) / 1e9
            row["mass_hi_share"] = after["mass_hi_share"]
        out["batches"][b] = row
        log(f"    batch {b}: {b / t_step:8.1f} tok/s, {1e3 * t_step:6.2f} ms/step, "
            f"{100 * bound / t_step:5.1f}% of the bound")  # fmt: skip
        del cache
        if hasattr(rt, "begin_capture") and DEV.type == "cuda" and b in (1, 8):
            try:
                row["graph"] = graph_decode(engine, b, steps, prompt, vocab)
                log(f"    batch {b} under a CUDA graph: {row['graph']['tokens_per_s']:8.1f} "
                    f"tok/s ({row['graph']['tokens_per_s'] * t_step / b:.2f}x eager)")  # fmt: skip
            except Exception as e:  # noqa: BLE001 - report, keep measuring the rest
                row["graph"] = {"error": f"{type(e).__name__}: {e}"}
                log(f"    CUDA graph failed: {row['graph']['error']}")
    # Prefill of one long prompt (eager).
    ids = torch.randint(0, vocab, (1, prefill), device=DEV, generator=g)
    with torch.inference_mode():
        model(ids[:, :64])
        sync()
        t0 = time.perf_counter()
        model(ids)
        sync()
        t = time.perf_counter() - t0
    out["prefill_tokens_per_s"] = prefill / t
    log(f"    prefill {prefill}: {prefill / t:8.0f} tok/s")
    return out


def bench_transformers(src: Path, batches, steps, prompt, prefill, vocab, bw) -> dict:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    model = model.to(DEV).eval()
    ne = nonexpert_read_bytes(model)
    cfg = model.config
    out: dict = {"version": transformers.__version__, "batches": {}}
    g = torch.Generator(device=DEV).manual_seed(2)
    for b in batches:
        ids = torch.randint(0, vocab, (b, prompt), device=DEV, generator=g)
        with torch.inference_mode():
            res = model(input_ids=ids, use_cache=True)
            state = {"past": res.past_key_values}

            def step(nxt, pos, key_slots, state=state):
                r = model(input_ids=nxt[:, None], past_key_values=state["past"], use_cache=True)
                state["past"] = r.past_key_values
                return r.logits[:, -1]

            t_step, _ = decode(step, b, prompt, steps)
        experts = cfg.num_hidden_layers * min(cfg.num_experts, b * cfg.num_experts_per_tok)
        step_bytes = ne + experts * 3 * cfg.hidden_size * cfg.moe_intermediate_size * 2
        out["batches"][b] = {
            "tokens_per_s": b / t_step,
            "step_ms": 1e3 * t_step,
            "achieved_over_bound_approx": step_bytes / (bw * 1e9) / t_step,
        }
        log(f"    batch {b}: {b / t_step:8.1f} tok/s, {1e3 * t_step:6.2f} ms/step")
    ids = torch.randint(0, vocab, (1, prefill), device=DEV, generator=g)
    with torch.inference_mode():
        model(input_ids=ids[:, :64])
        sync()
        t0 = time.perf_counter()
        model(input_ids=ids)
        sync()
        out["prefill_tokens_per_s"] = prefill / (time.perf_counter() - t0)
    log(f"    prefill {prefill}: {out['prefill_tokens_per_s']:8.0f} tok/s")
    return out


def engines(tiered: Path, budget: int, scores: np.ndarray, batch: int, context: int):
    """(name, loader) of every dynaexq engine at `budget`."""
    from dataclasses import replace

    from dynaexq import load
    from dynaexq.runtime.policy import DEFAULT_CONTROLLER, Policy

    dyn = DEFAULT_CONTROLLER
    cold = replace(dyn, move_gain=0.0, move_z=0.0, step_tokens=32)
    cases = [
        ("static int4", Policy("static", tiers=("int4",)), "int4", scores),
        ("static int2", Policy("static", tiers=("int2",)), "int2", scores),
        ("static-map int4/bf16", Policy("static-map", tiers=("int4", "bf16")), "int4,bf16", scores),
        ("dynamic int4/bf16", Policy("dynamic", tiers=("int4", "bf16"), controller=dyn),
         "int4,bf16", scores),
        ("dynamic int2/int4/bf16", Policy("dynamic", tiers=("int2", "int4", "bf16"),
                                          controller=dyn), "int2,int4,bf16", scores),
        ("dynamic int4/bf16 cold", Policy("dynamic", tiers=("int4", "bf16"), controller=cold),
         "int4,bf16", np.zeros_like(scores)),
        # The same bytes as static-map int4/bf16 (a share budget counts both tiers).
        ("offload bf16", Policy("offload", tiers=("int4", "bf16")), "int4,bf16", None),
    ]  # fmt: skip
    for name, pol, tiers, cal in cases:

        def make(pol=pol, tiers=tiers, cal=cal):
            return load(
                tiered, budget=budget, policy=pol, tiers=tiers, calibration=cal, device=DEV,
                batch=batch, context=context, lockstep=False, progress=False,
            )  # fmt: skip

        yield name, make


def _size(budget) -> str:
    return f"{budget / 2**30:.2f} GiB" if isinstance(budget, int) else str(budget)


def write_report(results: dict, out: Path) -> None:
    (out / "gpu_model.json").write_text(json.dumps(results, indent=1, default=float))
    lines = [
        f"# Whole model on {results.get('device', '?')}: {results['shapes']}, "
        f"{results['layers']} of 48 layers",
        "",
        f"Command: `{results['command']}`. Copy bandwidth (read + written, 1 GiB D2D): "
        f"{results.get('copy_gbs', 0):.0f} GB/s; the bound of a step is the bytes it must "
        "read over that bandwidth.",
        "",
    ]
    for card, rows in results.get("cards", {}).items():
        batches = sorted({b for r in rows.values() if isinstance(r, dict) and "batches" in r
                          for b in r["batches"]})  # fmt: skip
        lines += [
            f"## {card} card (budget {_size(rows.get('budget'))} for {results['layers']} layers)",
            "",
            "| engine | "
            + " | ".join(f"b={b} tok/s" for b in batches)
            + f" | b={batches[0] if batches else 1} of bound | graph b=1 / b=8 tok/s | "
            "prefill tok/s | transitions | bytes moved |",
            "|---" * (len(batches) + 6) + "|",
        ]
        for name, r in rows.items():
            if not isinstance(r, dict) or "batches" not in r:
                if isinstance(r, dict) and "error" in r:
                    lines.append(f"| {name} | error: {r['error'][:120]} |")
                continue
            bs = r["batches"]
            one = bs.get(batches[0], {}) if batches else {}
            frac = one.get("achieved_over_bound", one.get("achieved_over_bound_approx"))
            moved = sum(x.get("bytes_moved", 0) for x in bs.values())
            trans = sum(x.get("transitions_finished", 0) for x in bs.values())
            cells = [f"{bs[b]['tokens_per_s']:.1f}" if b in bs else "-" for b in batches]
            graphs = " / ".join(
                f"{bs[b]['graph'].get('tokens_per_s', 0):.1f}"
                if "graph" in bs.get(b, {}) else "-"
                for b in (1, 8)
            )  # fmt: skip
            lines.append(
                f"| {name} | " + " | ".join(cells) + " | "
                f"{'-' if frac is None else f'{100 * frac:.0f}%'} | {graphs} | "
                f"{r.get('prefill_tokens_per_s', 0):.0f} | {trans:.0f} | {moved / 1e6:.1f} MB |"
            )
        lines.append("")
    (out / "gpu_model.md").write_text("\n".join(lines) + "\n")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--work", type=Path, default=Path("/tmp/dynaexq-gpu-model"))
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--cards", default="24,32", help="card sizes to emulate, GB")
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--prefill", type=int, default=2048)
    p.add_argument("--skip", default="", help="comma list of engines to leave out")
    p.add_argument("--tiny", action="store_true", help="small shapes: a dry run of the script")
    p.add_argument("--device", default="cuda")
    args = p.parse_args()
    global DEV
    DEV = torch.device(args.device)
    if DEV.type == "cuda" and not torch.cuda.is_available():
        print("needs a CUDA device (or --tiny --device cpu for a dry run)", file=sys.stderr)
        return 2
    shape, vocab = (TINY, 4096) if args.tiny else (SHAPE, VOCAB)
    if DEV.type == "cpu":
        torch.set_num_threads(1)  # small ops: one thread does not stall on a busy machine
    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    batches = [int(b) for b in args.batches.split(",")]
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    context = max(args.prompt + args.steps + 16, args.prefill + 8)
    results: dict = {
        "command": "python benchmarks/bench_gpu_model.py " + " ".join(sys.argv[1:]),
        "device": torch.cuda.get_device_name() if DEV.type == "cuda" else str(DEV),
        "layers": args.layers,
        "shapes": "tiny shapes (a dry run)" if args.tiny else "Qwen3-30B-A3B shapes",
        "cards": {},
    }
    bw = copy_bandwidth()
    results["copy_gbs"] = bw
    log(f"copy bandwidth {bw:.0f} GB/s (read + written)")
    src, tiered = make_checkpoint(args.work, args.layers, shape, vocab)
    from dynaexq import load

    log("full bf16 (reference; the 48-layer model does not fit a 24/32 GB card)")
    full = load(src, device=DEV)
    scores = routed_calibration(full, vocab)
    full_row = bench_dynaexq(full, batches, args.steps, args.prompt, args.prefill, vocab, bw)
    del full
    gc.collect()
    torch.cuda.empty_cache()
    if "transformers" not in skip:
        log("transformers Qwen3MoeForCausalLM bf16")
        try:
            tf_row = bench_transformers(
                src, batches, args.steps, args.prompt, args.prefill, vocab, bw
            )
        except Exception as e:  # noqa: BLE001 - report what the peer could not do
            tf_row = {"error": f"{type(e).__name__}: {e}"}
            log(f"    transformers failed: {tf_row['error']}")
        gc.collect()
        torch.cuda.empty_cache()
    from dynaexq.checkpoint import Checkpoint

    config = Checkpoint(src).config
    for card in [float(c) for c in args.cards.split(",")]:
        # --tiny: the shapes are too small for a card; "card" N is the N% budget instead.
        budget = (
            f"{card:g}%"
            if args.tiny
            else card_budget(config, args.layers, int(card * 10**9), max(batches), context)
        )
        rows: dict = {"budget": budget, "full bf16": full_row}
        if "transformers" not in skip:
            rows["transformers bf16"] = tf_row
        results["cards"][f"{card:g} GB"] = rows
        for name, make in engines(tiered, budget, scores, max(batches), context):
            if name in skip:
                continue
            log(f"{card} GB: {name}")
            try:
                engine = make()
                rows[name] = bench_dynaexq(
                    engine, batches, args.steps, args.prompt, args.prefill, vocab, bw
                )
                if hasattr(engine.precision, "tier_map"):
                    rows[name]["tier_counts"] = np.bincount(
                        engine.precision.tier_map().ravel(), minlength=3
                    ).tolist()
            except Exception as e:  # noqa: BLE001 - a failing engine must not hide the rest
                import traceback

                traceback.print_exc()
                rows[name] = {"error": f"{type(e).__name__}: {e}"}
            engine = None
            gc.collect()
            torch.cuda.empty_cache()
            write_report(results, args.out)
    write_report(results, args.out)
    log(f"report: {args.out / 'gpu_model.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
