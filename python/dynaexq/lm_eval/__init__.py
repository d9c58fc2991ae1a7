"""lm-evaluation-harness model `dynaexq`: score tasks through the engine, in process.

    dynaexq lm-eval --model_args budget=20%,policy=dynamic --tasks hellaswag
    python -m dynaexq.lm_eval --model dynaexq --model_args budget=20% --tasks ...

(lm-eval has no plugin hook, so its own `lm_eval` command does not know the model name;
these two import this module, which registers it, and then run lm-eval's command line.)
From Python: `import dynaexq.lm_eval` and then `lm_eval.simple_evaluate(model="dynaexq",
model_args="budget=20%,policy=dynamic", ...)`.

Requests run through the server's continuous-batching scheduler (`dynaexq.serve`) without
a server: up to `batch_size` sequences at once, prompts prefilled in chunks.
`loglikelihood` and `loglikelihood_rolling` read the prompt log-probabilities the prefill
computes (what `echo` returns over HTTP), `generate_until` generates with stop strings,
so scores equal those of `lm_eval --model local-completions` against `dynaexq serve`.

model_args: pretrained (a checkpoint directory; default the embedded model), budget
("6GiB", "20%", ...), policy (full, static, static-map, dynamic, offload; default dynamic
with a budget, else full), tiers, dtype, device, batch_size, max_length (context tokens;
default min(model limit, 4096)), max_gen_toks (default 256), lockstep (default true:
expert copies publish at step boundaries, so a run is reproducible).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from dynaexq.serve.chat import end_of_turn_ids, render_chat
from dynaexq.serve.runtime import RuntimeSpec, build_runtime, check_policy
from dynaexq.serve.scheduler import Scheduler, SequenceSpec, TokenLogprob

__all__ = ["TASKS_DIR", "DynaexqLM"]

DEFAULT_CONTEXT = 4096
# Example tasks on the embedded model's held-out text (`--include_path TASKS_DIR`):
# dynaexq_heldout (perplexity, Python / C / prose), dynaexq_next_line_mc (multiple
# choice), dynaexq_next_line (generate_until).
TASKS_DIR = Path(__file__).resolve().parent / "tasks"


def _flag(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() not in ("0", "false", "no", "off", "")
    return bool(value)


@dataclass
class _Result:
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None


@register_model("dynaexq")
class DynaexqLM(TemplateLM):
    """lm-eval's model interface over a dynaexq engine (see the module docstring)."""

    def __init__(
        self,
        pretrained: str | None = None,
        budget: str | int | None = None,
        policy: str | None = None,
        tiers: str | None = None,
        dtype: str = "auto",
        device: str | None = None,
        batch_size: int | str = 8,
        max_batch_size: int | None = None,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        lockstep: bool | str = True,
        engine: Any = None,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if str(batch_size).startswith("auto"):
            batch_size = max_batch_size or 8
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        self.max_gen_toks = int(max_gen_toks)
        if engine is None:
            from pathlib import Path

            from dynaexq.engine import embedded_model_path
            from dynaexq.model.config import ModelConfig

            policy = policy or ("dynamic" if budget is not None else "full")
            check_policy(policy)
            # lm-eval's command line always passes a device (cuda by default): keep it
            # only where it can run (the precision runtime executes on the CPU here).
            if device is not None and str(device).startswith("cuda"):
                import torch

                if policy != "full" or not torch.cuda.is_available():
                    device = None
            ckpt = embedded_model_path() if pretrained is None else Path(pretrained)
            limit = ModelConfig.from_file(ckpt / "config.json").max_position_embeddings
            context = min(int(max_length or min(limit, DEFAULT_CONTEXT)), limit)
            engine, _ = build_runtime(
                RuntimeSpec(
                    pretrained,
                    policy,
                    budget,
                    dtype,
                    device,
                    batch=self.batch_size,
                    context=context,
                    tiers=tiers,
                    lockstep=_flag(lockstep),
                )
            )
        self.engine = engine
        if engine.tokenizer is None:
            raise ValueError(f"{engine.checkpoint.path} has no tokenizer.json")
        self.tokenizer = engine.tokenizer
        self._scheduler = Scheduler(
            engine,
            max_batch=self.batch_size,
            max_queue=1 << 30,
            # the KV cache is reserved for batch_size x this many tokens
            max_context=min(
                int(max_length or DEFAULT_CONTEXT), engine.config.max_position_embeddings
            ),
        )
        self._scheduler.start()
        self._eos = frozenset(engine.eos_token_ids)
        self._chat_eos = self._eos | end_of_turn_ids(self.tokenizer)
        self._chat = False  # set once lm-eval applies the chat template

    # -- what lm-eval asks of a model ----------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        ids = self.engine.eos_token_ids
        if not ids:
            raise ValueError("the model has no end-of-sequence token")
        return int(ids[0])

    @property
    def max_length(self) -> int:
        return self._scheduler.max_context

    @property
    def tokenizer_name(self) -> str:
        return str(self.engine.checkpoint.path).replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return self.tokenizer.chat_template or ""

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        self._chat = True
        return render_chat(self.tokenizer, chat_history)

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, **kwargs: Any
    ) -> list[int]:
        # Chat-templated text carries its special tokens as text: add none (as the server).
        add = (not self._chat) if add_special_tokens is None else add_special_tokens
        return self.tokenizer.encode(string, add_special_tokens=add)

    def tok_decode(self, tokens: list[int], **kwargs: Any) -> str:
        return self.tokenizer.decode(tokens)

    def _loglikelihood_tokens(
        self,
        requests: list[tuple[tuple[str | None, str | None], list[int], list[int]]],
        **kwargs: Any,
    ) -> list[tuple[float, bool]]:
        specs, lengths = [], []
        for _, context, continuation in requests:
            if not continuation:
                raise ValueError("loglikelihood: an empty continuation has no score")
            ids = (list(context) + list(continuation))[-self.max_length :]
            n = min(len(continuation), len(ids) - 1)  # a window keeps >= 1 token of context
            specs.append(SequenceSpec(tuple(ids), 0, prompt_logprobs=1))
            lengths.append(n)
        out = []
        for res, n in zip(self._run(specs), lengths, strict=True):
            assert res.prompt_logprobs is not None
            scored = [e for e in res.prompt_logprobs[-n:] if e is not None]
            total = sum(e.logprob for e in scored)
            greedy = all(e.top and e.top[0][0] == e.token_id for e in scored)
            out.append((total, greedy))
        return out

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """The log-likelihood of whole texts, in disjoint windows of the context length
        (each conditioned on the tokens before it, as lm-eval's HF model does)."""
        windows: list[tuple[tuple[str | None, str | None], list[int], list[int]]] = []
        owner: list[int] = []
        for i, req in enumerate(requests):
            (text,) = req.args
            for w in map(
                make_disjoint_window,
                get_rolling_token_windows(
                    token_list=self.tok_encode(text),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            ):
                windows.append(((None, None), list(w[0]), list(w[1])))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (lp, _) in zip(owner, self._loglikelihood_tokens(windows), strict=True):
            totals[i] += lp
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        specs = []
        for req in requests:
            context, gen_kwargs = req.args
            kw = dict(gen_kwargs or {})
            until = kw.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kw.pop("max_gen_toks", kw.pop("max_tokens", self.max_gen_toks)))
            do_sample = _flag(kw.pop("do_sample", False))
            temperature = float(kw.pop("temperature", 0.0)) if do_sample else 0.0
            if do_sample and temperature == 0.0:
                temperature = 1.0
            ids = self.tok_encode(context)
            max_new = max(1, min(max_new, self.max_length - 1))
            ids = ids[-(self.max_length - max_new) :]
            specs.append(
                SequenceSpec(
                    tuple(ids),
                    max_new,
                    temperature=temperature,
                    top_p=float(kw.pop("top_p", 1.0)),
                    top_k=int(kw.pop("top_k", 0)),
                    seed=kw.pop("seed", None),
                    stop=tuple(s for s in until if s),
                    eos_ids=self._chat_eos if self._chat else self._eos,
                )
            )
        texts = [r.text for r in self._run(specs)]
        for req, text in zip(requests, texts, strict=True):
            self.cache_hook.add_partial("generate_until", req.args, text)
        return texts

    # -- the scheduler, driven from a private event loop ----------------------------------
    def _run(self, specs: list[SequenceSpec]) -> list[_Result]:
        async def one(spec: SequenceSpec) -> _Result:
            handle = self._scheduler.submit([spec])
            res = _Result()
            while res.finish_reason is None:
                ev = await handle.events.get()
                if isinstance(ev, BaseException):
                    raise ev
                res.token_ids += ev.token_ids
                res.text += ev.text
                if ev.prompt_logprobs is not None:
                    res.prompt_logprobs = ev.prompt_logprobs
                res.finish_reason = ev.finish_reason
            return res

        async def main() -> list[_Result]:
            return list(await asyncio.gather(*(one(s) for s in specs)))

        return asyncio.run(main()) if specs else []

    def close(self) -> None:
        self._scheduler.stop(drain=False, timeout=30)
