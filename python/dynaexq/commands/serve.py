"""`dynaexq serve`: an OpenAI-compatible HTTP server with continuous batching."""

from __future__ import annotations

import argparse
import sys

from dynaexq.commands._options import add_value_scale

HELP = "serve a Qwen3-MoE checkpoint over an OpenAI-compatible HTTP API (continuous batching)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from dynaexq.serve.runtime import POLICIES

    parser.add_argument(
        "--model",
        default=None,
        help="Hugging Face checkpoint directory; default: the embedded model shipped with dynaexq",
    )
    parser.add_argument(
        "--served-model-name",
        default=None,
        help="the model id clients send; default: dynaexq-embedded or the checkpoint "
        "directory's name",
    )
    parser.add_argument(
        "--policy",
        default=None,
        choices=POLICIES,
        help="expert precision policy: full (every expert at the compute dtype), static, "
        "static-map, dynamic or offload (the precision runtime, within --budget); "
        "default: dynamic with --budget, else full",
    )
    parser.add_argument(
        "--tiers",
        default=None,
        help="precision tiers for the precision policies, low to high (default for dynamic: "
        "int2,int3,int4,bf16; for the others int2,bf16)",
    )
    add_value_scale(parser)
    parser.add_argument(
        "--calibration",
        action="append",
        default=[],
        metavar="FILE",
        help="text file(s) of your workload that rank experts for static-map and dynamic "
        "(not needed for the embedded model); repeat for several",
    )
    parser.add_argument(
        "--budget",
        default=None,
        help="device bytes for everything dynaexq owns (weights, KV cache for --max-batch x "
        "--max-context, experts): a size like 6GiB or 1.5GB, or N%% = the bytes at which a "
        "static hot map holds N%% of every layer's experts at the high tier (as dynaexq.load)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=8000, help="port (0: any free port)")
    parser.add_argument(
        "--max-batch", type=int, default=32, help="most sequences in the running batch"
    )
    parser.add_argument(
        "--max-queue",
        type=int,
        default=256,
        help="most requests waiting for a batch slot; beyond it requests get HTTP 429",
    )
    parser.add_argument(
        "--max-context",
        type=int,
        default=None,
        help="tokens per sequence (prompt + generated); the KV cache for max-batch "
        "sequences of this length is reserved at start; default: min(model limit, 4096)",
    )
    kv = parser.add_argument_group(
        "paged KV cache (one device budget for KV pages and expert precision)"
    )
    kv.add_argument(
        "--kv-cache",
        default="contiguous",
        choices=["contiguous", "paged"],
        help="contiguous: --max-batch x --max-context reserved at start; paged: fixed-size "
        "pages from the budget the experts use, so the split follows the load (dynamic "
        "policy: hot experts are demoted to free pages under load, promoted back after)",
    )
    kv.add_argument(
        "--min-kv-tokens",
        type=int,
        default=None,
        help="paged: tokens of KV always kept for pages (counted as fixed memory when the "
        "expert pool is sized); default: --max-context",
    )
    kv.add_argument(
        "--max-kv-tokens",
        type=int,
        default=None,
        help="paged: most tokens of KV the pages may hold; default: --max-batch x --max-context",
    )
    kv.add_argument("--kv-page-tokens", type=int, default=16, help="paged: tokens per KV page")
    parser.add_argument(
        "--max-prefill-tokens",
        type=int,
        default=1024,
        help="prompt tokens prefilled per step (long prompts are chunked and interleaved "
        "with decode steps)",
    )
    parser.add_argument(
        "--cuda-graphs",
        action="store_true",
        help="decode by replaying a CUDA graph per batch bucket (1, 2, 4, ... --max-batch) "
        "and key-slot bucket (64, 128, ... --max-context), captured on first use; needs a "
        "CUDA device, --budget with policy static, static-map or dynamic, and the "
        "contiguous KV cache, else decoding stays eager (with a warning). Off by default "
        "until a GPU run has measured it",
    )
    parser.add_argument(
        "--recalibrate-tokens",
        type=int,
        default=0,
        help="dynamic policy: once the finished requests hold this many tokens (prompts "
        "and completions), calibrate the expert values again on them, once, between two "
        "steps (the knapsack of the served text; serving pauses while it measures). "
        "0 (the default): never",
    )
    from dynaexq.runtime.policy import SERVED_RECALIBRATION_TRIGGERS  # dataclasses only

    parser.add_argument(
        "--recalibrate-on",
        choices=SERVED_RECALIBRATION_TRIGGERS,
        default="first",
        help="with --recalibrate-tokens: once on the first tokens served, or again on each "
        "next --recalibrate-tokens (the values follow the text served as it changes)",
    )
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=60.0,
        help="seconds to let running requests finish after SIGTERM/SIGINT",
    )
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="compute dtype; auto keeps the checkpoint's (float16 runs as float32 on CPU)",
    )
    parser.add_argument(
        "--device", default=None, help="torch device; default: cuda when available, else cpu"
    )
    ray = parser.add_argument_group("Ray Serve (past one GPU; needs dynaexq[ray])")
    ray.add_argument(
        "--replicas",
        type=int,
        default=None,
        help="serve N replicas (one per GPU) behind Ray Serve, starting a local Ray cluster "
        "or joining --ray-address / RAY_ADDRESS; default: one in-process engine, no Ray",
    )
    ray.add_argument(
        "--router",
        default="affinity",
        choices=["affinity", "pow2"],
        help="with --replicas: hot-set-affinity routing, or Ray's power of two choices",
    )
    ray.add_argument("--ray-address", default=None, help="with --replicas: join this cluster")
    ray.add_argument("--ray-cpus", type=float, default=None, help="CPUs of a local Ray cluster")
    ray.add_argument("--replica-cpus", type=float, default=None, help="CPUs per replica (1)")
    ray.add_argument(
        "--replica-gpus", type=float, default=None, help="GPUs per replica (1 with GPUs, else 0)"
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug"],
        help="server log level",
    )


def _fail(message: str) -> int:
    print(f"dynaexq serve: error: {message}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    import contextlib
    import signal
    import socket
    from collections.abc import Iterator
    from pathlib import Path

    from dynaexq.runtime.budget import BudgetError, format_bytes, kv_cache_bytes, parse_budget
    from dynaexq.runtime.memory import format_memory_report, memory_report
    from dynaexq.serve.runtime import RuntimeSpec, check_policy

    # Cheap checks first, before the model is loaded.
    if args.policy is None:
        args.policy = "dynamic" if args.budget is not None else "full"
    try:
        check_policy(args.policy)
        budget = parse_budget(args.budget) if args.budget is not None else None
    except ValueError as e:
        return _fail(str(e))
    for name in ("max_batch", "max_prefill_tokens"):
        if getattr(args, name) < 1:
            return _fail(f"--{name.replace('_', '-')} must be >= 1")
    if args.recalibrate_tokens < 0:
        return _fail("--recalibrate-tokens must be >= 0")
    if args.recalibrate_tokens and args.policy != "dynamic":
        return _fail("--recalibrate-tokens needs --policy dynamic")
    if args.recalibrate_on != "first" and not args.recalibrate_tokens:
        return _fail("--recalibrate-on needs --recalibrate-tokens")
    if getattr(args, "replicas", None) is not None:
        if args.replicas < 1:
            return _fail("--replicas must be >= 1")
        try:
            from dynaexq.serve.ray import serve_main
        except ImportError as e:
            return _fail(str(e))
        return serve_main(args)
    if args.max_queue < 0:
        return _fail("--max-queue must be >= 0")
    if args.max_context is not None and args.max_context < 2:
        return _fail("--max-context must be >= 2")
    if not 0 <= args.port <= 65535:
        return _fail("--port must be in 0..65535")
    try:
        family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((args.host, args.port))
    except OSError as e:
        return _fail(f"cannot listen on {args.host}:{args.port}: {e}")

    import uvicorn

    from dynaexq.checkpoint import CheckpointError
    from dynaexq.engine import embedded_model_path
    from dynaexq.model.config import ModelConfig
    from dynaexq.serve.app import ServerConfig, create_app
    from dynaexq.serve.runtime import build_runtime

    kv_share = None
    try:
        ckpt = embedded_model_path() if args.model is None else Path(args.model)
        model_config = ModelConfig.from_file(ckpt / "config.json")
        limit = model_config.max_position_embeddings
        max_context = min(args.max_context or min(limit, 4096), limit)
        if getattr(args, "kv_cache", "contiguous") == "paged":
            from dynaexq.runtime.kv_share import KvShare

            kv_share = KvShare(
                min_kv_tokens=max_context if args.min_kv_tokens is None else args.min_kv_tokens,
                max_kv_tokens=args.max_kv_tokens or args.max_batch * max_context,
                page_tokens=args.kv_page_tokens,
            )
        elif args.min_kv_tokens is not None or args.max_kv_tokens is not None:
            raise ValueError("--min-kv-tokens / --max-kv-tokens need --kv-cache paged")
        engine, stats = build_runtime(
            RuntimeSpec(
                args.model,
                args.policy,
                None if budget is None else (budget.nbytes or args.budget),
                args.dtype,
                args.device,
                batch=args.max_batch,
                context=max_context,
                tiers=args.tiers,
                calibration=tuple(Path(f).read_text() for f in args.calibration) or None,
                value_scale=args.value_scale,
                kv_share=kv_share,
            )
        )
    except BudgetError as e:
        sock.close()
        # The KV cache is reserved for the whole batch at the full context: say what it
        # costs, the one part of the fixed bytes the server's own options decide.
        kv = kv_cache_bytes(model_config, args.max_batch, max_context, 4)
        return _fail(
            f"{e}. Of the fixed bytes, the KV cache for --max-batch {args.max_batch} x "
            f"context {max_context} tokens costs {format_bytes(kv)} ({kv} bytes): lower "
            "--max-batch or --max-context, or raise --budget"
        )
    except (CheckpointError, ValueError, OSError) as e:
        sock.close()
        return _fail(str(e))
    name = args.served_model_name or (
        "dynaexq-embedded" if args.model is None else engine.checkpoint.path.resolve().name
    )
    config = ServerConfig(
        model_name=name,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        max_context=max_context,
        max_prefill_tokens=args.max_prefill_tokens,
        drain_timeout=args.drain_timeout,
        kv_share=kv_share,
        cuda_graphs=args.cuda_graphs,
        recalibrate_tokens=args.recalibrate_tokens,
        recalibrate_on=args.recalibrate_on,
    )
    try:
        app = create_app(engine, stats, config)
    except ValueError as e:
        sock.close()
        return _fail(str(e))

    class Server(uvicorn.Server):
        # uvicorn re-raises a caught SIGTERM after its graceful shutdown (so the process
        # ends "killed by signal"); a drained shutdown is a clean exit here, status 0.
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            handled = (signal.SIGINT, signal.SIGTERM)
            previous = {s: signal.signal(s, self.handle_exit) for s in handled}
            try:
                yield
            finally:
                for s, handler in previous.items():
                    signal.signal(s, handler)

    server = Server(
        uvicorn.Config(
            app,
            log_level=args.log_level,
            timeout_graceful_shutdown=int(args.drain_timeout),
            timeout_keep_alive=5,
        )
    )
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if family == socket.AF_INET6 else host
    print(
        f"dynaexq serve: {name} (policy {args.policy}, {engine.device}, {engine.dtype}) on "
        f"http://{shown}:{port}/v1  max batch {args.max_batch}, max queue {args.max_queue}, "
        f"context {app.state.scheduler.max_context} "
        + (
            f"(KV cache {app.state.scheduler.kv_cache_bytes / 2**20:.1f} MiB reserved)"
            if kv_share is None
            else f"(paged KV: {kv_share.min_kv_tokens}-{kv_share.max_kv_tokens} tokens in "
            f"pages of {kv_share.page_tokens}, "
            + (
                "sharing the budget with the experts)"
                if getattr(engine, "kv_budget", None) is not None
                else "a budget of its own: the policy manages no expert bytes)"
            )
        ),
        file=sys.stderr,
        flush=True,
    )
    print(format_memory_report(memory_report(engine)), file=sys.stderr, flush=True)
    server.run(sockets=[sock])
    return 0
