"""Structured output by constrained decoding, with xgrammar.

The checkpoint's vocabulary is handed to xgrammar once (`Grammars`); a request's
`response_format` (json_object, json_schema) or forced tool call (a named `tool_choice`,
or `required`) becomes a compiled grammar that the scheduler applies to every step as a
token mask (`SequenceSpec.grammar`). Compiled grammars are cached by xgrammar.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from dynaexq.serve.detokenize import backend_of

if TYPE_CHECKING:
    from dynaexq.tokenizer import Tokenizer


class GrammarError(ValueError):
    """The schema cannot be turned into a grammar (a client error)."""


# xgrammar 0.2.x lets a length-limited JSON string (maxLength / minLength) hold raw
# control characters, which JSON forbids unescaped: such strings get JSON's own class.
_LOOSE_CHAR = '[^\\"\\\\\\r\\n]'
_JSON_CHAR = '[^\\0-\\x1f\\"\\\\]'


def schema_grammar(schema: dict[str, Any]) -> Any:
    """The xgrammar Grammar of JSON text that validates against `schema`."""
    import xgrammar as xgr

    try:
        grammar = xgr.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False)
        text = str(grammar)
        if _LOOSE_CHAR in text:
            grammar = xgr.Grammar.from_ebnf(text.replace(_LOOSE_CHAR, _JSON_CHAR))
    except Exception as e:  # xgrammar raises RuntimeError/ValueError/its own errors
        # drop xgrammar's log prefix ("[10:04:38] /project/cpp/....cc:123: ")
        why = re.sub(r"^\[[0-9:]+\] \S+:\d+: ", "", str(e).strip().splitlines()[0])
        raise GrammarError(f"cannot use this JSON schema ({why})") from None
    return grammar


def _literal(text: str) -> str:
    """An EBNF string literal."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


class Grammars:
    """Builds and compiles grammars for one tokenizer (thread-safe, lazy)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, stop_ids: Iterable[int]) -> None:
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._stop_ids = sorted(set(stop_ids))
        self._compiler: Any = None
        self._lock = threading.Lock()

    def _get_compiler(self) -> Any:
        with self._lock:
            if self._compiler is None:
                import xgrammar as xgr

                backend = backend_of(self._tokenizer)
                vocab = [""] * self._vocab_size
                for text, i in backend.get_vocab(with_added_tokens=True).items():
                    if i < self._vocab_size:
                        vocab[i] = text
                meta = xgr.TokenizerInfo._detect_metadata_from_hf(backend.to_str())
                info = xgr.TokenizerInfo(
                    vocab,
                    xgr.VocabType(meta["vocab_type"]),
                    vocab_size=self._vocab_size,
                    stop_token_ids=self._stop_ids or None,
                    add_prefix_space=bool(meta["add_prefix_space"]),
                )
                self._compiler = xgr.GrammarCompiler(info, max_threads=1)
            return self._compiler

    def json_object(self) -> Any:
        """Any JSON object (OpenAI's json_object mode)."""
        return self.json_schema({"type": "object"})

    def json_schema(self, schema: dict[str, Any] | None) -> Any:
        if schema is None:  # json_schema without a schema: any JSON value
            return self._get_compiler().compile_builtin_json_grammar()
        try:
            grammar = schema_grammar(schema)
        except GrammarError as e:
            raise GrammarError(f"response_format: {e}") from None
        return self._get_compiler().compile_grammar(grammar)

    def tool_calls(self, tools: list[tuple[str, dict[str, Any] | None]]) -> Any:
        """One Hermes-format `<tool_call>` block calling one of `tools` (name, parameters
        schema) with arguments that follow its schema."""
        import xgrammar as xgr

        options = []
        for name, params in tools:
            call = {
                "type": "object",
                "properties": {
                    "name": {"const": name},
                    "arguments": params or {"type": "object"},
                },
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
            try:
                options.append(schema_grammar(call))
            except GrammarError as e:
                raise GrammarError(f"tools: the parameters of {name!r}: {e}") from None
        body = options[0] if len(options) == 1 else xgr.Grammar.union(*options)
        grammar = xgr.Grammar.concat(
            xgr.Grammar.from_ebnf(f"root ::= {_literal('<tool_call>' + chr(10))}"),
            body,
            xgr.Grammar.from_ebnf(f"root ::= {_literal(chr(10) + '</tool_call>')}"),
        )
        return self._get_compiler().compile_grammar(grammar)
