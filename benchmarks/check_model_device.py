"""Check the model runtime on a device (meant for a GPU session; runs on the CPU too).

    python benchmarks/check_model_device.py --device cuda [--model DIR]

On a random checkpoint (or --model), compares against transformers on the same device:
float32 logits (prefill and 16 KV-cached decode steps), greedy tokens, batched vs one by
one, and bfloat16 logits within a loose bound; then times decode at batch 1 and 8.
Prints one line per check and exits non-zero if any fails.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--model", type=Path, default=None)
    args = parser.parse_args()

    import dynaexq
    import transformers
    from dynaexq.generation import SamplingParams, generate_tokens
    from dynaexq.model.qwen3_moe import KVCache
    from dynaexq.model.testing import BENCH_CONFIG, make_hf_model, save_checkpoint

    dev = torch.device(args.device)
    if dev.type == "cuda":
        # Exact float32 comparisons: no TF32 in either implementation.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        print(f"device: {torch.cuda.get_device_name(dev)}")
    failures = 0

    def check(name: str, ok: bool, detail: str = "") -> None:
        nonlocal failures
        failures += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {name} {detail}")

    with tempfile.TemporaryDirectory() as tmp:
        path = args.model or save_checkpoint(make_hf_model(**BENCH_CONFIG), Path(tmp) / "m")
        engine = dynaexq.load(path, dtype="float32", device=dev)
        hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        hf = hf.to(dev).eval()
        vocab = engine.config.vocab_size
        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, vocab, (2, 33), generator=g).to(dev)
        with torch.no_grad():
            ref = hf(ids).logits
            diff = (engine.forward(ids) - ref).abs().max().item()
        check("fp32 prefill logits", diff <= 1e-4, f"max |d| {diff:.2e}")

        with torch.no_grad():
            out = hf.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=17,
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
                eos_token_id=None,
                pad_token_id=0,
            )
        tokens = out.sequences[:, ids.shape[1] :]
        cache = KVCache.allocate(engine.config, 2, ids.shape[1] + 17, torch.float32, dev)
        worst = 0.0
        with torch.inference_mode():
            pos = torch.arange(ids.shape[1], device=dev).expand(2, -1)
            logits = engine.model(ids, pos, cache)[:, -1]
            worst = (logits - out.logits[0]).abs().max().item()
            for step in range(16):
                p = torch.full((2, 1), ids.shape[1] + step, device=dev)
                logits = engine.model(tokens[:, step : step + 1], p, cache)[:, 0]
                worst = max(worst, (logits - out.logits[step + 1]).abs().max().item())
        check("fp32 16 decode steps with KV cache", worst <= 1e-4, f"max |d| {worst:.2e}")
        ours = [
            r.token_ids for r in engine.generate(ids.tolist(), max_new_tokens=17, ignore_eos=True)
        ]
        check("greedy tokens equal transformers", ours == tokens.tolist())

        prompts = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (5, 40, 1, 17)]
        params = SamplingParams(max_new_tokens=16, ignore_eos=True)
        together = [o.token_ids for o in generate_tokens(engine.model, prompts, params)]
        alone = [generate_tokens(engine.model, [p], params)[0].token_ids for p in prompts]
        check("batched generation equals one by one", together == alone)

        bf = dynaexq.load(path, dtype="bfloat16", device=dev)
        hf_bf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
        hf_bf = hf_bf.to(dev).eval()
        with torch.no_grad():
            ref = hf_bf(ids).logits.float()
        diff = (bf.forward(ids) - ref).abs().max().item()
        bound = 0.05 * ref.abs().max().item()
        check("bf16 prefill logits", diff <= bound, f"max |d| {diff:.3f} (bound {bound:.3f})")

        for batch in (1, 8):
            p = torch.randint(0, vocab, (batch, 128), generator=g).tolist()
            for eng, label in ((engine, "fp32"), (bf, "bf16")):
                generate_tokens(eng.model, p, SamplingParams(max_new_tokens=4, ignore_eos=True))
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                t0 = time.perf_counter()
                generate_tokens(eng.model, p, SamplingParams(max_new_tokens=65, ignore_eos=True))
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                dt = time.perf_counter() - t0
                print(
                    f"info decode {label} batch {batch}: "
                    f"{batch * 65 / dt:.0f} tokens/s (incl. prefill)"
                )
    print("all checks passed" if failures == 0 else f"{failures} check(s) FAILED")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
