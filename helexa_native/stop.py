"""Stop strings over a stream of text deltas.

Text that could still be the beginning of a stop string is held back until
the next deltas settle it, so a stop string is never emitted, even when it
arrives split across many tokens.
"""

from __future__ import annotations

from typing import Iterable, Optional


class StopMatcher:
    """Feed text deltas with `push`; emit what it returns; `flush` at the end."""

    def __init__(self, stops: Iterable[str] = ()):
        self.stops = [s for s in dict.fromkeys(stops) if s]
        self._held = ""
        self.stopped = False
        self.matched: Optional[str] = None  # the stop string that ended the text

    def push(self, delta: str) -> str:
        """Add a delta; return the text now safe to emit (empty once stopped)."""
        if self.stopped or not delta:
            return ""
        if not self.stops:
            return delta
        buf = self._held + delta
        hit, which = -1, None
        for s in self.stops:
            i = buf.find(s)
            if i >= 0 and (hit < 0 or i < hit):
                hit, which = i, s
        if hit >= 0:
            self.stopped, self.matched, self._held = True, which, ""
            return buf[:hit]
        keep = self._partial_suffix(buf)
        self._held = buf[len(buf) - keep :] if keep else ""
        return buf[: len(buf) - keep]

    def flush(self) -> str:
        """The held-back text, once the stream has ended without a stop."""
        out, self._held = ("" if self.stopped else self._held), ""
        return out

    @property
    def held(self) -> str:
        """Text currently held back."""
        return self._held

    def _partial_suffix(self, buf: str) -> int:
        return held_suffix_len(buf, self.stops)


def held_suffix_len(buf: str, markers: Iterable[str]) -> int:
    """Length of the longest suffix of buf that is a proper prefix of some marker.

    Nothing before that suffix can start a marker, so a stream may emit the
    rest and hold the suffix back until the next text settles it.
    """
    best = 0
    for s in markers:
        for n in range(min(len(s) - 1, len(buf)), best, -1):
            if buf.endswith(s[:n]):
                best = n
                break
    return best


def truncate_at_stop(text: str, stops: Iterable[str]):
    """Cut a finished text at its earliest stop string: returns (text, matched or None)."""
    m = StopMatcher(stops)
    out = m.push(text)
    return (out, m.matched) if m.stopped else (out + m.flush(), None)
