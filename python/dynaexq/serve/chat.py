"""Chat messages -> prompt text.

The checkpoint's own template (tokenizer_config.json `chat_template`, or
chat_template.jinja) is used when present. Otherwise the documented default is ChatML, the
format of the Qwen family:

    <|im_start|>system\\n{content}<|im_end|>\\n       (one block per message, in order)
    <|im_start|>assistant\\n                          (the generation prompt)

With either template, generation also stops at the `<|im_end|>` token when the vocabulary
has one (Qwen models end a turn with it).
"""

from __future__ import annotations

from typing import Any

from dynaexq.tokenizer import Tokenizer

END_OF_TURN = "<|im_end|>"


def default_chat_template(messages: list[dict[str, Any]]) -> str:
    parts = [f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages]
    return "".join(parts) + "<|im_start|>assistant\n"


def render_chat(tokenizer: Tokenizer, messages: list[dict[str, Any]]) -> str:
    """Raises ValueError (a client error) when the template rejects the conversation."""
    if tokenizer.chat_template is None:
        return default_chat_template(messages)
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    except Exception as e:  # jinja2 TemplateError, raise_exception(...) in the template
        raise ValueError(f"messages: the chat template rejected them ({e})") from None


def end_of_turn_ids(tokenizer: Tokenizer) -> set[int]:
    tid = tokenizer.token_to_id(END_OF_TURN)
    return set() if tid is None else {tid}
