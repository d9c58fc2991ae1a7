"""`dynaexq.load()`: a checkpoint, a tokenizer and the model behind one small API.

    engine = dynaexq.load()                  # the embedded default model
    engine = dynaexq.load("path/to/Qwen3-30B-A3B", dtype="bfloat16")
    engine.generate(["Hello", "def f("], max_new_tokens=32)
    engine.forward(input_ids)                # logits [batch, tokens, vocab]

Routed experts run through an `ExpertExecutor`; `load(..., experts=factory)` builds a
different one (the precision runtime does) from the lazily read checkpoint, so the
full-precision experts are never materialised when they are not wanted.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, overload

import torch

from dynaexq.checkpoint import (
    Checkpoint,
    EmbeddedModelMissingError,
    UnsupportedDtypeError,
)
from dynaexq.generation import SamplingParams, generate_tokens, iter_generate
from dynaexq.model import CausalLM, causal_lm_class
from dynaexq.model.config import ModelConfig
from dynaexq.model.experts import ExpertExecutor, FullPrecisionExperts, RoutingHook
from dynaexq.tokenizer import Tokenizer

if TYPE_CHECKING:
    from dynaexq.runtime.graphs import BucketedGraphs

EMBEDDED_MODEL_DIR = Path(__file__).resolve().parent / "data" / "embedded"

ExpertsFactory = Callable[[Checkpoint, torch.dtype, torch.device], ExpertExecutor]

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
Prompt = str | Sequence[int]


def embedded_model_path() -> Path:
    """Where the embedded default model lives; raises if it is not there."""
    if not (EMBEDDED_MODEL_DIR / "config.json").is_file():
        raise EmbeddedModelMissingError(
            f"the embedded default model is missing: expected a Hugging Face checkpoint "
            f"(config.json, model.safetensors, tokenizer.json) in {EMBEDDED_MODEL_DIR}; "
            "pass a checkpoint path instead"
        )
    return EMBEDDED_MODEL_DIR


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {dev} requested but no CUDA device is available")
    return dev


def resolve_dtype(
    dtype: str | torch.dtype, config: ModelConfig, device: torch.device
) -> torch.dtype:
    """'auto' keeps the checkpoint's bfloat16/float32; float16 runs as float32 on the CPU."""
    if isinstance(dtype, torch.dtype):
        chosen = dtype
    elif dtype == "auto":
        saved = _DTYPES.get(str(config.torch_dtype), torch.float32)
        chosen = torch.float32 if saved == torch.float16 and device.type == "cpu" else saved
    elif dtype in _DTYPES:
        chosen = _DTYPES[dtype]
    else:
        raise UnsupportedDtypeError(
            f"dtype {dtype!r} is not supported; use one of auto, float32, bfloat16, float16"
        )
    if chosen not in (torch.float32, torch.bfloat16, torch.float16):
        raise UnsupportedDtypeError(f"dtype {chosen} is not supported for inference")
    if chosen == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UnsupportedDtypeError(f"{device} does not support bfloat16; use float16")
    return chosen


def build_model(
    checkpoint: Checkpoint,
    dtype: torch.dtype,
    device: torch.device,
    experts: ExpertsFactory | None = None,
) -> CausalLM:
    """The model (the architecture's decoder) with its non-expert weights read from the
    checkpoint, by name."""
    config = checkpoint.config
    with torch.device("meta"):  # no random init: every parameter comes from the checkpoint
        model = causal_lm_class(config)(config, experts=None)  # type: ignore[arg-type]
    # The non-expert weights first (small, and their errors show before the long part).
    # copy=True: a tensor read from the checkpoint may be a view of the mapped file, and
    # one such view would keep its whole shard mapped (and every page later touched in it
    # counted in our RSS) for the life of the model.
    state = {
        name: checkpoint.tensor(name, tuple(p.shape), dtype).to(device, copy=True)
        for name, p in model.named_parameters()
    }
    model.load_state_dict(state, strict=True, assign=True)
    factory = experts or FullPrecisionExperts.from_checkpoint
    model.runtime.experts = factory(checkpoint, dtype, device)
    model.rotary.to(device)  # its frequencies are computed on the CPU, even under meta
    return model.eval().requires_grad_(False)


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]
    prompt_token_ids: list[int]
    finish_reason: str  # "eos", "stop" or "length"


class Engine:
    """A loaded model with its tokenizer."""

    def __init__(
        self,
        checkpoint: Checkpoint,
        model: CausalLM,
        tokenizer: Tokenizer | None,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.checkpoint = checkpoint
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.dtype = dtype
        self._graphs: BucketedGraphs | None = None  # decode graphs (generate(cuda_graphs=))

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    @property
    def experts(self) -> ExpertExecutor:
        return self.model.runtime.experts

    @experts.setter
    def experts(self, executor: ExpertExecutor) -> None:
        self.model.runtime.experts = executor

    def add_routing_hook(self, hook: RoutingHook) -> Callable[[], None]:
        """Call hook(layer, expert_ids [T, k], router_probs [T, E]) on every MoE layer
        of every step; returns a function that removes it."""
        hooks = self.model.runtime.routing_hooks
        hooks.append(hook)
        return lambda: hooks.remove(hook) if hook in hooks else None

    @property
    def eos_token_ids(self) -> list[int]:
        """EOS ids from config.json, generation_config.json and the tokenizer, merged."""
        ids = list(self.config.eos_token_ids)
        gen = self.checkpoint.path / "generation_config.json"
        if gen.is_file():
            eos = json.loads(gen.read_text()).get("eos_token_id")
            ids += [int(i) for i in (eos if isinstance(eos, list) else [eos]) if i is not None]
        if self.tokenizer is not None:
            ids += self.tokenizer.eos_token_ids
        return list(dict.fromkeys(ids))

    # -- forward -------------------------------------------------------------------------
    def forward(self, input_ids: torch.Tensor | Sequence[Sequence[int]]) -> torch.Tensor:
        """Logits [batch, tokens, vocab] (float32) for equal-length rows of token ids."""
        ids = torch.as_tensor(input_ids, dtype=torch.long)
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
        if ids.dim() != 2:
            raise ValueError(f"input_ids must be [batch, tokens], got shape {list(ids.shape)}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.config.vocab_size):
            raise ValueError(f"token ids must be in [0, {self.config.vocab_size})")
        with torch.inference_mode():
            return self.model(ids.to(self.device)).float()

    # -- generation ----------------------------------------------------------------------
    def _need_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise ValueError(
                f"{self.checkpoint.path} has no tokenizer.json: pass prompts as token ids"
            )
        return self.tokenizer

    def encode(self, prompt: Prompt, chat: bool = False) -> list[int]:
        if not isinstance(prompt, str):
            return [int(t) for t in prompt]
        tok = self._need_tokenizer()
        if chat:
            text = tok.apply_chat_template([{"role": "user", "content": prompt}])
            return tok.encode(text, add_special_tokens=False)
        return tok.encode(prompt)

    def decode(self, ids: list[int]) -> str:
        return self._need_tokenizer().decode(ids)

    def _params(self, **kw: object) -> SamplingParams:
        stop = kw.pop("stop", None)
        if isinstance(stop, str):
            stop = (stop,)
        return SamplingParams(stop=tuple(stop or ()), **kw)  # type: ignore[arg-type]

    def _text(self, ids: list[int], stop: Sequence[str]) -> str:
        if self.tokenizer is None:
            return ""
        text = self.tokenizer.decode(ids)
        cuts = [text.find(s) for s in stop if s in text]
        return text[: min(cuts)] if cuts else text

    @overload
    def generate(  # type: ignore[overload-overlap]
        self,
        prompts: str,
        max_new_tokens: int = ...,
        temperature: float = ...,
        top_k: int = ...,
        top_p: float = ...,
        seed: int | None = ...,
        stop: str | Sequence[str] | None = ...,
        ignore_eos: bool = ...,
        chat: bool = ...,
        cuda_graphs: bool = ...,
    ) -> GenerationResult: ...
    @overload
    def generate(
        self,
        prompts: Sequence[Prompt],
        max_new_tokens: int = ...,
        temperature: float = ...,
        top_k: int = ...,
        top_p: float = ...,
        seed: int | None = ...,
        stop: str | Sequence[str] | None = ...,
        ignore_eos: bool = ...,
        chat: bool = ...,
        cuda_graphs: bool = ...,
    ) -> list[GenerationResult]: ...

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        ignore_eos: bool = False,
        chat: bool = False,
        cuda_graphs: bool = False,
    ) -> GenerationResult | list[GenerationResult]:
        """Generate for one prompt (str) or a batch (list of str or of token-id lists).

        temperature 0 is greedy; top_k / top_p filter the sampled distribution; seed makes
        sampling reproducible (prompt i uses seed + i); generation of a sequence ends at
        EOS (unless ignore_eos), at a stop string (cut from the text) or after
        max_new_tokens. chat=True wraps each string prompt in the chat template.
        cuda_graphs=True (opt-in, not yet measured on a GPU): decode steps replay a CUDA
        graph per batch bucket (1, 2, 4, ... 32; `runtime.graphs`), captured on first use
        and kept by the engine; on an engine that cannot (no CUDA device, no budget) a
        warning says why and decoding stays eager.
        """
        single = isinstance(prompts, str)
        batch: list[Prompt] = [prompts] if isinstance(prompts, str) else list(prompts)  # type: ignore[arg-type]
        params = self._params(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            stop=stop,
            ignore_eos=ignore_eos,
        )
        encoded = [self.encode(p, chat) for p in batch]
        decode = self.tokenizer.decode if self.tokenizer is not None else None
        graphs = self._decode_graphs() if cuda_graphs else None
        outs = generate_tokens(self.model, encoded, params, self.eos_token_ids, decode, graphs)
        results = [
            GenerationResult(
                text=self._text(o.token_ids, params.stop),
                token_ids=o.token_ids,
                prompt_token_ids=o.prompt_token_ids,
                finish_reason=o.finish_reason or "length",
            )
            for o in outs
        ]
        return results[0] if single else results

    def _decode_graphs(self) -> BucketedGraphs | None:
        """The engine's bucketed decode graphs (made once), or None with a warning."""
        from dynaexq.runtime.graphs import BucketedGraphs, graphs_unavailable

        why = graphs_unavailable(self)
        if why is not None:
            warnings.warn(f"{why}; decoding eagerly", RuntimeWarning, stacklevel=3)
            return None
        if self._graphs is None:
            self._graphs = BucketedGraphs(self)
        return self._graphs

    def stream(
        self,
        prompt: Prompt,
        chat: bool = False,
        on_finish: Callable[[GenerationResult], None] | None = None,
        cuda_graphs: bool = False,
        **kw: object,
    ) -> Iterator[str]:
        """Yield the text of one generation piece by piece, as tokens are produced.

        Takes the same options as `generate`. Text that could still become a stop string,
        or an incomplete UTF-8 character, is held back until it is settled. `on_finish`
        receives the complete GenerationResult at the end.
        """
        tok = self._need_tokenizer()
        params = self._params(**kw)
        prompt_ids = self.encode(prompt, chat)
        ids: list[int] = []
        sent = 0
        hold = max((len(s) for s in params.stop), default=1) - 1
        graphs = self._decode_graphs() if cuda_graphs else None
        for events in iter_generate(
            self.model, [prompt_ids], params, self.eos_token_ids, tok.decode, graphs
        ):
            ev = events[0]
            ids.append(ev.token_id)
            if ev.finish_reason is not None:
                text = self._text(ids, params.stop)
                if len(text) > sent:
                    yield text[sent:]
                if on_finish is not None:
                    on_finish(GenerationResult(text, ids, prompt_ids, ev.finish_reason))
                return
            text = tok.decode(ids)
            ready = len(text) - hold
            while ready > sent and text[ready - 1] == "\ufffd":  # partial UTF-8 sequence
                ready -= 1
            if ready > sent:
                yield text[sent:ready]
                sent = ready


def load(
    path: str | Path | None = None,
    *,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device | None = None,
    experts: ExpertsFactory | None = None,
) -> Engine:
    """Load a Hugging Face Qwen3-MoE / Qwen2-MoE / Qwen3-Next checkpoint directory (default:
    the embedded model).

    dtype: "auto" (the checkpoint's, float16 -> float32 on CPU), "float32", "bfloat16" or
    "float16". device: default CUDA when available, else CPU. experts: a factory
    (checkpoint, dtype, device) -> ExpertExecutor replacing the full-precision experts.
    """
    ckpt_path = embedded_model_path() if path is None else Path(path)
    checkpoint = Checkpoint(ckpt_path)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, checkpoint.config, dev)
    model = build_model(checkpoint, dt, dev, experts)
    checkpoint.close()
    tokenizer = Tokenizer(ckpt_path) if (ckpt_path / "tokenizer.json").is_file() else None
    return Engine(checkpoint, model, tokenizer, dev, dt)
