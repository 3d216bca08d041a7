"""Reasoning (``<think>...</think>``) split from the answer in model output.

Qwen3 in thinking mode writes ``<think>\\n...\\n</think>\\n\\nanswer``. R1-style
distills (DeepSeek-R1-Distill, QwQ) have a template that already opened
``<think>`` in the prompt, so their output starts inside the reasoning and only
``</think>`` appears; `prompt_opens_reasoning` tells the two apart from the
rendered prompt, and `ReasoningStreamParser(start_in_reasoning=...)` takes the
answer. The result is OpenAI-compatible as vLLM and DeepSeek's API shape it:
``reasoning_content`` beside ``content``.

`parse_reasoning` splits a finished output; `ReasoningStreamParser` does the
same incrementally (``feed`` text deltas, then ``finish``), returning delta
dicts ``{"reasoning_content": ...}`` or ``{"content": ...}``. Text that may be
the start of a tag is held back until it is known, so tags never reach either
field, and `parse_reasoning` is the stream parser fed the whole text, so the
deltas of any split add up to the same result.

Rules and limits:

* Only a ``<think>`` at the start of the output (after whitespace) opens
  reasoning; one later in the text is content. When the output starts inside
  the reasoning, a repeated ``<think>`` at its start is dropped.
* Reasoning is stripped of surrounding whitespace; the content that follows
  ``</think>`` loses its leading whitespace. An output without reasoning is
  content unchanged. Empty fields are None.
* Reasoning that never closes (the output was cut off, or the model never
  wrote ``</think>``) is all reasoning, and content is None.
* Tags that are special tokens only reach the text when the output is decoded
  with ``skip_special_tokens=False`` (Qwen3's and R1's are ordinary added tokens).
* Tool calls inside the reasoning are not looked for: run the tool-call parser
  on the content deltas only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

from .stop import held_suffix_len
from .text_stream import DeltaParser, TrimmedField

REASONING_PARSERS = ("think",)
OPEN_TAG = "<think>"
CLOSE_TAG = "</think>"


def detect_reasoning(chat_template: Optional[str]) -> Optional[str]:
    """The reasoning parser a chat template's model needs ("think"), or None."""
    if chat_template and (OPEN_TAG in chat_template or CLOSE_TAG in chat_template):
        return "think"
    return None


def prompt_opens_reasoning(prompt: str) -> bool:
    """True when the rendered prompt ends inside an open ``<think>`` (R1-style templates)."""
    return prompt.rfind(OPEN_TAG) > prompt.rfind(CLOSE_TAG)


@dataclass
class ReasoningResult:
    """A split output: the reasoning and the answer."""

    reasoning_content: Optional[str]
    content: Optional[str]


def parse_reasoning(text: str, start_in_reasoning: bool = False) -> ReasoningResult:
    """Split a finished output into reasoning_content and content."""
    p = ReasoningStreamParser(start_in_reasoning)
    deltas = p.feed(text)
    deltas += p.finish()
    return assemble_reasoning(deltas)


def assemble_reasoning(deltas) -> ReasoningResult:
    """Join stream deltas into one result."""
    reasoning = "".join(d.get("reasoning_content", "") for d in deltas)
    content = "".join(d.get("content", "") for d in deltas)
    return ReasoningResult(reasoning or None, content or None)


class ReasoningStreamParser(DeltaParser):
    """Incremental reasoning splitter: `feed` text deltas, then `finish`; both return deltas."""

    def __init__(self, start_in_reasoning: bool = False) -> None:
        super().__init__()
        self._out: list = []
        self._state = "reasoning" if start_in_reasoning else "start"
        self._reasoning = TrimmedField(self._out, "reasoning_content")
        self._may_reopen = bool(start_in_reasoning)
        self._opened = bool(start_in_reasoning)
        self._c_started = False  # content after </think> began

    @property
    def in_reasoning(self) -> bool:
        """True while the text being received is reasoning (or may still be)."""
        return self._state in ("start", "reasoning")

    @property
    def saw_reasoning(self) -> bool:
        """True once the output is known to open with reasoning (its prompt opened it, or ``<think>``)."""
        return self._opened

    def _take(self) -> List[dict]:
        merged: list = []
        for d in self._out:
            if merged and merged[-1].keys() == d.keys():
                key = next(iter(d))
                merged[-1] = {key: merged[-1][key] + d[key]}
            else:
                merged.append(d)
        self._out.clear()
        return merged

    def _run(self, final: bool) -> None:
        while self._buf and getattr(self, "_st_" + self._state)(final):
            pass

    def _st_start(self, final: bool) -> bool:
        buf = self._buf
        s = buf.lstrip()
        if s.startswith(OPEN_TAG):
            self._buf = s[len(OPEN_TAG) :]
            self._state = "reasoning"
            self._opened = True
            return True
        if not final and OPEN_TAG.startswith(s):
            return False
        self._state = "content"
        return True

    def _st_reasoning(self, final: bool) -> bool:
        buf = self._buf
        if self._may_reopen and not self._reasoning.started:
            s = buf.lstrip()
            if s.startswith(OPEN_TAG):
                self._buf = buf = s[len(OPEN_TAG) :]
                self._may_reopen = False
            elif not final and OPEN_TAG.startswith(s):
                return False
            elif s:
                self._may_reopen = False
        i = buf.find(CLOSE_TAG)
        if i >= 0:
            self._reasoning.add(buf[:i])
            self._buf = buf[i + len(CLOSE_TAG) :]
            self._state = "after"
            return True
        hold = len(buf) if final else len(buf) - held_suffix_len(buf, (CLOSE_TAG,))
        self._reasoning.add(buf[:hold])
        self._buf = buf[hold:]
        return False

    def _st_after(self, final: bool) -> bool:
        s = self._buf.lstrip()
        self._buf = s
        if s:
            self._state = "content"
            return True
        return False

    def _st_content(self, final: bool) -> bool:
        self._out.append({"content": self._buf})
        self._buf = ""
        return False
