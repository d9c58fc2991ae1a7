"""A request's signature: the first MoE layer's routing of its prompt, approximated at
the ingress without a model (what the affinity router clusters)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from dynaexq.serve.ray.options import SIGNATURE_TOKENS


class PromptSignature:
    """The first MoE layer's routing of a prompt prefix, without attention: per vocabulary
    token the top-k experts of softmax(gate(post_attention_layernorm(embedding))), so a
    signature is a table look-up and a sum (no model on the ingress)."""

    def __init__(self, experts: np.ndarray, weights: np.ndarray, num_experts: int) -> None:
        self.experts = experts  # [V, k] int
        self.weights = weights  # [V, k] float32, rows sum to 1
        self.num_experts = num_experts

    @classmethod
    def from_checkpoint(cls, path: Path, chunk: int = 8192) -> PromptSignature | None:
        """None when the checkpoint has no such tensors (the router then balances load)."""
        import torch

        from dynaexq.checkpoint import Checkpoint

        ckpt = Checkpoint(path)
        try:
            config = ckpt.config
            layer = config.moe_layers[0]
            names = (
                "model.embed_tokens.weight",
                f"model.layers.{layer}.post_attention_layernorm.weight",
                f"model.layers.{layer}.mlp.gate.weight",
            )
            if not all(n in ckpt for n in names):
                return None
            emb, norm, gate = (ckpt.tensor(n).float() for n in names)
            k = config.num_experts_per_tok
            experts, weights = [], []
            for a in range(0, emb.shape[0], chunk):
                x = emb[a : a + chunk]
                x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + config.rms_norm_eps) * norm
                w, idx = torch.softmax(x @ gate.T, -1).topk(k, -1)
                experts.append(idx.to(torch.int32))
                weights.append(w / w.sum(-1, keepdim=True))
            return cls(torch.cat(experts).numpy(), torch.cat(weights).numpy(), config.num_experts)
        finally:
            ckpt.close()

    def __call__(self, ids: Sequence[int]) -> list[float]:
        ids = [t for t in ids[:SIGNATURE_TOKENS] if 0 <= t < len(self.experts)]
        out = np.zeros(self.num_experts, dtype=np.float64)
        if ids:
            np.add.at(out, self.experts[ids].ravel(), self.weights[ids].ravel())
            out /= len(ids)
        return [round(float(v), 5) for v in out]
