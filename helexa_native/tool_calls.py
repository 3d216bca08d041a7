"""Tool calls in model output text, turned into OpenAI `tool_calls`.

Three families of output format, named as vLLM names its parsers:

* ``hermes`` (Qwen2.5, Qwen3, Hermes): ``<tool_call>{"name": ..., "arguments":
  {...}}</tool_call>``, one block per call, text allowed around the blocks.
* ``llama3_json`` (Llama 3.1/3.2/3.3): ``{"name": ..., "parameters": {...}}``
  (``"arguments"`` and a leading ``"type": "function"`` accepted), either at
  the very start of the output or after ``<|python_tag|>``; several calls are
  separated by ``;``. A bare object counts as a call only when it holds both a
  name and its parameters, so a plain JSON answer stays content (held back
  until that is known).
* ``mistral``: ``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`` and the
  newer ``[TOOL_CALLS]name[ARGS]{...}`` (repeated per call; an optional
  ``[CALL_ID]...`` before ``[ARGS]`` is skipped).

`parse_tool_calls` splits a finished output into ``content`` and OpenAI tool
calls (``{"id": "call_...", "type": "function", "function": {"name", "arguments"}}``,
arguments as a JSON string exactly as the model wrote it). `ToolCallStreamParser`
does the same incrementally: fed text deltas, it returns OpenAI ``delta``
dicts, ``{"content": ...}`` or ``{"tool_calls": [...]}``; a call's first delta
carries index, id, type, name and the arguments so far, later ones carry
argument fragments. Text that may be the start of a marker is held back until
it is known, so tool markup never reaches content. `parse_tool_calls` is the
stream parser fed the whole text at once, and the parser decides only at
fixed points of the text, so the deltas of any split add up to the same result.

Rules and limits:

* Content is the text outside tool markup with leading and trailing whitespace
  removed (``None`` when nothing is left); whitespace between the markup and
  the JSON is part of the markup.
* A call is committed, and its first delta emitted, once its name is known and
  its arguments have begun (or, after an explicit marker, its object closed
  without arguments: ``"{}"``). Until then the marker and the text after it
  are held. If that text turns out not to be a call (not JSON, invalid JSON,
  no name) or the stream ends first, the marker and the held text fall back
  to content and the rest is scanned again, so a malformed call is returned as
  text, not lost.
* After commit the call is not taken back. If the JSON breaks later, or the
  output ends inside the arguments (``max_tokens``), the call keeps the
  arguments received so far, which may then be incomplete JSON, as OpenAI's
  own truncated calls are. The rest of that markup is dropped: up to
  ``</tool_call>`` for hermes, to the end of the output for the others.
* Strings inside JSON are strict: raw control characters are an error.
* Markers that are special tokens (``[TOOL_CALLS]``, ``<|python_tag|>``) only
  reach the text when the output is decoded with ``skip_special_tokens=False``.
* Mistral chat templates refuse tool-call ids that are not 9 alphanumeric
  characters, so the mistral parser makes ids of that shape; the others make
  ``call_`` plus 24 random characters.
"""

from __future__ import annotations

import json
import secrets
import string
from dataclasses import dataclass, field
from typing import Callable, List, Optional

from .stop import held_suffix_len
from .text_stream import DeltaParser, TrimmedField

PARSERS = ("hermes", "llama3_json", "mistral")
# The markup each format writes around calls (single special tokens in some vocabularies).
MARKERS = {
    "hermes": ("<tool_call>", "</tool_call>"),
    "llama3_json": ("<|python_tag|>",),
    "mistral": ("[TOOL_CALLS]", "[ARGS]", "[CALL_ID]"),
}

_ALNUM = string.ascii_letters + string.digits
_WS = " \t\n\r"


def new_tool_call_id() -> str:
    """A fresh OpenAI-style tool call id: ``call_`` plus 24 random alphanumerics."""
    return "call_" + "".join(secrets.choice(_ALNUM) for _ in range(24))


def new_mistral_tool_call_id() -> str:
    """A fresh tool call id as Mistral templates require: 9 random alphanumerics."""
    return "".join(secrets.choice(_ALNUM) for _ in range(9))


def detect_parser(chat_template: Optional[str]) -> Optional[str]:
    """The tool-call parser a chat template's model speaks, from the markers in its text, or None."""
    if not chat_template:
        return None
    if "[TOOL_CALLS]" in chat_template or "[AVAILABLE_TOOLS]" in chat_template:
        return "mistral"
    if "<tool_call>" in chat_template:
        return "hermes"
    if (
        "<|python_tag|>" in chat_template
        or "Environment: ipython" in chat_template
        or '"parameters": dictionary of argument name' in chat_template
    ):
        return "llama3_json"
    return None


def check_parser(name: str) -> str:
    """`name` if it is a known parser, else ValueError listing the known ones."""
    if name not in PARSERS:
        raise ValueError(f"unknown tool call parser {name!r} (known: {', '.join(PARSERS)})")
    return name


@dataclass
class ToolCallResult:
    """A parsed output: the remaining content and the OpenAI tool calls."""

    content: Optional[str]
    tool_calls: List[dict] = field(default_factory=list)


def parse_tool_calls(text: str, parser: str, id_factory: Optional[Callable[[], str]] = None) -> ToolCallResult:
    """Split a finished model output into content and OpenAI tool calls."""
    p = ToolCallStreamParser(parser, id_factory=id_factory)
    deltas = p.feed(text)
    deltas += p.finish()
    return assemble_deltas(deltas)


def assemble_deltas(deltas) -> ToolCallResult:
    """Accumulate stream deltas as an OpenAI client does into one result."""
    content = []
    calls: dict = {}
    for d in deltas:
        if d.get("content"):
            content.append(d["content"])
        for tc in d.get("tool_calls") or ():
            i = tc["index"]
            if i not in calls:
                calls[i] = {
                    "id": tc.get("id"),
                    "type": tc.get("type", "function"),
                    "function": {"name": tc["function"].get("name", ""), "arguments": ""},
                }
            calls[i]["function"]["arguments"] += tc["function"].get("arguments", "")
    text = "".join(content)
    return ToolCallResult(text or None, [calls[i] for i in sorted(calls)])


# ---- incremental strict JSON ---------------------------------------------

_ERR, _OK = 0, 1
_LITERALS = {"t": "rue", "f": "alse", "n": "ull"}
_NUM_END_OK = frozenset(("zero", "int", "frac", "exp"))


class _JsonScanner:
    """Validates one JSON object or array a character at a time.

    `push` returns _ERR at the first character that no valid JSON text could
    have there. Subclasses see the top-level object's keys and the spans of
    its values through `_on_key`, `_on_value_start` and `_on_value_end`
    (positions index the characters pushed so far).
    """

    def __init__(self) -> None:
        self.pos = -1
        self.done = False
        self._stack: list = []
        self._expect = "start"
        self._mode = None  # None, "str", "num", "lit"
        self._is_key = False
        self._esc = False
        self._hex = 0
        self._num = ""
        self._lit = ""
        self._key_start = 0

    def push(self, c: str) -> int:
        self.pos += 1
        if self.done:
            return _ERR
        mode = self._mode
        if mode == "str":
            if self._hex:
                if c in string.hexdigits:
                    self._hex -= 1
                    return _OK
                return _ERR
            if self._esc:
                self._esc = False
                if c in '"\\/bfnrt':
                    return _OK
                if c == "u":
                    self._hex = 4
                    return _OK
                return _ERR
            if c == "\\":
                self._esc = True
                return _OK
            if c == '"':
                self._mode = None
                if self._is_key:
                    self._expect = "colon"
                    if len(self._stack) == 1:
                        self._on_key(self._key_start, self.pos + 1)
                else:
                    self._end_value(self.pos + 1)
                return _OK
            return _OK if c >= " " else _ERR
        if mode == "lit":
            if c != self._lit[0]:
                return _ERR
            self._lit = self._lit[1:]
            if not self._lit:
                self._mode = None
                self._end_value(self.pos + 1)
            return _OK
        if mode == "num":
            nxt = self._number_step(self._num, c)
            if nxt is not None:
                self._num = nxt
                return _OK
            if self._num not in _NUM_END_OK:
                return _ERR
            self._mode = None
            self._end_value(self.pos)
        return self._structural(c)

    @staticmethod
    def _number_step(state: str, c: str) -> Optional[str]:
        digit = "0" <= c <= "9"
        if state == "minus":
            return ("zero" if c == "0" else "int") if digit else None
        if state in ("zero", "int"):
            if digit:
                return "int" if state == "int" else None
            return "dot" if c == "." else ("e" if c in "eE" else None)
        if state == "dot":
            return "frac" if digit else None
        if state == "frac":
            return "frac" if digit else ("e" if c in "eE" else None)
        if state == "e":
            return "exp" if digit else ("esign" if c in "+-" else None)
        if state in ("esign", "exp"):
            return "exp" if digit else None
        return None

    def _structural(self, c: str) -> int:
        if c in _WS:
            return _ERR if self._expect == "start" else _OK
        ex = self._expect
        if ex == "start":
            if c not in "{[":
                return _ERR
            return self._start_value(c)
        if ex in ("value", "value_or_close"):
            if c == "]" and ex == "value_or_close":
                return self._close()
            return self._start_value(c)
        if ex in ("key", "key_or_close"):
            if c == "}" and ex == "key_or_close":
                return self._close()
            if c != '"':
                return _ERR
            self._mode, self._is_key, self._key_start = "str", True, self.pos
            return _OK
        if ex == "colon":
            if c != ":":
                return _ERR
            self._expect = "value"
            return _OK
        if ex == "comma_or_close":
            top = self._stack[-1]
            if c == ",":
                self._expect = "key" if top == "o" else "value"
                return _OK
            if (c == "}" and top == "o") or (c == "]" and top == "a"):
                return self._close()
        return _ERR

    def _start_value(self, c: str) -> int:
        if not (c in '{["-' or "0" <= c <= "9" or c in _LITERALS):
            return _ERR
        if len(self._stack) == 1 and self._stack[0] == "o":
            self._on_value_start(self.pos)
        if c == "{":
            self._stack.append("o")
            self._expect = "key_or_close"
        elif c == "[":
            self._stack.append("a")
            self._expect = "value_or_close"
        elif c == '"':
            self._mode, self._is_key = "str", False
        elif c in _LITERALS:
            self._mode, self._lit = "lit", _LITERALS[c]
        else:
            self._mode = "num"
            self._num = "minus" if c == "-" else ("zero" if c == "0" else "int")
        return _OK

    def _close(self) -> int:
        self._stack.pop()
        self._end_value(self.pos + 1)
        return _OK

    def _end_value(self, end: int) -> None:
        if not self._stack:
            self.done = True
            self._expect = "end"
            return
        self._expect = "comma_or_close"
        if len(self._stack) == 1 and self._stack[0] == "o":
            self._on_value_end(end)

    def _on_key(self, start: int, end: int) -> None:
        pass

    def _on_value_start(self, pos: int) -> None:
        pass

    def _on_value_end(self, end: int) -> None:
        pass


_ARG_KEYS = ("arguments", "parameters")


class _CallObject(_JsonScanner):
    """One ``{"name": ..., "arguments": ...}`` object being read."""

    def __init__(self) -> None:
        super().__init__()
        self.raw: list = []
        self.name: Optional[str] = None
        self.bad_name = False
        self.args_start: Optional[int] = None
        self.args_end: Optional[int] = None
        self._key: Optional[str] = None
        self._value_start = 0
        self._seen: set = set()

    def push(self, c: str) -> int:
        self.raw.append(c)
        return super().push(c)

    def _on_key(self, start: int, end: int) -> None:
        self._key = json.loads("".join(self.raw[start:end]))

    def _on_value_start(self, pos: int) -> None:
        self._value_start = pos
        if self._key in _ARG_KEYS and "args" not in self._seen:
            self._seen.add("args")
            self.args_start = pos
            self._key = "<args>"

    def _on_value_end(self, end: int) -> None:
        key, self._key = self._key, None
        if key == "<args>":
            self.args_end = end
        elif key == "name" and "name" not in self._seen:
            self._seen.add("name")
            value = json.loads("".join(self.raw[self._value_start : end]))
            if isinstance(value, str) and value:
                self.name = value
            else:
                self.bad_name = True

    @property
    def args_is_string(self) -> bool:
        return self.args_start is not None and self.raw[self.args_start] == '"'

    def args_text(self) -> str:
        """The arguments as far as they are known (a decoded string value only once complete)."""
        if self.args_start is None:
            return ""
        end = self.args_end if self.args_end is not None else len(self.raw)
        if self.args_is_string:
            if self.args_end is None:
                return ""
            return json.loads("".join(self.raw[self.args_start : end]))
        return "".join(self.raw[self.args_start : end])


class _ValueScanner(_JsonScanner):
    """A JSON object or array kept as the text pushed so far."""

    def __init__(self) -> None:
        super().__init__()
        self.raw: list = []

    def push(self, c: str) -> int:
        self.raw.append(c)
        return super().push(c)


# ---- the stream parser --------------------------------------------------


_NAME_CHARS = frozenset(_ALNUM + "_-.:")


class ToolCallStreamParser(DeltaParser):
    """Incremental tool-call parser: `feed` text deltas, then `finish`; both return OpenAI deltas."""

    def __init__(self, parser: str, id_factory: Optional[Callable[[], str]] = None) -> None:
        super().__init__()
        self.parser = check_parser(parser)
        if id_factory is None:
            id_factory = new_mistral_tool_call_id if parser == "mistral" else new_tool_call_id
        self._new_id = id_factory
        self._out: list = []
        self._content = TrimmedField(self._out, "content")
        self._state = "text"
        self._at_start = parser == "llama3_json"  # a bare JSON call may open the output
        self._markers = {"hermes": ("<tool_call>",), "llama3_json": ("<|python_tag|>",), "mistral": ("[TOOL_CALLS]",)}[
            parser
        ]
        self._held = ""  # text of the uncommitted unit, returned to content on fallback
        self._held_head = 0  # length of its opening (marker or "{") given to content on fallback
        self._obj: Optional[_CallObject] = None
        self._val: Optional[_ValueScanner] = None
        self._bare = False
        self._index = -1  # index of the current committed call
        self._committed = False
        self._sent = 0  # argument characters already emitted for the current call
        self._name = ""
        self._array = False  # mistral: inside [TOOL_CALLS][ ... ]

    # ---- public -------------------------------------------------------

    @property
    def tool_call_count(self) -> int:
        """Calls committed so far."""
        return self._index + 1

    # ---- machinery ----------------------------------------------------

    def _take(self) -> List[dict]:
        merged: list = []
        for d in self._out:
            if merged and "content" in d and "content" in merged[-1]:
                merged[-1] = {"content": merged[-1]["content"] + d["content"]}
                continue
            if (
                merged
                and "tool_calls" in d
                and "tool_calls" in merged[-1]
                and set(d["tool_calls"][0]) == {"index", "function"}
                and merged[-1]["tool_calls"][0]["index"] == d["tool_calls"][0]["index"]
            ):
                prev = merged[-1]["tool_calls"][0]
                fn = dict(prev["function"])
                fn["arguments"] = fn.get("arguments", "") + d["tool_calls"][0]["function"]["arguments"]
                merged[-1] = {"tool_calls": [dict(prev, function=fn)]}
                continue
            merged.append(d)
        self._out.clear()
        return merged

    def _run(self, final: bool) -> None:
        while True:
            step = getattr(self, "_st_" + self._state)
            if not step(final):
                break
        if final:
            self._end_of_stream()

    def _end_of_stream(self) -> None:
        st = self._state
        if st == "skip":
            self._buf = ""
        elif self._held and not self._committed:
            self._fallback(final=True)
            return
        elif self._committed:
            self._close_call()
        self._buf = ""
        self._state = "text"

    # ---- content --------------------------------------------------------

    def _st_text(self, final: bool) -> bool:
        buf = self._buf
        if not buf:
            return False
        if self._at_start:
            stripped = buf.lstrip()
            if not stripped:
                self._content.add(buf)
                self._buf = ""
                return False
            self._at_start = False
            if stripped[0] == "{":
                self._content.add(buf[: len(buf) - len(stripped)])
                self._buf = stripped
                self._open_unit("", bare=True)
                self._state = "call_open"
                return True
        first, which = -1, None
        for m in self._markers:
            i = buf.find(m)
            if i >= 0 and (first < 0 or i < first):
                first, which = i, m
        if first >= 0:
            self._content.add(buf[:first])
            self._buf = buf[first + len(which) :]
            self._open_unit(which, bare=False)
            self._state = {"hermes": "call_open", "llama3_json": "call_open", "mistral": "m_open"}[self.parser]
            return True
        hold = len(buf) if final else self._partial_marker_at(buf)
        self._content.add(buf[:hold])
        self._buf = buf[hold:]
        return False

    def _partial_marker_at(self, buf: str) -> int:
        return len(buf) - held_suffix_len(buf, self._markers)

    def _open_unit(self, opening: str, bare: bool) -> None:
        self._held = opening
        self._held_head = len(opening) if opening else 1
        self._bare = bare
        self._committed = False

    def _fallback(self, final: bool) -> None:
        """The held unit is not a call: its opening goes to content, the rest is scanned again."""
        held = self._held
        head = self._held_head
        self._held = ""
        self._obj = self._val = None
        self._state = "text"
        self._content.add(held[:head])
        self._buf = held[head:] + self._buf
        if final:
            self._run(final=True)

    # ---- call objects (hermes, llama3_json, mistral array form) --------

    def _skip_ws(self) -> bool:
        """Drop leading whitespace of the buffer into the held text; True if anything is left."""
        buf = self._buf
        s = buf.lstrip(_WS)
        if len(s) != len(buf):
            self._held += buf[: len(buf) - len(s)]
            self._buf = s
        return bool(s)

    def _st_call_open(self, final: bool) -> bool:
        if not self._skip_ws():
            return False
        if self._buf[0] != "{":
            return self._broken()
        self._obj = _CallObject()
        self._state = "call"
        return True

    def _st_call(self, final: bool) -> bool:
        obj = self._obj
        buf = self._buf
        n = 0
        ok = True
        for c in buf:
            n += 1
            if obj.push(c) == _ERR or obj.bad_name:
                ok = False
                break
            if obj.done:
                break
        if not ok:
            # The offending character goes back to the buffer, out of the object.
            n -= 1
            obj.raw.pop()
        consumed = buf[:n]
        self._buf = buf[n:]
        if not self._committed:
            self._held += consumed
        if (
            not self._committed
            and obj.name is not None
            and (obj.args_start is not None or (obj.done and not self._bare))
        ):
            self._commit(obj.name)
        if self._committed:
            self._send_args(obj.args_text() if (obj.args_start is not None or not obj.done) else "{}")
        if not ok:
            return self._broken()
        if obj.done:
            if not self._committed:
                # Closed without a name, or (bare) without arguments: not a call.
                self._fallback(final=False)
                return True
            self._close_call()
            self._state = {"hermes": "h_after", "llama3_json": "l_after", "mistral": "m_after"}[self.parser]
            return True
        return False

    def _broken(self) -> bool:
        """The text stopped being a valid call here."""
        if not self._committed:
            self._fallback(final=False)
        else:
            self._close_call()
            self._state = "skip"
        return True

    def _commit(self, name: str) -> None:
        self._index += 1
        self._committed = True
        self._sent = 0
        self._name = name
        self._held = ""
        self._out.append(
            {
                "tool_calls": [
                    {
                        "index": self._index,
                        "id": self._new_id(),
                        "type": "function",
                        "function": {"name": name, "arguments": ""},
                    }
                ]
            }
        )

    def _send_args(self, text: str) -> None:
        if len(text) > self._sent:
            self._out.append({"tool_calls": [{"index": self._index, "function": {"arguments": text[self._sent :]}}]})
            self._sent = len(text)

    def _close_call(self) -> None:
        self._committed = False
        self._obj = self._val = None
        self._held = ""

    # hermes: after a call object, more objects or </tool_call>
    def _st_h_after(self, final: bool) -> bool:
        if not self._skip_ws():
            return False
        buf = self._buf
        if buf[0] == "{":
            self._open_unit("", bare=False)
            self._state = "call_open"
            return True
        close = "</tool_call>"
        if buf.startswith(close):
            self._buf = buf[len(close) :]
            self._held = ""
            self._state = "text"
            return True
        if close.startswith(buf) and not final:
            return False
        self._state = "skip"
        return True

    def _st_skip(self, final: bool) -> bool:
        """Drop the rest of broken markup: to </tool_call> for hermes, to the end otherwise."""
        if self.parser != "hermes":
            self._buf = ""
            return False
        close = "</tool_call>"
        i = self._buf.find(close)
        if i >= 0:
            self._buf = self._buf[i + len(close) :]
            self._held = ""
            self._state = "text"
            return True
        keep = len(close) - 1
        if len(self._buf) > keep:
            self._buf = self._buf[-keep:]
        return False

    # llama3_json: after a call object, "; {" continues, anything else is content
    def _st_l_after(self, final: bool) -> bool:
        buf = self._buf
        s = buf.lstrip(_WS)
        if not s:
            return False
        if s[0] == ";":
            rest = s[1:].lstrip(_WS)
            if not rest:
                return False
            if rest[0] != "{":
                self._buf = rest
                self._state = "text"
                return True
            self._buf = rest
            self._open_unit("", bare=self._bare)
            self._state = "call_open"
            return True
        if s[0] == "{":
            self._buf = s
            self._open_unit("", bare=self._bare)
            self._state = "call_open"
            return True
        self._state = "text"
        return True

    # ---- mistral ------------------------------------------------------

    def _st_m_open(self, final: bool) -> bool:
        if not self._skip_ws():
            return False
        c = self._buf[0]
        self._array = c == "["
        if c == "[":
            self._held += c
            self._buf = self._buf[1:]
            self._state = "m_array"
        elif c == "{":
            self._state = "call_open"
        else:
            self._name = ""
            self._state = "m_name"
        return True

    def _st_m_array(self, final: bool) -> bool:
        """Inside ``[``, before the first call object."""
        if not self._skip_ws():
            return False
        c = self._buf[0]
        if c == "{":
            self._state = "call_open"
            return True
        if c == "]":
            self._buf = self._buf[1:]
            self._held = ""
            self._state = "text"
            return True
        return self._broken()

    def _st_m_after(self, final: bool) -> bool:
        """After a call object: "," and another, "]", or (single object) back to text."""
        if not self._array:
            self._state = "text"
            return True
        s = self._buf.lstrip(_WS)
        self._buf = s
        if not s:
            return False
        if s[0] == ",":
            self._buf = s[1:]
            self._open_unit("", bare=False)
            self._state = "call_open"
        elif s[0] == "]":
            self._buf = s[1:]
            self._state = "text"
        else:
            self._state = "skip"
        return True

    def _st_m_name(self, final: bool) -> bool:
        buf = self._buf
        i = 0
        while i < len(buf) and buf[i] in _NAME_CHARS:
            i += 1
        self._name += buf[:i]
        self._held += buf[:i]
        self._buf = buf = buf[i:]
        if not buf:
            return False
        for tag, nxt in (("[ARGS]", "m_args"), ("[CALL_ID]", "m_call_id")):
            if buf.startswith(tag):
                if not self._name:
                    return self._broken()
                self._held += tag
                self._buf = buf[len(tag) :]
                self._state = nxt
                return True
        if ("[ARGS]".startswith(buf) or "[CALL_ID]".startswith(buf)) and not final:
            return False
        return self._broken()

    def _st_m_call_id(self, final: bool) -> bool:
        """Skip a model-written ``[CALL_ID]...`` up to ``[ARGS]``."""
        buf = self._buf
        i = buf.find("[ARGS]")
        stop = i if i >= 0 else (len(buf) if final else len(buf) - held_suffix_len(buf, ("[ARGS]",)))
        if any(ch not in _NAME_CHARS for ch in buf[:stop]) or (i < 0 and final):
            return self._broken()
        if i < 0:
            self._held += buf[:stop]
            self._buf = buf[stop:]
            return False
        self._held += buf[: i + 6]
        self._buf = buf[i + 6 :]
        self._state = "m_args"
        return True

    def _st_m_args(self, final: bool) -> bool:
        if self._val is None:
            if not self._skip_ws():
                return False
            if self._buf[0] != "{":
                return self._broken()
            self._val = _ValueScanner()
            self._commit(self._name)
        val = self._val
        buf = self._buf
        n = 0
        ok = True
        for c in buf:
            n += 1
            if val.push(c) == _ERR:
                ok = False
                break
            if val.done:
                break
        self._buf = buf[n:] if ok else buf[n - 1 :]
        self._send_args("".join(val.raw if ok else val.raw[:-1]))
        if not ok:
            return self._broken()
        if val.done:
            self._close_call()
            self._state = "text"
            return True
        return False
