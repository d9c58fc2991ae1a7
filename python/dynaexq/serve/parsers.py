"""Chat output -> reasoning, content and tool calls (Qwen3 / Hermes format), incrementally.

Qwen3 writes its reasoning as `<think>...</think>` before the answer, and calls tools as

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

(one block per call; the Hermes format). `ChatOutputParser.feed(text)` takes the text as
it is generated and returns what can already be told apart; text that could still turn
out to be the start of a tag is held back until the next piece settles it. `finish()`
flushes the rest. The non-streaming response is the same parser run over the whole text,
so streaming and non-streaming answers agree.

A `<tool_call>` block whose body is not a JSON object with a string `name` is returned as
content, unchanged. A block cut short by the token limit is parsed if its JSON is complete.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
TOOL_OPEN, TOOL_CLOSE = "<tool_call>", "</tool_call>"


@dataclass(frozen=True)
class ParsedToolCall:
    index: int
    id: str
    name: str
    arguments: str  # JSON text

    def to_openai(self) -> dict[str, object]:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


@dataclass
class Delta:
    """One piece of parsed output: reasoning text, content text or a complete tool call."""

    reasoning: str = ""
    content: str = ""
    tool_calls: list[ParsedToolCall] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.reasoning or self.content or self.tool_calls)


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def parse_tool_call(body: str, index: int) -> ParsedToolCall | None:
    """The JSON body of one `<tool_call>` block, or None if it is not a call."""
    try:
        obj = json.loads(body)
    except ValueError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    arguments = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
    return ParsedToolCall(index, f"call_{uuid.uuid4().hex[:24]}", obj["name"], arguments)


class ChatOutputParser:
    """Splits generated chat text into reasoning, content and tool calls.

    reasoning: look for a `<think>` block (`in_reasoning`: the prompt already opened one,
    so the output starts inside it). tools: look for `<tool_call>` blocks.
    """

    def __init__(self, *, reasoning: bool, tools: bool, in_reasoning: bool = False) -> None:
        self.tools = tools
        self._buf = ""
        self._state = "reasoning" if in_reasoning else ("start" if reasoning else "content")
        self._calls = 0
        self._after_think = False  # drop the whitespace that follows </think>
        self._pending_space = ""  # whitespace held until something else follows

    @property
    def tool_calls_seen(self) -> int:
        return self._calls

    def feed(self, text: str) -> Delta:
        self._buf += text
        out = Delta()
        while True:
            progressed = self._step(out, final=False)
            if not progressed:
                return out

    def finish(self) -> Delta:
        out = Delta()
        while self._step(out, final=True):
            pass
        if self._pending_space and not self._calls:
            out.content += self._pending_space
        self._pending_space = ""
        return out

    # -- one transition; returns whether anything was consumed ------------------------------
    def _step(self, out: Delta, final: bool) -> bool:
        buf = self._buf
        if not buf:
            return False
        if self._state == "start":
            stripped = buf.lstrip()
            if stripped.startswith(THINK_OPEN):
                self._buf = stripped[len(THINK_OPEN) :]
                self._state = "reasoning"
                return True
            if not final and THINK_OPEN.startswith(stripped):
                return False  # maybe the start of <think>
            self._state = "content"
            return True
        if self._state == "reasoning":
            end = buf.find(THINK_CLOSE)
            if end >= 0:
                out.reasoning += buf[:end]
                self._buf = buf[end + len(THINK_CLOSE) :]
                self._state, self._after_think = "content", True
                return True
            keep = 0 if final else _partial_suffix(buf, THINK_CLOSE)
            out.reasoning += buf[: len(buf) - keep]
            self._buf = buf[len(buf) - keep :]
            return False
        if self._state == "content":
            if self._after_think:
                buf = buf.lstrip()
                self._buf = buf
                if not buf:
                    return False
                self._after_think = False
            start = buf.find(TOOL_OPEN) if self.tools else -1
            if start >= 0:
                self._emit_content(out, buf[:start], final=True)
                self._buf = buf[start + len(TOOL_OPEN) :]
                self._state = "tool"
                return True
            keep = _partial_suffix(buf, TOOL_OPEN) if self.tools and not final else 0
            self._emit_content(out, buf[: len(buf) - keep], final=final)
            self._buf = buf[len(buf) - keep :]
            return False
        # inside a <tool_call> block
        end = buf.find(TOOL_CLOSE)
        if end < 0 and not final:
            return False
        body = buf[:end] if end >= 0 else buf
        call = parse_tool_call(body.strip(), self._calls)
        if call is not None:
            self._pending_space = ""
            out.tool_calls.append(call)
            self._calls += 1
        else:
            raw = TOOL_OPEN + body + (TOOL_CLOSE if end >= 0 else "")
            self._emit_content(out, raw, final=True)
        self._buf = buf[end + len(TOOL_CLOSE) :] if end >= 0 else ""
        self._state = "content"
        return True

    def _emit_content(self, out: Delta, text: str, final: bool) -> None:
        """Content, holding back whitespace (between or around tool calls it is dropped)."""
        if not text:
            return
        text = self._pending_space + text
        self._pending_space = ""
        if self.tools:
            body = text.rstrip()
            self._pending_space = text[len(body) :]
            text = body
            if self._calls and not text.strip():
                return
        out.content += text
