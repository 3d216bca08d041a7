"""What the incremental parsers of model output text share (reasoning.py, tool_calls.py).

`DeltaParser` is their feed/finish frame: text deltas accumulate in `_buf`,
the parser's `_run(final)` consumes what it can settle, and `_take()` returns
the delta dicts completed so far. `TrimmedField` streams one delta field's
text with its surrounding whitespace removed. Text that may be the start of a
marker is held back with `stop.held_suffix_len`.
"""

from __future__ import annotations

from typing import List


class DeltaParser:
    """Incremental parser frame: `feed` text deltas, then `finish`; both return delta dicts.

    Subclasses give `_run(final)` (advance over `_buf`; `final` once no more
    text comes) and `_take()` (the deltas completed since the last call).
    """

    def __init__(self) -> None:
        self._buf = ""
        self._finished = False

    def feed(self, text: str) -> List[dict]:
        """Take the next piece of output text; return the deltas it completes."""
        if self._finished:
            raise RuntimeError("feed() after finish()")
        if text:
            self._buf += text
            self._run(final=False)
        return self._take()

    def finish(self) -> List[dict]:
        """End of output: release (or resolve) everything held; return the last deltas."""
        if not self._finished:
            self._run(final=True)
            self._finished = True
        return self._take()

    def _run(self, final: bool) -> None:
        raise NotImplementedError

    def _take(self) -> List[dict]:
        raise NotImplementedError


class TrimmedField:
    """One delta field's text as a stream, without leading or trailing whitespace.

    `add` appends ``{key: text}`` deltas to `out`: whitespace before the
    first other character is dropped, and whitespace is held back until more
    text follows it, so none ends the field.
    """

    def __init__(self, out: list, key: str) -> None:
        self._out = out
        self._key = key
        self.started = False  # text other than whitespace was emitted
        self._ws = ""  # whitespace held until more text follows

    def add(self, text: str) -> None:
        if not text:
            return
        if not self.started:
            text = text.lstrip()
            if not text:
                return
            self.started = True
        body = text.rstrip()
        if body:
            self._out.append({self._key: self._ws + body})
            self._ws = text[len(body) :]
        else:
            self._ws += text
