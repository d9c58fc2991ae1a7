"""Helpers of tests/test_fullsize.py that also run as a child process (no pytest import,
so a sampled child's memory is the workload's): a synthetic Qwen3-MoE checkpoint writer
in the released per-expert sharded layout, a memory sampler, and the workload steps.

    python tests/fullsize_workload.py make DIR LAYERS EXPERTS HIDDEN INTER
    python tests/fullsize_workload.py load TIERED BUDGET CALIB_FILE OUT_JSON
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

EMBEDDED = Path(__file__).resolve().parent.parent / "python" / "dynaexq" / "data" / "embedded"


def cache_root() -> Path:
    root = os.environ.get("DYNAEXQ_CACHE") or Path.home() / ".cache" / "dynaexq"
    return Path(root)


def write_synthetic(
    root: Path,
    *,
    layers: int,
    experts: int,
    hidden: int,
    inter: int,
    top_k: int = 8,
    vocab: int = 4096,
    heads: int = 8,
    kv_heads: int = 2,
    head_dim: int = 64,
    shard_bytes: int = 1 << 30,
    seed: int = 0,
    progress: bool = False,
) -> Path:
    """A random bf16 Qwen3-MoE checkpoint at `root` with the released layout: per-expert
    `model.layers.N.mlp.experts.E.{gate,up,down}_proj.weight`, sharded safetensors with a
    `model.safetensors.index.json`, the embedded model's tokenizer. Written once (into a
    hidden sibling, renamed when complete); an existing one is reused."""
    import torch
    from safetensors.torch import save_file
    from tqdm import tqdm

    if (root / "model.safetensors.index.json").is_file():
        return root
    tmp = root.parent / f".{root.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    cfg = {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": None,
        "eos_token_id": 0,
        "pad_token_id": 0,
        "decoder_sparse_step": 1,
        "dtype": "bfloat16",
        "head_dim": head_dim,
        "hidden_act": "silu",
        "hidden_size": hidden,
        "intermediate_size": 4 * hidden,
        "max_position_embeddings": 2048,
        "mlp_only_layers": [],
        "moe_intermediate_size": inter,
        "norm_topk_prob": True,
        "num_attention_heads": heads,
        "num_experts": experts,
        "num_experts_per_tok": top_k,
        "num_hidden_layers": layers,
        "num_key_value_heads": kv_heads,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
        "tie_word_embeddings": False,
        "use_cache": True,
        "vocab_size": vocab,
    }
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    def ones(n: int) -> torch.Tensor:
        return torch.ones(n, dtype=torch.bfloat16)

    weight_map: dict[str, str] = {}
    shard: dict[str, torch.Tensor] = {}
    files: list[str] = []
    state = {"size": 0}

    def flush() -> None:
        if shard:
            name = f"model-{len(files) + 1:05d}.safetensors"
            save_file(shard, str(tmp / name), metadata={"format": "pt"})
            files.append(name)
            weight_map.update(dict.fromkeys(shard, name))
            shard.clear()
            state["size"] = 0

    def add(name: str, t: torch.Tensor) -> None:
        shard[name] = t
        state["size"] += t.numel() * t.element_size()
        if state["size"] >= shard_bytes:
            flush()

    bar = tqdm(total=layers, desc="writing synthetic checkpoint", disable=not progress)
    add("model.embed_tokens.weight", rnd(vocab, hidden))
    for li in range(layers):
        p = f"model.layers.{li}"
        add(f"{p}.input_layernorm.weight", ones(hidden))
        add(f"{p}.post_attention_layernorm.weight", ones(hidden))
        add(f"{p}.self_attn.q_proj.weight", rnd(heads * head_dim, hidden))
        add(f"{p}.self_attn.k_proj.weight", rnd(kv_heads * head_dim, hidden))
        add(f"{p}.self_attn.v_proj.weight", rnd(kv_heads * head_dim, hidden))
        add(f"{p}.self_attn.o_proj.weight", rnd(hidden, heads * head_dim))
        add(f"{p}.self_attn.q_norm.weight", ones(head_dim))
        add(f"{p}.self_attn.k_norm.weight", ones(head_dim))
        add(f"{p}.mlp.gate.weight", rnd(experts, hidden) * 3)  # a router with preferences
        for e in range(experts):
            q = f"{p}.mlp.experts.{e}"
            add(f"{q}.gate_proj.weight", rnd(inter, hidden))
            add(f"{q}.up_proj.weight", rnd(inter, hidden))
            add(f"{q}.down_proj.weight", rnd(hidden, inter))
        bar.update(1)
    bar.close()
    add("model.norm.weight", ones(hidden))
    add("lm_head.weight", rnd(vocab, hidden))
    flush()
    total = sum((tmp / f).stat().st_size for f in files)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    (tmp / "config.json").write_text(json.dumps(cfg, indent=1))
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (EMBEDDED / f).is_file():
            shutil.copy(EMBEDDED / f, tmp / f)
    (tmp / "generation_config.json").write_text(json.dumps({"eos_token_id": 0}))
    tmp.rename(root)
    return root


def status(pid: int | str = "self") -> dict[str, int]:
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile", "VmRSS", "VmHWM"):
                out[key] = int(value.split()[0]) * 1024
    return out


def tree(pid: int | str) -> list[str]:
    """`pid` and its descendants (worker processes count too)."""
    if pid == "self":
        pid = os.getpid()
    out, todo = [], [str(pid)]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += f.read().split()
        except OSError:
            pass
    return out


class Sampler:
    """Peak RssAnon and VmRSS of a process and its children (summed), sampled every
    `every` seconds in a thread."""

    def __init__(self, pid: int | str = "self", every: float = 0.01) -> None:
        self.pid, self.every = pid, every
        self.peak = {"RssAnon": 0, "VmRSS": 0, "RssFile": 0}
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            total: dict[str, int] = {}
            for p in tree(self.pid):
                try:
                    s = status(p)
                except (OSError, ValueError):
                    if p == (str(os.getpid()) if self.pid == "self" else str(self.pid)):
                        return  # the process is gone
                    continue
                for k, v in s.items():
                    total[k] = total.get(k, 0) + v
            for k in self.peak:
                self.peak[k] = max(self.peak[k], total.get(k, 0))
            self._stop.wait(self.every)

    def __enter__(self) -> Sampler:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()


def run_sampled(
    cmd: list[str], timeout: float | None = None, **kw
) -> tuple[subprocess.CompletedProcess, dict[str, int]]:
    """Run `cmd`, sampling its memory until it exits."""
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)
    with Sampler(p.pid) as s:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            raise
    return subprocess.CompletedProcess(cmd, p.returncode, out, err), s.peak


def load_and_generate(tiered: str, budget: str, calib_file: str, out_json: str) -> None:
    """Child: load with a budget and the dynamic policy from a tiered checkpoint (memory
    maps), calibrate on the file's text, generate; peak memory and time to first token."""
    with Sampler() as s:
        base = status()
        t0 = time.perf_counter()
        import dynaexq

        engine = dynaexq.load(
            tiered,
            budget=budget,
            policy="dynamic",
            calibration=[Path(calib_file).read_text()],
            host_store="mapped",
            progress=False,
        )
        t_load = time.perf_counter() - t0
        first = None
        n = 0
        for _piece in engine.stream("def fibonacci(n):", max_new_tokens=8):
            n += 1
            if first is None:
                first = time.perf_counter() - t0
        t_all = time.perf_counter() - t0
        from dynaexq.runtime.memory import memory_report

        report = memory_report(engine)
        tot = engine.precision.telemetry.totals()
    Path(out_json).write_text(
        json.dumps(
            {
                "base": base,
                "peak": s.peak,
                "load_s": t_load,
                "first_token_s": first,
                "total_s": t_all,
                "pieces": n,
                "report": report,
                "steps": tot["steps"],
            }
        )
    )


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "make":
        d, layers, experts, hidden, inter = sys.argv[2:7]
        write_synthetic(
            Path(d), layers=int(layers), experts=int(experts), hidden=int(hidden),
            inter=int(inter), progress=True,
        )  # fmt: skip
    elif cmd == "load":
        load_and_generate(*sys.argv[2:6])
    else:
        raise SystemExit(f"unknown command {cmd!r}")
