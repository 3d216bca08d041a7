"""The OpenAI HTTP API's shapes: request validation, response bodies and stream chunks.

Plain functions over dicts, with no Flask and no Engine in sight, so every
rule here is testable alone. A request body becomes a `GenerationRequest`
(or an `ApiError` naming the offending field); results and stream pieces
become the JSON objects the official clients parse:

  chat:        chat.completion / chat.completion.chunk, logprobs as
               choices[].logprobs.content[] = {token, logprob, bytes, top_logprobs}
  completions: text_completion, logprobs as
               {tokens, token_logprobs, top_logprobs: [{token: logprob}], text_offset}
  errors:      {"error": {"message", "type", "param", "code"}}
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

from . import defaults
from .chat_template import normalize_messages
from .errors import InvalidParameterError
from .request_params import MAX_TOKENS_ALIAS, PASSTHROUGH_FIELDS, resolve_params

# Reported instead of -inf (a token the model rules out), which JSON cannot carry.
MIN_LOGPROB = -9999.0

CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")


class ApiError(Exception):
    """An error answered with the OpenAI envelope and an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: Optional[str] = None,
        code: Optional[str] = None,
        headers: Optional[Dict[str, str]] = None,
    ) -> None:
        super().__init__(message)
        self.status = int(status)
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict:
        """The OpenAI error envelope."""
        return error_body(self.message, self.type, self.param, self.code)


def error_body(
    message: str, type: str = "invalid_request_error", param: Optional[str] = None, code: Optional[str] = None
) -> dict:
    """{"error": {...}} as OpenAI sends it."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad_request(message: str, param: Optional[str] = None, code: Optional[str] = None) -> ApiError:
    return ApiError(400, message, "invalid_request_error", param, code)


# ---------------------------------------------------------------------------
# request bodies


def parse_json_body(data: bytes) -> dict:
    """The request body as a JSON object, or a 400 saying what is wrong with it."""
    if not data or not data.strip():
        raise bad_request("the request body is empty; send a JSON object")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise bad_request(f"the request body is not valid UTF-8 (byte {e.start})") from None
    try:
        body = json.loads(text, parse_constant=_reject_constant)
    except json.JSONDecodeError as e:
        raise bad_request(f"the request body is not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})") from None
    except ValueError as e:
        raise bad_request(f"the request body is not valid JSON: {e}") from None
    except RecursionError:
        raise bad_request("the request body is nested too deeply") from None
    if not isinstance(body, dict):
        raise bad_request(f"the request body must be a JSON object, got {_json_type(body)}")
    if _SURROGATE_ESCAPE.search(text):
        _reject_unpaired_surrogates(body, "")
    return body


# A \uD800-\uDFFF escape: JSON allows one alone, but it is not Unicode text.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _reject_unpaired_surrogates(value, where: str) -> None:
    """400 naming the first string of `value` (at `where`, a field path) that holds an unpaired surrogate."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise bad_request(
                f"{where or 'a field name'} holds an unpaired surrogate (\\u{ord(value[e.start]):04x}); "
                "strings must be Unicode text",
                where.split(".")[0].split("[")[0] or None,
            ) from None
    elif isinstance(value, dict):
        for k, v in value.items():
            _reject_unpaired_surrogates(k, "")
            _reject_unpaired_surrogates(v, f"{where}.{k}" if where else k)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _reject_unpaired_surrogates(v, f"{where}[{i}]")


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a JSON number")


def _json_type(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, (int, float)):
        return "number"
    if isinstance(v, str):
        return "string"
    if isinstance(v, list):
        return "array"
    if isinstance(v, dict):
        return "object"
    return type(v).__name__


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _opt(body: dict, key: str, ok: Callable[[Any], bool], kind: str):
    """body[key], None when null or absent; a 400 saying it must be `kind` unless ok(value)."""
    v = body.get(key)
    if v is not None and not ok(v):
        raise bad_request(f"{key} must be {kind}, got {_json_type(v)}", key)
    return v


def opt_bool(body: dict, key: str, default: bool = False) -> bool:
    """body[key] as a boolean (null or absent: default)."""
    v = _opt(body, key, lambda x: isinstance(x, bool), "a boolean")
    return default if v is None else v


def opt_str(body: dict, key: str) -> Optional[str]:
    return _opt(body, key, lambda x: isinstance(x, str), "a string")


def opt_int(body: dict, key: str, minimum: Optional[int] = None) -> Optional[int]:
    v = _opt(body, key, _is_int, "an integer")
    if v is not None and minimum is not None and v < minimum:
        raise bad_request(f"{key} must be >= {minimum}, got {v}", key)
    return v


def opt_dict(body: dict, key: str) -> Optional[dict]:
    return _opt(body, key, lambda x: isinstance(x, dict), "an object")


def token_id_list(v, key: str) -> List[int]:
    """A non-empty list of non-negative integers."""
    if not isinstance(v, list) or not v:
        raise bad_request(f"{key} must be a non-empty array of token ids", key)
    for t in v:
        if not _is_int(t) or t < 0:
            raise bad_request(f"{key} must hold non-negative integers, got {json.dumps(t)}", key)
    return list(v)


# Fields accepted and deliberately ignored: they describe billing, storage,
# caching or client bookkeeping that has no meaning for a local engine (the
# prefix cache needs no key). Each is still checked for its type.
_IGNORED = ("user", "metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier")
_IGNORED_STRINGS = ("user", "prompt_cache_key", "safety_identifier")

_COMMON = (
    ("model", "n", "stream", "stream_options", "logit_bias", "skip_special_tokens", "response_format")
    + PASSTHROUGH_FIELDS
    + _IGNORED
)

CHAT_FIELDS = frozenset(
    _COMMON
    + (
        "messages",
        MAX_TOKENS_ALIAS,
        "logprobs",
        "top_logprobs",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "chat_template_kwargs",
        "reasoning_effort",
        # OpenAI fields for what only its own models do: accepted when they
        # ask for nothing this engine lacks (text output, no audio); a
        # predicted output and a verbosity hint are ignored (the answer is
        # the same without them).
        "modalities",
        "audio",
        "prediction",
        "verbosity",
    )
)
COMPLETION_FIELDS = frozenset(_COMMON + ("prompt", "logprobs", "echo", "suffix", "best_of"))


@dataclass
class GenerationRequest:
    """A validated /v1/chat/completions or /v1/completions request."""

    kind: str  # "chat" | "completion"
    model: Optional[str]
    sampling: Dict[str, Any]  # engine sampling keyword arguments
    stream: bool = False
    include_usage: bool = False
    messages: Optional[list] = None
    tools: Optional[list] = None
    chat_template_kwargs: Dict[str, Any] = field(default_factory=dict)
    prompt: Union[str, List[int], None] = None
    echo: bool = False
    n: int = 1
    logit_bias: Optional[Dict[int, float]] = None
    response_format: Optional[dict] = None
    tool_choice: Any = None
    parallel_tool_calls: bool = True

    def engine_options(self) -> Dict[str, Any]:
        """The Engine keyword arguments beyond sampling that this request sets (defaults left out)."""
        out: Dict[str, Any] = {}
        if self.n != 1:
            out["n"] = self.n
        if self.logit_bias:
            out["logit_bias"] = dict(self.logit_bias)
        if self.response_format is not None and self.response_format.get("type") != "text":
            out["response_format"] = self.response_format
        if self.kind == "chat":
            if self.tool_choice is not None:
                out["tool_choice"] = self.tool_choice
            if not self.parallel_tool_calls:
                out["parallel_tool_calls"] = False
        return out

    @property
    def logprobs(self) -> bool:
        return bool(self.sampling.get("logprobs"))


def _check_common(body: dict, allowed: frozenset) -> Tuple[Optional[str], bool, bool]:
    unknown = sorted(k for k in body if k not in allowed)
    if unknown:
        raise bad_request(f"unrecognized request argument(s): {', '.join(unknown)}", unknown[0], "unknown_parameter")
    model = opt_str(body, "model")
    for key in _IGNORED:
        v = body.get(key)
        if key in _IGNORED_STRINGS and v is not None and not isinstance(v, str):
            raise bad_request(f"{key} must be a string, got {_json_type(v)}", key)
        if key == "metadata" and v is not None and not isinstance(v, dict):
            raise bad_request(f"metadata must be an object, got {_json_type(v)}", "metadata")
        if key == "store":
            opt_bool(body, key)
    stream = opt_bool(body, "stream")
    include_usage = False
    so = body.get("stream_options")
    if so is not None:
        if not isinstance(so, dict):
            raise bad_request(f"stream_options must be an object, got {_json_type(so)}", "stream_options")
        if not stream:
            raise bad_request("stream_options is only allowed when stream is true", "stream_options")
        extra = sorted(k for k in so if k not in ("include_usage", "continuous_usage_stats"))
        if extra:
            raise bad_request(f"stream_options: unrecognized field(s) {', '.join(extra)}", "stream_options")
        include_usage = opt_bool(so, "include_usage")
        if so.get("continuous_usage_stats") is not None:
            opt_bool(so, "continuous_usage_stats")
    return model, stream, include_usage


def parse_n(body: dict) -> int:
    """n: how many answers to generate for the prompt."""
    n = opt_int(body, "n")
    if n is None:
        return 1
    if not 1 <= n <= defaults.MAX_CHOICES:
        raise bad_request(f"n must be in [1, {defaults.MAX_CHOICES}], got {n}", "n")
    return n


def parse_logit_bias(body: dict) -> Optional[Dict[int, float]]:
    """logit_bias: {"token id": bias in [-100, 100]} with ids as decimal strings (JSON keys)."""
    bias = body.get("logit_bias")
    if bias is None:
        return None
    if not isinstance(bias, dict):
        raise bad_request(f"logit_bias must be an object, got {_json_type(bias)}", "logit_bias")
    out = {}
    lim = defaults.MAX_LOGIT_BIAS
    for k, v in bias.items():
        if not k.strip().isdigit():
            raise bad_request(f"logit_bias keys must be token ids, got {k!r}", "logit_bias")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not -lim <= v <= lim:
            raise bad_request(
                f"logit_bias values must be numbers in [-{lim:g}, {lim:g}], got {json.dumps(v)} for token {k}",
                "logit_bias",
            )
        out[int(k)] = float(v)
    return out or None


def parse_response_format(body: dict) -> Optional[dict]:
    """response_format, checked for shape (the grammar itself compiles against the model's vocabulary)."""
    rf = body.get("response_format")
    if rf is None:
        return None
    if not isinstance(rf, dict) or not isinstance(rf.get("type"), str):
        raise bad_request("response_format must be an object with a string 'type'", "response_format")
    from .constraints import response_format_spec
    from .errors import ConstraintError

    try:
        response_format_spec(rf)
    except ConstraintError as e:
        raise bad_request(str(e), "response_format") from None
    return rf


def parse_tool_choice(body: dict, tools: Optional[list]):
    """tool_choice: "none", "auto", "required" or {"type": "function", "function": {"name": ...}}."""
    tc = body.get("tool_choice")
    if tc is None:
        return None
    if isinstance(tc, str):
        if tc not in ("none", "auto", "required"):
            raise bad_request(
                f"tool_choice must be 'none', 'auto', 'required' or a function, got {tc!r}", "tool_choice"
            )
        if tc == "required" and not tools:
            raise bad_request("tool_choice 'required' needs tools", "tool_choice")
        return tc
    if not isinstance(tc, dict):
        raise bad_request(f"tool_choice must be a string or an object, got {_json_type(tc)}", "tool_choice")
    fn = tc.get("function")
    name = fn.get("name") if isinstance(fn, dict) else None
    if tc.get("type") != "function" or not isinstance(name, str):
        raise bad_request("tool_choice must be {'type': 'function', 'function': {'name': ...}}", "tool_choice")
    names = [t["function"]["name"] for t in tools or []]
    if name not in names:
        raise bad_request(
            f"tool_choice names function {name!r}, which is not among the tools ({', '.join(names) or 'none given'})",
            "tool_choice",
        )
    return {"type": "function", "function": {"name": name}}


def parse_sampling(body: dict) -> Dict[str, Any]:
    """The engine's sampling arguments, checked together; an error names the offending field."""
    fields = {k: body[k] for k in PASSTHROUGH_FIELDS if body.get(k) is not None}
    if "max_tokens" not in fields and body.get(MAX_TOKENS_ALIAS) is not None:
        fields[MAX_TOKENS_ALIAS] = body[MAX_TOKENS_ALIAS]
    try:
        resolve_params(fields, {})
    except InvalidParameterError as e:
        raise bad_request(str(e), e.field) from None
    out = dict(fields)
    if MAX_TOKENS_ALIAS in out:
        out["max_tokens"] = out.pop(MAX_TOKENS_ALIAS)
    if body.get("skip_special_tokens") is not None:
        out["skip_special_tokens"] = opt_bool(body, "skip_special_tokens")
    return out


def parse_chat_request(body: dict) -> GenerationRequest:
    """Validate a /v1/chat/completions body."""
    model, stream, include_usage = _check_common(body, CHAT_FIELDS)
    messages = parse_messages(body.get("messages"))
    sampling = parse_sampling(body)

    logprobs = opt_bool(body, "logprobs")
    top = body.get("top_logprobs")
    if top is not None:
        if not _is_int(top) or not 0 <= top <= defaults.MAX_TOP_LOGPROBS:
            raise bad_request(
                f"top_logprobs must be an integer in [0, {defaults.MAX_TOP_LOGPROBS}], got {json.dumps(top)}",
                "top_logprobs",
            )
        if top and not logprobs:
            raise bad_request("top_logprobs needs logprobs set to true", "top_logprobs")
    if logprobs:
        sampling["logprobs"] = True
        sampling["top_logprobs"] = int(top or 0)

    tools = parse_tools(body.get("tools"))
    tool_choice = parse_tool_choice(body, tools)
    _check_output_only_text(body)
    kwargs = with_reasoning_effort(template_kwargs(body), body.get("reasoning_effort"), "reasoning_effort")
    return GenerationRequest(
        "chat",
        model,
        sampling,
        stream,
        include_usage,
        messages=messages,
        tools=tools,
        chat_template_kwargs=dict(kwargs),
        n=parse_n(body),
        logit_bias=parse_logit_bias(body),
        response_format=parse_response_format(body),
        tool_choice=tool_choice,
        parallel_tool_calls=opt_bool(body, "parallel_tool_calls", True),
    )


def _check_output_only_text(body: dict) -> None:
    """modalities, audio, prediction and verbosity: what a text-only engine can honour."""
    mod = body.get("modalities")
    if mod is not None:
        if not isinstance(mod, list) or not all(isinstance(m, str) for m in mod):
            raise bad_request(f"modalities must be an array of strings, got {_json_type(mod)}", "modalities")
        if any(m != "text" for m in mod):
            raise bad_request('only text output is supported (modalities: ["text"])', "modalities", "unsupported_value")
    if body.get("audio") is not None:
        raise bad_request("audio output is not supported", "audio", "unsupported_parameter")
    pred = body.get("prediction")
    if pred is not None and (not isinstance(pred, dict) or pred.get("type") != "content"):
        raise bad_request("prediction must be an object with type 'content'", "prediction")
    verbosity = body.get("verbosity")
    if verbosity is not None and verbosity not in ("low", "medium", "high"):
        raise bad_request(f"verbosity must be 'low', 'medium' or 'high', got {json.dumps(verbosity)}", "verbosity")


def with_reasoning_effort(kwargs: dict, effort, param: str) -> dict:
    """A request's reasoning effort as chat-template variables.

    Templates that grade their reasoning read `reasoning_effort`; "none" also
    sets `enable_thinking` false, the switch of templates that think by
    default (Qwen3). Variables the request sets in chat_template_kwargs win.
    Any other effort reaches the template only: models without graded
    reasoning answer as they would without it.
    """
    if effort is None:
        return kwargs
    if not isinstance(effort, str) or not effort:
        raise bad_request(f"{param} must be a string such as 'low' or 'none', got {_json_type(effort)}", param)
    out = dict(kwargs)
    out.setdefault("reasoning_effort", effort)
    if effort == "none":
        out.setdefault("enable_thinking", False)
    return out


# Names the template call itself sets; a request may not override them.
_RESERVED_TEMPLATE_KWARGS = ("messages", "tools", "tokenize", "documents")


def template_kwargs(body: dict) -> dict:
    """chat_template_kwargs: extra variables for the chat template."""
    kwargs = opt_dict(body, "chat_template_kwargs") or {}
    bad = sorted(k for k in kwargs if k in _RESERVED_TEMPLATE_KWARGS or not k.isidentifier())
    if bad:
        raise bad_request(f"chat_template_kwargs may not set {', '.join(map(repr, bad))}", "chat_template_kwargs")
    if kwargs.get("add_generation_prompt") is not None and not isinstance(kwargs["add_generation_prompt"], bool):
        raise bad_request("chat_template_kwargs.add_generation_prompt must be a boolean", "chat_template_kwargs")
    return dict(kwargs)


def parse_messages(messages, param: str = "messages") -> list:
    """Checked chat messages; 'developer' becomes 'system' (how chat templates know it)."""
    if messages is None:
        raise bad_request(f"{param} is required", param)
    if not isinstance(messages, list):
        raise bad_request(f"{param} must be an array of message objects, got {_json_type(messages)}", param)
    if not messages:
        raise bad_request(f"{param} must hold at least one message", param)
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise bad_request(f"{param}[{i}] must be an object, got {_json_type(m)}", param)
        role = m.get("role")
        if not isinstance(role, str):
            raise bad_request(f"{param}[{i}].role must be a string", param)
        if role not in CHAT_ROLES:
            raise bad_request(f"{param}[{i}].role must be one of {', '.join(CHAT_ROLES)}, got {role!r}", param)
        m = dict(m)
        if role == "developer":
            m["role"] = "system"
        out.append(m)
    try:
        return normalize_messages(out)
    except ValueError as e:
        raise bad_request(str(e), param) from None


def parse_tools(tools) -> Optional[list]:
    """Checked function tools: each {"type": "function", "function": {"name", "parameters"?, ...}}."""
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise bad_request(f"tools must be an array, got {_json_type(tools)}", "tools")
    from .constraints import tool_functions
    from .errors import ConstraintError

    for i, t in enumerate(tools):
        if not isinstance(t, dict):
            raise bad_request(f"tools[{i}] must be an object with type 'function'", "tools")
        if t.get("type", "function") != "function":
            raise bad_request(f"tools[{i}].type {t.get('type')!r} is not supported: only 'function' tools are", "tools")
        fn = t.get("function")
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise bad_request(f"tools[{i}].function must be an object with a non-empty 'name'", "tools")
        params = fn.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise bad_request(
                f"tools[{i}].function.parameters must be a JSON schema object, got {_json_type(params)}", "tools"
            )
    if tools:
        try:
            tool_functions(tools)
        except ConstraintError as e:
            raise bad_request(str(e), "tools") from None
    return tools or None


def parse_completion_request(body: dict) -> GenerationRequest:
    """Validate a /v1/completions body."""
    model, stream, include_usage = _check_common(body, COMPLETION_FIELDS)
    prompt = parse_prompt(body.get("prompt"))
    n = parse_n(body)
    logit_bias = parse_logit_bias(body)
    response_format = parse_response_format(body)
    sampling = parse_sampling(body)
    lp = body.get("logprobs")
    if lp is not None:
        if not _is_int(lp) or not 0 <= lp <= defaults.MAX_TOP_LOGPROBS:
            raise bad_request(
                f"logprobs must be an integer in [0, {defaults.MAX_TOP_LOGPROBS}], got {json.dumps(lp)}", "logprobs"
            )
        sampling["logprobs"] = True
        sampling["top_logprobs"] = int(lp)
    echo = opt_bool(body, "echo")
    if echo and lp is not None:
        raise bad_request(
            "echo with logprobs would need prompt logprobs, which are not supported", "echo", "unsupported_parameter"
        )
    suffix = opt_str(body, "suffix")
    if suffix:
        raise bad_request("suffix (insertion) is not supported", "suffix", "unsupported_parameter")
    best_of = opt_int(body, "best_of")
    if best_of is not None and best_of != 1:
        raise bad_request(f"best_of must be 1 (got {best_of})", "best_of")
    return GenerationRequest(
        "completion",
        model,
        sampling,
        stream,
        include_usage,
        prompt=prompt,
        echo=echo,
        n=n,
        logit_bias=logit_bias,
        response_format=response_format,
    )


def parse_prompt(prompt) -> Union[str, List[int]]:
    """A text prompt or a list of token ids; a batch of one is unwrapped, larger batches refused."""
    if prompt is None:
        raise bad_request("prompt is required", "prompt")
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):
        if not prompt:
            raise bad_request("prompt must not be empty", "prompt")
        if all(_is_int(t) for t in prompt):
            return token_id_list(prompt, "prompt")
        if all(isinstance(p, (str, list)) for p in prompt):
            if len(prompt) > 1:
                raise bad_request("prompt holds several prompts; send one prompt per request", "prompt")
            return parse_prompt(prompt[0])
    raise bad_request("prompt must be a string, an array of token ids, or an array holding one of those", "prompt")


# ---------------------------------------------------------------------------
# responses


def usage_dict(usage: Optional[dict]) -> dict:
    """OpenAI usage; completion_tokens_details.reasoning_tokens when the engine counted them."""
    u = usage or {}
    p, c = int(u.get("prompt_tokens", 0)), int(u.get("completion_tokens", 0))
    out = {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}
    if u.get("reasoning_tokens") is not None:
        out["completion_tokens_details"] = {"reasoning_tokens": int(u["reasoning_tokens"])}
    return out


def total_usage(usages: List[Optional[dict]]) -> dict:
    """The usage of n answers to one prompt: the prompt counted once, the answers summed."""
    out = {"prompt_tokens": 0, "completion_tokens": 0}
    reasoning = None
    for u in usages:
        if not u:
            continue
        out["prompt_tokens"] = int(u.get("prompt_tokens", 0))
        out["completion_tokens"] += int(u.get("completion_tokens", 0))
        if u.get("reasoning_tokens") is not None:
            reasoning = (reasoning or 0) + int(u["reasoning_tokens"])
    out["total_tokens"] = out["prompt_tokens"] + out["completion_tokens"]
    if reasoning is not None:
        out["reasoning_tokens"] = reasoning
    return out


def api_finish_reason(reason: Optional[str]) -> Optional[str]:
    """The engine's finish reason in the API's vocabulary (stop / length / tool_calls)."""
    if reason is None:
        return None
    return reason if reason in ("length", "tool_calls") else "stop"


def _lp(v) -> float:
    if v is None:
        return MIN_LOGPROB
    v = float(v)
    return v if math.isfinite(v) else MIN_LOGPROB


def chat_logprobs(entries: Optional[list]) -> Optional[dict]:
    """Engine logprob entries as chat choices[].logprobs."""
    if entries is None:
        return None
    content = []
    for e in entries:
        content.append(
            {
                "token": e["token"],
                "logprob": _lp(e.get("logprob")),
                "bytes": list(e.get("bytes") or []),
                "top_logprobs": [
                    {"token": t["token"], "logprob": _lp(t.get("logprob")), "bytes": list(t.get("bytes") or [])}
                    for t in e.get("top_logprobs") or []
                ],
            }
        )
    return {"content": content, "refusal": None}


def completion_logprobs(entries: Optional[list], offset: int) -> Tuple[Optional[dict], int]:
    """Engine logprob entries as legacy completions logprobs; returns (logprobs, next text offset)."""
    if entries is None:
        return None, offset
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for e in entries:
        out["tokens"].append(e["token"])
        out["token_logprobs"].append(_lp(e.get("logprob")))
        out["top_logprobs"].append({t["token"]: _lp(t.get("logprob")) for t in e.get("top_logprobs") or []})
        out["text_offset"].append(offset)
        offset += len(e["token"])
    return out, offset


def chat_message(
    content: Optional[str], reasoning_content: Optional[str] = None, tool_calls: Optional[list] = None
) -> dict:
    """An assistant message; reasoning_content and tool_calls only when present."""
    msg = {"role": "assistant", "content": content, "refusal": None}
    if reasoning_content is not None:
        msg["reasoning_content"] = reasoning_content
    if tool_calls:
        msg["tool_calls"] = list(tool_calls)
    return msg


def _response(kind: str, cid: str, created: int, model: str, fingerprint: str, choices: List[dict]) -> dict:
    """The fields every chat and completions object and chunk starts with; `kind` is its "object"."""
    return {
        "id": cid,
        "object": kind,
        "created": created,
        "model": model,
        "system_fingerprint": fingerprint,
        "choices": choices,
    }


def _whole(kind: str, cid: str, created: int, model: str, fingerprint: str, choices: List[dict], usage) -> dict:
    """A whole response, or a stream's closing usage chunk: the choices and the request's usage."""
    out = _response(kind, cid, created, model, fingerprint, choices)
    out["usage"] = usage_dict(usage)
    return out


def _chunk(
    kind: str,
    cid: str,
    created: int,
    model: str,
    fingerprint: str,
    choice: dict,
    include_usage: bool,
    usage: Optional[dict],
) -> dict:
    """A stream chunk with one choice.

    Its usage is null while include_usage keeps the usage for the closing
    usage chunk, else the answer's usage when given, else absent.
    """
    out = _response(kind, cid, created, model, fingerprint, [choice])
    if include_usage:
        out["usage"] = None
    elif usage is not None:
        out["usage"] = usage_dict(usage)
    return out


def _chat_entry(index: int, key: str, body: dict, finish_reason: Optional[str], logprobs: Optional[list]) -> dict:
    """One chat choice holding `body` under `key`: "message" in a chat.completion, "delta" in a chunk."""
    return {
        "index": index,
        key: body,
        "logprobs": chat_logprobs(logprobs),
        "finish_reason": api_finish_reason(finish_reason),
    }


def chat_choice(index: int, message: dict, finish_reason: Optional[str], logprobs: Optional[list]) -> dict:
    """One entry of chat.completion choices."""
    return _chat_entry(index, "message", message, finish_reason, logprobs)


def chat_completion(cid: str, created: int, model: str, fingerprint: str, choices: List[dict], usage: dict) -> dict:
    """A chat.completion object over chat_choice entries."""
    return _whole("chat.completion", cid, created, model, fingerprint, choices, usage)


def chat_chunk(
    cid: str,
    created: int,
    model: str,
    fingerprint: str,
    delta: dict,
    finish_reason: Optional[str] = None,
    logprobs: Optional[list] = None,
    include_usage: bool = False,
    usage: Optional[dict] = None,
    index: int = 0,
) -> dict:
    """A chat.completion.chunk with one choice."""
    choice = _chat_entry(index, "delta", delta, finish_reason, logprobs)
    return _chunk("chat.completion.chunk", cid, created, model, fingerprint, choice, include_usage, usage)


def chat_usage_chunk(cid: str, created: int, model: str, fingerprint: str, usage: dict) -> dict:
    """The chunk stream_options.include_usage asks for: no choices, the whole request's usage."""
    return _whole("chat.completion.chunk", cid, created, model, fingerprint, [], usage)


def completion_choice(index: int, text: str, finish_reason: Optional[str], logprobs: Optional[dict]) -> dict:
    """One entry of text_completion choices."""
    return {"text": text, "index": index, "logprobs": logprobs, "finish_reason": api_finish_reason(finish_reason)}


def completion(cid: str, created: int, model: str, fingerprint: str, choices: List[dict], usage: dict) -> dict:
    """A text_completion object over completion_choice entries."""
    return _whole("text_completion", cid, created, model, fingerprint, choices, usage)


def completion_chunk(
    cid: str,
    created: int,
    model: str,
    fingerprint: str,
    text: str,
    finish_reason: Optional[str] = None,
    logprobs: Optional[dict] = None,
    include_usage: bool = False,
    usage: Optional[dict] = None,
    index: int = 0,
) -> dict:
    """One streamed text_completion piece."""
    choice = completion_choice(index, text, finish_reason, logprobs)
    return _chunk("text_completion", cid, created, model, fingerprint, choice, include_usage, usage)


def completion_usage_chunk(cid: str, created: int, model: str, fingerprint: str, usage: dict) -> dict:
    """The closing usage chunk of a text_completion stream: no choices, the whole request's usage."""
    return _whole("text_completion", cid, created, model, fingerprint, [], usage)


def model_card(name: str, created: int, n_ctx: Optional[int] = None, root: Optional[str] = None) -> dict:
    """One entry of /v1/models."""
    out = {"id": name, "object": "model", "created": created, "owned_by": "helexa-native"}
    if root is not None:
        out["root"] = root
    if n_ctx is not None:
        out["max_model_len"] = n_ctx
    return out


def dumps(obj) -> str:
    """Compact JSON, UTF-8 text kept as is (no \\u escapes)."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def sse(obj) -> bytes:
    """One server-sent event carrying a JSON object."""
    return f"data: {dumps(obj)}\n\n".encode("utf-8")


SSE_DONE = b"data: [DONE]\n\n"
