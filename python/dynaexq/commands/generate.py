"""`dynaexq generate`: generate text with a Qwen3-MoE checkpoint, streaming tokens."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from dynaexq.commands._options import add_value_scale

HELP = "generate text from a prompt with a Qwen3-MoE checkpoint (streams tokens as produced)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "prompt",
        nargs="*",
        help="prompt text; several prompts run as one batch and print when all are done; "
        "'-' or no prompt reads one prompt from standard input",
    )
    parser.add_argument(
        "--model",
        default=None,
        help="Hugging Face checkpoint directory (config.json, safetensors, tokenizer.json); "
        "default: the embedded model shipped with dynaexq",
    )
    parser.add_argument(
        "--max-new-tokens", type=int, default=64, help="most tokens to generate per prompt"
    )
    parser.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="sampling temperature; 0 picks the most likely token (greedy)",
    )
    parser.add_argument(
        "--top-k", type=int, default=0, help="sample only among the k most likely tokens (0: off)"
    )
    parser.add_argument(
        "--top-p",
        type=float,
        default=1.0,
        help="sample only among the most likely tokens whose probabilities sum to p (1: off)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=None,
        help="random seed for sampling (prompt i uses seed + i); unset: not reproducible",
    )
    parser.add_argument(
        "--stop",
        action="append",
        default=[],
        metavar="TEXT",
        help="stop when this text appears (not printed); repeat for several",
    )
    parser.add_argument(
        "--ignore-eos",
        action="store_true",
        help="keep generating past the end-of-sequence token",
    )
    parser.add_argument(
        "--chat",
        action="store_true",
        help="wrap the prompt as a user message in the model's chat template",
    )
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="compute dtype; auto keeps the checkpoint's (float16 runs as float32 on CPU)",
    )
    parser.add_argument(
        "--device",
        default=None,
        help="torch device such as cpu or cuda:0; default: cuda when available, else cpu",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch; default: 1 for models under 100M parameters (their "
        "operations are too small to split, and extra threads stall on busy CPUs), "
        "else torch's default",
    )
    parser.add_argument(
        "--no-stream",
        action="store_true",
        help="print the text once generation ends instead of token by token",
    )
    parser.add_argument(
        "--stats",
        action="store_true",
        help="print token counts, finish reason and tokens/s to standard error",
    )
    parser.add_argument(
        "--cuda-graphs",
        action="store_true",
        help="decode by replaying a CUDA graph per batch size bucket (1, 2, 4, ... 32; "
        "captured on first use); needs a CUDA device and --budget with policy static, "
        "static-map or dynamic, else decoding stays eager. Off by default until a GPU run "
        "has measured it",
    )
    memory = parser.add_argument_group("precision runtime (experts in a byte budget)")
    memory.add_argument(
        "--budget",
        default=None,
        help="device bytes for everything dynaexq owns: a size like 6GiB, or N%% = the bytes "
        "at which a static hot map holds N%% of every layer's experts at the high tier; "
        "default: no budget, every expert at full precision",
    )
    memory.add_argument(
        "--policy",
        default=None,
        choices=("full", "static", "static-map", "dynamic", "offload"),
        help="who holds which tier (default with a budget: dynamic)",
    )
    memory.add_argument(
        "--tiers",
        default=None,
        help="expert tiers, low to high or any order (default for dynamic: "
        "int2,int3,int4,bf16; for the others int2,bf16)",
    )
    add_value_scale(memory)


def run(args: argparse.Namespace) -> int:
    import time

    import torch

    from dynaexq.checkpoint import CheckpointError
    from dynaexq.engine import GenerationResult
    from dynaexq.runtime.budget import parse_budget
    from dynaexq.runtime.load import load

    try:  # the one budget parser, before anything is loaded
        if args.budget is not None:
            parse_budget(args.budget)
    except ValueError as e:
        print(f"dynaexq generate: error: {e}", file=sys.stderr)
        return 2
    prompts = list(args.prompt)
    if not prompts or prompts == ["-"]:
        prompts = [sys.stdin.read()]
    try:
        if args.threads is not None:
            torch.set_num_threads(max(1, args.threads))
        if args.budget is None and args.policy in (None, "full"):
            engine = load(args.model, dtype=args.dtype, device=args.device)
        else:
            engine = load(
                args.model,
                budget=args.budget,
                policy=args.policy,
                tiers=args.tiers,
                dtype=args.dtype,
                device=args.device,
                lockstep=False,
                value_scale=args.value_scale,
            )
        if args.threads is None and _parameters(engine.config) < 100_000_000:
            torch.set_num_threads(1)
        if engine.tokenizer is None:
            raise CheckpointError(f"{engine.checkpoint.path}: no tokenizer.json to encode text")
    except (CheckpointError, ValueError) as e:
        print(f"dynaexq generate: error: {e}", file=sys.stderr)
        return 2
    options: dict[str, Any] = dict(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop=args.stop,
        ignore_eos=args.ignore_eos,
    )
    if args.cuda_graphs:
        from dynaexq.runtime.graphs import graphs_unavailable

        why = graphs_unavailable(engine)
        if why is not None:
            print(f"dynaexq generate: --cuda-graphs: {why}; decoding eagerly", file=sys.stderr)
        options["cuda_graphs"] = why is None
    start = time.perf_counter()
    try:
        if len(prompts) == 1 and not args.no_stream:
            done: list[GenerationResult] = []
            for piece in engine.stream(
                prompts[0], chat=args.chat, on_finish=done.append, **options
            ):
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")
            results = done
        else:
            results = engine.generate(prompts, chat=args.chat, **options)
            for i, r in enumerate(results):
                if len(results) > 1:
                    print(f"--- [{i}] ({r.finish_reason})")
                print(r.text)
    except ValueError as e:
        print(f"dynaexq generate: error: {e}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - start
    if args.stats:
        n = sum(len(r.token_ids) for r in results)
        reasons = ", ".join(r.finish_reason for r in results)
        print(
            f"[{len(results)} prompt(s), {n} tokens in {elapsed:.2f}s = {n / elapsed:.1f} "
            f"tokens/s (including the prefill); finished by: {reasons}]",
            file=sys.stderr,
        )
        runtime = getattr(engine, "precision", None)
        if runtime is not None:
            runtime.flush()
            dep = engine.deployment
            t = runtime.telemetry.totals()
            print(
                f"[{dep.plan.describe()}]\n[{int(t['steps'])} steps, "
                f"{int(t['transitions_finished'])} transitions, "
                f"{t['bytes_moved'] / 1e6:.2f} MB moved, "
                f"{100 * t['mass_hi_share']:.1f}% of routed mass served at the high tier]",
                file=sys.stderr,
            )
    return 0


def _parameters(config: Any) -> int:
    """Approximate parameter count (embeddings, attention, MLPs and all experts)."""
    h, layers = config.hidden_size, config.num_hidden_layers
    attn = h * config.head_dim * (2 * config.num_attention_heads + 2 * config.num_key_value_heads)
    moe = config.num_experts * 3 * h * config.moe_intermediate_size
    dense = 3 * h * config.intermediate_size
    mlp = sum(moe if config.is_moe_layer(i) else dense for i in range(layers))
    embed = config.vocab_size * h * (1 if config.tie_word_embeddings else 2)
    return layers * attn + mlp + embed
