"""Incremental detokenization: the text of a growing sequence of token ids, a piece per token.

Decoding the whole sequence after every new token costs O(n) per token (O(n^2) for a
generation). The `tokenizers` library's `DecodeStream` keeps a small window of ids and
yields only the new text, holding back a token whose bytes are an incomplete UTF-8
character until the character is complete.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tokenizers.decoders import DecodeStream

if TYPE_CHECKING:
    from dynaexq.tokenizer import Tokenizer


def backend_of(tokenizer: Tokenizer) -> Any:
    """The `tokenizers.Tokenizer` behind dynaexq's `Tokenizer`."""
    backend = getattr(tokenizer, "backend", None) or getattr(tokenizer, "_tok", None)
    if backend is None:
        raise TypeError(f"{type(tokenizer).__name__} does not expose a `tokenizers` backend")
    return backend


class IncrementalDetokenizer:
    """`step(id)` returns the text that token adds (\"\" while a character is incomplete);
    `text` is everything so far. Special tokens are skipped, as `Tokenizer.decode` does."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self._backend = backend_of(tokenizer)
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        self.text = ""

    def step(self, token_id: int) -> str:
        piece = self._stream.step(self._backend, token_id) or ""
        self.text += piece
        return piece


class OffsetTracker:
    """Character offset of each token in a text decoded token by token (plus `start`):
    where the text it adds begins (a token that only starts a multi-byte character gets
    the offset of that character)."""

    def __init__(self, tokenizer: Tokenizer, start: int = 0, skip_special_tokens: bool = True):
        self._detok = IncrementalDetokenizer(tokenizer, skip_special_tokens)
        self.start = start

    def offsets(self, ids: list[int]) -> list[int]:
        out = []
        for t in ids:
            out.append(self.start + len(self._detok.text))
            self._detok.step(t)
        return out
