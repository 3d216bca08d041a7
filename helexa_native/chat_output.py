"""A chat answer's text as OpenAI message fields: reasoning, content and tool calls, whole or as deltas.

The reasoning parser runs first (reasoning.py): what it calls reasoning goes
to ``reasoning_content``; its content deltas go through the tool-call parser
(tool_calls.py) when the request offered tools, which splits them into
``content`` and ``tool_calls``. `ChatOutputParser.feed` takes each text delta
with the number of tokens it came from and returns OpenAI ``delta`` dicts;
`finish` releases what the parsers held. It also counts reasoning tokens:
the tokens whose text arrived while the answer was still inside its
reasoning (the token that closes it included).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from .reasoning import ReasoningStreamParser
from .tool_calls import ToolCallStreamParser, assemble_deltas


@dataclass
class ChatMessage:
    """An assistant message assembled from deltas."""

    content: Optional[str] = None
    reasoning_content: Optional[str] = None
    tool_calls: List[dict] = field(default_factory=list)


class ChatOutputParser:
    """Reasoning first, then tool calls, over a stream of text deltas.

    reasoning: a reasoning parser name ("think") or None. start_in_reasoning:
    the prompt already opened the reasoning block (reasoning.prompt_opens_reasoning).
    tool_parser: a tool-call parser name, or None when the request offered no tools.
    """

    def __init__(
        self, reasoning: Optional[str] = None, start_in_reasoning: bool = False, tool_parser: Optional[str] = None
    ) -> None:
        self._reasoning = ReasoningStreamParser(start_in_reasoning) if reasoning else None
        self._tools = ToolCallStreamParser(tool_parser) if tool_parser else None
        self.reasoning_tokens = 0
        self._pending = 0  # tokens read before it is known whether the answer reasons

    def feed(self, text: str, n_tokens: int = 0) -> List[dict]:
        """The deltas a piece of output (from n_tokens tokens) completes."""
        r = self._reasoning
        if r is None:
            return self._content([{"content": text}] if text else [])
        if r.in_reasoning:
            self._pending += n_tokens
        deltas = r.feed(text)
        self._count(final=False)
        return self._route(deltas)

    def finish(self) -> List[dict]:
        """The deltas held back until the end of the output."""
        out = []
        if self._reasoning is not None:
            out = self._route(self._reasoning.finish())
            self._count(final=True)
        if self._tools is not None:
            out += self._tools.finish()
        return out

    def _count(self, final: bool) -> None:
        r = self._reasoning
        if r.saw_reasoning:
            self.reasoning_tokens += self._pending
            self._pending = 0
        elif final or not r.in_reasoning:
            self._pending = 0

    @property
    def tool_call_count(self) -> int:
        """Tool calls found so far."""
        return self._tools.tool_call_count if self._tools is not None else 0

    def _route(self, deltas: List[dict]) -> List[dict]:
        out = []
        for d in deltas:
            if "reasoning_content" in d:
                out.append(d)
            else:
                out += self._content([d])
        return out

    def _content(self, deltas: List[dict]) -> List[dict]:
        if self._tools is None:
            return deltas
        out = []
        for d in deltas:
            out += self._tools.feed(d["content"])
        return out


def assemble_message(deltas) -> ChatMessage:
    """Accumulate deltas into one assistant message, as an OpenAI client does."""
    reasoning = "".join(d.get("reasoning_content", "") for d in deltas)
    rest = [d for d in deltas if "reasoning_content" not in d]
    merged = assemble_deltas(rest)
    return ChatMessage(content=merged.content, reasoning_content=reasoning or None, tool_calls=merged.tool_calls)
