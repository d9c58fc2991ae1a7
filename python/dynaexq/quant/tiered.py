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

import hashlib
import json
import os
import shutil
import struct
import time
from collections.abc import Iterator
from concurrent.futures import (
    FIRST_COMPLETED,
    Executor,
    Future,
    ProcessPoolExecutor,
    ThreadPoolExecutor,
    wait,
)
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
_NONEXPERT_SHARD_BYTES = 512 << 20  # bounds the memory a non-expert shard needs


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


class TieredMismatchError(CheckpointError):
    """A tiered checkpoint does not match its config.json or its source checkpoint."""


class NotEnoughDiskError(CheckpointError, OSError):
    """The output's file system cannot hold the tiered checkpoint (checked before starting)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class QuantizeBusyError(CheckpointError):
    """Another `dynaexq quantize` is writing the same output."""


def source_fingerprint(src: Path) -> dict[str, Any]:
    """What identifies a source checkpoint: its config and the name, size and mtime of
    every weight file (cheap: no data is read). A tiered checkpoint records it, so a
    resumed run or a cached checkpoint that no longer matches its source is detected."""
    files = {}
    for f in sorted(src.iterdir()):
        if f.suffix == ".safetensors" or f.name == "model.safetensors.index.json":
            st = f.stat()
            files[f.name] = [st.st_size, st.st_mtime_ns]
    cfg = (src / "config.json").read_bytes()
    return {"config_sha256": hashlib.sha256(cfg).hexdigest(), "files": files}


def quantize_checkpoint(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    tiers: list[TierSpec],
    force: bool = False,
    alignment: int = DEFAULT_ALIGNMENT,
    progress: bool = True,
    threads: int = 1,
) -> dict[str, Any]:
    """Write a tiered checkpoint of `src` at `dst`; returns the manifest, plus the run's
    `quantize_seconds`, `quantize_mb_per_s` and `resumed_layers` (not written to the
    manifest, so the output's bytes do not depend on timing).

    Streams one expert at a time (`threads` workers quantize in parallel) into one shard
    per MoE layer; each shard is written under a temporary name and renamed when
    complete, in a hidden sibling directory `.<dst>.partial` that is renamed to `dst`
    when everything is written. An interrupted run (Ctrl-C, kill, power loss) leaves that
    directory behind, and running again resumes from the shards already complete; the
    result is byte-identical to an uninterrupted run (any thread count).

    Raises dynaexq.checkpoint.CheckpointError (a subclass: MissingTensorError,
    TensorShapeError, UnsupportedDtypeError, NonFiniteTensorError, NotEnoughDiskError,
    ...) on bad input, naming the file or tensor; FileExistsError if dst exists and not
    force. Nothing appears at `dst` unless the whole run succeeded.
    """
    src_p, dst_p = Path(src), Path(dst)
    if not tiers:
        raise CheckpointError("no tiers requested")
    if threads < 1:
        raise CheckpointError(f"threads must be >= 1, got {threads}")
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
        return _quantize(source, shape, src_p, dst_p, tiers, alignment, progress, threads)
    finally:
        source.close()


def partial_dir(dst: Path) -> Path:
    """Where an unfinished run of `dst` keeps its work (resumed by the next run)."""
    return dst.parent / f".{dst.name}.partial"


def _quantize(
    source: Checkpoint,
    shape: MoeShape,
    src_p: Path,
    dst_p: Path,
    tiers: list[TierSpec],
    alignment: int,
    progress: bool,
    threads: int,
) -> dict[str, Any]:
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

    job = {
        "format": FORMAT,
        "layout_version": LAYOUT_VERSION,
        "alignment": alignment,
        "tiers": [t.name for t in tiers],
        "source": str(src_p),
        "source_fingerprint": source_fingerprint(src_p),
    }
    tmp = partial_dir(dst_p)
    # The lock comes first and lives beside the partial directory, so that nobody removes
    # or renames a directory another process is writing.
    dst_p.parent.mkdir(parents=True, exist_ok=True)
    lock = _lock(dst_p)
    t0 = time.perf_counter()
    try:
        if tmp.exists():
            try:
                old = json.loads((tmp / _JOB).read_text())
            except (OSError, json.JSONDecodeError):
                old = None
            if old != job:  # another source, tiers or layout: its shards are of no use
                shutil.rmtree(tmp)
        tmp.mkdir(parents=True, exist_ok=True)
        _write_atomic(tmp / _JOB, json.dumps(job, indent=1, sort_keys=True).encode())
        plan = _Plan(source, shape, expert_names, tiers, alignment)
        plan.check_disk(tmp)
        done_before = plan.done_layers(tmp)
        manifest = _write(source, plan, tmp, progress, threads)
        manifest["source"] = str(src_p)
        manifest["source_fingerprint"] = job["source_fingerprint"]
        _copy_side_files(src_p, tmp)
        # The manifest is the last file written: a directory without one is incomplete.
        _write_atomic(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())
        (tmp / _JOB).unlink()
        if dst_p.exists():
            old_dir = dst_p.parent / f".{dst_p.name}.old-{os.getpid()}"
            dst_p.rename(old_dir)
            tmp.rename(dst_p)
            shutil.rmtree(old_dir) if old_dir.is_dir() else old_dir.unlink()
        else:
            tmp.rename(dst_p)
        _unlock(dst_p, lock)  # only now: a waiter finds the finished checkpoint in place
    except CheckpointError:
        # Bad input found mid-run (a non-finite weight...): nothing to resume from.
        shutil.rmtree(tmp, ignore_errors=True)
        _unlock(dst_p, lock)
        raise
    except BaseException:
        # Interrupted (Ctrl-C, out of disk...): keep the complete shards for the next run.
        _unlock(dst_p, lock)
        raise
    seconds = time.perf_counter() - t0
    out = dict(manifest)
    new_bytes = plan.source_bytes(skip=done_before)
    out["quantize_seconds"] = round(seconds, 3)
    out["quantize_mb_per_s"] = round(new_bytes / 1e6 / max(seconds, 1e-9), 3)
    out["resumed_layers"] = sorted(done_before)
    return out


_JOB = "job.json"


def _lock_path(dst: Path) -> Path:
    return dst.parent / f".{dst.name}.lock"


def _lock(dst: Path) -> Any:
    """An exclusive lock on writing `dst` (released when the process dies). The file is
    removed by the holder when it finishes (`_unlock`), so a lock taken on a file that was
    removed meanwhile is no lock: take it again on the file now at the path."""
    import fcntl

    path = _lock_path(dst)
    while True:
        f = open(path, "a")  # noqa: SIM115 (held for the whole run)
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            raise QuantizeBusyError(
                f"{dst}: another dynaexq quantize is writing this output (lock held)"
            ) from None
        try:
            if os.stat(path).st_ino == os.fstat(f.fileno()).st_ino:
                return f
        except FileNotFoundError:
            pass
        f.close()


def _unlock(dst: Path, lock: Any) -> None:
    """Remove the lock file, then release it (in this order: see `_lock`)."""
    _lock_path(dst).unlink(missing_ok=True)
    lock.close()


def wait_for_writer(dst: str | os.PathLike[str]) -> None:
    """Block until no other process is quantizing into `dst` (its lock is free); returns
    at once when none is."""
    import fcntl

    try:  # read-only: opening must not create a lock file that nobody removes
        f = open(_lock_path(Path(dst)))  # noqa: SIM115
    except FileNotFoundError:  # no lock file: nobody is writing there
        return
    with f:
        fcntl.flock(f, fcntl.LOCK_EX)
        fcntl.flock(f, fcntl.LOCK_UN)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


def _shard_name(layer: int) -> str:
    return f"experts-layer{layer:03d}.safetensors"


def _metrics_name(layer: int) -> str:
    return f"experts-layer{layer:03d}.metrics.json"


class _Plan:
    """Sizes and file names of everything the run writes (for the disk check and resume)."""

    def __init__(
        self,
        source: Checkpoint,
        shape: MoeShape,
        expert_names: dict[int, list[str]],
        tiers: list[TierSpec],
        alignment: int,
    ) -> None:
        self.source, self.shape, self.tiers, self.alignment = source, shape, tiers, alignment
        self.expert_names = expert_names
        h, i = shape.hidden_size, shape.intermediate_size
        self.nbytes = {t.name: expert_nbytes(t, h, i, alignment) for t in tiers}
        self.layer_src_bytes = {
            layer: sum(source.nbytes(n) for n in names) for layer, names in expert_names.items()
        }
        known = {n for names in expert_names.values() for n in names}
        self.nonexpert = [
            n
            for n in sorted(source.names())
            if n not in known and not n.startswith(IGNORED_PREFIXES)
        ]
        self.shards = _group_shards(self.nonexpert, source.nbytes, _NONEXPERT_SHARD_BYTES)

    def shard_bytes(self) -> int:
        return _HEADER_ROOM + self.shape.num_experts * sum(self.nbytes.values())

    def done_layers(self, tmp: Path) -> set[int]:
        return {
            layer
            for layer in self.expert_names
            if (tmp / _shard_name(layer)).is_file() and (tmp / _metrics_name(layer)).is_file()
        }

    def source_bytes(self, skip: set[int]) -> int:
        return sum(b for layer, b in self.layer_src_bytes.items() if layer not in skip)

    def check_disk(self, tmp: Path) -> None:
        done = self.done_layers(tmp)
        need = self.shard_bytes() * (len(self.expert_names) - len(done))
        for k, names in enumerate(self.shards):
            if not (tmp / _nonexpert_name(k)).is_file():
                need += sum(self.source.nbytes(n) for n in names) + (1 << 20)
        need += sum(
            f.stat().st_size
            for f in self.source.path.iterdir()
            if f.is_file() and f.suffix != ".safetensors"
        )
        free = shutil.disk_usage(tmp).free
        if free < need + (64 << 20):
            total = self.shard_bytes() * len(self.expert_names)
            raise NotEnoughDiskError(
                f"{tmp.parent}: the tiered checkpoint needs {need / 1e9:.2f} GB more "
                f"({total / 1e9:.2f} GB of expert shards in all, tiers "
                f"{', '.join(self.nbytes)}), but only {free / 1e9:.2f} GB are free; "
                "free some space or pass another --out"
            )


# Room for a layer shard's safetensors header: the data starts at this offset, so every
# expert row is page-aligned in the file (and in its memory map) when its size is.
_HEADER_ROOM = 4096


def _nonexpert_name(k: int) -> str:
    return f"nonexpert-{k:05d}.safetensors"


def _group_shards(names: list[str], nbytes: Any, limit: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for n in names:
        shards[-1].append(n)
        size += nbytes(n)
        if size >= limit:
            shards.append([])
            size = 0
    return [s for s in shards if s]


def _layer_header(layer: int, tiers: list[TierSpec], nbytes: dict[str, int], e: int) -> bytes:
    """A safetensors header for one layer shard: one U8 tensor [E, nbytes] per tier, in
    tier order, the data starting at `_HEADER_ROOM` (the header is padded with spaces, as
    the format allows)."""
    meta: dict[str, Any] = {"__metadata__": {"format": FORMAT, "layer": str(layer)}}
    off = 0
    for t in tiers:
        size = e * nbytes[t.name]
        meta[f"layers.{layer}.experts.{t.name}"] = {
            "dtype": "U8",
            "shape": [e, nbytes[t.name]],
            "data_offsets": [off, off + size],
        }
        off += size
    text = json.dumps(meta, separators=(",", ":"), sort_keys=True).encode()
    room = _HEADER_ROOM - 8
    if len(text) > room:
        raise AssertionError("layer shard header does not fit its room")
    return struct.pack("<Q", room) + text + b" " * (room - len(text))


def _write(
    source: Checkpoint, plan: _Plan, out: Path, progress: bool, threads: int
) -> dict[str, Any]:
    from safetensors.torch import save_file
    from tqdm import tqdm

    shape, tiers, alignment = plan.shape, plan.tiers, plan.alignment
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
        "expert_nbytes": dict(plan.nbytes),
        "experts": {},
        "nonexpert": {},
        "metrics": {t.name: {} for t in tiers},
    }
    done = plan.done_layers(out)
    total = len(plan.expert_names) * e
    bar = tqdm(
        total=total,
        initial=len(done) * e,
        desc="quantizing experts",
        unit="expert",
        disable=not progress,
        smoothing=0.05,
    )
    t0 = time.perf_counter()
    moved = 0
    # One intra-op thread per worker: `threads` experts at once, and results that do not
    # depend on the thread count (every reduction runs in the same order).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    # Several workers are processes: the quantizer's many small tensor operations hold
    # the GIL often enough that threads run no faster than one.
    pool: Executor
    if threads > 1:
        import multiprocessing

        pool = ProcessPoolExecutor(
            max_workers=threads,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=torch.set_num_threads,
            initargs=(1,),
        )
    else:
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dynaexq-quantize")
    try:
        for layer in plan.expert_names:
            fname = _shard_name(layer)
            if layer not in done:
                _quantize_layer(source, plan, layer, out, pool, threads, bar)
                moved += plan.layer_src_bytes[layer]
                mb_s = moved / 1e6 / max(time.perf_counter() - t0, 1e-9)
                bar.set_postfix_str(f"{mb_s:.1f} MB/s", refresh=False)
            metrics = json.loads((out / _metrics_name(layer)).read_text())
            for t in tiers:
                manifest["metrics"][t.name][str(layer)] = metrics[t.name]
            manifest["experts"][str(layer)] = {
                "file": fname,
                "tensors": {t.name: f"layers.{layer}.experts.{t.name}" for t in tiers},
            }
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(before)
        bar.close()
    # Non-expert tensors, unchanged, in shards of bounded size (each written whole under
    # a temporary name, then renamed: a present shard is complete).
    for k, names in enumerate(plan.shards):
        fname = _nonexpert_name(k)
        if not (out / fname).is_file():
            shard = {n: source.tensor_as_stored(n).contiguous() for n in names}
            part = out / (fname + ".partial")
            save_file(shard, str(part))
            _fsync(part)
            part.replace(out / fname)
            del shard
        for n in names:
            manifest["nonexpert"][n] = fname
    manifest["source_expert_bytes"] = sum(plan.layer_src_bytes.values())
    manifest["summary"] = {t.name: _summary(manifest["metrics"][t.name]) for t in tiers}
    return manifest


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _quantize_layer(
    source: Checkpoint,
    plan: _Plan,
    layer: int,
    out: Path,
    pool: Executor,
    threads: int,
    bar: Any,
) -> None:
    """Quantize one layer's experts into its shard, streaming: the main thread reads one
    expert at a time from the memory-mapped source, workers quantize and write its rows
    in place; at most 2 x threads experts are in memory at once."""
    tiers, alignment, e = plan.tiers, plan.alignment, plan.shape.num_experts
    nbytes = plan.nbytes
    header = _layer_header(layer, tiers, nbytes, e)
    base = {}
    off = _HEADER_ROOM
    for t in tiers:
        base[t.name] = off
        off += e * nbytes[t.name]
    part = out / (_shard_name(layer) + ".partial")
    metrics: dict[str, list[dict[str, float]]] = {t.name: [None] * e for t in tiers}  # type: ignore[list-item]
    fd = os.open(part, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, off)
        os.pwrite(fd, header, 0)
        ino = os.fstat(fd).st_ino

        def work(ex: int, x: Any) -> Future[dict[str, dict[str, float]]]:
            return pool.submit(
                _quantize_one, (str(part), ino), tiers, alignment, base, nbytes, ex, x.gate,
                x.up, x.down,
            )  # fmt: skip

        def done(ex: int, m: dict[str, dict[str, float]]) -> None:
            for name, v in m.items():
                metrics[name][ex] = v

        futures: list[tuple[int, Future[dict[str, dict[str, float]]]]] = []
        try:
            _feed(source, layer, e, work, done, futures, threads, bar)
        except BaseException:
            # No worker may still write into the shard once this returns.
            for _, f in futures:
                f.cancel()
            wait([f for _, f in futures])
            raise
        os.fsync(fd)
    finally:
        os.close(fd)
    part.replace(out / _shard_name(layer))
    _write_atomic(out / _metrics_name(layer), json.dumps(metrics, sort_keys=True).encode())


def _quantize_one(
    part: tuple[str, int],
    tiers: list[TierSpec],
    alignment: int,
    base: dict[str, int],
    nbytes: dict[str, int],
    ex: int,
    gate: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
) -> dict[str, dict[str, float]]:
    """Quantize expert `ex` at every tier and write its rows into the shard `part`
    (in a worker process or thread); returns its metrics per tier."""
    fd = _worker_fd(part)
    out = {}
    for t in tiers:
        qe = quantize_expert(t, gate, up, down)
        blob = pack_quantized_expert(qe, alignment)
        os.pwrite(fd, blob.numpy().tobytes(), base[t.name] + ex * nbytes[t.name])
        out[t.name] = {k: round(v, 6) for k, v in qe.metrics.items()}
    return out


_FDS: dict[tuple[str, int], int] = {}


def _worker_fd(part: tuple[str, int]) -> int:
    """This process's descriptor of the shard being written, (path, inode): a new file
    under an old name is opened anew; the previous one is closed."""
    fd = _FDS.get(part)
    if fd is None:
        for old in list(_FDS):
            os.close(_FDS.pop(old))
        fd = os.open(part[0], os.O_WRONLY)
        if os.fstat(fd).st_ino != part[1]:
            os.close(fd)
            raise OSError(f"{part[0]} was replaced while being written")
        _FDS[part] = fd
    return fd


def _feed(
    source: Checkpoint,
    layer: int,
    e: int,
    work: Any,
    done: Any,
    futures: list[tuple[int, Future[dict[str, dict[str, float]]]]],
    threads: int,
    bar: Any,
) -> None:
    def collect(block: bool) -> None:
        pending = [f for _, f in futures if not f.done()]
        if block and pending:
            wait(pending, return_when=FIRST_COMPLETED)
        for item in [it for it in futures if it[1].done()]:
            done(item[0], item[1].result())  # re-raises a worker's error here
            futures.remove(item)
            bar.update(1)

    for ex in range(e):
        x = source.expert(layer, ex, check_finite=True)
        futures.append((ex, work(ex, x)))
        del x
        collect(block=len(futures) >= 2 * threads)
    while futures:
        collect(block=True)


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

        self._check_config()

    def _check_config(self) -> None:
        """The manifest's expert shapes must be those of the config.json beside it."""
        cfg_path = self.root / "config.json"
        if not cfg_path.is_file():
            return
        shape = MoeShape.of(ModelConfig.from_file(cfg_path), cfg_path)
        m = self.manifest
        want = {
            "hidden_size": shape.hidden_size,
            "moe_intermediate_size": shape.intermediate_size,
            "num_experts": shape.num_experts,
            "moe_layers": list(shape.moe_layers),
        }
        bad = {k: (m.get(k), v) for k, v in want.items() if m.get(k) != v}
        if bad:
            raise TieredMismatchError(
                f"{self.root}: manifest and config.json disagree on "
                + ", ".join(f"{k} ({a} vs {b})" for k, (a, b) in bad.items())
                + "; re-run dynaexq quantize"
            )

    def check_source(self, src: str | os.PathLike[str]) -> None:
        """Raise TieredMismatchError unless this checkpoint was made from `src` as it
        is now (same config, same weight files by name, size and mtime)."""
        have = self.manifest.get("source_fingerprint")
        now = source_fingerprint(Path(src))
        if have != now:
            why = "records no source fingerprint" if have is None else "was made from"
            raise TieredMismatchError(
                f"{self.root} {why} a different version of {src} (its config or weight "
                "files changed since); re-run dynaexq quantize --force"
                if have is not None
                else f"{self.root} {why}; re-run dynaexq quantize --force"
            )

    @property
    def expert_files(self) -> dict[int, Path]:
        return {int(k): self.root / v["file"] for k, v in self.manifest["experts"].items()}

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
