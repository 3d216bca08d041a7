"""Structured outputs: grammars that constrain decoding, as token masks over the vocabulary.

A request's ``response_format`` (``json_object``, ``json_schema``, and the
extensions ``regex`` and ``grammar``), or its ``tools`` with ``tool_choice``
``"required"`` or a named function, becomes a `GrammarSpec`. A
`GrammarCompiler` built once per model over the engine's `Tokenizer` compiles
specs (cached by their canonical text) and hands out one `GrammarMatcher` per
sequence. Each decode step: ``fill_mask()`` gives the allowed next tokens as
an int32 bitmask ``[ceil(vocab / 32)]`` (bit ``i % 32`` of word ``i // 32``),
`apply_mask` sets the other logits to -inf, the sampler picks a token, and
``accept(token)`` advances the matcher; ``is_finished()`` says the grammar is
complete and only end-of-sequence may follow. Where the grammar leaves no
choice, ``forced_tokens()`` names the tokens to accept and run in one pass.

Library: llguidance (Rust, PyPI wheel). Compared with xgrammar on this CPU
machine (2 shared AMD EPYC cores, load average 7-10 while measuring), on the
default model's 49,152-token vocabulary, by `bench/bench_constraints.py`:
an 87-token document walked through a 7-property schema (nested object,
array, enum, pattern, number), every mask timed over 5 passes (440 masks),
then the same walk under "any JSON object"::

                                 llguidance 1.9.1      xgrammar 0.2.9
    install (torch 2.13 present) 3.1 MB wheel,         1.3 MB wheel + triton
                                 no dependencies       (286 MB), apache-tvm-ffi,
                                                       transformers; needs torch
    vocabulary setup, per model  0.40 s                0.07 s
    schema compile, per schema   1.6 ms                29 ms
    matcher from compiled        0.006 ms              -
    mask, schema: median / mean  13 / 27 us            4 / 15 us
    mask, any object             14 / 16 us            15 / 43 us

(Maxima are scheduler noise on the loaded machine: 0.3-4 ms for both.)
xgrammar's masks are faster on a fixed schema, which it pays for at compile
time; both are far below a decode step. llguidance was chosen because it
installs alone: xgrammar requires torch, transformers and triton, which on
CI's CPU-only machine is a 286 MB GPU compiler it never uses, and its torch
requirement is one more place a second torch could come from. llguidance
also compiles schemas ~18x faster (requests bring their own schemas and
tools, so compile time is paid per request), takes Lark grammars with
inline JSON schemas and special tokens by id (the tool-call grammars below
use both), converts GBNF, and reports forced tokens for jump-forward
decoding.

Limits:

* JSON output is one line, written as ``json.dumps`` writes it
  (``", "`` and ``": "``), in the schema's property order; that rules out the
  whitespace loops small models fall into when any whitespace is allowed.
  ``json_whitespace="flexible"`` allows any JSON whitespace instead.
  Characters outside ASCII are written as themselves: ``\\u`` escapes are
  allowed for control characters only.
* ``strict: true`` schemas must use only keywords llguidance implements (a
  clear error names the one it does not); without strict, unknown keywords
  are ignored. Schemas that cannot be satisfied, bad ``$ref``s and bad regex
  patterns are errors either way. Every error is a `ConstraintError`, a
  ValueError, naming the problem.
* Regexes use Rust `regex` syntax and must match the whole output. Grammars
  are Lark as llguidance extends it, or GBNF (llama.cpp) converted to it.
* SentencePiece vocabularies write an answer's first word with a leading
  space that the detokenizer drops from a chat answer, so the grammar lets
  the output open with one optional space (``leading_space``, on for such
  vocabularies); a completion keeps that space in its text.
* Where the grammar forces text, only the tokenizer's own tokenization of
  that text is allowed, not every token sequence that spells it.
* A grammar does not cover reasoning text: with a thinking model, start the
  matcher after ``</think>`` or turn thinking off.
"""

from __future__ import annotations

import json
import re
import sys
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence

import numpy as np
import torch

from .errors import ConstraintError

_JSON_WHITESPACE = {
    "compact": {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "},
    "flexible": {"whitespace_flexible": True},
}
GRAMMAR_KINDS = ("json_schema", "regex", "lark", "gbnf")
_TOOL_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,64}")


def _llguidance():
    try:
        import llguidance
    except ImportError as e:  # a declared dependency; a clear message if it is missing anyway
        raise ConstraintError("structured outputs need the llguidance package: pip install llguidance") from e
    return llguidance


# ---- what to constrain to -----------------------------------------------


@dataclass(frozen=True)
class GrammarSpec:
    """A grammar to constrain to: its kind, its canonical source text, and JSON leniency."""

    kind: str
    source: str
    lenient: bool = False


def _schema_text(schema: Any, where: str) -> str:
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as e:
            raise ConstraintError(f"{where} is not valid JSON: {e}") from e
    if not isinstance(schema, dict):
        raise ConstraintError(f"{where} must be a JSON object, got {type(schema).__name__}")
    try:
        # Property order is kept: the grammar writes properties in schema order.
        return json.dumps(schema, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ConstraintError(f"{where} is not JSON-serializable: {e}") from e


def json_schema_spec(schema: Any, strict: bool = True) -> GrammarSpec:
    """Output must be JSON valid under `schema` (a dict or its JSON text)."""
    if not isinstance(strict, bool):
        raise ConstraintError(f"strict must be a boolean, got {type(strict).__name__}")
    return GrammarSpec("json_schema", _schema_text(schema, "the JSON schema"), lenient=not strict)


def json_object_spec() -> GrammarSpec:
    """Output must be one JSON object (OpenAI's ``json_object`` mode)."""
    return GrammarSpec("json_schema", '{"type":"object"}')


def regex_spec(pattern: str) -> GrammarSpec:
    """Output must match `pattern` (Rust regex syntax) as a whole."""
    if not isinstance(pattern, str) or not pattern:
        raise ConstraintError("regex must be a non-empty string")
    return GrammarSpec("regex", pattern)


def grammar_spec(grammar: str, syntax: str = "lark") -> GrammarSpec:
    """Output must derive from `grammar` (syntax "lark" as llguidance takes it, or "gbnf"/"ebnf")."""
    if not isinstance(grammar, str) or not grammar.strip():
        raise ConstraintError("grammar must be a non-empty string")
    syntax = {"ebnf": "gbnf"}.get(syntax, syntax)
    if syntax not in ("lark", "gbnf"):
        raise ConstraintError(f"grammar syntax {syntax!r} is not supported (lark, gbnf)")
    return GrammarSpec(syntax, grammar)


def response_format_spec(response_format: Optional[dict]) -> Optional[GrammarSpec]:
    """The spec for an OpenAI ``response_format`` (None for plain text).

    Types: ``text``, ``json_object``, ``json_schema`` (``{"json_schema":
    {"schema": ..., "strict": ...}}``), and two extensions: ``regex``
    (``{"type": "regex", "regex": ...}``) and ``grammar`` (``{"type":
    "grammar", "grammar": ..., "syntax": "lark" | "gbnf"}``).
    """
    if response_format is None:
        return None
    if not isinstance(response_format, dict):
        raise ConstraintError("response_format must be an object with a 'type'")
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return json_object_spec()
    if kind == "json_schema":
        js = response_format.get("json_schema")
        if not isinstance(js, dict):
            raise ConstraintError("response_format.json_schema must be an object holding 'schema'")
        strict = js.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise ConstraintError("response_format.json_schema.strict must be a boolean")
        if js.get("schema") is None:
            return json_object_spec()
        return GrammarSpec(
            "json_schema", _schema_text(js["schema"], "response_format.json_schema.schema"), lenient=not strict
        )
    if kind == "regex":
        return regex_spec(response_format.get("regex", response_format.get("pattern")))
    if kind == "grammar":
        return grammar_spec(response_format.get("grammar"), response_format.get("syntax", "lark"))
    raise ConstraintError(
        f"response_format.type {kind!r} is not supported (text, json_object, json_schema, regex, grammar)"
    )


# ---- tool calls -----------------------------------------------------------


def _tool_functions(tools) -> List[dict]:
    if not isinstance(tools, (list, tuple)) or not tools:
        raise ConstraintError("tools must be a non-empty list", "tools")
    out = []
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(fn, dict):
            raise ConstraintError(f"tools[{i}] must be {{'type': 'function', 'function': {{...}}}}", "tools")
        name = fn.get("name")
        if not isinstance(name, str) or not _TOOL_NAME.fullmatch(name):
            raise ConstraintError(
                f"tools[{i}].function.name must be 1-64 letters, digits, '_', '-', '.' or ':'", "tools"
            )
        params = fn.get("parameters")
        if params is None:
            params = {"type": "object", "properties": {}}
        try:
            _schema_text(params, f"tools[{i}].function.parameters")
        except ConstraintError as e:
            raise ConstraintError(str(e), "tools") from None
        out.append({"name": name, "parameters": params, "strict": fn.get("strict") is True})
    return out


def tool_functions(tools) -> List[dict]:
    """The functions of OpenAI `tools`, checked: ``{"name", "parameters", "strict"}`` each."""
    return _tool_functions(tools)


def _chosen(functions: List[dict], tool_choice) -> Optional[List[dict]]:
    """The functions `tool_choice` forces a call among, or None when it forces nothing."""
    if tool_choice in (None, "auto", "none"):
        return None
    if tool_choice == "required":
        return functions
    if isinstance(tool_choice, dict) and tool_choice.get("type") == "function":
        name = (tool_choice.get("function") or {}).get("name")
        picked = [f for f in functions if f["name"] == name]
        if not picked:
            raise ConstraintError(f"tool_choice names function {name!r}, which is not in tools", "tool_choice")
        return picked[:1]
    raise ConstraintError(
        "tool_choice must be 'none', 'auto', 'required' or {'type': 'function', 'function': {'name': ...}}",
        "tool_choice",
    )


def tool_call_spec(
    tools, tool_choice, parser: str, tokenizer, parallel_tool_calls: bool = True, json_whitespace: str = "compact"
) -> Optional[GrammarSpec]:
    """A grammar forcing a valid call, in `parser`'s format, whose arguments match the tool's schema.

    tool_choice "required" allows one or more calls of any tool (one when
    parallel_tool_calls is False); a named function exactly one call of it;
    "auto", "none" and None constrain nothing (None is returned). The output
    parses with `helexa_native.tool_calls` under the same parser name.
    Markers that are one special token are forced as that token. For mistral,
    a vocabulary holding an ``[ARGS]`` token gets the ``name[ARGS]{...}`` form,
    others the ``[TOOL_CALLS][...]`` array.
    """
    from .tool_calls import check_parser

    check_parser(parser)
    functions = _tool_functions(tools)
    chosen = _chosen(functions, tool_choice)
    if chosen is None:
        return None
    many = parallel_tool_calls and isinstance(tool_choice, str)
    ws = _json_options(json_whitespace)

    def schema(fn: dict, args_key: str) -> dict:
        return {
            "type": "object",
            "properties": {"name": {"const": fn["name"]}, args_key: fn["parameters"]},
            "required": ["name", args_key],
            "additionalProperties": False,
        }

    def inline(s: dict, lenient: bool) -> str:
        return "%json " + json.dumps(dict(s, **{"x-guidance": dict(ws, lenient=lenient)}), ensure_ascii=False)

    lenient = not all(f["strict"] for f in chosen)
    if parser in ("hermes", "llama3_json"):
        key = "arguments" if parser == "hermes" else "parameters"
        body = schema(chosen[0], key) if len(chosen) == 1 else {"anyOf": [schema(f, key) for f in chosen]}
        if parser == "hermes":
            lines = [
                'start: call ("\\n" call)*' if many else "start: call",
                f'call: {_marker(tokenizer, "<tool_call>")} "\\n" body "\\n" {_marker(tokenizer, "</tool_call>")}',
            ]
        else:
            lines = ['start: call ("; " call)*' if many else "start: call", "call: body"]
        lines.append("body: " + inline(body, lenient))
        return GrammarSpec("lark", "\n".join(lines))
    # mistral: the name[ARGS]{...} form where the vocabulary has [ARGS], else the JSON array.
    tc = _marker(tokenizer, "[TOOL_CALLS]")
    if tokenizer.token_to_id("[ARGS]") is not None:
        args = _marker(tokenizer, "[ARGS]")
        lines = ["start: call+" if many else "start: call", f"call: {tc} fn"]
        lines.append("fn: " + " | ".join(f"f{i}" for i in range(len(chosen))))
        for i, f in enumerate(chosen):
            lines.append(f"f{i}: {json.dumps(f['name'])} {args} j{i}")
            lines.append(f"j{i}: " + inline(f["parameters"], not f["strict"]))
        return GrammarSpec("lark", "\n".join(lines))
    items = schema(chosen[0], "arguments") if len(chosen) == 1 else {"anyOf": [schema(f, "arguments") for f in chosen]}
    array = {"type": "array", "items": items, "minItems": 1}
    if not many:
        array["maxItems"] = 1
    return GrammarSpec("lark", f'start: {tc} " "? calls\ncalls: ' + inline(array, lenient))


def _marker(tokenizer, text: str) -> str:
    """A marker in Lark: its token by id when it is one special token, else its text."""
    tid = tokenizer.token_to_id(text)
    if tid is not None and tokenizer.is_special(tid):
        return f"<[{tid}]>"
    return json.dumps(text)


def _json_options(json_whitespace: str) -> dict:
    try:
        return dict(_JSON_WHITESPACE[json_whitespace])
    except (KeyError, TypeError):
        raise ConstraintError(
            f"json_whitespace must be one of {sorted(_JSON_WHITESPACE)}, got {json_whitespace!r}"
        ) from None


# ---- compiling against a vocabulary --------------------------------------


class _Vocabulary:
    """The engine's tokenizer as llguidance's TokenizerWrapper reads it."""

    def __init__(self, tokenizer, vocab_size: int, eos: int) -> None:
        self._tok = tokenizer
        self.eos_token_id = eos
        self.bos_token_id = tokenizer.bos_token_id
        n = tokenizer.vocab_size
        self.tokens = [tokenizer.token_bytes(i) for i in range(n)] + [b""] * (vocab_size - n)
        self.special_token_ids = sorted(i for i in tokenizer.special_ids if i < vocab_size)
        self._special = frozenset(self.special_token_ids)
        self._greedy: Optional[dict] = None
        self._longest = 1
        self._memo: dict = {}

    def __call__(self, text) -> List[int]:
        """Token ids spelling exactly `text`'s bytes, which llguidance uses for forced text."""
        data = text if isinstance(text, bytes) else text.encode("utf-8")
        ids = self._memo.get(data)
        if ids is None:
            if len(self._memo) >= 4096:  # the same forced texts recur with the same grammars
                self._memo.clear()
            ids = self._memo[data] = self._tokenize(data)
        return list(ids)

    def _tokenize(self, data: bytes) -> List[int]:
        try:
            ids = self._tok.encode(data.decode("utf-8"), add_special_tokens=False)
        except Exception:
            return self._greedy_ids(data)
        if not any(i in self._special for i in ids):
            got = b"".join(self.tokens[i] for i in ids)
            if got == data:
                return ids
            # A SentencePiece encoder puts a word-boundary space in front of the text.
            if ids and got == b" " + data and self.tokens[ids[0]] == b" ":
                return ids[1:]
        return self._greedy_ids(data)

    def _greedy_ids(self, data: bytes) -> List[int]:
        if self._greedy is None:
            table = {}
            for i, b in enumerate(self.tokens):
                if b and i not in self._special:
                    table.setdefault(b, i)
            self._greedy = table
            self._longest = max(len(b) for b in table)
        out, i = [], 0
        while i < len(data):
            for n in range(min(self._longest, len(data) - i), 0, -1):
                tid = self._greedy.get(data[i : i + n])
                if tid is not None:
                    out.append(tid)
                    i += n
                    break
            else:
                i += 1  # a byte no token spells: nothing can produce it anyway
        return out


class CompiledGrammar:
    """A validated grammar for one vocabulary; `matcher()` makes a fresh per-sequence matcher."""

    def __init__(self, spec: GrammarSpec, proto, compiler: "GrammarCompiler") -> None:
        self.spec = spec
        self._proto = proto
        self._compiler = compiler

    def matcher(self) -> "GrammarMatcher":
        """A matcher at the start of the grammar."""
        return GrammarMatcher(self._proto.deep_copy(), self._compiler)


class GrammarCompiler:
    """Compiles grammar specs against one model's vocabulary, caching them by spec.

    tokenizer: the engine's `helexa_native.tokenizer.Tokenizer`. vocab_size:
    width of the model's logits (default: the tokenizer's; ids past the
    tokenizer are never allowed). eos_token_ids: the ids that end a sequence
    (default: the tokenizer's); any of them is allowed where the grammar may
    end. leading_space: allow one optional space before the output (default:
    on for vocabularies whose decoder drops it). json_whitespace: "compact"
    or "flexible". cache_size: compiled grammars kept (least recently used go).
    """

    def __init__(
        self,
        tokenizer,
        vocab_size: Optional[int] = None,
        eos_token_ids: Optional[Sequence[int]] = None,
        leading_space: Optional[bool] = None,
        json_whitespace: str = "compact",
        cache_size: int = 128,
    ) -> None:
        llg = _llguidance()
        n = int(tokenizer.vocab_size)
        self.vocab_size = n if vocab_size is None else int(vocab_size)
        if self.vocab_size < n:
            raise ValueError(f"vocab_size {self.vocab_size} is smaller than the tokenizer's {n}")
        eos = list(dict.fromkeys(tokenizer.eos_token_ids if eos_token_ids is None else eos_token_ids))
        if not eos or not all(isinstance(t, int) and 0 <= t < self.vocab_size for t in eos):
            raise ValueError(f"eos_token_ids must be one or more ids below {self.vocab_size}, got {eos!r}")
        self.eos_token_ids = eos
        self.leading_space = (
            bool(getattr(tokenizer, "strip_leading_space", False)) if leading_space is None else bool(leading_space)
        )
        self.json_whitespace = json_whitespace
        self._json = _json_options(json_whitespace)
        if cache_size < 1:
            raise ValueError("cache_size must be at least 1")
        self.cache_size = int(cache_size)
        self.tokenizer = tokenizer
        self._vocab = _Vocabulary(tokenizer, self.vocab_size, eos[0])
        self._lltok = llg.LLTokenizer(llg.TokenizerWrapper(self._vocab))
        self._cache: "OrderedDict[GrammarSpec, CompiledGrammar]" = OrderedDict()
        self._lock = threading.Lock()
        self.mask_words = (self.vocab_size + 31) // 32

    def compile(self, spec: GrammarSpec) -> CompiledGrammar:
        """The compiled grammar for `spec` (from the cache when seen before); ConstraintError if invalid."""
        if not isinstance(spec, GrammarSpec):
            raise TypeError(f"expected a GrammarSpec, got {type(spec).__name__}")
        with self._lock:
            hit = self._cache.get(spec)
            if hit is not None:
                self._cache.move_to_end(spec)
                return hit
        compiled = CompiledGrammar(spec, self._build(spec), self)
        with self._lock:
            self._cache[spec] = compiled
            self._cache.move_to_end(spec)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return compiled

    def matcher(self, spec: GrammarSpec) -> "GrammarMatcher":
        """A fresh per-sequence matcher for `spec`."""
        return self.compile(spec).matcher()

    def tool_call_spec(
        self, tools, tool_choice, parser: str, parallel_tool_calls: bool = True
    ) -> Optional[GrammarSpec]:
        """`tool_call_spec` over this compiler's tokenizer and JSON whitespace."""
        return tool_call_spec(
            tools,
            tool_choice,
            parser,
            self.tokenizer,
            parallel_tool_calls=parallel_tool_calls,
            json_whitespace=self.json_whitespace,
        )

    @property
    def cached(self) -> int:
        """Compiled grammars held in the cache."""
        return len(self._cache)

    def _build(self, spec: GrammarSpec):
        llg = _llguidance()
        what = {"json_schema": "JSON schema", "regex": "regex", "lark": "grammar", "gbnf": "grammar"}.get(spec.kind)
        if what is None:
            raise ConstraintError(f"unknown grammar kind {spec.kind!r} (known: {', '.join(GRAMMAR_KINDS)})")
        try:
            if spec.kind == "json_schema":
                grammar = llg.LLMatcher.grammar_from_json_schema(
                    spec.source, overrides=dict(self._json, lenient=spec.lenient)
                )
            elif spec.kind == "regex":
                grammar = llg.LLMatcher.grammar_from_regex(spec.source)
            elif spec.kind == "lark":
                grammar = llg.LLMatcher.grammar_from_lark(spec.source)
            else:
                grammar = llg.grammar_from("gbnf", spec.source)
        except (ValueError, TypeError) as e:
            raise ConstraintError(f"invalid {what}: {e}") from e
        if self.leading_space:
            top = json.loads(grammar)
            inner = dict(top["grammars"][0], name="output")
            grammar = json.dumps({"grammars": [{"lark_grammar": 'start: " "? @output'}, inner]})
        m = llg.LLMatcher(self._lltok, grammar, log_level=0)
        if m.is_error():
            raise ConstraintError(f"invalid {what}: {_one_line(m.get_error())}")
        return m


def _one_line(msg: str) -> str:
    """An llguidance error on one line, without its source excerpt and caret lines."""
    keep = [ln.strip() for ln in msg.strip().splitlines() if ln.strip() and not _EXCERPT.match(ln)]
    return " ".join(keep) or "rejected"


_EXCERPT = re.compile(r"^\s*(\d+ \||\^+\s*$)")


_executor = None
_executor_lock = threading.Lock()


def fill_masks(matchers: Sequence["GrammarMatcher"], out: torch.Tensor) -> torch.Tensor:
    """Each matcher's mask into its row of `out` (contiguous CPU int32 [len(matchers), mask_words]).

    The same masks as GrammarMatcher.fill_mask row by row, computed in
    parallel on llguidance's thread pool: a batched step asks for every
    constrained sequence's mask at once, and one mask can take a fraction of
    a millisecond.
    """
    global _executor
    n = len(matchers)
    if out.dtype != torch.int32 or out.device.type != "cpu" or not out.is_contiguous() or out.dim() != 2:
        raise ValueError("out must be a contiguous 2-D CPU int32 tensor")
    if n == 0:
        return out
    words = matchers[0].mask_words
    if out.shape[0] != n or out.shape[1] != words or any(m.mask_words != words for m in matchers):
        raise ValueError(f"out must be [{n}, {words}] and every matcher of the same vocabulary")
    with _executor_lock:
        if _executor is None:
            make = getattr(_llguidance(), "LLExecutor", None)  # absent from older llguidance
            _executor = make() if make is not None else False
    if n == 1 or _executor is False:
        for m, row in zip(matchers, out):
            m.fill_mask(row)
        return out
    live = [(m._m, i) for i, m in enumerate(matchers) if not m._m.is_error()]
    if live:
        _executor.unsafe_compute_mask_ptr(live, out.data_ptr(), words * 4, n)
    for i, m in enumerate(matchers):
        m._finish_mask(out[i])
    return out


class GrammarMatcher:
    """One sequence's position in a grammar: masks for the next token, and tokens accepted so far."""

    def __init__(self, matcher, compiler: GrammarCompiler) -> None:
        self._m = matcher
        self.vocab_size = compiler.vocab_size
        self.mask_words = compiler.mask_words
        self._eos = compiler.eos_token_ids
        self._eos_set = frozenset(self._eos)
        self._primary = self._eos[0]
        self.tokens_accepted = 0

    def fill_mask(self, out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The allowed next tokens as an int32 bitmask [ceil(vocab/32)] (written into `out` if given).

        Every end-of-sequence id is allowed exactly where the grammar may end.
        `out` must be a contiguous CPU int32 tensor of `mask_words` elements
        (a row of a [batch, words] tensor works).
        """
        if out is None:
            out = torch.empty(self.mask_words, dtype=torch.int32)
        elif (
            out.dtype != torch.int32
            or out.device.type != "cpu"
            or not out.is_contiguous()
            or out.numel() != self.mask_words
        ):
            raise ValueError(f"out must be a contiguous CPU int32 tensor of {self.mask_words} elements")
        if not self._m.is_error():
            self._m.unsafe_compute_mask_ptr(out.data_ptr(), self.mask_words * 4)
        return self._finish_mask(out)

    def _finish_mask(self, out: torch.Tensor) -> torch.Tensor:
        """Complete a mask llguidance computed into `out` (anything, after an error): the end tokens."""
        if self._m.is_error():
            out.zero_()
            allow_end = True
        else:
            if len(self._eos) == 1:
                return out  # llguidance already allows its one end token exactly where it may end
            allow_end = None
        words = out.view(-1).numpy().view(np.uint32)
        if allow_end is None:
            p = self._primary
            allow_end = bool((int(words[p >> 5]) >> (p & 31)) & 1)
        for t in self._eos:
            bit = np.uint32(1 << (t & 31))
            words[t >> 5] = (words[t >> 5] | bit) if allow_end else (words[t >> 5] & ~bit)
        return out

    def accept(self, token_id: int) -> bool:
        """Advance past `token_id`; False (and `error` set) when the grammar does not allow it."""
        tok = self._primary if token_id in self._eos_set else int(token_id)
        ok = bool(self._m.consume_token(tok))
        if ok:
            self.tokens_accepted += 1
        return ok

    def forced_tokens(self) -> List[int]:
        """Tokens the grammar forces next, in the tokenizer's own spelling (often empty).

        They need no mask or sampling: accept them and run them through the
        model in one forward pass (jump-forward decoding).
        """
        if self._m.is_error():
            return []
        return list(self._m.compute_ff_tokens())

    def is_finished(self) -> bool:
        """True once nothing but end-of-sequence may follow (or an end token was accepted, or an error)."""
        return bool(self._m.is_stopped())

    def is_accepting(self) -> bool:
        """True when the output so far is complete under the grammar (it may still go on)."""
        return bool(self._m.is_accepting())

    @property
    def error(self) -> Optional[str]:
        """Why the matcher stopped on an error (a token it did not allow), or None."""
        return (self._m.get_error() or "rejected") if self._m.is_error() else None

    def rollback(self, n: int) -> None:
        """Undo the last `n` accepted tokens (speculative decoding)."""
        if not 0 <= n <= self.tokens_accepted or not self._m.rollback(n):
            raise ValueError(f"cannot roll back {n} tokens ({self.tokens_accepted} accepted)")
        self.tokens_accepted -= n

    def reset(self) -> None:
        """Back to the start of the grammar."""
        self._m.reset()
        self.tokens_accepted = 0


# ---- masks on logits ------------------------------------------------------


def allocate_mask(vocab_size: int, batch: Optional[int] = None) -> torch.Tensor:
    """An all-allowed int32 bitmask [ceil(vocab/32)] (or [batch, ...]) for `fill_mask(out=...)`."""
    words = (int(vocab_size) + 31) // 32
    shape = (words,) if batch is None else (int(batch), words)
    return torch.full(shape, -1, dtype=torch.int32)


def unpack_mask(mask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """A bool [..., vocab] tensor from an int32 bitmask [..., ceil(vocab/32)]."""
    if mask.device.type == "cpu" and sys.byteorder == "little":
        # Little-endian words laid out as bytes: bit i of the mask is bit i % 8 of byte i // 8.
        raw = mask.detach().contiguous().numpy().view(np.uint8)
        bits = np.unpackbits(raw, axis=-1, bitorder="little")[..., :vocab_size]
        return torch.from_numpy(np.ascontiguousarray(bits).view(np.bool_))
    return _unpack_shifts(mask, vocab_size)


def _unpack_shifts(mask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """`unpack_mask` in torch ops, on the mask's own device."""
    shifts = torch.arange(32, dtype=torch.int32, device=mask.device)
    bits = (mask.unsqueeze(-1) >> shifts) & 1
    return bits.flatten(-2)[..., :vocab_size].bool()


def apply_mask(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Set the logits of disallowed tokens to -inf, in place; returns `logits`.

    logits: [vocab] or [batch, vocab] floats. mask: an int32 bitmask
    [..., ceil(vocab/32)] from `fill_mask`, or a bool [..., vocab] (True =
    allowed); it is moved to the logits' device.
    """
    vocab = logits.shape[-1]
    if mask.dtype == torch.int32:
        if mask.shape[-1] * 32 < vocab:
            raise ValueError(f"a bitmask of {mask.shape[-1]} words cannot cover a vocabulary of {vocab}")
        allowed = unpack_mask(mask.to(logits.device), vocab)
    elif mask.dtype == torch.bool:
        if mask.shape[-1] != vocab:
            raise ValueError(f"a bool mask of {mask.shape[-1]} entries does not match a vocabulary of {vocab}")
        allowed = mask.to(logits.device)
    else:
        raise TypeError(f"mask must be int32 (bitmask) or bool, got {mask.dtype}")
    # Backends hand out logits made under inference mode, which only it may change in place.
    with torch.inference_mode(logits.is_inference()):
        logits.masked_fill_(~allowed, float("-inf"))
    return logits
