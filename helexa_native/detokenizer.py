"""Streaming token ids to text without ever splitting a UTF-8 character.

Each token contributes its exact bytes (`Tokenizer.token_bytes`); an
incremental UTF-8 decoder emits every completed character and holds the bytes
of an incomplete one until the rest arrive. Invalid bytes become U+FFFD just
as `Tokenizer.decode` turns them, and the one leading space a SentencePiece
encoder adds is dropped from the start of the stream, so the concatenation of
all `push` results and `flush()` equals `tokenizer.decode(all_ids)`. The work
per token is constant: no window of earlier tokens is decoded again.
"""

from __future__ import annotations

import codecs


class IncrementalDetokenizer:
    """Turns a stream of token ids into text deltas."""

    def __init__(self, tokenizer, skip_special_tokens: bool = False, keep_leading_space: bool = False) -> None:
        """keep_leading_space: the stream continues earlier text (a completion), so a
        SentencePiece word-boundary space at its start is real text, not an artefact."""
        self._tok = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._strip = bool(getattr(tokenizer, "strip_leading_space", False)) and not keep_leading_space
        self._started = False  # some text has been emitted
        self._ids: list[int] = []
        self._text_len = 0

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes ("" while a character is partial)."""
        token_id = int(token_id)
        data = self._tok.token_bytes(token_id)  # validates the id before any state changes
        self._ids.append(token_id)
        if self.skip_special_tokens and self._tok.is_special(token_id):
            return ""
        return self._emit(self._decoder.decode(data))

    def push_many(self, token_ids) -> str:
        """Add several tokens; return the text they complete."""
        return "".join(self.push(t) for t in token_ids)

    def flush(self) -> str:
        """End of stream: bytes of a never-completed character come out as U+FFFD."""
        text = self._emit(self._decoder.decode(b"", final=True))
        self._decoder.reset()
        return text

    def _emit(self, text: str) -> str:
        if text and not self._started:
            self._started = True
            if self._strip and text.startswith(" "):
                text = text[1:]
        self._text_len += len(text)
        return text

    @property
    def pending_bytes(self) -> bytes:
        """Bytes held back because they end in an incomplete character."""
        return self._decoder.getstate()[0]

    @property
    def token_ids(self) -> list[int]:
        """Every id pushed so far."""
        return list(self._ids)

    @property
    def text_length(self) -> int:
        """Characters emitted so far."""
        return self._text_len
