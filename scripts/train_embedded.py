#!/usr/bin/env python3
"""Train the embedded default model: a small Qwen3-MoE, from scratch, on the CPU.

Stages (run in this order; each is deterministic for a given seed):

``prepare``
    Trains a byte-level BPE tokenizer on the training splits written by
    ``scripts/build_corpus.py``, tokenizes every split into uint16 token streams
    under ``--work`` and writes the held-out streams (capped) next to the model in
    ``--model-dir/heldout``.
``train``
    Trains ``transformers``' ``Qwen3MoeForCausalLM`` (the reference implementation,
    so the checkpoint is the Hugging Face format by construction) with AdamW,
    linear warmup and cosine decay, equal domain mixing, a per-layer Switch-style
    load-balancing loss of strength ``--aux-coef``, periodic held-out evaluation
    (loss per domain and routing statistics) logged to ``train_log.jsonl``, and a
    resumable checkpoint every ``--ckpt-minutes``. Rerunning the same command resumes.
    ``--max-minutes`` is a wall-clock guard: if the measured step rate says the
    planned token count will not fit, the cosine horizon is shortened (logged as
    ``horizon`` events) so the run still ends with a fully decayed learning rate.
``pack`` / ``unpack``
    Move a run to another machine (a lent GPU) and back: ``pack`` writes its weights
    as fp32 safetensors shards of at most ``--shard-mb`` MiB with its counters and log
    (no optimizer state); ``unpack --src DIR --run NAME`` makes a run of it that
    ``train --continue-from NAME`` continues with a fresh AdamW, or ``export`` exports.
``export``
    Writes the final weights in the Hugging Face format (bf16 or fp32) with the
    tokenizer and the training log into ``--model-dir``.

Example (the commands used for the shipped model are in python/dynaexq/data/README.md)::

    python scripts/build_corpus.py
    python scripts/train_embedded.py prepare
    nice -n 10 python scripts/train_embedded.py train --run main --max-minutes 95
    python scripts/train_embedded.py export --run main
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from embedded_common import (  # noqa: E402
    CHAT_TEMPLATE,
    DOMAINS,
    SPECIAL_TOKENS,
    evaluate,
    load_heldout,
)

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODEL_DIR = REPO / "python" / "dynaexq" / "data" / "embedded"
CACHE = Path.home() / ".cache" / "dynaexq"


def _docs(path: Path) -> Iterator[str]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)["text"]


# ---------------------------------------------------------------------------- prepare
def prepare(args: argparse.Namespace) -> int:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus: Path = args.corpus
    for d in DOMAINS:
        for s in ("train", "heldout"):
            if not (corpus / f"{d}.{s}.jsonl").is_file():
                print(
                    f"error: {corpus / f'{d}.{s}.jsonl'} missing; run scripts/build_corpus.py first"
                )
                return 2
    work: Path = args.work
    (work / "tokens").mkdir(parents=True, exist_ok=True)
    args.model_dir.mkdir(parents=True, exist_ok=True)

    # Equal text from each domain so no domain dominates the merges.
    def sample() -> Iterator[str]:
        for d in DOMAINS:
            n = 0
            for text in _docs(corpus / f"{d}.train.jsonl"):
                yield text
                n += len(text)
                if n >= args.tokenizer_mb * 1e6:
                    break

    t0 = time.time()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=args.vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(sample(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
        model_max_length=args.max_positions,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(work / "tokenizer"))
    print(f"tokenizer: vocab {tok.get_vocab_size()} trained in {time.time() - t0:.0f}s", flush=True)

    eos = tok.token_to_id("<|endoftext|>")
    stats: dict[str, dict[str, int]] = {}
    for d in DOMAINS:
        for s in ("train", "heldout"):
            t0 = time.time()
            parts: list[np.ndarray] = []
            nbytes = 0
            batch: list[str] = []
            for text in [*_docs(corpus / f"{d}.{s}.jsonl"), None]:
                if text is not None:
                    batch.append(text)
                    nbytes += len(text.encode())
                if batch and (text is None or len(batch) >= 256):
                    for enc in tok.encode_batch(batch):
                        parts.append(np.asarray(enc.ids + [eos], dtype=np.uint16))
                    batch = []
            arr = np.concatenate(parts)
            np.save(work / "tokens" / f"{d}.{s}.npy", arr)
            stats[f"{d}.{s}"] = {"bytes": nbytes, "tokens": int(len(arr))}
            print(
                f"{d:7s} {s:8s} {nbytes / 1e6:7.2f} MB -> {len(arr) / 1e6:6.2f} M tokens "
                f"({nbytes / len(arr):.2f} B/tok, {time.time() - t0:.0f}s)",
                flush=True,
            )
            if s == "heldout":
                # The committed held-out split: whole documents, capped.
                (args.model_dir / "heldout").mkdir(exist_ok=True)
                np.save(args.model_dir / "heldout" / f"{d}.npy", arr[: args.heldout_tokens])
    (work / "tokens" / "stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    return 0


# ---------------------------------------------------------------------------- model
def build_config(args: argparse.Namespace, vocab_size: int):  # type: ignore[no-untyped-def]
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        vocab_size=vocab_size,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 4,  # unused: every layer is sparse
        moe_intermediate_size=args.moe_inter,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        head_dim=args.hidden // args.heads,
        num_experts=args.experts,
        num_experts_per_tok=args.top_k,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        tie_word_embeddings=True,
        max_position_embeddings=args.max_positions,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        initializer_range=0.02,
        router_aux_loss_coef=args.aux_coef,
        output_router_logits=False,
        bos_token_id=None,
        eos_token_id=0,
        pad_token_id=0,
    )


def aux_loss(router_logits: tuple, top_k: int) -> torch.Tensor:  # type: ignore[name-defined]  # noqa: F821
    """Switch-transformer balance loss computed per layer, averaged over layers.

    transformers' own helper concatenates all layers before balancing, which only
    balances expert *indices* summed over layers; per layer is what we want.
    """
    import torch

    total = 0.0
    for rl in router_logits:
        probs = torch.softmax(rl.float(), dim=-1)
        e = probs.shape[-1]
        picks = torch.topk(probs, top_k, dim=-1).indices
        frac = (
            torch.zeros(e, device=picks.device).index_add_(
                0, picks.reshape(-1), torch.ones(picks.numel(), device=picks.device)
            )
            / picks.numel()
        )
        total = total + e * (frac * probs.mean(0)).sum()
    return total / len(router_logits)


def lr_at(step: int, horizon: int, args: argparse.Namespace) -> float:
    """Learning rate at ``step`` of a phase of ``horizon`` steps (both phase-relative)."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    t = min(1.0, (step - args.warmup) / max(1, horizon - args.warmup))
    return args.lr * (args.min_lr_frac + (1 - args.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * t)))


def train(args: argparse.Namespace) -> int:
    import torch
    from transformers import Qwen3MoeForCausalLM

    torch.set_num_threads(args.threads)
    work: Path = args.work
    run_dir = work / "runs" / args.run
    run_dir.mkdir(parents=True, exist_ok=True)
    tok_dir = work / "tokens"
    streams = {d: np.load(tok_dir / f"{d}.train.npy", mmap_mode="r") for d in DOMAINS}
    heldout = load_heldout(args.model_dir / "heldout")
    vocab = json.loads((work / "tokenizer" / "tokenizer.json").read_text())["model"]["vocab"]
    vocab_size = max(len(vocab), args.vocab_size)  # special tokens are part of the BPE vocab

    config = build_config(args, vocab_size)
    torch.manual_seed(args.seed)
    model = Qwen3MoeForCausalLM(config).to(args.device)
    if str(args.device).startswith("cuda"):
        # TF32 tensor-core matmuls (fp32 accumulate): faster, and ample for training.
        torch.backends.cuda.matmul.allow_tf32 = True
    model.set_experts_implementation(args.experts_impl)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "gate.weight" not in n]
    no_decay = [
        p for n, p in model.named_parameters() if not (p.ndim >= 2 and "gate.weight" not in n)
    ]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": args.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=args.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )
    tokens_per_step = args.batch * args.seq_len
    planned = max(args.warmup + 1, int(args.tokens // tokens_per_step))
    horizon = planned
    step, elapsed_before = 0, 0.0
    # Tokens trained in all phases so far: a phase may use another batch size.
    tokens = 0
    # A phase is one warmup + cosine schedule; a continued run (--continue-from) starts
    # a second phase at the parent's last step, with the parent's weights and AdamW state.
    phase_start, phase_elapsed = 0, 0.0
    ckpt = run_dir / "ckpt.pt"
    log_path = run_dir / "train_log.jsonl"
    continued = fresh_opt = False
    resumed = ckpt.is_file()
    if resumed:
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        if "opt" not in state:
            raise SystemExit(
                f"{ckpt} is an unpacked run (no optimizer state): start a phase from it "
                f"with --continue-from {args.run} --run NEW_NAME"
            )
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        step, horizon, elapsed_before = state["step"], state["horizon"], state["elapsed"]
        tokens = state.get("tokens", step * tokens_per_step)
        phase_start = state.get("phase_start", 0)
        phase_elapsed = state.get("phase_elapsed", 0.0)
        print(f"resumed {ckpt} at step {step}", flush=True)
    elif args.continue_from:
        parent = work / "runs" / args.continue_from
        state = torch.load(parent / "ckpt.pt", map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        # A packed run (stage `pack`) carries no optimizer state: AdamW starts afresh,
        # which the phase's warmup absorbs.
        fresh_opt = "opt" not in state
        if not fresh_opt:
            opt.load_state_dict(state["opt"])
        step, elapsed_before = state["step"], state["elapsed"]
        tokens = state.get("tokens", step * _run_tokens_per_step(parent))
        phase_start, phase_elapsed = step, elapsed_before
        horizon = step + planned
        # The new run's log starts as a copy of the parent's, so it reads as one history.
        shutil.copy(parent / "train_log.jsonl", log_path)
        continued = True
        print(f"continuing {parent} from step {step} for {planned} steps", flush=True)
    if not resumed:
        (run_dir / "config.json").write_text(
            json.dumps(
                {
                    "args": vars(args)
                    | {
                        "work": str(work),
                        "model_dir": str(args.model_dir),
                        "corpus": str(args.corpus),
                    },
                    "params": n_params,
                },
                indent=2,
                default=str,
            )
            + "\n"
        )  # noqa: E501

    def log(rec: dict) -> None:
        with open(log_path, "a") as f:
            f.write(json.dumps(rec) + "\n")

    if continued:
        log(
            {
                "event": "continue",
                "from": args.continue_from,
                "step": step,
                "horizon": horizon,
                "lr": args.lr,
                "warmup": args.warmup,
                "tokens": tokens,
                "tokens_per_step": tokens_per_step,
                "optimizer": "fresh" if fresh_opt else "parent",
                "device": str(args.device),
            }
        )
    if step == 0:
        log(
            {
                "event": "start",
                "params": n_params,
                "horizon": horizon,
                "tokens_per_step": tokens_per_step,
                "config": config.to_diff_dict() if hasattr(config, "to_diff_dict") else None,
            }
        )

    def save_ckpt(elapsed: float) -> None:
        tmp = ckpt.with_suffix(".tmp")
        torch.save(
            {
                "model": model.state_dict(),
                "opt": opt.state_dict(),
                "step": step,
                "horizon": horizon,
                "elapsed": elapsed,
                "tokens": tokens,
                "phase_start": phase_start,
                "phase_elapsed": phase_elapsed,
            },
            tmp,
        )
        os.replace(tmp, ckpt)

    t_start = time.time()
    last_ckpt = time.time()
    win_loss, win_aux, win_t, win_n = 0.0, 0.0, time.time(), 0
    top_k = config.num_experts_per_tok
    budget = args.max_minutes * 60 if args.max_minutes else None
    while step < horizon:
        # Deterministic batch for this step: rows cycle through the domains, offsets
        # from a generator seeded by (seed, step), so a resumed run sees the same data.
        rng = np.random.default_rng([args.seed, step])
        rows = []
        for i in range(args.batch):
            s = streams[DOMAINS[(step * args.batch + i) % len(DOMAINS)]]
            o = int(rng.integers(0, len(s) - args.seq_len - 1))
            rows.append(np.asarray(s[o : o + args.seq_len + 1], dtype=np.int64))
        x = torch.from_numpy(np.stack(rows)).to(args.device)
        lr = lr_at(step - phase_start, horizon - phase_start, args)
        for g in opt.param_groups:
            g["lr"] = lr
        out = model(input_ids=x[:, :-1], output_router_logits=True, use_cache=False)
        ce = torch.nn.functional.cross_entropy(
            out.logits.reshape(-1, out.logits.shape[-1]).float(), x[:, 1:].reshape(-1)
        )
        aux = aux_loss(out.router_logits, top_k)
        loss = ce + args.aux_coef * aux
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        tokens += tokens_per_step
        win_loss += ce.item()
        win_aux += aux.item()
        win_n += 1
        elapsed = elapsed_before + time.time() - t_start
        if step % args.log_every == 0:
            dt = time.time() - win_t
            log(
                {
                    "step": step,
                    "tokens": tokens,
                    "loss": round(win_loss / win_n, 4),
                    "aux": round(win_aux / win_n, 4),
                    "lr": lr,
                    "gnorm": round(float(gnorm), 3),
                    "tok_s": round(win_n * tokens_per_step / dt),
                    "elapsed_s": round(elapsed),
                }
            )
            print(
                f"step {step}/{horizon} loss {win_loss / win_n:.4f} "
                f"aux {win_aux / win_n:.3f} lr {lr:.2e} "
                f"{win_n * tokens_per_step / dt:.0f} tok/s elapsed {elapsed / 60:.1f} min",
                flush=True,
            )
            win_loss, win_aux, win_t, win_n = 0.0, 0.0, time.time(), 0
            # Time guard: shorten the cosine horizon if the planned tokens will not fit.
            # It may grow back towards the plan while early (the step rate depends on
            # how busy the shared machine is) and only shrinks in the second half.
            done, span = step - phase_start, horizon - phase_start
            if budget and done > args.warmup and done < span * 0.9:
                rate = done / (elapsed - phase_elapsed)
                fit = phase_start + max(done + args.log_every, int(rate * budget * 0.97))
                goal = phase_start + planned
                new = min(goal, fit) if done < span * 0.5 else min(horizon, fit)
                if abs(new - horizon) >= 0.02 * horizon:
                    horizon = new
                    log({"event": "horizon", "step": step, "horizon": horizon})
                    print(f"time guard: horizon -> {horizon}", flush=True)
        if step % args.eval_every == 0 or step == horizon:
            t0 = time.time()
            ev = evaluate(model, heldout, args.seq_len, args.eval_seqs)
            log(
                {
                    "step": step,
                    "tokens": tokens,
                    "eval": ev,
                    "eval_s": round(time.time() - t0, 1),
                }
            )
            print(
                f"eval step {step}: {ev['loss']} load_entropy {ev['routing']['load_entropy']} "
                f"jaccard {ev['routing']['jaccard_top25']}",
                flush=True,
            )
        if time.time() - last_ckpt > args.ckpt_minutes * 60 or step == horizon:
            save_ckpt(elapsed)
            last_ckpt = time.time()
    log(
        {
            "event": "done",
            "step": step,
            "tokens": tokens,
            "elapsed_s": round(elapsed_before + time.time() - t_start),
        }
    )
    return 0


def _run_tokens_per_step(run_dir: Path) -> int:
    """Tokens per step of a run from before checkpoints counted tokens (one batch size)."""
    cfg = json.loads((run_dir / "config.json").read_text())["args"]
    return int(cfg["batch"]) * int(cfg["seq_len"])


# ---------------------------------------------------------------------- pack / unpack
# A run moves between machines (this CPU box and a lent GPU) as its weights in fp32
# safetensors shards, its counters and its log: a fraction of a checkpoint's size, since
# AdamW's two moments are left behind. A phase continued from a packed run starts AdamW
# afresh (logged in its `continue` event).
PACK_META = "state.json"
RUN_FILES = ("train_log.jsonl", "config.json")  # travel with the weights


def pack(args: argparse.Namespace) -> int:
    import torch
    from safetensors.torch import save_file

    run_dir = args.work / "runs" / args.run
    state = torch.load(run_dir / "ckpt.pt", map_location="cpu", weights_only=False)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    limit = int(args.shard_mb * 2**20)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in state["model"].items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > limit:
            shards.append({})
            size = 0
        shards[-1][name] = t.detach().float().contiguous()
        size += n
    files = []
    for i, sd in enumerate(shards):
        files.append(f"weights-{i:02d}.safetensors")
        save_file(sd, str(out / files[-1]))
    meta = {k: v for k, v in state.items() if k not in ("model", "opt")}
    meta.setdefault("tokens", state["step"] * _run_tokens_per_step(run_dir))
    meta["files"] = files
    (out / PACK_META).write_text(json.dumps(meta, indent=2) + "\n")
    for f in RUN_FILES:
        shutil.copy(run_dir / f, out / f)
    print(f"packed {run_dir} (step {state['step']}) into {len(files)} shard(s) in {out}")
    return 0


def unpack(args: argparse.Namespace) -> int:
    import torch
    from safetensors.torch import load_file

    src: Path = args.src
    meta = json.loads((src / PACK_META).read_text())
    model: dict[str, torch.Tensor] = {}
    for f in meta.pop("files"):
        model.update(load_file(str(src / f)))
    run_dir = args.work / "runs" / args.run
    if (run_dir / "ckpt.pt").exists():
        raise SystemExit(f"{run_dir} already has a checkpoint; pick another --run")
    run_dir.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model, **meta}, run_dir / "ckpt.pt")
    for f in RUN_FILES:
        shutil.copy(src / f, run_dir / f)
    print(f"unpacked {src} (step {meta['step']}) into {run_dir}")
    return 0


# ---------------------------------------------------------------------------- export
def export(args: argparse.Namespace) -> int:
    import torch
    from transformers import GenerationConfig, Qwen3MoeForCausalLM

    work: Path = args.work
    run_dir = work / "runs" / args.run
    state = torch.load(run_dir / "ckpt.pt", map_location="cpu", weights_only=False)
    vocab_size = state["model"]["model.embed_tokens.weight"].shape[0]
    config = build_config(args, vocab_size)
    model = Qwen3MoeForCausalLM(config)
    model.load_state_dict(state["model"])
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    model = model.to(dtype)
    model.config.dtype = dtype
    out: Path = args.model_dir
    out.mkdir(parents=True, exist_ok=True)
    for f in ("model.safetensors", "model.safetensors.index.json"):
        (out / f).unlink(missing_ok=True)
    model.generation_config = GenerationConfig(
        eos_token_id=0, pad_token_id=0, do_sample=True, temperature=0.8, top_p=0.95, top_k=50
    )
    model.save_pretrained(str(out))
    for f in (work / "tokenizer").iterdir():
        shutil.copy(f, out / f.name)
    shutil.copy(run_dir / "train_log.jsonl", out / "train_log.jsonl")
    _portable_metadata(out)
    # Reference: the same weights rounded to the export dtype, computed in fp32 (the
    # model converted with .to(bf16) would also have rounded its RoPE buffers).
    ref = Qwen3MoeForCausalLM(config)
    ref.load_state_dict({k: v.to(dtype).float() for k, v in state["model"].items()})
    _verify_export(out, ref)
    print(f"exported step {state['step']} ({args.dtype}) to {out}")
    return 0


def _portable_metadata(out: Path) -> None:
    """Write the config/tokenizer keys real Qwen3-MoE checkpoints use.

    transformers 5 saves ``num_local_experts`` (its internal name) and the tokenizer
    class ``TokenizersBackend``; Qwen's own checkpoints (and older loaders) use
    ``num_experts`` and a class every transformers version knows.
    """
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    if "num_local_experts" in cfg:
        cfg["num_experts"] = cfg.pop("num_local_experts")
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    tc_path = out / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text())
    tc["tokenizer_class"] = "PreTrainedTokenizerFast"
    tc["chat_template"] = CHAT_TEMPLATE
    tc_path.write_text(json.dumps(tc, indent=2) + "\n")


def _verify_export(out: Path, model) -> None:  # type: ignore[no-untyped-def]
    """Reload with AutoModelForCausalLM and check it computes what the exported weights do."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3MoeForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    if type(loaded) is not Qwen3MoeForCausalLM:
        raise SystemExit(f"export check: loaded {type(loaded).__name__}")
    ref = model.eval()
    x = torch.randint(0, ref.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (loaded(input_ids=x).logits - ref(input_ids=x).logits).abs().max().item()
    if diff > 1e-4:
        raise SystemExit(f"export check: reloaded logits differ by {diff}")
    tok = AutoTokenizer.from_pretrained(str(out))
    ids = tok("def main(", return_tensors="pt").input_ids
    g = loaded.generate(ids, max_new_tokens=24, do_sample=False)
    print(f"export check: reload max |dlogits| {diff:.2e}; greedy: {tok.decode(g[0])!r}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("stage", choices=["prepare", "train", "export", "pack", "unpack"])
    ap.add_argument("--corpus", type=Path, default=CACHE / "corpus")
    ap.add_argument("--work", type=Path, default=CACHE / "train")
    ap.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    ap.add_argument("--run", default="main", help="run name (checkpoint dir under WORK/runs)")
    ap.add_argument("--seed", type=int, default=0)
    # tokenizer
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument(
        "--tokenizer-mb", type=float, default=6.0, help="text per domain for BPE training"
    )
    ap.add_argument(
        "--heldout-tokens",
        type=int,
        default=200_000,
        help="cap of committed held-out tokens/domain",
    )
    # architecture
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--moe-inter", type=int, default=48)
    ap.add_argument("--max-positions", type=int, default=1024)
    # optimisation
    ap.add_argument("--tokens", type=float, default=24e6, help="planned training tokens")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--min-lr-frac", type=float, default=0.05)
    ap.add_argument("--warmup", type=int, default=200)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--clip", type=float, default=1.0)
    ap.add_argument("--aux-coef", type=float, default=0.01)
    ap.add_argument(
        "--experts-impl", default="grouped_mm", help="transformers experts implementation"
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--device",
        default="cpu",
        help="torch device to train on (cpu, cuda, cuda:1); checkpoints are portable",
    )
    ap.add_argument(
        "--continue-from",
        default=None,
        metavar="RUN",
        help="start a new phase (warmup + cosine over --tokens more tokens, peak --lr) "
        "from RUN's last checkpoint, weights and optimizer state",
    )
    ap.add_argument(
        "--max-minutes", type=float, default=0.0, help="wall-clock budget guard (0 = none)"
    )
    ap.add_argument("--log-every", type=int, default=25)
    ap.add_argument("--eval-every", type=int, default=250)
    ap.add_argument(
        "--eval-seqs", type=int, default=32, help="held-out windows per domain per eval"
    )
    ap.add_argument("--ckpt-minutes", type=float, default=4.0)
    ap.add_argument(
        "--dtype", choices=["bfloat16", "float32"], default="bfloat16", help="export dtype"
    )
    ap.add_argument("--out", type=Path, help="pack: folder to write the packed run to")
    ap.add_argument("--src", type=Path, help="unpack: a folder written by `pack`")
    ap.add_argument("--shard-mb", type=float, default=15.0, help="pack: MiB per weight shard")
    args = ap.parse_args(argv)
    if args.stage == "pack" and args.out is None or args.stage == "unpack" and args.src is None:
        ap.error(f"{args.stage} needs {'--out' if args.stage == 'pack' else '--src'}")
    stages = {"prepare": prepare, "train": train, "export": export, "pack": pack, "unpack": unpack}
    return stages[args.stage](args)


if __name__ == "__main__":
    raise SystemExit(main())
