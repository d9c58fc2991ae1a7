"""What each tier of each expert costs the model's output, measured on calibration text.

The knapsack and the controller value a tier by `routed share x error reduction`. The
error used to be the tier's relative *weight* error (from quantization, text-blind).
Here it is the expert's *output* error on the calibration activations: every token the
router sends to expert e contributes `(w * |f_t(x) - f_top(x)|)^2` at tier t (w its
combine weight), summed per expert and divided by the layer's MoE output energy (so every
layer's error is relative to its own output, as the weight error is relative to the
weights; an absolute output error grows with depth and would put every upper slot in
the last layers).

`rel[l, e, t]` is that share of layer l's output energy. The planner wants a value per
unit of routed share, so that the live signal can weigh it: `per_share = rel_gain /
share`, where the calibration share is known. Experts the calibration hardly routes to
have a noisy (or no) estimate: it is shrunk toward the weight error scaled to the same
units per layer, by the number of routed tokens (`prior_tokens` tokens of prior weight).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dynaexq.quant import PackedExpertView, expert_forward
from dynaexq.runtime.calibration import (
    MappedExperts,
    TierMapExperts,
    _cache_path,
    cache_atomically,
    calibration_key,
    group_losses,
    window_groups,
    windows_of,
)
from dynaexq.runtime.store import TierStore


@dataclass(frozen=True)
class OutputErrors:
    """Measured on calibration text with every expert at the top tier."""

    tiers: tuple[str, ...]  # tier names, lowest precision first
    rel: np.ndarray  # [L, E, T] squared output error / layer output energy
    tokens: np.ndarray  # [L, E] routed (token, expert) pairs seen
    share: np.ndarray  # [L, E] routed share of each expert in its layer
    # [L, E, T] the loss's sensitivity to it: sum over routed tokens of (g . w dy)^2,
    # g the gradient of the calibration loss at the layer's MoE output (a Fisher
    # estimate of the loss increase, in the same units, nats^2, for every layer).
    fisher: np.ndarray | None = None

    def select(self, names: list[str]) -> OutputErrors:
        """The same errors for a subset of the tiers (the top tier stays the reference:
        errors are measured against the highest tier measured)."""
        idx = [self.tiers.index(n) for n in names]
        fisher = None if self.fisher is None else self.fisher[..., idx]
        return OutputErrors(tuple(names), self.rel[..., idx], self.tokens, self.share, fisher)

    def per_share(
        self,
        weight_gains: np.ndarray,
        share: np.ndarray,
        prior_tokens: float = 16.0,
        kind: str = "output",
    ) -> np.ndarray:
        """[L, E, T] error reduction relative to tier 0 per unit of routed share (`share`:
        the calibration share the planner weighs it by, [L, E]), non-decreasing in t,
        shrunk toward the weight error (`weight_gains`, [L, E, T]) scaled per layer to the
        output error's units. `kind`: "output" (relative output error) or "fisher"."""
        err = self.rel if kind == "output" else self.fisher
        if err is None:
            raise ValueError(f"no {kind} errors were measured")
        gain = np.maximum(err[..., :1] - err, 0.0)
        gain = np.maximum.accumulate(gain, axis=-1)
        share = np.asarray(share, dtype=np.float64)
        wg = np.asarray(weight_gains, dtype=np.float64)
        # Per layer: weight error x share maps to output error by one factor (least
        # squares through the origin over the layer's experts and tiers).
        pred = share[..., None] * wg
        scale = (pred * gain).sum(axis=(1, 2)) / np.maximum((pred * pred).sum(axis=(1, 2)), 1e-30)
        prior = scale[:, None, None] * wg
        seen = gain / np.maximum(share, 1e-12)[..., None]
        n = self.tokens.astype(np.float64)[..., None]
        out = (n * seen + prior_tokens * prior) / np.maximum(n + prior_tokens, 1e-12)
        return np.maximum.accumulate(np.maximum(out, 0.0), axis=-1)


def _measured_path(store: TierStore, streams, window: int, prompts: int, what: str) -> Path:
    """Where a measurement of `what` on this calibration text and these tiers is cached
    (beside the ranking; the tier names are part of the key)."""
    key = calibration_key(store, streams, window, prompts, len(store.tiers) - 1)
    names = ",".join(t.name for t in store.tiers)
    key = hashlib.sha256(f"{key}-{what}-{names}".encode()).hexdigest()[:20]
    return _cache_path(store, key).with_suffix(".npz")


class _ErrorProbe(MappedExperts):
    """MappedExperts at the top tier that also runs every lower tier on the same tokens
    and accumulates each expert's weighted squared output error per tier."""

    def __init__(self, store: TierStore) -> None:
        super().__init__(store)
        L, E, T = len(store.layers), store.experts, len(store.tiers)
        self.err = np.zeros((L, E, T), dtype=np.float64)
        self.tokens = np.zeros((L, E), dtype=np.int64)
        self.mass = np.zeros((L, E), dtype=np.float64)
        self.energy = np.zeros(L, dtype=np.float64)

        self.fisher = np.zeros((L, E, T), dtype=np.float64)
        # Two passes over the same tokens: "grad" runs the top tier and keeps a leaf per
        # layer whose gradient is the loss's sensitivity to the layer's MoE output;
        # "measure" (the gradients known) runs every tier and projects each pair's output
        # error on its token's gradient at once, so no error is kept.
        self.mode = "measure"
        self.leaves: list[tuple[int, torch.Tensor]] = []
        self.grads: dict[int, torch.Tensor] = {}

    def take_grads(self) -> None:
        """After the gradient pass's backward: keep each layer's output gradient."""
        self.grads = {  # on the host, where the maps' experts run
            li: leaf.grad.detach().float().cpu()
            for li, leaf in self.leaves
            if leaf.grad is not None
        }
        self.leaves = []

    def forward(self, layer, hidden, expert_ids, weights):
        if self.mode == "grad":
            with torch.no_grad():
                y = super().forward(layer, hidden.detach(), expert_ids, weights.detach())
            # The experts' own inputs are not differentiated through: the residual stream
            # and attention carry the gradient back.
            leaf = y.detach().requires_grad_(True)
            leaf.retain_grad()
            self.leaves.append((self.layer_pos[layer], leaf))
            return leaf
        with torch.no_grad():
            if hidden.device.type != "cpu":  # the maps are host memory: measure there
                y = self._forward(layer, hidden.float().cpu(), expert_ids.cpu(), weights.cpu())
                return y.to(device=hidden.device, dtype=hidden.dtype)
            return self._forward(layer, hidden, expert_ids, weights)

    def _forward(self, layer, hidden, expert_ids, weights):
        li = self.layer_pos[layer]
        t, k = expert_ids.shape
        flat = expert_ids.reshape(-1)
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=self.store.experts).tolist()
        x = hidden[order // k].float()
        w = weights.reshape(-1)[order].float().unsqueeze(-1)
        out = torch.empty_like(x)
        h, inter = self.store.hidden_size, self.store.intermediate_size
        top = len(self.store.tiers) - 1
        g = self.grads.get(li)
        g = g[order // k] if g is not None else None  # [pairs, H], the sorted pairs' tokens
        start = 0
        for e, n in enumerate(counts):
            if not n:
                continue
            xs, ws = x[start : start + n], w[start : start + n]

            def run(tier: int, e=e, xs=xs) -> torch.Tensor:
                spec = self.store.tiers[tier]
                view = PackedExpertView(spec, h, inter, self.store.blob(li, e, tier))
                return expert_forward(view, xs)

            ref = run(top)
            out[start : start + n] = ref
            for tier in range(top):
                d = ws * (run(tier) - ref)
                if g is not None:
                    proj = (d * g[start : start + n]).sum(-1).double()
                    self.fisher[li, e, tier] += float((proj * proj).sum())
                d = d.double()
                self.err[li, e, tier] += float((d * d).sum())
            self.tokens[li, e] += n
            self.mass[li, e] += float(ws.sum())
            start += n
        out.mul_(w)
        unsorted = torch.empty_like(out)
        unsorted[order] = out
        y = unsorted.view(t, k, -1).sum(dim=1)
        self.energy[li] += float((y.double() ** 2).sum())
        return y.to(hidden.dtype)


def output_errors(
    engine,
    store: TierStore,
    streams: list[np.ndarray],
    *,
    window: int = 128,
    prompts: int = 128,
    batch: int = 16,
    cache: bool = True,
    keep_bytes: int = 256 << 20,
) -> OutputErrors:
    """Every expert's output error at every tier of `store` on `streams` (windows cut as
    for the calibration ranking), with `engine`'s non-expert weights; cached beside the
    tiered checkpoint like the ranking."""
    names = tuple(t.name for t in store.tiers)
    path = _measured_path(store, streams, window, prompts, "outerr2")
    if cache and path.is_file():
        try:
            z = np.load(path)
            return OutputErrors(names, z["rel"], z["tokens"], z["share"], z["fisher"])
        except (OSError, ValueError, KeyError):
            pass
    probe = _ErrorProbe(store)
    wins = windows_of(streams, window, prompts)
    if not wins:
        raise ValueError("calibration text is empty (fewer than 8 tokens)")
    # The gradient pass keeps every layer's activations until its backward (a rough 16
    # hidden-sized rows per token and layer): windows per pass under `keep_bytes`.
    per_window = window * store.hidden_size * 4 * 16 * len(store.layers)
    batch = max(1, min(batch, keep_bytes // max(1, per_window)))
    before = engine.experts
    engine.experts = probe
    try:
        groups: list[list[np.ndarray]] = []
        for w in wins:
            if groups and len(groups[-1]) < batch and len(groups[-1][0]) == len(w):
                groups[-1].append(w)
            else:
                groups.append([w])
        params = list(engine.model.parameters())
        flags = [p.requires_grad for p in params]
        for p in params:
            p.requires_grad_(False)
        try:
            for g in groups:
                ids = torch.from_numpy(np.stack(g)).to(engine.device)
                probe.mode = "grad"
                with torch.enable_grad():
                    logits = engine.model(ids).float()
                    loss = torch.nn.functional.cross_entropy(
                        logits[:, :-1].reshape(-1, logits.shape[-1]),
                        ids[:, 1:].reshape(-1),
                        reduction="sum",
                    )
                    loss.backward()
                del logits, loss
                probe.take_grads()
                probe.mode = "measure"
                with torch.no_grad():
                    engine.model(ids)
                probe.grads = {}
        finally:
            for p, f in zip(params, flags, strict=True):
                p.requires_grad_(f)
    finally:
        engine.experts = before
    rel = probe.err / np.maximum(probe.energy, 1e-30)[:, None, None]
    share = probe.mass / np.maximum(probe.mass.sum(axis=1, keepdims=True), 1e-30)
    out = OutputErrors(names, rel, probe.tokens, share, probe.fisher)
    if cache:
        cache_atomically(
            path,
            lambda f: np.savez(f, rel=rel, tokens=probe.tokens, share=share, fisher=probe.fisher),
        )
    return out


@dataclass(frozen=True)
class LayerLosses:
    """[L, T] loss increase (nats per token) on the calibration windows with MoE layer l
    alone at tier t (every other layer at the top tier; the top column is 0), and its
    standard error over the windows (the differences are paired: same windows)."""

    mean: np.ndarray
    se: np.ndarray


def layer_losses(
    engine,
    store: TierStore,
    streams: list[np.ndarray],
    *,
    window: int = 128,
    prompts: int | None = None,
    max_tokens: int = 73728,
    cache: bool = True,
    progress: bool = False,
) -> LayerLosses:
    """Each MoE layer's loss increase at each tier, alone, on up to `prompts` calibration
    windows (L x (T - 1) passes over them; default: as many as keep the passes within
    `max_tokens` tokens in all, 2 to 32: the embedded model's 18 passes over 32 windows,
    about 4.5 passes of the ranking's 128 windows for any model; a model of many layers
    measures on fewer windows, and its noisier measurements lean on the prediction more);
    cached beside the tiered checkpoint.

    The per-expert values add each expert's predicted loss increase as if its error were
    the only one; how a layer's errors carry through the layers above differs from layer
    to layer (in the embedded model some layers' int2 even lowers the loss on code), and
    this measures it."""
    from tqdm import tqdm

    L, T = len(store.layers), len(store.tiers)
    if prompts is None:
        prompts = int(np.clip(max_tokens // max(1, L * (T - 1) * window), 2, 32))
    path = _measured_path(store, streams, window, prompts, "layerloss2")
    if cache and path.is_file():
        try:
            z = np.load(path)
            if z["mean"].shape == (L, T):
                return LayerLosses(z["mean"], z["se"])
        except (OSError, ValueError, KeyError):
            pass
    wins = windows_of(streams, window, prompts)
    if not wins:
        raise ValueError("calibration text is empty (fewer than 8 tokens)")
    mean = np.zeros((L, T), dtype=np.float64)
    se = np.zeros((L, T), dtype=np.float64)
    bar = tqdm(total=L * (T - 1), desc="layer losses", unit="pass", disable=not progress)
    try:
        for li, t, d in _layer_loss_passes(engine, store, wins, lambda: bar.update(1)):
            mean[li, t] = d.mean()
            se[li, t] = d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else 0.0
    finally:
        bar.close()
    if cache:
        cache_atomically(path, lambda f: np.savez(f, mean=mean, se=se))
    return LayerLosses(mean, se)


class _Replay(torch.nn.Module):
    """Stands in for the decoder layers below the MoE layer measured: they run at the top
    tier in every pass, so their output is the one recorded once (`out`)."""

    def __init__(self) -> None:
        super().__init__()
        self.out: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, step: object, runtime: object) -> torch.Tensor:
        assert self.out is not None
        return self.out


def _layer_loss_passes(
    engine, store: TierStore, wins: list[np.ndarray], on_pass: Callable[[], None] | None = None
) -> list[tuple[int, int, np.ndarray]]:
    """(l, t, per-window loss increase) with MoE layer l alone at tier t, for every layer
    and tier below the top. The layers below l run at the top tier in every pass, so
    their output is kept from one pass per window batch and each pass runs only from l
    up: about half the layer work of running every pass whole, the same losses. The
    model's layers are stood in for during the passes only (`on_pass` after each)."""
    L, E, T = len(store.layers), store.experts, len(store.tiers)
    model = engine.model
    layers = model.model.layers
    top = np.full((L, E), T - 1, dtype=np.int64)
    groups = window_groups(engine, wins)
    # The top-tier pass: every window's loss, and each batch's step (the positions,
    # rotary tables and masks of the decoder layers' calls) and embeddings.
    steps: list[object] = []
    xs: list[torch.Tensor] = []

    def grab(_module, args) -> None:
        xs.append(args[0])
        steps.append(args[1])

    before = engine.experts
    replay = _Replay()
    saved = list(layers)
    out: list[tuple[int, int, np.ndarray]] = []
    try:
        with torch.no_grad():
            engine.experts = TierMapExperts(store, top)
            hook = layers[0].register_forward_pre_hook(grab)
            try:
                base = [group_losses(model(g.to(engine.device)), g) for g in groups]
            finally:
                hook.remove()
            below = 0  # the decoder layer whose input xs holds
            for li, layer_index in enumerate(store.layers):
                engine.experts = TierMapExperts(store, top)
                for j in range(below, layer_index):
                    xs = [saved[j](x, st, model.runtime) for x, st in zip(xs, steps, strict=True)]
                below = layer_index
                for j in range(layer_index):
                    layers[j] = replay
                try:
                    for t in range(T - 1):
                        m = top.copy()
                        m[li] = t
                        engine.experts = TierMapExperts(store, m)
                        d: list[float] = []
                        for g, x, b in zip(groups, xs, base, strict=True):
                            replay.out = x
                            d += [
                                a - c
                                for a, c in zip(
                                    group_losses(model(g.to(engine.device)), g), b, strict=True
                                )
                            ]
                        out.append((li, t, np.asarray(d, dtype=np.float64)))
                        if on_pass is not None:
                            on_pass()
                finally:
                    for j in range(layer_index):
                        layers[j] = saved[j]
                    replay.out = None
    finally:
        engine.experts = before
    return out


def scale_to_layer_losses(
    gains: np.ndarray, share: np.ndarray, losses: LayerLosses | np.ndarray
) -> np.ndarray:
    """[L, E, T] per-share tier gains (relative to tier 0) rescaled per layer and tier so
    that the layer's predicted loss at tier t (its experts' errors against the top tier,
    weighed by their calibration `share`) equals the measured one; non-decreasing in t.

    A measurement within its noise of the prediction (scaled to nats by one factor over
    all layers and tiers) is shrunk toward it (positive-part James-Stein: the weight on
    the measurement is 1 - se^2 / (measured - predicted)^2), so small noisy differences
    (a high tier on text unlike the workload) keep the prediction, while a layer measured
    far from it is planned as measured; a measured decrease counts as no loss."""
    if isinstance(losses, np.ndarray):
        losses = LayerLosses(losses, np.zeros_like(losses))
    g = np.asarray(gains, dtype=np.float64)
    err, pred = _predicted_layer_losses(g, share)
    measured = np.asarray(losses.mean, dtype=np.float64)
    k = np.maximum(measured, 0.0).sum() / max(pred.sum(), 1e-30)  # nats per predicted unit
    prior = k * pred
    d = measured - prior
    w = np.clip(1.0 - losses.se**2 / np.maximum(d * d, 1e-30), 0.0, 1.0)
    est = np.maximum(prior + w * d, 0.0)
    scale = np.where(pred > 0, est / np.maximum(pred, 1e-30), 0.0)
    err = scale[:, None, :] * err
    out = np.maximum(err[..., :1] - err, 0.0)
    return np.maximum.accumulate(out, axis=-1).astype(g.dtype)


def layer_loss_std(gains: np.ndarray, share: np.ndarray, losses: LayerLosses) -> np.ndarray:
    """[L, E, T] standard error of each expert's loss at each tier per unit of routed
    share (0 at the top tier), as `scale_to_layer_losses` plans on it: the layer's
    measured loss at a tier is known to its standard error, spread over the layer's
    experts in proportion to their predicted errors (one scale per layer and tier, so
    its uncertainty is a share of every expert's error alike). `gains`: the predicted
    per-share tier gains before scaling."""
    err, pred = _predicted_layer_losses(np.asarray(gains, dtype=np.float64), share)
    rel = np.where(pred > 0, np.asarray(losses.se, dtype=np.float64) / np.maximum(pred, 1e-30), 0.0)
    return np.maximum(rel[:, None, :] * err, 0.0).astype(np.float32)


def _predicted_layer_losses(gains: np.ndarray, share: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each tier's error below the top per share [L, E, T], and each layer's predicted
    loss at each tier [L, T]: its experts' errors weighed by their calibration `share`."""
    err = gains[..., -1:] - gains
    return err, (np.asarray(share, dtype=np.float64)[..., None] * err).sum(axis=1)
