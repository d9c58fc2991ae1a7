"""CPU throughput of our Qwen3-MoE vs transformers, and peak RSS when loading.

    python benchmarks/bench_model_cpu.py [--model DIR] [--prompt-len 128] [--new-tokens 32]

Measures, in one run and interleaved (ours, transformers, ours, ...) so machine load hits
both alike:
- prefill tokens/s: one forward over batch x prompt-len tokens (with the KV cache);
- decode tokens/s: batch x new-tokens greedy tokens after the prefill, i.e.
  (time to generate new-tokens+1 tokens - time to generate 1) per token;
at batch 1 and 8, on the embedded model if present (else a random checkpoint of a similar
configuration: hidden 128, 6 layers, 64 experts, moe_intermediate 32, top-4, vocab 8192).
Then the peak RSS of a fresh process loading a sharded copy of the checkpoint and running
one short forward, against the checkpoint's size on disk: ours (experts copied into
memory), ours with MappedExperts (experts used in place from the mapped file) and
transformers' from_pretrained.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from dynaexq.engine import EMBEDDED_MODEL_DIR
from dynaexq.generation import SamplingParams, generate_tokens

RSS_SCRIPT = r"""
import json, sys
import torch
which, path = sys.argv[1], sys.argv[2]

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024  # kB -> MiB

# Load every library first (imports, one tiny forward), so the baseline holds them.
if which.startswith("ours"):
    import dynaexq, dynaexq.engine
    from dynaexq.model.experts import MappedExperts
else:
    import transformers
x = torch.randn(2, 4, 8, 16)
torch.nn.functional.scaled_dot_product_attention(x, x, x, is_causal=True).sum()
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
base = status("VmRSS")
if which.startswith("ours"):
    experts = MappedExperts.factory if which == "ours-mapped" else None
    engine = dynaexq.load(path, device="cpu", experts=experts)
    loaded = status("VmHWM")
    engine.forward([[1, 2, 3]])
else:
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    loaded = status("VmHWM")
    with torch.inference_mode():
        model(torch.tensor([[1, 2, 3]]))
print(json.dumps({"baseline_mib": base, "load_peak_mib": loaded, "peak_mib": status("VmHWM")}))
"""


LARGE_RSS_CONFIG = dict(
    vocab_size=8192,
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    moe_intermediate_size=128,
    num_experts=128,
    num_experts_per_tok=8,
    norm_topk_prob=True,
)


def make_random_checkpoint(root: Path) -> Path:
    from dynaexq.model.testing import BENCH_CONFIG, make_hf_model, save_checkpoint

    model = make_hf_model(seed=0, **BENCH_CONFIG)
    return save_checkpoint(model, root / "random")


def reshard(src: Path, dst: Path, shard: str) -> Path:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(src)
    model.save_pretrained(dst, max_shard_size=shard)
    return dst


def timed(fn, repeats: int) -> float:
    """Median wall seconds of fn() over repeats."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_throughput(path: Path, args: argparse.Namespace) -> list[dict]:
    import dynaexq
    import transformers

    dtype = getattr(torch, args.dtype)
    engine = dynaexq.load(path, dtype=dtype, device="cpu")
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    vocab = engine.config.vocab_size
    rows = []
    for batch in (1, 8):
        g = torch.Generator().manual_seed(batch)
        ids = torch.randint(0, vocab, (batch, args.prompt_len), generator=g)
        prompts = ids.tolist()
        mask = torch.ones_like(ids)

        def ours(n: int, prompts: list[list[int]] = prompts) -> None:
            generate_tokens(
                engine.model, prompts, SamplingParams(max_new_tokens=n, ignore_eos=True)
            )

        def theirs(n: int, ids: torch.Tensor = ids, mask: torch.Tensor = mask) -> None:
            with torch.inference_mode():
                hf.generate(
                    ids,
                    attention_mask=mask,
                    max_new_tokens=n,
                    min_new_tokens=n,
                    do_sample=False,
                    eos_token_id=None,
                    pad_token_id=0,
                )

        ours(2), theirs(2)  # warm-up
        res = {}
        for name in ("ours", "transformers"):
            res[name] = {}
        # interleave the two implementations, repeat, take medians
        t = {k: {"p": [], "d": []} for k in res}
        for _ in range(args.repeats):
            for name, fn in (("ours", ours), ("transformers", theirs)):
                t[name]["p"].append(timed(lambda fn=fn: fn(1), 1))
                t[name]["d"].append(timed(lambda fn=fn: fn(args.new_tokens + 1), 1))
        for name in res:
            p = statistics.median(t[name]["p"])
            d = statistics.median(t[name]["d"]) - p
            res[name] = {
                "prefill_tok_s": batch * args.prompt_len / p,
                # nan if noise made the longer run the faster one
                "decode_tok_s": batch * args.new_tokens / d if d > 0 else float("nan"),
            }
        rows.append({"batch": batch, **res})
    return rows


def bench_rss(path: Path, which: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", RSS_SCRIPT, which, str(path)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "OMP_NUM_THREADS": "2"},
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None, help="checkpoint (default: embedded)")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1: on a shared 2-core machine, 2 threads stall on busy cores)",
    )
    parser.add_argument(
        "--no-rss-large",
        dest="rss_large",
        action="store_false",
        help="skip the RSS measurement on a larger (~300 MiB) random checkpoint",
    )
    parser.add_argument("--shard-size", default="2MB", help="max_shard_size for the RSS test")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        if args.model is not None:
            path, what = args.model, f"checkpoint {args.model}"
        elif (EMBEDDED_MODEL_DIR / "config.json").is_file():
            path, what = EMBEDDED_MODEL_DIR, "the embedded model"
        else:
            path = make_random_checkpoint(root)
            what = (
                "a RANDOM checkpoint (embedded model not present): hidden 128, 6 layers, "
                "64 experts, moe_intermediate 32, top-4, vocab 8192"
            )
        cfg = json.loads((path / "config.json").read_text())
        print(f"model: {what}")
        print(
            f"torch {torch.__version__}, {args.threads} threads, {args.dtype}, load average "
            f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; prompt {args.prompt_len} tokens, "
            f"{args.new_tokens} decode tokens, median of {args.repeats}"
        )
        print(
            f"config: hidden {cfg['hidden_size']}, layers {cfg['num_hidden_layers']}, experts "
            f"{cfg.get('num_experts', cfg.get('num_local_experts'))}, top-"
            f"{cfg['num_experts_per_tok']}, vocab {cfg['vocab_size']}"
        )
        print()
        print(f"{'':>10} | {'prefill tok/s':^32} | {'decode tok/s':^32}")
        print(
            f"{'batch':>10} | {'ours':>9} {'transf.':>9} {'ratio':>10} "
            f"| {'ours':>9} {'transf.':>9} {'ratio':>10}"
        )
        for r in bench_throughput(path, args):
            o, t = r["ours"], r["transformers"]
            print(
                f"{r['batch']:>10} | {o['prefill_tok_s']:>9.0f} {t['prefill_tok_s']:>9.0f} "
                f"{o['prefill_tok_s'] / t['prefill_tok_s']:>9.2f}x | {o['decode_tok_s']:>9.0f} "
                f"{t['decode_tok_s']:>9.0f} {o['decode_tok_s'] / t['decode_tok_s']:>9.2f}x"
            )

        sharded = reshard(path, root / "sharded", args.shard_size)
        rss_cases = [("this model, resharded", sharded)]
        if args.rss_large:
            from dynaexq.model.testing import make_hf_model, save_checkpoint

            big = make_hf_model(seed=1, **LARGE_RSS_CONFIG)
            rss_cases.append(
                (
                    "random, hidden 256, 6 layers, 128 experts x 128",
                    save_checkpoint(big, root / "large", max_shard_size="64MB"),
                )
            )
            del big
        for label, ckpt in rss_cases:
            files = sorted(ckpt.glob("*.safetensors"))
            size = sum(f.stat().st_size for f in files) / 2**20
            print()
            print(
                f"peak RSS of a fresh process: {label} "
                f"({len(files)} shards, {size:.1f} MiB on disk)"
            )
            for which in ("ours", "ours-mapped", "transformers"):
                r = bench_rss(ckpt, which)
                load = r["load_peak_mib"] - r["baseline_mib"]
                both = r["peak_mib"] - r["baseline_mib"]
                print(
                    f"  {which:>12}: load +{load:.1f} MiB = {load / size:.2f}x the checkpoint; "
                    f"load + one forward +{both:.1f} MiB = {both / size:.2f}x "
                    f"(over {r['baseline_mib']:.0f} MiB with libraries loaded)"
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
