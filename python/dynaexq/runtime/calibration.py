"""Calibration without materialising the model.

The initial hot set comes from the routed probability mass each expert receives on
calibration text. Computing it needs the model's routing, so it needs a forward pass,
but not the model in memory: the engine holds only its non-expert weights, and the
experts run one at a time straight from the memory-mapped tiered checkpoint at its
highest tier (`MappedExperts`; bf16 is the source's own precision, bit for bit). Host
memory stays at the non-expert weights plus a few activations; the page cache holds the
expert bytes read (and may drop them).

The ranking is cached beside the tiered checkpoint (`calibration/<key>.npy`, keyed by the
tokens, the window, the tier and the checkpoint), so a second start skips the pass.
Calibration text is the caller's, or `default_calibration_text()` shipped with the
package.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from dynaexq.quant import PackedExpertView, expert_forward
from dynaexq.runtime.store import TierStore, default_cache_dir

DEFAULT_TEXT = Path(__file__).resolve().parent.parent / "data" / "calibration.txt"


def default_calibration_text() -> str:
    """A small generic text (prose, Q&A, code, data, chat) shipped with the package."""
    return DEFAULT_TEXT.read_text()


class MappedExperts:
    """An expert executor that runs every expert from the store's memory maps at one tier
    (default: the highest), reading nothing but the experts the tokens route to."""

    def __init__(self, store: TierStore, tier: int | None = None) -> None:
        self.store = store
        self.tier = len(store.tiers) - 1 if tier is None else tier
        self.layer_pos = {layer: i for i, layer in enumerate(store.layers)}

    def tier_of(self, layer_pos: int, expert: int) -> int:
        """The store tier expert `expert` of MoE layer `layer_pos` runs at."""
        return self.tier

    def forward(
        self, layer: int, hidden: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        if hidden.device.type != "cpu":  # the maps are host memory: run there, once per layer
            out = self.forward(layer, hidden.float().cpu(), expert_ids.cpu(), weights.cpu())
            return out.to(device=hidden.device, dtype=hidden.dtype)
        li = self.layer_pos[layer]
        t, k = expert_ids.shape
        flat = expert_ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.store.experts).tolist()
        x = hidden[order // k]
        out = torch.empty_like(x)
        h, inter = self.store.hidden_size, self.store.intermediate_size
        start = 0
        for e, n in enumerate(counts):
            if n:
                tier = self.tier_of(li, e)
                spec = self.store.tiers[tier]
                view = PackedExpertView(spec, h, inter, self.store.blob(li, e, tier))
                out[start : start + n] = expert_forward(view, x[start : start + n])
                start += n
        out.mul_(weights.reshape(-1)[order].unsqueeze(-1))
        unsorted = torch.empty_like(out)
        unsorted[order] = out
        return unsorted.view(t, k, -1).sum(dim=1)


class TierMapExperts(MappedExperts):
    """Runs every routed expert from the store's maps at the tier `tier_map[layer, e]`
    gives it; the map may change between steps."""

    def __init__(self, store: TierStore, tier_map: np.ndarray) -> None:
        super().__init__(store)
        self.tier_map = np.asarray(tier_map, dtype=np.int64)
        want = (len(store.layers), store.experts)
        if self.tier_map.shape != want:
            raise ValueError(f"tier map of shape {self.tier_map.shape}, want {want}")

    def tier_of(self, layer_pos: int, expert: int) -> int:
        return int(self.tier_map[layer_pos, expert])


def window_groups(
    engine, windows: Sequence[np.ndarray], batch: int = 16, keep_bytes: int = 256 << 20
) -> list[torch.Tensor]:
    """`windows` in batches of token ids [n, T] (each cut to its shortest window): at most
    `batch` windows, and as many as keep the logits and their log-softmax under
    `keep_bytes` (a 150k vocabulary makes them 1.2 GB for 16 windows of 128 tokens)."""
    longest = max((len(w) for w in windows), default=1)
    per_window = longest * engine.config.vocab_size * 4 * 2
    batch = max(1, min(batch, keep_bytes // max(1, per_window)))
    out = []
    for i in range(0, len(windows), batch):
        group = windows[i : i + batch]
        n = min(len(w) for w in group)
        out.append(torch.from_numpy(np.stack([np.asarray(w[:n]) for w in group])))
    return out


def group_losses(logits: torch.Tensor, ids: torch.Tensor) -> list[float]:
    """Mean next-token loss (nats) of each row of `ids` [n, T] under `logits` [n, T, V]."""
    import torch.nn.functional as F

    logits = logits.float()
    target = ids[:, 1:].to(logits.device)
    loss = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none"
    )
    return loss.view(len(ids), -1).mean(dim=1).tolist()


def window_losses(
    engine,
    store: TierStore,
    tier_map: np.ndarray,
    windows: Sequence[np.ndarray],
    batch: int = 16,
    keep_bytes: int = 256 << 20,
) -> np.ndarray:
    """Mean next-token loss (nats) of each of `windows` with every routed expert at its
    `tier_map` tier ([L, E] store tiers), run from the store's maps with the engine's
    other weights (its executor is restored afterwards); batched as `window_groups`."""
    before = engine.experts
    engine.experts = TierMapExperts(store, tier_map)
    out: list[float] = []
    try:
        with torch.no_grad():
            for ids in window_groups(engine, windows, batch, keep_bytes):
                out += group_losses(engine.model(ids.to(engine.device)), ids)
    finally:
        engine.experts = before
    return np.asarray(out, dtype=np.float64)


def layer_share(mass: np.ndarray, floor: float = 0.0) -> np.ndarray:
    """[..., L, E] routed mass -> each expert's share of its layer's mass, floored toward
    an even share: (1 - floor) x share + floor / E (the knapsack's hotness, a hedge against
    calibration text unlike the workload)."""
    mass = np.asarray(mass, dtype=np.float64)
    share = mass / np.maximum(mass.sum(axis=-1, keepdims=True), 1e-12)
    return (1.0 - floor) * share + floor / mass.shape[-1] if floor else share


def windows_of(
    streams: Sequence[np.ndarray], window: int = 128, prompts: int = 128
) -> list[np.ndarray]:
    """Up to `prompts` windows of `window` tokens, spread evenly over the streams; a
    stream shorter than a window contributes itself whole (padded windows would skew the
    mass), so short calibration text still counts."""
    out: list[np.ndarray] = []
    per_stream = max(1, -(-prompts // max(1, len(streams))))
    for s in streams:
        s = np.asarray(s, dtype=np.int64).ravel()
        n = min(per_stream, len(s) // window)
        out += [s[i * window : (i + 1) * window] for i in range(n)]
        if n == 0 and len(s) >= 8:
            out.append(s)
    return out


def calibration_scores(
    engine,
    streams: Sequence[np.ndarray],
    *,
    window: int = 128,
    prompts: int = 128,
    batch: int = 16,
    progress: bool = False,
) -> np.ndarray:
    """Mean routed probability mass per (MoE layer, expert) over up to `prompts` windows of
    `window` tokens cut from `streams`, with the engine's current experts: [layers, E]."""
    from tqdm import tqdm

    config = engine.config
    layers = config.moe_layers
    pos = {layer: i for i, layer in enumerate(layers)}
    mass = np.zeros((len(layers), config.num_experts), dtype=np.float64)
    tokens = np.zeros(len(layers), dtype=np.int64)

    def hook(layer: int, ids: torch.Tensor, probs: torch.Tensor) -> None:
        picked = probs.gather(1, ids).double().cpu().numpy()
        np.add.at(mass[pos[layer]], ids.cpu().numpy().ravel(), picked.ravel())
        tokens[pos[layer]] += ids.shape[0]

    wins = windows_of(streams, window, prompts)
    if not wins:
        raise ValueError("calibration text is empty (fewer than 8 tokens)")
    groups: list[list[np.ndarray]] = []
    for w in wins:  # equal-length rows per forward pass
        if groups and len(groups[-1]) < batch and len(groups[-1][0]) == len(w):
            groups[-1].append(w)
        else:
            groups.append([w])
    remove = engine.add_routing_hook(hook)
    bar = tqdm(
        total=sum(len(w) for w in wins), desc="calibrating", unit="tok", disable=not progress
    )
    try:
        for g in groups:
            engine.forward(torch.from_numpy(np.stack(g)))
            bar.update(sum(len(w) for w in g))
    finally:
        remove()
        bar.close()
    return (mass / np.maximum(tokens, 1)[:, None]).astype(np.float32)


def calibration_key(
    store: TierStore, streams: Sequence[np.ndarray], window: int, prompts: int, tier: int
) -> str:
    h = hashlib.sha256()
    for s in streams:
        a = np.ascontiguousarray(np.asarray(s, dtype=np.int64).ravel())
        h.update(len(a).to_bytes(8, "little"))
        h.update(a.tobytes())
    h.update(f"w{window}p{prompts}t{store.tiers[tier].name}".encode())
    if store.root is not None and (store.root / "manifest.json").is_file():
        h.update(hashlib.sha256((store.root / "manifest.json").read_bytes()).digest())
    h.update(",".join(map(str, store.layers)).encode())
    return h.hexdigest()[:20]


def _cache_path(store: TierStore, key: str) -> Path:
    """Beside the tiered checkpoint when it is writable, else in the cache directory."""
    if store.root is not None and os.access(store.root, os.W_OK):
        return store.root / "calibration" / f"{key}.npy"
    return default_cache_dir().parent / "calibration" / f"{key}.npy"


def calibrate(
    engine,
    store: TierStore,
    streams: Sequence[np.ndarray],
    *,
    window: int = 128,
    prompts: int = 128,
    progress: bool = True,
    cache: bool = True,
    on_pass: Callable[[], None] | None = None,
) -> np.ndarray:
    """Expert ranking [layers, E] on `streams`, computed with `engine`'s non-expert
    weights and `MappedExperts(store)` (the engine's executor is restored afterwards), or
    read from the cache when this exact calibration ran before."""
    tier = len(store.tiers) - 1
    key = calibration_key(store, streams, window, prompts, tier)
    path = _cache_path(store, key)
    want = (len(store.layers), store.experts)
    if cache and path.is_file():
        try:
            scores = np.load(path)
            if scores.shape == want and scores.dtype == np.float32:
                return scores
        except (OSError, ValueError):
            pass  # unreadable: compute again
    if on_pass is not None:
        on_pass()
    before = engine.experts
    engine.experts = MappedExperts(store, tier)
    try:
        scores = calibration_scores(
            engine, streams, window=window, prompts=prompts, progress=progress
        )
    finally:
        engine.experts = before
    if cache:
        cache_atomically(path, lambda f: np.save(f, scores))
    return scores


def cache_atomically(path: Path, write: Callable[[object], None]) -> None:
    """Write a cache file whole or not at all (a reader never sees half of one, a killed
    run leaves none); a read-only place just caches nothing."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            write(f)
        tmp.replace(path)
    except OSError:
        pass
