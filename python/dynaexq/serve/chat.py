"""Chat messages -> prompt text.

The checkpoint's own template (tokenizer_config.json `chat_template`, or
chat_template.jinja) is used when present. Otherwise the documented default is ChatML, the
format of the Qwen family:

    <|im_start|>system\\n{content}<|im_end|>\\n       (one block per message, in order)
    <|im_start|>assistant\\n                          (the generation prompt)

With either template, generation also stops at the `<|im_end|>` token when the vocabulary
has one (Qwen models end a turn with it).

Tools (`tools=[{"type": "function", "function": {...}}]`) and template variables such as
Qwen3's `enable_thinking` are passed to the checkpoint's template, which renders them its
own way; a template that never mentions `tools` cannot show them to the model, so a
request with tools is refused there rather than silently answered without them.
"""

from __future__ import annotations

from typing import Any

from dynaexq.tokenizer import Tokenizer

END_OF_TURN = "<|im_end|>"


def default_chat_template(messages: list[dict[str, Any]]) -> str:
    parts = [f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages]
    return "".join(parts) + "<|im_start|>assistant\n"


def render_chat(
    tokenizer: Tokenizer,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None = None,
    template_kwargs: dict[str, Any] | None = None,
) -> str:
    """Raises ValueError (a client error) when the template rejects the conversation."""
    template = tokenizer.chat_template
    if tools and (template is None or "tools" not in template):
        raise ValueError("tools: this model's chat template does not render tools")
    if template is None:
        return default_chat_template(messages)
    variables = dict(template_kwargs or {})
    variables.pop("messages", None)
    variables.pop("add_generation_prompt", None)
    if tools:
        variables["tools"] = tools
    try:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, **variables)
    except Exception as e:  # jinja2 TemplateError, raise_exception(...) in the template
        raise ValueError(f"messages: the chat template rejected them ({e})") from None


def thinks(tokenizer: Tokenizer) -> bool:
    """Whether the model writes Qwen3-style `<think>` reasoning (its template knows it)."""
    return "<think>" in (tokenizer.chat_template or "")


def end_of_turn_ids(tokenizer: Tokenizer) -> set[int]:
    tid = tokenizer.token_to_id(END_OF_TURN)
    return set() if tid is None else {tid}
