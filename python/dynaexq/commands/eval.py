"""`dynaexq eval`: every policy at equal device bytes on held-out text, the gap each
recovers, a workload-shift run, plots and a markdown report."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from dynaexq.commands._options import add_value_scale

HELP = "compare policies (full, static, static-map, dynamic, offload) at equal memory"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from dynaexq.runtime.policy import (  # dataclasses only: cheap
        DEFAULT_CONTROLLER,
        RECALIBRATION_TRIGGERS,
    )

    p.add_argument("--model", type=Path, default=None, help="checkpoint dir (default: embedded)")
    p.add_argument(
        "--data",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="a named text file to evaluate on (repeatable); default: the embedded model's "
        "held-out splits",
    )
    p.add_argument(
        "--domains",
        default="embedded",
        help="embedded (the model's held-out splits), unseen (every domain built by "
        "scripts/build_unseen_domains.py), tuning, held-back, fresh, final, round8, round9, "
        "or a comma list of unseen domain names",
    )
    p.add_argument("--offsets", type=int, default=1, help="scored slices per domain (seeds)")
    p.add_argument(
        "--calibration",
        default="domain",
        help="comma list of calibration sources for static-map/static-knapsack/dynamic: "
        "domain (each domain's own first tokens), mix (every domain's together), generic "
        "(the text shipped with the package), domain+generic (each domain's own first "
        "tokens, then the generic text)",
    )
    p.add_argument(
        "--uniform-tiers",
        default="int2,int3,int4,int8,bf16",
        help="tiers the 'uniform' baseline picks from (the best that fits each budget)",
    )
    p.add_argument("--mixed", action="store_true", help="also run mixed-domain batches")
    p.add_argument(
        "--tiers", default="int2,int3,int4,bf16", help="tiers, e.g. int2,bf16 or int2,int4,bf16"
    )
    p.add_argument(
        "--policies",
        default="full,static,uniform,static-map,static-knapsack,dynamic",
        help="policies to compare; dynamic-recal: dynamic that calibrates again on the "
        "first --recalibrate-tokens tokens it scored (and as --recalibrate-on says), then "
        "plans on them",
    )
    p.add_argument(
        "--recalibrate-tokens",
        type=int,
        default=1024,
        help="dynamic-recal: scored tokens (all streams) behind it when it calibrates again",
    )
    p.add_argument(
        "--recalibrate-on",
        choices=RECALIBRATION_TRIGGERS,
        default="window",
        help="dynamic-recal: once on the first tokens; again on each new workload regime's "
        "own text (the regime signal); or every --recalibrate-tokens on the last ones",
    )
    p.add_argument(
        "--budgets",
        default="10%,20%,30%",
        help="budgets: N%% = the bytes at which static-map holds N%% of experts hot, Nbits = "
        "an expert pool of N bits per expert weight on average, or sizes like 6GiB",
    )
    p.add_argument("--tokens", type=int, default=16384, help="scored tokens per domain")
    p.add_argument(
        "--calibration-tokens",
        type=int,
        default=16384,
        help="tokens at the start of each domain used to rank experts (never scored)",
    )
    p.add_argument("--streams", type=int, default=4, help="parallel sequences per domain")
    p.add_argument("--window", type=int, default=256, help="context window (tokens)")
    p.add_argument("--chunk", type=int, default=32, help="tokens per sequence per step")
    c = p.add_argument_group("controller (dynamic)")
    c.add_argument(
        "--signal",
        choices=("ema", "window", "regime"),
        default=DEFAULT_CONTROLLER.signal,
        help="what the controller plans on: an EMA of the steps, a window of them, or the "
        "mean since the routing last changed (regime)",
    )
    c.add_argument(
        "--prior-steps",
        type=float,
        default=DEFAULT_CONTROLLER.prior_steps,
        help="regime: the calibration's weight in controller steps",
    )
    c.add_argument(
        "--shift-ratio",
        type=float,
        default=DEFAULT_CONTROLLER.shift_ratio,
        help="regime: a change of routing is this many times the regime's usual distance",
    )
    c.add_argument(
        "--alpha", type=float, default=DEFAULT_CONTROLLER.alpha, help="EMA factor per step"
    )
    c.add_argument("--window-steps", type=int, default=4, help="steps in the window signal")
    c.add_argument("--replan-every", type=int, default=1, help="controller steps between plans (T)")
    c.add_argument(
        "--step-tokens",
        type=int,
        default=128,
        help="routed tokens per controller step (the EMA and window count these steps)",
    )
    c.add_argument(
        "--delta", type=float, default=0.005, help="hysteresis margin (routed mass per step)"
    )
    c.add_argument("--max-bytes-per-token", type=float, default=float("inf"), help="churn cap")
    c.add_argument(
        "--in-flight",
        type=int,
        default=DEFAULT_CONTROLLER.in_flight,
        help="transitions in flight (K)",
    )
    c.add_argument(
        "--staging",
        choices=("every", "lowest"),
        default="lowest",
        help="staging slots: K of every tier, or K of the lowest tier only (the upper "
        "tiers' bytes then hold experts; dynamic that does not move is the static knapsack)",
    )
    c.add_argument(
        "--staging-memory",
        choices=("device", "host"),
        default=None,
        help="where the staging slots live: device memory, paid out of the budget, or host "
        "memory the device reads in place, outside it (staging lowest only; default: host "
        "with --staging lowest, device with every)",
    )
    c.add_argument(
        "--move-gain",
        type=float,
        default=DEFAULT_CONTROLLER.move_gain,
        help="move only when the gain exceeds this share of the planned value per top-tier "
        "slot copied (0: any gain)",
    )
    c.add_argument(
        "--move-z",
        type=float,
        default=DEFAULT_CONTROLLER.move_z,
        help="a move's gain less this many standard errors (from the signal's prediction "
        "error) must still pay (0: no discount)",
    )
    c.add_argument(
        "--move-noise",
        choices=("routing", "measured"),
        default=DEFAULT_CONTROLLER.move_noise,
        help="what those standard errors count: the routing signal's noise, or also the "
        "measurement noise of the layer-scaled tier values (measured)",
    )
    c.add_argument("--split", choices=("per-layer", "global"), default="per-layer")
    c.add_argument(
        "--planner",
        choices=("top-n", "value"),
        default="value",
        help="dynamic's planner (static-map is always the top-n map of the calibration)",
    )
    c.add_argument(
        "--gate",
        choices=("skill", "off"),
        default="off",
        help="no-harm rule: follow the workload only while it measurably beats the static plan",
    )
    c.add_argument("--gate-margin", type=float, default=0.05, help="relative value to follow")
    c.add_argument("--gate-alpha", type=float, default=0.8, help="EMA of the gate's advantage")
    c.add_argument("--prior-weight", type=float, default=0.0, help="blend of the calibration prior")
    c.add_argument(
        "--hotness-floor",
        type=float,
        default=DEFAULT_CONTROLLER.hotness_floor,
        help="knapsack hotness: (1 - f) x calibration share + f x an even share",
    )
    c.add_argument(
        "--value",
        choices=("weight", "output", "fisher"),
        default=DEFAULT_CONTROLLER.value,
        help="what a tier is worth per unit of routed share: its weight error's reduction, "
        "its output error's measured on the calibration text, or the loss increase that "
        "error predicts there (fisher)",
    )
    c.add_argument(
        "--value-prior",
        type=float,
        default=DEFAULT_CONTROLLER.value_prior,
        help="routed calibration tokens the (per-layer scaled) weight error counts for "
        "against an expert's measured error (value output/fisher)",
    )
    add_value_scale(c, default=DEFAULT_CONTROLLER.value_scale)
    p.add_argument(
        "--shift",
        default="python,prose,c",
        help="domain order of the workload-shift run ('none' to skip)",
    )
    p.add_argument("--shift-budget", default="20%", help="budget of the workload-shift run")
    p.add_argument(
        "--variants",
        choices=("all", "none"),
        default="all",
        help="also score dynamic's ablations at --shift-budget: the long horizon, a window "
        "signal, three tiers split evenly (top-n) and sized by the knapsack",
    )
    p.add_argument("--segment-tokens", type=int, default=4096, help="tokens per shift segment")
    p.add_argument("--out", type=Path, default=Path("runs/eval"), help="report and plots dir")
    p.add_argument("--json", type=Path, default=None, help="also write every figure here")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument(
        "--device",
        default="cpu",
        help="where the models run: cpu (the default, reproducible figures) or cuda[:N]",
    )
    s = p.add_argument_group("suites (every run behind a set of published figures)")
    s.add_argument(
        "--suite",
        default=None,
        metavar="NAME|PATH",
        help="run a suite of evals into --out/<run> and write their tables to "
        "--out/<suite>.md; finished runs are skipped (shipped: round9, the README's "
        "results; css, the last held-back set); with it, only --out and --jobs apply",
    )
    s.add_argument("--jobs", type=int, default=1, help="suite runs at once (one core each)")


_SUITE_OPTIONS = {"suite", "jobs", "out"}


def _run_suite(args: argparse.Namespace) -> int:
    """`--suite`: check every run's arguments and data sets, then run what is not done."""
    from dynaexq.eval.suite import load_suite, run_suite

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    defaults = vars(parser.parse_args([]))
    given = sorted(
        f"--{k.replace('_', '-')}"
        for k, v in vars(args).items()
        if k in defaults and k not in _SUITE_OPTIONS and v != defaults[k]
    )
    if given:
        print(
            f"dynaexq eval: error: --suite takes only --out and --jobs, not {given}",
            file=sys.stderr,
        )
        return 2
    try:
        suite = load_suite(args.suite)
        for r in suite.runs:  # every run's arguments and sets, before hours of work
            check = argparse.ArgumentParser(prog=f"suite run {r.name}", exit_on_error=False)
            add_arguments(check)
            try:
                ns = check.parse_args(list(r.args))
            except (argparse.ArgumentError, SystemExit) as e:
                raise ValueError(f"suite run {r.name}: bad arguments ({e})") from None
            if ns.domains != "embedded" and not ns.data:
                from dynaexq.eval.run import unseen_domains

                unseen_domains("all" if ns.domains == "unseen" else ns.domains)
    except (ValueError, FileNotFoundError) as e:
        print(f"dynaexq eval: error: {e}", file=sys.stderr)
        return 2
    failed, tables = run_suite(suite, args.out, jobs=args.jobs)
    if tables is not None:
        print(tables.read_text())
        print(f"tables: {tables}")
    return 1 if failed else 0


def run(args: argparse.Namespace) -> int:
    if args.suite is not None:
        return _run_suite(args)

    from dynaexq.eval.run import parse_bits
    from dynaexq.runtime.budget import parse_budget

    try:  # every budget read by the one parser, before anything is loaded
        for b in [*args.budgets.split(","), args.shift_budget]:
            if parse_bits(b) is None:
                parse_budget(b.strip())
    except ValueError as e:
        print(f"dynaexq eval: error: {e}", file=sys.stderr)
        return 2

    import torch

    from dynaexq.eval.report import plot_pareto, plot_ppl_vs_budget, plot_shift, write_report
    from dynaexq.eval.run import (
        VARIANTS,
        EvalConfig,
        embedded_domains,
        run_policies,
        text_domains,
        unseen_domains,
    )
    from dynaexq.eval.shift import run_shift
    from dynaexq.runtime.policy import DEFAULT_CONTROLLER, ControllerSettings

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    controller = ControllerSettings(
        signal=args.signal,
        prior_steps=args.prior_steps,
        shift_ratio=args.shift_ratio,
        alpha=args.alpha,
        window=args.window_steps,
        replan_every=args.replan_every,
        step_tokens=args.step_tokens,
        delta=args.delta,
        max_bytes_per_token=args.max_bytes_per_token,
        in_flight=args.in_flight,
        staging=args.staging,
        staging_memory=args.staging_memory
        or (DEFAULT_CONTROLLER.staging_memory if args.staging == "lowest" else "device"),
        move_gain=args.move_gain,
        move_z=args.move_z,
        move_noise=args.move_noise,
        split=args.split,
        planner=args.planner,
        gate=args.gate,
        gate_margin=args.gate_margin,
        gate_alpha=args.gate_alpha,
        prior_weight=args.prior_weight,
        hotness_floor=args.hotness_floor,
        value=args.value,
        value_prior=args.value_prior,
        value_scale=args.value_scale,
    )
    cfg = EvalConfig(
        tiers=tuple(t.strip() for t in args.tiers.split(",")),
        policies=tuple(p.strip() for p in args.policies.split(",")),
        budgets=tuple(b.strip() for b in args.budgets.split(",")),
        tokens_per_domain=args.tokens,
        calibration_tokens=args.calibration_tokens,
        streams=args.streams,
        window=args.window,
        chunk=args.chunk,
        controller=controller,
        variants=VARIANTS if args.variants == "all" else (),
        variant_budget=args.shift_budget,
        uniform_tiers=tuple(t.strip() for t in args.uniform_tiers.split(",")),
        offsets=args.offsets,
        calibrations=tuple(c.strip() for c in args.calibration.split(",")),
        mixed=args.mixed,
        device=args.device,
        recalibrate_tokens=args.recalibrate_tokens,
        recalibrate_on=args.recalibrate_on,
    )
    if args.data:
        from dynaexq.engine import load

        engine = load(args.model)
        domains = text_domains(args.data, engine.encode)
    elif args.domains != "embedded":
        domains = unseen_domains("all" if args.domains == "unseen" else args.domains)
    else:
        if args.model is not None:
            print("--model given without --data: evaluating on the embedded held-out text")
        domains = embedded_domains()
    args.out.mkdir(parents=True, exist_ok=True)
    print(
        f"dynaexq eval: domains {', '.join(f'{k} ({len(v)} tokens)' for k, v in domains.items())}"
    )
    summary = run_policies(args.model, domains, cfg)
    plots = [plot_ppl_vs_budget(summary, args.out), plot_pareto(summary, args.out)]
    shift = None
    if args.shift != "none":
        order = [d.strip() for d in args.shift.split(",")]
        if all(d in domains for d in order):
            shift, trace = run_shift(
                args.model,
                domains,
                order,
                cfg,
                budget=args.shift_budget,
                segment_tokens=args.segment_tokens,
            )
            if trace is not None:
                plots += plot_shift(trace, order, args.out)
        else:
            print(f"skipping the shift run: {order} are not all among {sorted(domains)}")
    command = "dynaexq eval " + " ".join(shlex.quote(a) for a in sys.argv[2:])
    report = write_report(summary, shift, args.out, plots, command)
    if args.json is not None:
        args.json.write_text(json.dumps({"eval": summary, "shift": shift}, indent=1))
    print(f"report: {report}")
    for g in summary["gaps"]:
        print(
            f"  gap recovered {g['policy']:10s} {g['budget']:>5s} {g['domain']:8s} "
            f"log-ppl {100 * g['gap_recovered_ppl']:6.1f}%  "
            f"acc {100 * g['gap_recovered_acc']:6.1f}%"
        )
    return 0
