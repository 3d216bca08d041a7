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
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Union

from . import defaults
from .chat_template import normalize_messages
from .errors import InvalidParameterError
from .request_params import MAX_TOKENS_ALIAS, PASSTHROUGH_FIELDS, resolve_params

# Reported instead of -inf (a token the model rules out), which JSON cannot carry.
MIN_LOGPROB = -9999.0

CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")


class ApiError(Exception):
    """An error answered with the OpenAI envelope and an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None,
                 headers: Optional[Dict[str, str]] = None) -> None:
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


def error_body(message: str, type: str = "invalid_request_error", param: Optional[str] = None,
               code: Optional[str] = None) -> dict:
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
        raise bad_request(f"the request body is not valid JSON: {e.msg} "
                          f"(line {e.lineno}, column {e.colno})") from None
    except ValueError as e:
        raise bad_request(f"the request body is not valid JSON: {e}") from None
    except RecursionError:
        raise bad_request("the request body is nested too deeply") from None
    if not isinstance(body, dict):
        raise bad_request(f"the request body must be a JSON object, got {_json_type(body)}")
    return body


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


def opt_bool(body: dict, key: str, default: bool = False) -> bool:
    """body[key] as a boolean (null or absent: default)."""
    v = body.get(key)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad_request(f"{key} must be a boolean, got {_json_type(v)}", key)
    return v


def opt_str(body: dict, key: str) -> Optional[str]:
    v = body.get(key)
    if v is None:
        return None
    if not isinstance(v, str):
        raise bad_request(f"{key} must be a string, got {_json_type(v)}", key)
    return v


def opt_int(body: dict, key: str, minimum: Optional[int] = None) -> Optional[int]:
    v = body.get(key)
    if v is None:
        return None
    if not _is_int(v):
        raise bad_request(f"{key} must be an integer, got {_json_type(v)}", key)
    if minimum is not None and v < minimum:
        raise bad_request(f"{key} must be >= {minimum}, got {v}", key)
    return v


def opt_dict(body: dict, key: str) -> Optional[dict]:
    v = body.get(key)
    if v is None:
        return None
    if not isinstance(v, dict):
        raise bad_request(f"{key} must be an object, got {_json_type(v)}", key)
    return v


def token_id_list(v, key: str) -> List[int]:
    """A non-empty list of non-negative integers."""
    if not isinstance(v, list) or not v:
        raise bad_request(f"{key} must be a non-empty array of token ids", key)
    for t in v:
        if not _is_int(t) or t < 0:
            raise bad_request(f"{key} must hold non-negative integers, got {json.dumps(t)}", key)
    return list(v)


# Fields accepted and deliberately ignored: they describe billing, storage or
# client bookkeeping that has no meaning for a local engine.
_IGNORED = ("user", "metadata", "store", "service_tier", "parallel_tool_calls")

_COMMON = (("model", "n", "stream", "stream_options", "logit_bias", "skip_special_tokens")
           + PASSTHROUGH_FIELDS + _IGNORED)

CHAT_FIELDS = frozenset(_COMMON + ("messages", MAX_TOKENS_ALIAS, "logprobs", "top_logprobs",
                                   "response_format", "tools", "tool_choice", "chat_template_kwargs"))
COMPLETION_FIELDS = frozenset(_COMMON + ("prompt", "logprobs", "echo", "suffix", "best_of"))


@dataclass
class GenerationRequest:
    """A validated /v1/chat/completions or /v1/completions request."""

    kind: str                                   # "chat" | "completion"
    model: Optional[str]
    sampling: Dict[str, Any]                    # engine sampling keyword arguments
    stream: bool = False
    include_usage: bool = False
    messages: Optional[list] = None
    tools: Optional[list] = None
    chat_template_kwargs: Dict[str, Any] = field(default_factory=dict)
    prompt: Union[str, List[int], None] = None
    echo: bool = False

    @property
    def logprobs(self) -> bool:
        return bool(self.sampling.get("logprobs"))


def _check_common(body: dict, allowed: frozenset) -> Tuple[Optional[str], bool, bool]:
    unknown = sorted(k for k in body if k not in allowed)
    if unknown:
        raise bad_request(f"unrecognized request argument(s): {', '.join(unknown)}", unknown[0],
                          "unknown_parameter")
    model = opt_str(body, "model")
    n = opt_int(body, "n")
    if n is not None and n != 1:
        raise bad_request(f"n must be 1: this server generates one choice per request (got {n})", "n")
    bias = body.get("logit_bias")
    if bias is not None:
        if not isinstance(bias, dict):
            raise bad_request(f"logit_bias must be an object, got {_json_type(bias)}", "logit_bias")
        if bias:
            raise bad_request("logit_bias is not supported", "logit_bias", "unsupported_parameter")
    for key in _IGNORED:
        v = body.get(key)
        if key == "user" and v is not None and not isinstance(v, str):
            raise bad_request(f"user must be a string, got {_json_type(v)}", "user")
        if key == "metadata" and v is not None and not isinstance(v, dict):
            raise bad_request(f"metadata must be an object, got {_json_type(v)}", "metadata")
        if key in ("store", "parallel_tool_calls"):
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


def _sampling(body: dict) -> Dict[str, Any]:
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
    sampling = _sampling(body)

    logprobs = opt_bool(body, "logprobs")
    top = body.get("top_logprobs")
    if top is not None:
        if not _is_int(top) or not 0 <= top <= defaults.MAX_TOP_LOGPROBS:
            raise bad_request(f"top_logprobs must be an integer in [0, {defaults.MAX_TOP_LOGPROBS}], "
                              f"got {json.dumps(top)}", "top_logprobs")
        if top and not logprobs:
            raise bad_request("top_logprobs needs logprobs set to true", "top_logprobs")
    if logprobs:
        sampling["logprobs"] = True
        sampling["top_logprobs"] = int(top or 0)

    rf = body.get("response_format")
    if rf is not None:
        if not isinstance(rf, dict) or not isinstance(rf.get("type"), str):
            raise bad_request("response_format must be an object with a string 'type'", "response_format")
        if rf["type"] in ("json_object", "json_schema"):
            raise bad_request(f"response_format type {rf['type']!r} is not supported yet; "
                              "only 'text' is", "response_format", "unsupported_parameter")
        if rf["type"] != "text":
            raise bad_request(f"response_format type must be 'text', 'json_object' or 'json_schema', "
                              f"got {rf['type']!r}", "response_format")

    tools = parse_tools(body.get("tools"))
    tc = body.get("tool_choice")
    if tc is not None:
        if tc == "none":
            tools = None
        elif tc != "auto":
            if isinstance(tc, (str, dict)):
                raise bad_request("tool_choice may be 'auto' or 'none': forcing a tool call is not "
                                  "supported", "tool_choice", "unsupported_parameter")
            raise bad_request(f"tool_choice must be a string or an object, got {_json_type(tc)}",
                              "tool_choice")

    kwargs = template_kwargs(body)
    return GenerationRequest("chat", model, sampling, stream, include_usage, messages=messages,
                             tools=tools, chat_template_kwargs=dict(kwargs))


# Names the template call itself sets; a request may not override them.
_RESERVED_TEMPLATE_KWARGS = ("messages", "tools", "tokenize", "documents")


def template_kwargs(body: dict) -> dict:
    """chat_template_kwargs: extra variables for the chat template."""
    kwargs = opt_dict(body, "chat_template_kwargs") or {}
    bad = sorted(k for k in kwargs if k in _RESERVED_TEMPLATE_KWARGS or not k.isidentifier())
    if bad:
        raise bad_request(f"chat_template_kwargs may not set {', '.join(map(repr, bad))}",
                          "chat_template_kwargs")
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
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise bad_request(f"tools must be an array, got {_json_type(tools)}", "tools")
    for i, t in enumerate(tools):
        if not isinstance(t, dict) or t.get("type", "function") != "function":
            raise bad_request(f"tools[{i}] must be an object with type 'function'", "tools")
        fn = t.get("function")
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise bad_request(f"tools[{i}].function must be an object with a non-empty 'name'", "tools")
    return tools or None


def parse_completion_request(body: dict) -> GenerationRequest:
    """Validate a /v1/completions body."""
    model, stream, include_usage = _check_common(body, COMPLETION_FIELDS)
    prompt = parse_prompt(body.get("prompt"))
    sampling = _sampling(body)
    lp = body.get("logprobs")
    if lp is not None:
        if not _is_int(lp) or not 0 <= lp <= defaults.MAX_TOP_LOGPROBS:
            raise bad_request(f"logprobs must be an integer in [0, {defaults.MAX_TOP_LOGPROBS}], "
                              f"got {json.dumps(lp)}", "logprobs")
        sampling["logprobs"] = True
        sampling["top_logprobs"] = int(lp)
    echo = opt_bool(body, "echo")
    if echo and lp is not None:
        raise bad_request("echo with logprobs would need prompt logprobs, which are not supported", "echo",
                          "unsupported_parameter")
    suffix = opt_str(body, "suffix")
    if suffix:
        raise bad_request("suffix (insertion) is not supported", "suffix", "unsupported_parameter")
    best_of = opt_int(body, "best_of")
    if best_of is not None and best_of != 1:
        raise bad_request(f"best_of must be 1 (got {best_of})", "best_of")
    return GenerationRequest("completion", model, sampling, stream, include_usage, prompt=prompt, echo=echo)


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
    raise bad_request("prompt must be a string, an array of token ids, or an array holding one of "
                      "those", "prompt")


# ---------------------------------------------------------------------------
# responses

def usage_dict(usage: Optional[dict]) -> dict:
    u = usage or {}
    p, c = int(u.get("prompt_tokens", 0)), int(u.get("completion_tokens", 0))
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def api_finish_reason(reason: Optional[str]) -> Optional[str]:
    """The engine's finish reason in the API's vocabulary (stop / length)."""
    if reason is None:
        return None
    return "length" if reason == "length" else "stop"


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
        content.append({
            "token": e["token"], "logprob": _lp(e.get("logprob")), "bytes": list(e.get("bytes") or []),
            "top_logprobs": [{"token": t["token"], "logprob": _lp(t.get("logprob")),
                              "bytes": list(t.get("bytes") or [])} for t in e.get("top_logprobs") or []],
        })
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


def chat_completion(cid: str, created: int, model: str, fingerprint: str, text: str,
                    finish_reason: Optional[str], usage: dict, logprobs: Optional[list]) -> dict:
    """A chat.completion object."""
    return {
        "id": cid, "object": "chat.completion", "created": created, "model": model,
        "system_fingerprint": fingerprint,
        "choices": [{"index": 0,
                     "message": {"role": "assistant", "content": text, "refusal": None},
                     "logprobs": chat_logprobs(logprobs),
                     "finish_reason": api_finish_reason(finish_reason)}],
        "usage": usage_dict(usage),
    }


def chat_chunk(cid: str, created: int, model: str, fingerprint: str, delta: dict,
               finish_reason: Optional[str] = None, logprobs: Optional[list] = None,
               include_usage: bool = False, usage: Optional[dict] = None) -> dict:
    """A chat.completion.chunk with one choice."""
    out = {
        "id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
        "system_fingerprint": fingerprint,
        "choices": [{"index": 0, "delta": delta, "logprobs": chat_logprobs(logprobs),
                     "finish_reason": api_finish_reason(finish_reason)}],
    }
    if include_usage:
        out["usage"] = None
    elif usage is not None:
        out["usage"] = usage_dict(usage)
    return out


def chat_usage_chunk(cid: str, created: int, model: str, fingerprint: str, usage: dict) -> dict:
    """The chunk stream_options.include_usage asks for: no choices, the whole request's usage."""
    return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "system_fingerprint": fingerprint, "choices": [], "usage": usage_dict(usage)}


def completion(cid: str, created: int, model: str, fingerprint: str, text: str,
               finish_reason: Optional[str], usage: dict, logprobs: Optional[dict]) -> dict:
    """A text_completion object."""
    return {
        "id": cid, "object": "text_completion", "created": created, "model": model,
        "system_fingerprint": fingerprint,
        "choices": [{"text": text, "index": 0, "logprobs": logprobs,
                     "finish_reason": api_finish_reason(finish_reason)}],
        "usage": usage_dict(usage),
    }


def completion_chunk(cid: str, created: int, model: str, fingerprint: str, text: str,
                     finish_reason: Optional[str] = None, logprobs: Optional[dict] = None,
                     include_usage: bool = False, usage: Optional[dict] = None) -> dict:
    """One streamed text_completion piece."""
    out = completion(cid, created, model, fingerprint, text, finish_reason, {}, logprobs)
    del out["usage"]
    if include_usage:
        out["usage"] = None
    elif usage is not None:
        out["usage"] = usage_dict(usage)
    return out


def completion_usage_chunk(cid: str, created: int, model: str, fingerprint: str, usage: dict) -> dict:
    return {"id": cid, "object": "text_completion", "created": created, "model": model,
            "system_fingerprint": fingerprint, "choices": [], "usage": usage_dict(usage)}


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
