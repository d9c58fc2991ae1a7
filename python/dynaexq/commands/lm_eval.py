"""`dynaexq lm-eval`: lm-evaluation-harness with the in-process `dynaexq` model."""

from __future__ import annotations

import argparse
import sys

NAME = "lm-eval"
HELP = (
    "score lm-evaluation-harness tasks through the engine in process (loglikelihood, "
    "loglikelihood_rolling, generate_until; batched), e.g. dynaexq lm-eval --budget 6GiB "
    "-- --tasks dynaexq_heldout"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model-path", default=None, help="checkpoint directory (default: embedded)"
    )
    parser.add_argument(
        "--budget",
        default=None,
        help="device bytes: a size like 6GiB, or N%% (the bytes at which a static hot map "
        "holds N%% of every layer's experts at the high tier)",
    )
    parser.add_argument(
        "--policy",
        default=None,
        choices=("full", "static", "static-map", "dynamic", "offload"),
        help="expert precision policy (default: dynamic with --budget, else full)",
    )
    parser.add_argument("--tiers", default=None, help="expert tiers, e.g. int2,bf16")
    parser.add_argument("--max-length", type=int, default=None, help="context tokens")
    parser.add_argument(
        "--batch-size", type=int, default=8, help="sequences run at once (lm-eval's --batch_size)"
    )
    parser.add_argument(
        "--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
        help="compute dtype",
    )  # fmt: skip
    parser.add_argument(
        "lm_eval_args",
        nargs=argparse.REMAINDER,
        help="lm-eval's own options (--tasks, --num_fewshot, --limit, --output_path, ...)",
    )


def run(args: argparse.Namespace) -> int:
    from dynaexq.runtime.budget import parse_budget

    try:
        if args.budget is not None:
            parse_budget(args.budget)
    except ValueError as e:
        print(f"dynaexq lm-eval: error: {e}", file=sys.stderr)
        return 2
    try:
        from lm_eval.__main__ import cli_evaluate

        import dynaexq.lm_eval  # noqa: F401  (registers the model with lm-eval)
    except ImportError as e:
        print(f"dynaexq lm-eval: error: {e} (pip install 'dynaexq[lm-eval]')", file=sys.stderr)
        return 2
    model_args = [f"dtype={args.dtype}"]
    for key, value in (
        ("pretrained", args.model_path),
        ("budget", args.budget),
        ("policy", args.policy),
        ("tiers", args.tiers),
        ("max_length", args.max_length),
    ):
        if value is not None:
            model_args.append(f"{key}={value}")
    rest = [a for a in args.lm_eval_args if a != "--"]
    if not any(a.startswith("--batch_size") for a in rest):
        rest += ["--batch_size", str(args.batch_size)]
    if not any(a.startswith("--include_path") for a in rest):  # the example tasks
        rest += ["--include_path", str(dynaexq.lm_eval.TASKS_DIR)]
    argv = ["lm-eval", "run", "--model", "dynaexq", "--model_args", ",".join(model_args), *rest]
    saved = sys.argv
    sys.argv = argv
    try:
        cli_evaluate()
    except SystemExit as e:
        return int(e.code or 0) if not isinstance(e.code, str) else 1
    finally:
        sys.argv = saved
    return 0
