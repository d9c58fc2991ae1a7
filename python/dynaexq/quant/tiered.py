"""Tiered checkpoints: every expert of a Hugging Face MoE checkpoint (Qwen3-MoE, Qwen2-MoE,
Qwen3-Next) packed at every tier.

Output directory (see docs/packed-layout.md, "Tiered checkpoint"):

    manifest.json                 layout version, tiers (+ blob sections), per-expert bytes
                                  per tier, error metrics, file index
    experts-layerLLL.safetensors  one uint8 tensor [E, expert_nbytes(tier)] per tier,
                                  named "layers.L.experts.<tier>"; row e is expert e's blob
    nonexpert-NNNNN.safetensors   every non-expert tensor, unchanged (name and dtype)
    config.json, tokenizer files  copied from the source

It is written into a hidden sibling directory and renamed into place only when complete.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dynaexq.checkpoint import Checkpoint, CheckpointError
from dynaexq.model.config import ModelConfig
from dynaexq.quant.expert import (
    DEFAULT_ALIGNMENT,
    LAYOUT_VERSION,
    expert_layout,
    expert_nbytes,
    pack_quantized_expert,
    quantize_expert,
)
from dynaexq.quant.tiers import TierSpec

MANIFEST = "manifest.json"
FORMAT = "dynaexq-tiered-checkpoint"
_NONEXPERT_SHARD_BYTES = 2 << 30


# Tensors of the source that no dynaexq model reads, left out of tiered checkpoints:
# Qwen3-Next's multi-token-prediction head (`mtp.*`, a draft model for speculative decoding).
IGNORED_PREFIXES = ("mtp.",)

# Source checkpoints are read through dynaexq.checkpoint.Checkpoint (lazy, memory-mapped,
# sharded or not, per-expert or fused experts), as the model loader reads them; bad input
# raises its CheckpointError subclasses, which name the file or tensor.


@dataclass(frozen=True)
class MoeShape:
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_experts: int
    moe_layers: tuple[int, ...]

    @classmethod
    def of(cls, config: ModelConfig, where: Path) -> MoeShape:
        """The expert shapes of a config the loader parsed (one parser for both)."""
        if config.num_experts <= 0 or config.moe_intermediate_size <= 0 or not config.moe_layers:
            raise CheckpointError(
                f"{where}: num_experts or moe_intermediate_size missing or 0, or no sparse "
                "layer (not a Qwen3-MoE model?)"
            )
        return cls(
            config.num_hidden_layers,
            config.hidden_size,
            config.moe_intermediate_size,
            config.num_experts,
            tuple(config.moe_layers),
        )


# ------------------------------------------------------------------ writing


def _tier_entry(t: TierSpec, shape: MoeShape, alignment: int) -> dict[str, Any]:
    secs = expert_layout(t, shape.hidden_size, shape.intermediate_size, alignment)
    return {
        "name": t.name,
        "bits": t.bits,
        "group_size": t.group_size,
        "symmetric": t.symmetric,
        "method": t.method,
        "dtype": t.dtype if t.bits == 16 else "int",
        "expert_nbytes": expert_nbytes(t, shape.hidden_size, shape.intermediate_size, alignment),
        "sections": [
            {
                "name": s.name,
                "offset": s.offset,
                "nbytes": s.nbytes,
                "dtype": str(s.dtype).removeprefix("torch."),
                "shape": list(s.shape),
            }
            for s in secs
        ],
    }


def _copy_side_files(src: Path, dst: Path) -> None:
    for f in sorted(src.iterdir()):
        if f.is_file() and f.suffix != ".safetensors" and f.name != "model.safetensors.index.json":
            shutil.copy2(f, dst / f.name)


def quantize_checkpoint(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    tiers: list[TierSpec],
    force: bool = False,
    alignment: int = DEFAULT_ALIGNMENT,
    progress: bool = True,
) -> dict[str, Any]:
    """Write a tiered checkpoint of `src` at `dst`; returns the manifest.

    Raises dynaexq.checkpoint.CheckpointError (a subclass: MissingTensorError,
    TensorShapeError, UnsupportedDtypeError, NonFiniteTensorError, ...) on bad input,
    naming the file or tensor; FileExistsError if dst exists
    and not force. Nothing appears at `dst` unless the whole run succeeded.
    """
    src_p, dst_p = Path(src), Path(dst)
    if not tiers:
        raise CheckpointError("no tiers requested")
    if dst_p.exists() and not force:
        raise FileExistsError(f"{dst_p} exists; pass --force to overwrite it")
    if not src_p.is_dir():
        raise CheckpointError(f"{src_p}: not a directory")
    if dst_p.resolve() == src_p.resolve():
        raise CheckpointError("output directory must differ from the source")
    # The config first: a non-MoE or broken config is the error to report, not missing weights.
    config = src_p / "config.json"
    shape = MoeShape.of(ModelConfig.from_file(config), config)
    source = Checkpoint(src_p)
    try:
        return _quantize(source, shape, src_p, dst_p, tiers, alignment, progress)
    finally:
        source.close()


def _quantize(
    source: Checkpoint,
    shape: MoeShape,
    src_p: Path,
    dst_p: Path,
    tiers: list[TierSpec],
    alignment: int,
    progress: bool,
) -> dict[str, Any]:
    from safetensors.torch import save_file
    from tqdm import tqdm

    # Check every expert tensor (presence, shape, dtype) from the headers before the long run.
    expert_names: dict[int, list[str]] = {}
    for layer in shape.moe_layers:
        wanted = source.expert_tensors(layer)
        for name, want in wanted.items():
            source.check_tensor(name, want)
        expert_names[layer] = list(wanted)
    known = {n for names in expert_names.values() for n in names}
    for name in sorted(source.names()):
        if name.startswith(IGNORED_PREFIXES):
            continue
        if ".mlp.experts." in name and name not in known:
            raise CheckpointError(
                f"{src_p}: tensor {name!r} is an unexpected expert tensor "
                "(layer not MoE per config.json, or both expert layouts present?)"
            )

    tmp = dst_p.parent / f".{dst_p.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    t0 = time.perf_counter()
    try:
        manifest = _write(
            source, shape, expert_names, tiers, tmp, alignment, progress, save_file, tqdm
        )
        manifest["source"] = str(src_p)
        seconds = time.perf_counter() - t0
        manifest["quantize_seconds"] = round(seconds, 3)
        manifest["quantize_mb_per_s"] = round(manifest["source_expert_bytes"] / 1e6 / seconds, 3)
        _copy_side_files(src_p, tmp)
        # The manifest is the last file written: a directory without one is incomplete.
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        if dst_p.exists():
            old = dst_p.parent / f".{dst_p.name}.old-{os.getpid()}"
            dst_p.rename(old)
            tmp.rename(dst_p)
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        else:
            tmp.rename(dst_p)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _write(
    source: Checkpoint,
    shape: MoeShape,
    expert_names: dict[int, list[str]],
    tiers: list[TierSpec],
    out: Path,
    alignment: int,
    progress: bool,
    save_file: Any,
    tqdm: Any,
) -> dict[str, Any]:
    e = shape.num_experts
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "layout_version": LAYOUT_VERSION,
        "alignment": alignment,
        "hidden_size": shape.hidden_size,
        "moe_intermediate_size": shape.intermediate_size,
        "num_experts": e,
        "num_hidden_layers": shape.num_layers,
        "moe_layers": list(shape.moe_layers),
        "tiers": [_tier_entry(t, shape, alignment) for t in tiers],
        "expert_nbytes": {
            t.name: expert_nbytes(t, shape.hidden_size, shape.intermediate_size, alignment)
            for t in tiers
        },
        "experts": {},
        "nonexpert": {},
        "metrics": {t.name: {} for t in tiers},
    }
    src_bytes = 0
    bar = tqdm(
        total=len(expert_names) * e, desc="quantizing experts", unit="expert", disable=not progress
    )
    for layer, names in expert_names.items():
        src_bytes += sum(source.nbytes(n) for n in names)
        blobs = {
            t.name: torch.empty(e, manifest["expert_nbytes"][t.name], dtype=torch.uint8)
            for t in tiers
        }
        for t in tiers:
            manifest["metrics"][t.name][str(layer)] = []
        for ex in range(e):
            x = source.expert(layer, ex, check_finite=True)
            g, u, d = x.gate, x.up, x.down
            for t in tiers:
                qe = quantize_expert(t, g, u, d)
                blobs[t.name][ex] = pack_quantized_expert(qe, alignment)
                manifest["metrics"][t.name][str(layer)].append(
                    {k: round(v, 6) for k, v in qe.metrics.items()}
                )
            bar.update(1)
        fname = f"experts-layer{layer:03d}.safetensors"
        save_file({f"layers.{layer}.experts.{n}": b for n, b in blobs.items()}, str(out / fname))
        manifest["experts"][str(layer)] = {
            "file": fname,
            "tensors": {n: f"layers.{layer}.experts.{n}" for n in blobs},
        }
    bar.close()
    # Non-expert tensors, unchanged, in shards of bounded size.
    shard: dict[str, torch.Tensor] = {}
    size, idx = 0, 0

    def flush() -> None:
        nonlocal shard, size, idx
        if shard:
            fname = f"nonexpert-{idx:05d}.safetensors"
            save_file(shard, str(out / fname))
            for k in shard:
                manifest["nonexpert"][k] = fname
            shard, size, idx = {}, 0, idx + 1

    known = {n for names in expert_names.values() for n in names}
    for name in sorted(source.names()):
        if name in known or name.startswith(IGNORED_PREFIXES):
            continue
        t = source.tensor_as_stored(name).contiguous()
        shard[name] = t
        size += t.numel() * t.element_size()
        if size >= _NONEXPERT_SHARD_BYTES:
            flush()
    flush()
    manifest["source_expert_bytes"] = src_bytes
    manifest["summary"] = {t.name: _summary(manifest["metrics"][t.name]) for t in tiers}
    return manifest


def _summary(per_layer: dict[str, list[dict[str, float]]]) -> dict[str, float]:
    vals = [m["weights"] for ms in per_layer.values() for m in ms]
    if not vals:
        return {}
    return {"weights_mean": sum(vals) / len(vals), "weights_max": max(vals)}


# ------------------------------------------------------------------ reading back


class TieredCheckpoint:
    """Read side of a tiered checkpoint (memory-mapped; nothing is loaded until asked)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        mf = self.root / MANIFEST
        if not mf.exists():
            raise CheckpointError(f"{self.root}: no {MANIFEST} (not a complete tiered checkpoint)")
        self.manifest: dict[str, Any] = json.loads(mf.read_text())
        if self.manifest.get("format") != FORMAT:
            raise CheckpointError(f"{mf}: not a {FORMAT} manifest")
        if self.manifest.get("layout_version") != LAYOUT_VERSION:
            raise CheckpointError(
                f"{mf}: layout version {self.manifest.get('layout_version')}, "
                f"this build reads {LAYOUT_VERSION}"
            )

    @property
    def tiers(self) -> list[TierSpec]:
        from dynaexq.quant.tiers import parse_tier

        return [parse_tier(t["name"]) for t in self.manifest["tiers"]]

    def expert_blobs(self, layer: int, tier: TierSpec | str) -> torch.Tensor:
        """uint8 [E, expert_nbytes] for one MoE layer at one tier."""
        from safetensors import safe_open

        name = tier if isinstance(tier, str) else tier.name
        ent = self.manifest["experts"][str(layer)]
        with safe_open(str(self.root / ent["file"]), framework="pt") as h:
            return h.get_tensor(ent["tensors"][name])

    def nonexpert_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        from safetensors import safe_open

        by_file: dict[str, list[str]] = {}
        for k, f in self.manifest["nonexpert"].items():
            by_file.setdefault(f, []).append(k)
        for f, names in sorted(by_file.items()):
            with safe_open(str(self.root / f), framework="pt") as h:
                for k in names:
                    yield k, h.get_tensor(k)
