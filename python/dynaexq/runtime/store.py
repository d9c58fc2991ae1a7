"""The packed tiers of every expert, and where they come from.

A `TierStore` maps, for every MoE layer and every tier, one uint8 tensor [E, slot bytes]
of the tiered checkpoint (`dynaexq quantize`) whose row e is expert e's packed blob
(docs/packed-layout.md), plus each expert's quantization error per tier. Nothing is
copied at load time: the blobs are memory-mapped views, so host memory holds only the
pages that were read (the page cache's, not the process's). The original checkpoint is
quantized once into a cache directory (with a progress bar) when no tiered checkpoint
is given, and reused. Nothing is quantized on the serving path.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import struct
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from dynaexq.checkpoint import CheckpointError
from dynaexq.quant import TierSpec, expert_nbytes, parse_tier, parse_tiers
from dynaexq.quant.tiered import (
    LAYOUT_VERSION,
    QuantizeBusyError,
    TieredCheckpoint,
    TieredMismatchError,
    quantize_checkpoint,
    wait_for_writer,
)


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
        origin = tc.manifest.get("source")
        if tc.manifest.get("source_fingerprint") and origin and Path(origin).is_dir():
            tc.check_source(origin)  # its source changed since: stale
        return tc
    dst = (cache_dir or default_cache_dir()) / f"{src_p.name}-{_source_key(src_p, tier_list)}"
    while True:
        if (dst / "manifest.json").is_file():
            tc = TieredCheckpoint(dst)
            try:
                if tc.manifest.get("source_fingerprint") is not None:
                    tc.check_source(src_p)
                return tc
            except TieredMismatchError:
                pass  # a cached copy of an older version of the source: quantize again
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            quantize_checkpoint(
                src_p, dst, tier_list, force=True, progress=progress, threads=_cpu_count()
            )
            return TieredCheckpoint(dst)
        except QuantizeBusyError:
            # Another process (a second eval of a suite, say) is making the same cache
            # entry: use its result, or resume its shards if it stopped.
            print(f"another process is quantizing {dst}; waiting for it", file=sys.stderr)
            wait_for_writer(dst)


def _cpu_count() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


class HostMemoryError(MemoryError):
    """The host cannot hold what was asked of it (e.g. every tier resident/pinned)."""


HOST_STORE_MODES = ("auto", "mapped", "pinned")


def mem_available() -> int:
    """MemAvailable of /proc/meminfo in bytes (what can be allocated without swapping)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def safetensors_layout(path: Path) -> dict[str, tuple[str, tuple[int, ...], int, int]]:
    """name -> (dtype, shape, start, end) with absolute byte offsets in the file, from the
    safetensors header alone (8-byte little-endian length, then JSON)."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise CheckpointError(f"{path}: not a safetensors file (too short)")
        (n,) = struct.unpack("<Q", head)
        size = path.stat().st_size
        if n > min(size - 8, 100 << 20):
            raise CheckpointError(f"{path}: not a safetensors file (header of {n} B)")
        try:
            meta = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: unreadable safetensors header ({e})") from None
    out = {}
    for name, ent in meta.items():
        if name == "__metadata__":
            continue
        a, b = ent["data_offsets"]
        out[name] = (ent["dtype"], tuple(ent["shape"]), 8 + n + a, 8 + n + b)
        if 8 + n + b > size:
            raise CheckpointError(f"{path}: tensor {name!r} runs past the end of the file")
    return out


@dataclass
class TierStore:
    """Packed blobs of every expert at every tier, lowest precision first, read through
    memory maps of the tiered checkpoint's layer shards: `blobs[(layer pos, tier)]` is a
    uint8 [E, bytes] view of the file (nothing is copied; the page cache holds what was
    read, and the kernel may drop it again). `host_mode` says how the transfer engine's
    Rust store holds them: "mapped" (the same files, with a bounded staging ring) or
    "pinned" (every tier resident, pinned on a GPU)."""

    tiers: list[TierSpec]
    layers: list[int]  # MoE layer ids of the model, in order
    experts: int
    hidden_size: int
    intermediate_size: int
    slot_bytes: list[int]
    blobs: dict[tuple[int, int], torch.Tensor]  # (layer position, tier) -> uint8 [E, bytes]
    errors: np.ndarray  # [layers, experts, tiers] relative weight error per tier
    files: list[Path] = field(default_factory=list)  # one expert shard per layer
    # [layer pos][tier] -> (file index, offset of expert 0, stride) in `files`
    places: list[list[tuple[int, int, int]]] = field(default_factory=list)
    host_mode: str = "mapped"
    staging_slots: int = 8
    root: Path | None = None

    @classmethod
    def from_tiered(
        cls,
        tc: TieredCheckpoint,
        tiers: list[TierSpec] | list[str] | None = None,
        pin: bool = False,
        *,
        host_store: str = "auto",
        staging_slots: int = 8,
    ) -> TierStore:
        """Map `tc`'s layer shards. `host_store`: "mapped", "pinned" (every tier of the
        chosen ones resident: HostMemoryError when MemAvailable cannot hold it) or "auto"
        (pinned when that takes under half of MemAvailable, else mapped). `pin=True` is
        the old spelling of "pinned"."""
        if host_store not in HOST_STORE_MODES:
            raise ValueError(f"host_store must be one of {HOST_STORE_MODES}, got {host_store!r}")
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
        files: list[Path] = []
        places: list[list[tuple[int, int, int]]] = []
        for li, layer in enumerate(layers):
            ent = m["experts"][str(layer)]
            path = tc.root / ent["file"]
            layout = safetensors_layout(path)
            mm = _map(path)
            files.append(path)
            row = []
            for ti, t in enumerate(chosen):
                name = ent["tensors"][t.name]
                if name not in layout:
                    raise TieredMismatchError(f"{path}: no tensor {name!r} (tier {t.name})")
                dtype, shape, start, end = layout[name]
                if dtype != "U8" or shape != (e, slot_bytes[ti]):
                    raise TieredMismatchError(
                        f"{tc.root}: layer {layer} tier {t.name} has blobs {dtype} {list(shape)}, "
                        f"expected U8 {[e, slot_bytes[ti]]} (layout version "
                        f"{m.get('layout_version')}, manifest and shards disagree)"
                    )
                blobs[(li, ti)] = torch.frombuffer(
                    mm, dtype=torch.uint8, count=end - start, offset=start
                ).view(e, slot_bytes[ti])
                row.append((li, start, slot_bytes[ti]))
                per_expert = m["metrics"][t.name][str(layer)]
                errors[li, :, ti] = [float(x["weights"]) for x in per_expert]
            places.append(row)
        store = cls(
            chosen, layers, e, h, i, slot_bytes, blobs, errors, files, places,
            staging_slots=staging_slots, root=tc.root,
        )  # fmt: skip
        store.host_mode = store.choose_host_mode("pinned" if pin else host_store)
        return store

    def blob(self, layer_pos: int, expert: int, tier: int) -> torch.Tensor:
        return self.blobs[(layer_pos, tier)][expert]

    @property
    def num_experts_total(self) -> int:
        return len(self.layers) * self.experts

    def tier_total_bytes(self, tiers: list[int] | None = None) -> int:
        """Bytes of every expert at each of `tiers` (default all): what pinning costs."""
        ts = range(len(self.tiers)) if tiers is None else tiers
        return len(self.layers) * self.experts * sum(self.slot_bytes[t] for t in ts)

    @property
    def mapped_bytes(self) -> int:
        """Bytes of the tiered checkpoint's expert shards mapped into the process."""
        return sum(f.stat().st_size for f in self.files)

    def choose_host_mode(self, mode: str) -> str:
        need = self.tier_total_bytes()
        avail = mem_available()
        if mode == "pinned" and need > 0.9 * avail:
            raise HostMemoryError(
                f"pinning every tier ({', '.join(t.name for t in self.tiers)}) of every expert "
                f"needs {need / 2**30:.2f} GiB of host RAM, but only {avail / 2**30:.2f} GiB "
                "are available; use host_store='mapped' (memory maps of the tiered checkpoint "
                "and a bounded staging ring)"
            )
        if mode == "auto":
            return "pinned" if need <= 0.5 * avail else "mapped"
        return mode

    def host_store(self, tiers: list[int], *, min_slots: int = 1, device: int | None = None):
        """The Rust HostStore the transfer engine copies from, over store tiers `tiers`
        (its tier k is store tier tiers[k]): the mapped files with a staging ring of
        max(staging_slots, min_slots) slots, or every tier resident ("pinned")."""
        from dynaexq._core import HostStore

        layers = len(self.layers)
        sizes = [[self.slot_bytes[t] for t in tiers]] * layers
        if self.host_mode == "mapped" and self.files:
            return HostStore.mapped(
                [str(f) for f in self.files],
                [self.experts] * layers,
                sizes,
                [[self.places[li][t] for t in tiers] for li in range(layers)],
                staging_slots=max(self.staging_slots, min_slots),
                device=device,
            )
        host = HostStore([self.experts] * layers, sizes, device=device)
        for li in range(layers):
            for k, t in enumerate(tiers):
                blobs = self.blobs[(li, t)].numpy()
                for e in range(self.experts):
                    host.write(li, e, k, blobs[e])
        host.freeze()
        return host

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
                "host_store": self.host_mode,
                "mean_error": [float(x) for x in self.errors.mean(axis=(0, 1))],
            }
        )


def _map(path: Path) -> mmap.mmap:
    """A private (copy-on-write) map of the whole file: its pages are the page cache's
    until written, and nothing writes them (writable only so that torch can wrap it
    without a read-only warning)."""
    with open(path, "rb") as f:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
