"""Tokenizer from a Hugging Face checkpoint directory, through the `tokenizers` library.

`tokenizer.json` is required. `tokenizer_config.json` (optional) supplies the special
tokens and the chat template; `transformers` 5.x may instead save the template as
`chat_template.jinja`, which is read too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as _HFTokenizer

from dynaexq.checkpoint import CheckpointError, CheckpointFileNotFoundError


def _token_text(value: Any) -> str | None:
    """Special tokens are saved either as a string or as {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


class Tokenizer:
    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        file = path / "tokenizer.json"
        if not file.is_file():
            raise CheckpointFileNotFoundError(f"{file}: tokenizer.json not found")
        try:
            self._tok = _HFTokenizer.from_file(str(file))
        except Exception as e:
            raise CheckpointError(f"{file}: cannot load tokenizer ({e})") from None
        cfg_file = path / "tokenizer_config.json"
        self.config: dict[str, Any] = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
        self.chat_template: str | None = self._find_chat_template(path)
        self.eos_token = _token_text(self.config.get("eos_token"))
        self.bos_token = _token_text(self.config.get("bos_token"))
        self.pad_token = _token_text(self.config.get("pad_token"))

    def _find_chat_template(self, path: Path) -> str | None:
        template = self.config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        if not template and (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text()
        return template or None

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size(with_added_tokens=True))

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    @property
    def eos_token_ids(self) -> list[int]:
        ids = [self._tok.token_to_id(self.eos_token)] if self.eos_token else []
        return [i for i in ids if i is not None]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return str(self._tok.decode(ids, skip_special_tokens=skip_special_tokens))

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        **variables: Any,
    ) -> str:
        """Render messages ([{"role": ..., "content": ...}]) with the checkpoint's template."""
        if self.chat_template is None:
            raise CheckpointError("this tokenizer has no chat template (tokenizer_config.json)")
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise jinja2.exceptions.TemplateError(message)

        def tojson(value: Any, indent: int | None = None, **_: Any) -> str:
            return json.dumps(value, ensure_ascii=False, indent=indent)

        def strftime_now(fmt: str) -> str:
            import datetime

            return datetime.datetime.now().strftime(fmt)

        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = strftime_now
        return env.from_string(self.chat_template).render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
            **variables,
        )
