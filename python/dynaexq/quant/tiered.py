"""Tiered checkpoints: every expert of a Hugging Face Qwen3-MoE checkpoint packed at every tier.

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
import math
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

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
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_NONEXPERT_SHARD_BYTES = 2 << 30


class CheckpointError(ValueError):
    """The source checkpoint is missing something or has an unexpected tensor."""


# ------------------------------------------------------------------ source reading
# TODO: switch to dynaexq.checkpoint (lazy sharded reader) once it lands; this private
# reader only needs safetensors.safe_open.


class _SafetensorsSource:
    """Lazy, memory-mapped view of a (possibly sharded) safetensors checkpoint."""

    def __init__(self, root: Path) -> None:
        from safetensors import safe_open

        self.root = root
        index = root / "model.safetensors.index.json"
        if index.exists():
            wm = json.loads(index.read_text())["weight_map"]
            self.where = {k: root / v for k, v in wm.items()}
        else:
            files = sorted(root.glob("*.safetensors"))
            if not files:
                raise CheckpointError(f"{root}: no *.safetensors files")
            self.where = {}
            for f in files:
                with safe_open(str(f), framework="pt") as h:
                    for k in h.keys():  # noqa: SIM118 (safe_open is not iterable)
                        self.where[k] = f
        self._handles: dict[Path, Any] = {}
        self._open = safe_open
        for f in set(self.where.values()):
            if not f.exists():
                raise CheckpointError(f"{f}: listed in the index but missing")

    def _h(self, name: str):
        f = self.where[name]
        h = self._handles.get(f)
        if h is None:
            h = self._handles[f] = self._open(str(f), framework="pt")
        return h

    def names(self) -> list[str]:
        return sorted(self.where)

    def shape_dtype(self, name: str) -> tuple[tuple[int, ...], str]:
        sl = self._h(name).get_slice(name)
        return tuple(sl.get_shape()), sl.get_dtype()

    def get(self, name: str) -> torch.Tensor:
        if name not in self.where:
            raise CheckpointError(f"{name}: tensor missing from the checkpoint")
        return self._h(name).get_tensor(name)

    def get_index(self, name: str, i: int) -> torch.Tensor:
        return self._h(name).get_slice(name)[i]


@dataclass(frozen=True)
class MoeShape:
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_experts: int
    moe_layers: tuple[int, ...]


def read_moe_config(root: Path) -> MoeShape:
    cfg_path = root / "config.json"
    if not cfg_path.exists():
        raise CheckpointError(f"{root}: config.json missing")
    cfg = json.loads(cfg_path.read_text())
    cfg = cfg.get("text_config", cfg)
    need = ("num_hidden_layers", "hidden_size", "moe_intermediate_size")
    for k in need:
        if k not in cfg:
            raise CheckpointError(f"config.json: {k} missing (is this a Qwen3-MoE model?)")
    ne = cfg.get("num_experts", cfg.get("num_local_experts"))
    if not ne:
        raise CheckpointError("config.json: num_experts missing or 0 (not an MoE model)")
    step = int(cfg.get("decoder_sparse_step", 1) or 1)
    mlp_only = set(cfg.get("mlp_only_layers", []) or [])
    n = int(cfg["num_hidden_layers"])
    moe = tuple(i for i in range(n) if i not in mlp_only and (i + 1) % step == 0)
    return MoeShape(n, int(cfg["hidden_size"]), int(cfg["moe_intermediate_size"]), int(ne), moe)


_DT = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


class _ExpertReader:
    """Reads one layer's experts in either on-disk form, validating names/shapes/dtypes."""

    PROJ = ("gate_proj", "up_proj", "down_proj")

    def __init__(self, src: _SafetensorsSource, shape: MoeShape, layer: int) -> None:
        self.src, self.s, self.layer = src, shape, layer
        p = f"model.layers.{layer}.mlp.experts"
        self.prefix = p
        h, i, e = shape.hidden_size, shape.intermediate_size, shape.num_experts
        fused_gu, fused_dn = f"{p}.gate_up_proj", f"{p}.down_proj"
        if fused_gu in src.where or fused_dn in src.where:
            self.fused = True
            self._check(fused_gu, (e, 2 * i, h))
            self._check(fused_dn, (e, h, i))
            self.names = [fused_gu, fused_dn]
        else:
            self.fused = False
            self.names = []
            want = {"gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}
            for ex in range(e):
                for proj in self.PROJ:
                    nm = f"{p}.{ex}.{proj}.weight"
                    self._check(nm, want[proj])
                    self.names.append(nm)

    def _check(self, name: str, shape: tuple[int, ...]) -> None:
        if name not in self.src.where:
            raise CheckpointError(f"{name}: tensor missing from the checkpoint")
        got, dt = self.src.shape_dtype(name)
        if got != shape:
            raise CheckpointError(f"{name}: expected shape {list(shape)}, got {list(got)}")
        if dt not in _DT:
            raise CheckpointError(f"{name}: unsupported dtype {dt} (expected F32, F16 or BF16)")

    def expert(self, ex: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        p, i = self.prefix, self.s.intermediate_size
        if self.fused:
            gu = self.src.get_index(f"{p}.gate_up_proj", ex)
            dn = self.src.get_index(f"{p}.down_proj", ex)
            g, u = gu[:i], gu[i:]
        else:
            g, u, dn = (self.src.get(f"{p}.{ex}.{proj}.weight") for proj in self.PROJ)
        for nm, t in (("gate_proj", g), ("up_proj", u), ("down_proj", dn)):
            # A float64 sum is non-finite iff some element is; much cheaper than
            # isfinite().all() on bf16.
            if not math.isfinite(float(t.sum(dtype=torch.float64))):
                raise CheckpointError(f"{p}.{ex}.{nm}: non-finite values")
        return g, u, dn

    def source_bytes(self) -> int:
        total = 0
        for nm in self.names:
            shape, dt = self.src.shape_dtype(nm)
            n = 1
            for d in shape:
                n *= d
            total += n * _DT[dt].itemsize
        return total


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

    Raises CheckpointError on bad input (naming the tensor), FileExistsError if dst exists
    and not force. Nothing appears at `dst` unless the whole run succeeded.
    """
    from safetensors.torch import save_file
    from tqdm import tqdm

    src_p, dst_p = Path(src), Path(dst)
    if not tiers:
        raise CheckpointError("no tiers requested")
    if dst_p.exists() and not force:
        raise FileExistsError(f"{dst_p} exists; pass --force to overwrite it")
    if not src_p.is_dir():
        raise CheckpointError(f"{src_p}: not a directory")
    if dst_p.resolve() == src_p.resolve():
        raise CheckpointError("output directory must differ from the source")
    shape = read_moe_config(src_p)
    source = _SafetensorsSource(src_p)
    readers = {layer: _ExpertReader(source, shape, layer) for layer in shape.moe_layers}
    expert_names = {n for r in readers.values() for n in r.names}
    for name in source.names():
        if ".mlp.experts." in name and name not in expert_names:
            raise CheckpointError(f"{name}: unexpected expert tensor (layer not MoE per config?)")

    tmp = dst_p.parent / f".{dst_p.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    t0 = time.perf_counter()
    try:
        manifest = _write(
            source, shape, readers, expert_names, tiers, tmp, alignment, progress, save_file, tqdm
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
    source, shape, readers, expert_names, tiers, out, alignment, progress, save_file, tqdm
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
        total=len(readers) * e, desc="quantizing experts", unit="expert", disable=not progress
    )
    for layer, rd in readers.items():
        src_bytes += rd.source_bytes()
        blobs = {
            t.name: torch.empty(e, manifest["expert_nbytes"][t.name], dtype=torch.uint8)
            for t in tiers
        }
        for t in tiers:
            manifest["metrics"][t.name][str(layer)] = []
        for ex in range(e):
            g, u, d = rd.expert(ex)
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

    for name in source.names():
        if name in expert_names:
            continue
        t = source.get(name).contiguous()
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
