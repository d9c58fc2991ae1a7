"""CPU prefill and decode throughput of dynaexq's Qwen3-Next against transformers'
Qwen3NextForCausalLM on the same small random checkpoint (float32, greedy).

    python benchmarks/bench_qwen3_next_cpu.py [--threads 1] [--prompt 512] [--decode 64]

Prefill: one forward over a batch of prompts (tokens/s over all prompt tokens). Decode: a
greedy generation of --decode tokens after that prefill, minus the prefill's time
(tokens/s over all generated tokens). Both sides run torch on the CPU: transformers'
own torch fallbacks (chunked delta rule, conv1d) as it uses without flash-linear-attention.
Each figure is the best of --repeat runs.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

# A small Qwen3-Next: 6 Gated DeltaNet + 2 gated attention layers, 64 experts top-4 with a
# shared expert (hidden 256), 58M parameters (50M of them routed experts).
CONFIG = dict(
    vocab_size=8192,
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=8,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    linear_num_key_heads=4,
    linear_num_value_heads=8,
    linear_key_head_dim=32,
    linear_value_head_dim=32,
    linear_conv_kernel_dim=4,
    moe_intermediate_size=128,
    shared_expert_intermediate_size=256,
    num_experts=64,
    num_experts_per_tok=4,
    norm_topk_prob=True,
    max_position_embeddings=4096,
    initializer_range=0.05,
)


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt", type=int, default=512)
    p.add_argument("--decode", type=int, default=64)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    import dynaexq
    from dynaexq.model.testing import make_hf_model, save_checkpoint

    hf = make_hf_model(seed=0, architecture="qwen3_next", **CONFIG)
    params = sum(t.numel() for t in hf.parameters())
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, CONFIG["vocab_size"], (args.batch, args.prompt), generator=g)
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(hf, Path(tmp) / "ckpt")
        ours = dynaexq.load(Path(tmp) / "ckpt", dtype="float32", device="cpu")

    def hf_generate() -> torch.Tensor:
        return hf.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=args.decode,
            min_new_tokens=args.decode,
            do_sample=False,
            pad_token_id=0,
        )

    with torch.inference_mode():
        hf_prefill = best(lambda: hf(ids), args.repeat)
        our_prefill = best(lambda: ours.model(ids), args.repeat)
        hf_total = best(hf_generate, args.repeat)
        our_total = best(
            lambda: ours.generate(ids.tolist(), max_new_tokens=args.decode, ignore_eos=True),
            args.repeat,
        )
        mine = ours.generate(ids.tolist(), max_new_tokens=args.decode, ignore_eos=True)
        same = hf_generate()[:, args.prompt :].tolist() == [r.token_ids for r in mine]
    tokens_in, tokens_out = args.batch * args.prompt, args.batch * args.decode
    result = {
        "params": params,
        "threads": args.threads,
        "batch": args.batch,
        "prompt": args.prompt,
        "decode": args.decode,
        "prefill_tok_s": {
            "dynaexq": tokens_in / our_prefill,
            "transformers": tokens_in / hf_prefill,
        },
        "decode_tok_s": {
            "dynaexq": tokens_out / max(our_total - our_prefill, 1e-9),
            "transformers": tokens_out / max(hf_total - hf_prefill, 1e-9),
        },
        "same_greedy_tokens": same,
    }
    print(json.dumps(result, indent=1))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
