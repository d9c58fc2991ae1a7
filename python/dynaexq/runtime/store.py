"""The packed tiers of every expert in host memory, and where they come from.

A `TierStore` holds, for every MoE layer and every tier, one uint8 tensor [E, slot bytes]
whose row e is expert e's packed blob (docs/packed-layout.md), plus each expert's
quantization error per tier. It is filled once at load time, from a tiered checkpoint
(`dynaexq quantize`), or by quantizing the original checkpoint on the fly into a cache
directory (with a progress bar) so that the next load reuses it. Nothing is quantized on
the serving path.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dynaexq.quant import TierSpec, expert_nbytes, parse_tier, parse_tiers
from dynaexq.quant.tiered import LAYOUT_VERSION, TieredCheckpoint, quantize_checkpoint


def default_cache_dir() -> Path:
    root = os.environ.get("DYNAEXQ_CACHE") or Path.home() / ".cache" / "dynaexq"
    return Path(root) / "tiered"


def precision_order(tiers: list[TierSpec]) -> list[TierSpec]:
    """Tiers from the lowest precision (index 0) to the highest."""
    return sorted(tiers, key=lambda t: (t.bits, t.group_size == 0, -t.group_size))


def _source_key(src: Path, tiers: list[TierSpec]) -> str:
    h = hashlib.sha256()
    h.update(str(src.resolve()).encode())
    for f in sorted(src.iterdir()):
        if f.suffix in (".safetensors", ".json"):
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    h.update(",".join(t.name for t in tiers).encode())
    h.update(f"layout{LAYOUT_VERSION}".encode())
    return h.hexdigest()[:16]


def tiered_checkpoint_for(
    src: str | os.PathLike[str],
    tiers: list[TierSpec] | str,
    *,
    cache_dir: Path | None = None,
    progress: bool = True,
) -> TieredCheckpoint:
    """A tiered checkpoint of `src` holding `tiers`: `src` itself when it is one, else a
    cached one, quantized now if it does not exist yet."""
    src_p = Path(src)
    if isinstance(tiers, str):
        tier_list = parse_tiers(tiers)
    else:
        tier_list = [parse_tier(t) if isinstance(t, str) else t for t in tiers]
    if (src_p / "manifest.json").is_file():
        tc = TieredCheckpoint(src_p)
        missing = {t.name for t in tier_list} - {t.name for t in tc.tiers}
        if missing:
            raise ValueError(f"{src_p} holds tiers {[t.name for t in tc.tiers]}, not {missing}")
        return tc
    dst = (cache_dir or default_cache_dir()) / f"{src_p.name}-{_source_key(src_p, tier_list)}"
    if not (dst / "manifest.json").is_file():
        dst.parent.mkdir(parents=True, exist_ok=True)
        quantize_checkpoint(src_p, dst, tier_list, force=True, progress=progress)
    return TieredCheckpoint(dst)


@dataclass
class TierStore:
    """Packed blobs of every expert at every tier, lowest precision first."""

    tiers: list[TierSpec]
    layers: list[int]  # MoE layer ids of the model, in order
    experts: int
    hidden_size: int
    intermediate_size: int
    slot_bytes: list[int]
    blobs: dict[tuple[int, int], torch.Tensor]  # (layer position, tier) -> uint8 [E, bytes]
    errors: np.ndarray  # [layers, experts, tiers] relative weight error per tier

    @classmethod
    def from_tiered(
        cls,
        tc: TieredCheckpoint,
        tiers: list[TierSpec] | list[str] | None = None,
        pin: bool = False,
    ) -> TierStore:
        m = tc.manifest
        wanted = (
            tc.tiers
            if tiers is None
            else [parse_tier(t) if isinstance(t, str) else t for t in tiers]
        )
        chosen = precision_order(list(wanted))
        layers = [int(x) for x in m["moe_layers"]]
        e, h, i = int(m["num_experts"]), int(m["hidden_size"]), int(m["moe_intermediate_size"])
        align = int(m["alignment"])
        slot_bytes = [expert_nbytes(t, h, i, align) for t in chosen]
        blobs: dict[tuple[int, int], torch.Tensor] = {}
        errors = np.zeros((len(layers), e, len(chosen)), dtype=np.float32)
        for li, layer in enumerate(layers):
            for ti, t in enumerate(chosen):
                blob = tc.expert_blobs(layer, t).contiguous()
                if tuple(blob.shape) != (e, slot_bytes[ti]):
                    raise ValueError(
                        f"{tc.root}: layer {layer} tier {t.name} has blobs {tuple(blob.shape)}, "
                        f"expected {(e, slot_bytes[ti])}"
                    )
                blobs[(li, ti)] = blob.pin_memory() if pin else blob
                per_expert = m["metrics"][t.name][str(layer)]
                errors[li, :, ti] = [float(x["weights"]) for x in per_expert]
        return cls(chosen, layers, e, h, i, slot_bytes, blobs, errors)

    def blob(self, layer_pos: int, expert: int, tier: int) -> torch.Tensor:
        return self.blobs[(layer_pos, tier)][expert]

    @property
    def num_experts_total(self) -> int:
        return len(self.layers) * self.experts

    def gains(self) -> np.ndarray:
        """Error reduction of each expert at each tier relative to tier 0, [L, E, T]."""
        return self.errors[..., :1] - self.errors

    def describe(self) -> str:
        return json.dumps(
            {
                "tiers": [t.name for t in self.tiers],
                "slot_bytes": self.slot_bytes,
                "layers": len(self.layers),
                "experts": self.experts,
                "mean_error": [float(x) for x in self.errors.mean(axis=(0, 1))],
            }
        )
