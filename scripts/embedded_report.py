#!/usr/bin/env python3
"""Measure the embedded model and write REPORT.json + REPORT.md next to it.

Loads the checkpoint with ``transformers.AutoModelForCausalLM`` (the reference), then
reports: parameters (total and active per token), training tokens and time (from
train_log.jsonl), held-out loss and perplexity per domain, and per layer routing
entropy, expert-use skew (share of the top 25% experts) and how much the favourite
experts differ between domains (Jaccard overlap of the top-25% sets, Jensen-Shannon
divergence), for the trained model and for the same architecture at random init.

Usage::

    python scripts/embedded_report.py [--model-dir python/dynaexq/data/embedded] [--max-seqs 256]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from embedded_common import DOMAINS, evaluate, load_heldout  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def count_params(model) -> tuple[int, int]:  # type: ignore[no-untyped-def]
    cfg = model.config
    total = sum(p.numel() for p in model.parameters())
    expert = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    active = total - expert + expert * cfg.num_experts_per_tok // cfg.num_experts
    return total, active


def expert_format(model_dir: Path) -> str:
    from safetensors import safe_open

    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    per = [
        k for k in keys if ".experts." in k and k.endswith(("gate_proj.weight", "up_proj.weight"))
    ]
    fused = [k for k in keys if k.endswith("experts.gate_up_proj")]
    if per and not fused:
        return f"per-expert ({len(per) // 2} experts x gate/up/down, e.g. {sorted(per)[0]})"
    if fused and not per:
        return f"fused ({fused[0]})"
    return "mixed/unknown"


def trained_history(recs: list[dict]) -> list[dict]:
    """The log records that describe training the final weights hold.

    A run killed between checkpoints has logged steps its checkpoint lost; the resumed
    run (or a phase continued from that checkpoint) logs from the checkpoint's step again.
    So a record whose step goes back drops the earlier records past it; a training-loss
    record at step S also drops an earlier one at S with what was logged after it.
    """

    def lost(q: dict, s: int, loss_record: bool) -> bool:
        qs = q.get("step", 0)
        if q.get("event") in ("start", "continue"):
            return qs > s
        return qs > s or (loss_record and qs == s)

    out: list[dict] = []
    for r in recs:
        if "step" in r and r.get("event") != "start":
            loss_record = "loss" in r and "event" not in r
            while out and lost(out[-1], r["step"], loss_record):
                out.pop()
        out.append(r)
    return out


def training_summary(log_path: Path) -> dict[str, object]:
    recs = [json.loads(ln) for ln in log_path.read_text().splitlines() if ln.strip()]
    recs = trained_history(recs)
    steps = [r for r in recs if "loss" in r and "step" in r and "eval" not in r]
    evals = [r for r in recs if "eval" in r]
    done = [r for r in recs if r.get("event") == "done"]
    last = steps[-1] if steps else {}
    tps = next((r["tokens_per_step"] for r in recs if r.get("event") == "start"), 0)
    # A phase is one warmup + cosine schedule: the first starts at step 0, each
    # `continue` event (train_embedded.py --continue-from) starts another. Records are
    # in log order, so a phase is everything between two such events. Phases may use
    # different batch sizes: records carry the running token count (older `continue`
    # events without one inherit the first phase's tokens per step).
    phases: list[dict[str, object]] = []
    clock = 0.0  # wall clock (s) when the current phase started
    tokens = 0  # running token count at the latest record
    for r in recs:
        if r.get("event") in ("start", "continue"):
            start_tokens = r.get("tokens", r.get("step", 0) * tps)
            if phases:  # the previous phase ended at the checkpoint this one starts from
                clock = float(phases[-1]["_clock"])  # type: ignore[arg-type]
                phases[-1]["_tokens"], phases[-1]["last_step"] = start_tokens, r["step"]
            phases.append(
                {
                    "first_step": r.get("step", 0),
                    "_start": clock,
                    "_clock": clock,
                    "_tokens0": start_tokens,
                    "_tokens": start_tokens,
                    "tokens_per_step": r.get("tokens_per_step", tps),
                    "device": r.get("device", "cpu"),
                    "optimizer": r.get("optimizer", "new" if r["event"] == "start" else "parent"),
                }
            )
        elif phases and "elapsed_s" in r:
            phases[-1]["_clock"] = r["elapsed_s"]
        if phases and "tokens" in r and "step" in r:
            phases[-1]["_tokens"] = tokens = r["tokens"]
        if phases and "lr" in r and "step" in r:
            ph = phases[-1]
            ph["last_step"] = r["step"]
            ph["peak_lr"] = max(float(ph.get("peak_lr", 0.0)), r["lr"])  # type: ignore[arg-type]
            ph["final_lr"] = r["lr"]
        if phases and r.get("event") == "done":
            phases[-1]["last_step"] = r["step"]
    for ph in phases:
        ph["end_tokens"] = int(ph.pop("_tokens"))  # type: ignore[call-overload]
        ph["tokens"] = ph["end_tokens"] - int(ph.pop("_tokens0"))  # type: ignore[call-overload]
        ph["seconds"] = float(ph.pop("_clock")) - float(ph.pop("_start"))  # type: ignore[arg-type]
        # Held-out loss where the phase ended, if it was evaluated there: the ends of
        # fully decayed phases are the points a flattening curve is read from.
        end = [r for r in evals if r["step"] == ph.get("last_step")]
        ph["end_eval"] = end[-1]["eval"]["loss"] if end else None
        # "Decayed": the learning rate at its last step fell to a quarter of its peak or
        # less (a full cosine ends at --min-lr-frac, 5%; a phase cut short stays near 1).
        ph["decayed"] = bool(ph.get("final_lr")) and float(ph["final_lr"]) <= 0.25 * float(
            ph["peak_lr"]  # type: ignore[arg-type]
        )
    final = max([last.get("step", 0), *(r["step"] for r in done)])
    curve = [
        {"step": r["step"], "tokens": r["tokens"], **{d: r["eval"]["loss"][d] for d in DOMAINS}}
        for r in evals
    ]
    summary: dict[str, object] = {
        "steps": final,
        "tokens": tokens,
        "train_seconds": max([last.get("elapsed_s", 0), *(r["elapsed_s"] for r in done)]),
        "final_train_loss": last.get("loss"),
        "tokens_per_step": tps,
        "phases": phases,
        "last_doubling": last_doubling(curve),
        "eval_curve": curve,
        "train_curve": [{"tokens": r["tokens"], "loss": r["loss"]} for r in steps],
    }
    summary["decayed_phase_ends"] = decayed_phase_ends(summary)
    return summary


def decayed_phase_ends(tsum: dict[str, object]) -> list[dict[str, object]]:
    """Held-out loss at the ends of fully decayed phases, with the gain per doubling of
    tokens since the previous such end (per domain, nats)."""
    out: list[dict[str, object]] = []
    for ph in tsum.get("phases") or []:  # type: ignore[attr-defined]
        if not (ph.get("decayed") and ph.get("end_eval")):
            continue
        gain = {}
        if out:
            prev = out[-1]
            doublings = math.log2(ph["end_tokens"] / prev["tokens"])  # type: ignore[operator]
            gain = {
                d: round((prev["loss"][d] - ph["end_eval"][d]) / doublings, 4)  # type: ignore[index]
                for d in DOMAINS
            }
        out.append({"tokens": ph["end_tokens"], "loss": ph["end_eval"], "gain_per_doubling": gain})
    return out


def last_doubling(curve: list[dict[str, float]]) -> dict[str, object] | None:
    """Held-out loss gained by the last doubling of training tokens, per domain.

    Compares the final evaluation with the last one at or before half the final token
    count: a flattened curve gains little from twice the data.
    """
    if len(curve) < 2:
        return None
    end = curve[-1]
    half = [e for e in curve if e["tokens"] <= end["tokens"] / 2]
    if not half:
        return None
    mid = half[-1]
    return {
        "from_tokens": mid["tokens"],
        "to_tokens": end["tokens"],
        "gain": {d: round(mid[d] - end[d], 4) for d in DOMAINS},
        "gain_pct": {d: round(100 * (mid[d] - end[d]) / mid[d], 2) for d in DOMAINS},
    }


def plot_training(summary: dict[str, object], path: Path) -> None:
    """Held-out loss per domain (and training loss) against tokens, phases marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = summary["eval_curve"]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    train = summary["train_curve"]
    ax.plot(
        [r["tokens"] / 1e6 for r in train],  # type: ignore[index]
        [r["loss"] for r in train],  # type: ignore[index]
        color="0.75",
        lw=0.8,
        label="training loss (batch mean)",
    )
    for d in DOMAINS:
        ax.plot(
            [e["tokens"] / 1e6 for e in curve],  # type: ignore[index]
            [e[d] for e in curve],  # type: ignore[index]
            marker=".",
            label=f"held-out {d}",
        )
    for ph in summary["phases"][1:]:  # type: ignore[index]
        start = ph["end_tokens"] - ph["tokens"]  # type: ignore[operator]
        ax.axvline(start / 1e6, color="k", ls="--", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlim(left=0.3)
    ax.set_ylim(top=min(6.0, ax.get_ylim()[1]))
    ax.set_xlabel("training tokens (millions, log scale)")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("Embedded model: loss during training (dashed: a new LR phase)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def samples(model, tok, prompts: list[str], n: int) -> list[dict[str, str]]:  # type: ignore[no-untyped-def]
    import torch

    out = []
    for p in prompts:
        ids = tok(p, return_tensors="pt").input_ids
        torch.manual_seed(0)
        g = model.generate(ids, max_new_tokens=n, do_sample=False)
        torch.manual_seed(0)
        s = model.generate(ids, max_new_tokens=n, do_sample=True, temperature=0.8, top_p=0.95)
        out.append(
            {
                "prompt": p,
                "greedy": tok.decode(g[0, ids.shape[1] :]),
                "sampled": tok.decode(s[0, ids.shape[1] :]),
            }
        )
    return out


def md_table(header: list[str], rows: list[list[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--model-dir", type=Path, default=REPO / "python" / "dynaexq" / "data" / "embedded"
    )
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument(
        "--max-seqs", type=int, default=100_000, help="held-out windows per domain (all)"
    )
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0, help="seed of the random-init baseline")
    ap.add_argument("--no-samples", action="store_true")
    args = ap.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3MoeForCausalLM

    torch.set_num_threads(args.threads)
    d = args.model_dir
    heldout = load_heldout(d / "heldout")
    t0 = time.time()
    model = AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32)
    if type(model) is not Qwen3MoeForCausalLM:
        raise SystemExit(f"expected Qwen3MoeForCausalLM, loaded {type(model).__name__}")
    model.eval()
    total, active = count_params(model)
    trained = evaluate(model, heldout, args.seq_len, args.max_seqs)
    torch.manual_seed(args.seed)
    base = Qwen3MoeForCausalLM(model.config).eval()
    untrained = evaluate(base, heldout, args.seq_len, args.max_seqs)
    cfg = model.config
    report: dict[str, object] = {
        "config": {
            k: getattr(cfg, k)
            for k in (
                "vocab_size",
                "hidden_size",
                "num_hidden_layers",
                "num_attention_heads",
                "num_key_value_heads",
                "head_dim",
                "num_experts",
                "num_experts_per_tok",
                "moe_intermediate_size",
                "norm_topk_prob",
                "tie_word_embeddings",
                "router_aux_loss_coef",
            )
        },
        "params_total": total,
        "params_active_per_token": active,
        "expert_tensor_format": expert_format(d),
        "checkpoint_dtype": str(
            next(
                iter(
                    __import__("safetensors.torch", fromlist=["load_file"])
                    .load_file(str(d / "model.safetensors"))
                    .values()
                )
            ).dtype
        ),  # noqa: E501
        "training": training_summary(d / "train_log.jsonl")
        if (d / "train_log.jsonl").is_file()
        else None,
        "heldout_tokens_per_domain": {
            k: int(min(len(v) - 1, args.max_seqs * args.seq_len)) for k, v in heldout.items()
        },
        "trained": trained,
        "untrained": untrained,
        "heldout_ppl": {k: round(math.exp(v), 3) for k, v in trained["loss"].items()},  # type: ignore[index]
    }
    if not args.no_samples:
        tok = AutoTokenizer.from_pretrained(str(d))
        report["samples"] = samples(
            model, tok, ["def parse_args(", "#include <stdio.h>\n", "The file is"], 48
        )
    report["report_seconds"] = round(time.time() - t0, 1)
    (d / "REPORT.json").write_text(json.dumps(report, indent=2) + "\n")

    tr, un = trained["routing"], untrained["routing"]  # type: ignore[index]
    layers = cfg.num_hidden_layers
    tsum = report["training"] or {}
    md = [
        "# Embedded model report",
        "",
        "Generated by `python scripts/embedded_report.py` (numbers measured, see REPORT.json).",
        "",
        f"- architecture: Qwen3-MoE, {layers} layers, hidden {cfg.hidden_size}, "
        f"{cfg.num_experts} experts/layer "
        f"(moe_intermediate_size {cfg.moe_intermediate_size}), top-{cfg.num_experts_per_tok}, "
        f"vocab {cfg.vocab_size}, tied embeddings {cfg.tie_word_embeddings}",
        f"- parameters: {total:,} total, {active:,} active per token",
        f"- expert tensors saved as: {report['expert_tensor_format']}; "
        f"dtype {report['checkpoint_dtype']}",
        f"- trained tokens: {tsum.get('tokens')} in {tsum.get('steps')} steps, "
        f"{(tsum.get('train_seconds') or 0) / 60:.1f} min wall clock; "
        f"{(tsum.get('tokens') or 0) / total:.1f} tokens per parameter, "
        f"{(tsum.get('tokens') or 0) / active:.1f} per active parameter",
        "",
        "## Held-out loss (nats/token) and perplexity",
        "",
        md_table(
            ["domain", "trained loss", "trained ppl", "untrained loss"],
            [
                [k, trained["loss"][k], report["heldout_ppl"][k], untrained["loss"][k]]  # type: ignore[index]
                for k in DOMAINS
            ],
        ),
        "",
        "## Routing per layer (trained / untrained)",
        "",
        "load entropy = entropy of expert use / log(E) (1 = flat); token entropy = mean router "
        "entropy per token / log(E); top-25% share = share of top-k assignments taken by the 25% "
        "most used experts (0.25 = flat); Jaccard = mean pairwise overlap of the domains' top-25% "
        "experts (1 = same favourites); "
        "JS = mean pairwise Jensen-Shannon divergence of domain expert-use distributions (nats).",
        "",
        md_table(
            [
                "layer",
                "load entropy",
                "token entropy",
                "top-25% share",
                "Jaccard top-25%",
                "JS div",
            ],
            [
                [
                    i,
                    f"{tr['load_entropy'][i]} / {un['load_entropy'][i]}",
                    f"{tr['token_entropy'][i]} / {un['token_entropy'][i]}",
                    f"{tr['top25_share'][i]} / {un['top25_share'][i]}",
                    f"{tr['jaccard_top25'][i]} / {un['jaccard_top25'][i]}",
                    f"{tr['js_divergence'][i]} / {un['js_divergence'][i]}",
                ]
                for i in range(layers)
            ],
        ),
        "",
        "Per-domain top-25% share (trained): "
        + "; ".join(f"{k}: {v}" for k, v in tr["domain_top25_share"].items()),
        "",
    ]
    if tsum.get("phases"):
        md += [
            "## Training phases",
            "",
            "Each phase is a linear warmup and a cosine decay; a later phase continues from "
            "the previous one's weights (`train_embedded.py --continue-from`), with its AdamW "
            "state or, for a run moved between machines with `pack`, a fresh AdamW.",
            "",
            md_table(
                [
                    "phase",
                    "device",
                    "steps",
                    "tokens",
                    "tokens/step",
                    "AdamW",
                    "peak lr",
                    "final lr",
                    "wall clock (min)",
                ],
                [
                    [
                        i + 1,
                        ph["device"],
                        f"{ph['first_step']}-{ph.get('last_step', ph['first_step'])}",
                        f"{ph['tokens']:,}",
                        ph["tokens_per_step"],
                        ph["optimizer"],
                        f"{ph['peak_lr']:.2e}" if ph.get("peak_lr") else "",
                        f"{ph['final_lr']:.2e}" if ph.get("final_lr") else "",
                        f"{ph['seconds'] / 60:.1f}" if ph["seconds"] else "",
                    ]
                    for i, ph in enumerate(tsum["phases"])  # type: ignore[arg-type]
                ],
            ),
            "",
        ]
    ends: list[dict] = tsum.get("decayed_phase_ends") or []  # type: ignore[assignment]
    if len(ends) >= 2:
        md += [
            "Held-out loss at the end of each fully decayed phase (sampled held-out windows "
            "as logged during training) and the loss gained per doubling of training tokens "
            "since the previous such end: the flattening measure that compares like with like.",
            "",
            md_table(
                ["tokens", *DOMAINS, "gain per doubling"],
                [
                    [
                        f"{e['tokens']:,}",
                        *(e["loss"][k] for k in DOMAINS),
                        " / ".join(f"{g:.3f}" for g in e["gain_per_doubling"].values())
                        if e["gain_per_doubling"]
                        else "",
                    ]
                    for e in ends
                ],
            ),
            "",
        ]
    dbl = tsum.get("last_doubling")
    if dbl:
        md += [
            f"Held-out loss gained by the last doubling of training tokens "
            f"({dbl['from_tokens']:,} to {dbl['to_tokens']:,}; "  # type: ignore[index]
            "sampled held-out windows as logged during training): "
            + "; ".join(
                f"{d} {dbl['gain'][d]} nats ({dbl['gain_pct'][d]}%)"  # type: ignore[index]
                for d in DOMAINS
            ),
            "",
        ]
    if tsum.get("eval_curve"):
        plot_training(tsum, d / "training_curve.png")
        md += ["![held-out loss during training](training_curve.png)", ""]
        md += ["## Held-out loss during training", ""]
        md.append(
            md_table(
                ["step", "tokens", *DOMAINS],
                [[e["step"], e["tokens"], *(e[k] for k in DOMAINS)] for e in tsum["eval_curve"]],
            )
        )  # noqa: E501
        md.append("")
    if "samples" in report:
        md += ["## Samples (48 new tokens; greedy, then T=0.8 top-p 0.95 seed 0)", ""]
        for s in report["samples"]:  # type: ignore[attr-defined]
            md += [
                f"prompt `{s['prompt']!r}`, greedy:",
                "",
                "```",
                s["prompt"] + s["greedy"],
                "```",
                "",
            ]
            md += ["sampled:", "", "```", s["prompt"] + s["sampled"], "```", ""]
    (d / "REPORT.md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
