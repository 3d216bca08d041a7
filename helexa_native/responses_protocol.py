"""The OpenAI Responses API's shapes: request bodies to chat requests, answers to response objects and events.

Plain functions over dicts (no Flask, no Engine), like openai_protocol.py. A
``POST /v1/responses`` body becomes a `ResponsesRequest`: its ``input`` (a
string, or items: messages, ``function_call`` and ``function_call_output``;
``reasoning`` items are accepted and dropped, as chat templates drop earlier
reasoning) and ``instructions`` become chat messages, function ``tools`` and
``tool_choice`` their chat forms, ``text.format`` a ``response_format``. An
answer (message deltas from chat_output.py) becomes output items built by
`ResponseBuilder`: a ``reasoning`` item, a ``message`` with ``output_text``,
and one ``function_call`` per call; streamed, the same builder writes the
typed events (``response.created``, ``response.output_item.added``,
``response.output_text.delta``, ``response.function_call_arguments.delta``,
``response.completed``, ...), each with its ``sequence_number``.

Conversation state: a stored response keeps its conversation as chat
messages (input and output, without ``instructions``, which OpenAI does not
carry over either), so ``previous_response_id`` continues from it.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from .openai_protocol import (
    _json_type,
    bad_request,
    opt_bool,
    opt_dict,
    opt_int,
    opt_str,
    parse_messages,
    parse_response_format,
    parse_tool_choice,
    parse_tools,
    template_kwargs,
    with_reasoning_effort,
)

RESPONSES_FIELDS = frozenset(
    (
        "model",
        "input",
        "instructions",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "max_output_tokens",
        "temperature",
        "top_p",
        "stream",
        "previous_response_id",
        "store",
        "text",
        "reasoning",
        "metadata",
        "user",
        "truncation",
        "include",
        "service_tier",
        "background",
        "top_logprobs",
        "max_tool_calls",
        "prompt_cache_key",
        "safety_identifier",
        "stream_options",
        # extensions, as on chat completions
        "seed",
        "top_k",
        "min_p",
        "repetition_penalty",
        "presence_penalty",
        "frequency_penalty",
        "stop",
        "chat_template_kwargs",
    )
)

_SAMPLING = (
    "temperature",
    "top_p",
    "seed",
    "top_k",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "stop",
)


def new_id(prefix: str) -> str:
    """An id as OpenAI shapes them: a prefix and 32 hex digits."""
    return f"{prefix}_{uuid.uuid4().hex}"


@dataclass
class ResponsesRequest:
    """A validated /v1/responses request, with its input as chat messages."""

    model: Optional[str]
    input_messages: List[dict]  # this request's input items as chat messages
    instructions: Optional[str]
    sampling: Dict[str, Any]
    stream: bool = False
    tools: Optional[list] = None  # chat form
    tool_choice: Any = None  # chat form
    parallel_tool_calls: bool = True
    response_format: Optional[dict] = None
    chat_template_kwargs: Dict[str, Any] = field(default_factory=dict)
    previous_response_id: Optional[str] = None
    store: bool = True
    echo: Dict[str, Any] = field(default_factory=dict)  # request fields the response repeats


def parse_responses_request(body: dict) -> ResponsesRequest:
    """Validate a /v1/responses body; 400 naming the offending field otherwise."""
    unknown = sorted(k for k in body if k not in RESPONSES_FIELDS)
    if unknown:
        raise bad_request(f"unrecognized request argument(s): {', '.join(unknown)}", unknown[0], "unknown_parameter")
    if opt_bool(body, "background"):
        raise bad_request("background responses are not supported", "background", "unsupported_parameter")
    model = opt_str(body, "model")
    instructions = opt_str(body, "instructions")
    prev = opt_str(body, "previous_response_id")
    messages = input_messages(body.get("input"), allow_empty=prev is not None)
    sampling = {k: body[k] for k in _SAMPLING if body.get(k) is not None}
    mot = opt_int(body, "max_output_tokens", minimum=1)
    if mot is not None:
        sampling["max_tokens"] = mot
    stream = opt_bool(body, "stream")
    if body.get("stream_options") is not None and not stream:
        raise bad_request("stream_options is only allowed when stream is true", "stream_options")
    tools = parse_tools(chat_tools(body.get("tools")))
    tool_choice = parse_tool_choice({"tool_choice": chat_tool_choice(body.get("tool_choice"))}, tools)
    text = opt_dict(body, "text") or {}
    fmt = text.get("format")
    response_format = parse_response_format({"response_format": chat_response_format(fmt)}) if fmt else None
    reasoning = opt_dict(body, "reasoning")
    kwargs = with_reasoning_effort(template_kwargs(body), (reasoning or {}).get("effort"), "reasoning.effort")
    truncation = body.get("truncation")
    if truncation not in (None, "disabled", "auto"):
        raise bad_request("truncation must be 'disabled' or 'auto'", "truncation")
    if opt_dict(body, "metadata") is None and body.get("metadata") is not None:
        raise bad_request("metadata must be an object", "metadata")
    echo = {
        "instructions": instructions,
        "max_output_tokens": mot,
        "metadata": body.get("metadata") or {},
        "parallel_tool_calls": opt_bool(body, "parallel_tool_calls", True),
        "previous_response_id": prev,
        "reasoning": {"effort": (reasoning or {}).get("effort"), "summary": (reasoning or {}).get("summary")},
        "store": opt_bool(body, "store", True),
        "temperature": body.get("temperature"),
        "text": {"format": fmt or {"type": "text"}},
        "tool_choice": body.get("tool_choice") or "auto",
        "tools": list(body.get("tools") or []),
        "top_p": body.get("top_p"),
        "truncation": truncation or "disabled",
        "user": opt_str(body, "user"),
    }
    return ResponsesRequest(
        model=model,
        input_messages=messages,
        instructions=instructions,
        sampling=sampling,
        stream=stream,
        tools=tools,
        tool_choice=tool_choice,
        parallel_tool_calls=echo["parallel_tool_calls"],
        response_format=response_format,
        chat_template_kwargs=kwargs,
        previous_response_id=prev,
        store=echo["store"],
        echo=echo,
    )


def chat_tools(tools) -> Optional[list]:
    """Responses function tools ({"type": "function", "name", "parameters", ...}) in their chat form."""
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise bad_request(f"tools must be an array, got {_json_type(tools)}", "tools")
    out = []
    for i, t in enumerate(tools):
        if not isinstance(t, dict):
            raise bad_request(f"tools[{i}] must be an object", "tools")
        if t.get("type") != "function":
            raise bad_request(f"tools[{i}].type {t.get('type')!r} is not supported: only 'function' tools are", "tools")
        fn = {k: t[k] for k in ("name", "description", "parameters", "strict") if t.get(k) is not None}
        out.append({"type": "function", "function": fn})
    return out


def chat_tool_choice(tc):
    """A Responses tool_choice in its chat form ({"type": "function", "name"} -> {..."function": {"name"}})."""
    if isinstance(tc, dict) and tc.get("type") == "function" and "function" not in tc:
        return {"type": "function", "function": {"name": tc.get("name")}}
    if isinstance(tc, dict) and tc.get("type") != "function":
        raise bad_request(f"tool_choice type {tc.get('type')!r} is not supported (function tools only)", "tool_choice")
    return tc


def chat_response_format(fmt) -> Any:
    """text.format in the chat form of response_format (json_schema's fields move under "json_schema")."""
    if not isinstance(fmt, dict) or not isinstance(fmt.get("type"), str):
        raise bad_request("text.format must be an object with a string 'type'", "text")
    if fmt["type"] == "json_schema":
        js = {k: fmt[k] for k in ("name", "schema", "strict", "description") if k in fmt}
        if "schema" not in js:
            raise bad_request("text.format.schema is required for json_schema", "text")
        return {"type": "json_schema", "json_schema": js}
    return fmt


def _text_of(content, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad_request(f"{where}.content must be a string or an array of content parts", "input")
    parts = []
    for j, p in enumerate(content):
        if not isinstance(p, dict) or p.get("type") not in ("input_text", "output_text", "text"):
            kind = p.get("type") if isinstance(p, dict) else _json_type(p)
            raise bad_request(f"{where}.content[{j}]: only text parts are supported, got {kind!r}", "input")
        if not isinstance(p.get("text"), str):
            raise bad_request(f"{where}.content[{j}].text must be a string", "input")
        parts.append(p["text"])
    return "\n".join(parts)


def input_messages(items, allow_empty: bool = False) -> List[dict]:
    """The request's `input` as chat messages (see the module docstring)."""
    if items is None:
        if allow_empty:
            return []
        raise bad_request("input is required", "input")
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    if not isinstance(items, list):
        raise bad_request(f"input must be a string or an array of items, got {_json_type(items)}", "input")
    out: List[dict] = []
    for i, it in enumerate(items):
        where = f"input[{i}]"
        if not isinstance(it, dict):
            raise bad_request(f"{where} must be an object", "input")
        kind = it.get("type", "message")
        if kind == "message":
            role = it.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise bad_request(f"{where}.role must be user, system, developer or assistant", "input")
            out.append(
                {"role": "system" if role == "developer" else role, "content": _text_of(it.get("content"), where)}
            )
        elif kind == "function_call":
            name, args = it.get("name"), it.get("arguments", "{}")
            call_id = it.get("call_id") or it.get("id")
            if not isinstance(name, str) or not isinstance(args, str) or not isinstance(call_id, str):
                raise bad_request(f"{where}: a function_call needs string call_id, name and arguments", "input")
            call = {"id": call_id, "type": "function", "function": {"name": name, "arguments": args}}
            if out and out[-1]["role"] == "assistant":
                out[-1].setdefault("tool_calls", []).append(call)
            else:
                out.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            call_id, output = it.get("call_id"), it.get("output")
            if not isinstance(call_id, str):
                raise bad_request(f"{where}.call_id must be a string", "input")
            if not isinstance(output, str):
                output = _text_of(output, where) if isinstance(output, list) else json.dumps(output)
            out.append({"role": "tool", "tool_call_id": call_id, "content": output})
        elif kind == "reasoning":
            continue
        else:
            raise bad_request(
                f"{where}.type {kind!r} is not supported (message, function_call, function_call_output, reasoning)",
                "input",
            )
    if not out and not allow_empty:
        raise bad_request("input must hold at least one message", "input")
    return parse_messages(out, "input") if out else out


def output_messages(output: List[dict]) -> List[dict]:
    """A response's output items as the chat messages a later turn continues from."""
    text, calls, reasoning = [], [], []
    for it in output:
        if it["type"] == "message":
            text += [p["text"] for p in it["content"] if p.get("type") == "output_text"]
        elif it["type"] == "function_call":
            calls.append(
                {
                    "id": it["call_id"],
                    "type": "function",
                    "function": {"name": it["name"], "arguments": it["arguments"]},
                }
            )
        elif it["type"] == "reasoning":
            reasoning += [p["text"] for p in it.get("content") or []]
    if not text and not calls:
        return []
    msg: Dict[str, Any] = {"role": "assistant", "content": "".join(text) if text else None}
    if calls:
        msg["tool_calls"] = calls
    if reasoning:
        msg["reasoning_content"] = "".join(reasoning)
    return [msg]


def response_usage(usage: Optional[dict], cached: int = 0) -> dict:
    """Engine usage as the Responses API's."""
    u = usage or {}
    inp, out = int(u.get("prompt_tokens", 0)), int(u.get("completion_tokens", 0))
    return {
        "input_tokens": inp,
        "input_tokens_details": {"cached_tokens": int(cached)},
        "output_tokens": out,
        "output_tokens_details": {"reasoning_tokens": int(u.get("reasoning_tokens") or 0)},
        "total_tokens": inp + out,
    }


class ResponseBuilder:
    """Output items from message deltas, with the stream events that build them.

    `start()` and `feed(deltas)` and `finish(...)` return lists of event
    dicts (sequence-numbered); `response()` is the response object as it
    stands (status in_progress until finished).
    """

    def __init__(self, rid: str, model: str, echo: dict, created: Optional[int] = None) -> None:
        self.id = rid
        self.model = model
        self.echo = echo
        self.created = int(time.time()) if created is None else created
        self.output: List[dict] = []
        self.status = "in_progress"
        self.usage: Optional[dict] = None
        self.incomplete: Optional[dict] = None
        self.error: Optional[dict] = None
        self._seq = 0
        self._open: Optional[dict] = None  # the item being written
        self._calls: Dict[int, dict] = {}  # tool call index -> its item

    def response(self) -> dict:
        """The response object."""
        out = {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": self.status,
            "error": self.error,
            "incomplete_details": self.incomplete,
            "model": self.model,
            "output": [dict(it) for it in self.output],
            "usage": self.usage,
        }
        out.update(self.echo)
        return out

    def _event(self, kind: str, **fields) -> dict:
        ev = {"type": kind, "sequence_number": self._seq}
        ev.update(fields)
        self._seq += 1
        return ev

    def start(self) -> List[dict]:
        """response.created and response.in_progress."""
        return [
            self._event("response.created", response=self.response()),
            self._event("response.in_progress", response=self.response()),
        ]

    def feed(self, deltas: List[dict]) -> List[dict]:
        """The events a list of chat message deltas adds."""
        events: List[dict] = []
        for d in deltas:
            if d.get("reasoning_content"):
                item = self._ensure("reasoning", events)
                item["content"][0]["text"] += d["reasoning_content"]
                events.append(
                    self._event(
                        "response.reasoning_text.delta",
                        item_id=item["id"],
                        output_index=self._index(item),
                        content_index=0,
                        delta=d["reasoning_content"],
                    )
                )
            if d.get("content"):
                item = self._ensure("message", events)
                item["content"][0]["text"] += d["content"]
                events.append(
                    self._event(
                        "response.output_text.delta",
                        item_id=item["id"],
                        output_index=self._index(item),
                        content_index=0,
                        delta=d["content"],
                        logprobs=[],
                    )
                )
            for tc in d.get("tool_calls") or ():
                item = self._calls.get(tc["index"])
                if item is None:
                    events += self._close()
                    fn = tc.get("function") or {}
                    item = {
                        "id": new_id("fc"),
                        "type": "function_call",
                        "status": "in_progress",
                        "call_id": tc.get("id") or new_id("call"),
                        "name": fn.get("name", ""),
                        "arguments": "",
                    }
                    self._calls[tc["index"]] = item
                    self._add(item, events)
                args = (tc.get("function") or {}).get("arguments") or ""
                if args:
                    item["arguments"] += args
                    events.append(
                        self._event(
                            "response.function_call_arguments.delta",
                            item_id=item["id"],
                            output_index=self._index(item),
                            delta=args,
                        )
                    )
        return events

    def finish(self, finish_reason: Optional[str], usage: dict) -> List[dict]:
        """Close the open item; response.completed (or response.incomplete when cut at max_output_tokens)."""
        cut = finish_reason == "length"
        events = self._close("incomplete" if cut else "completed")
        self.usage = usage
        if cut:
            self.status = "incomplete"
            self.incomplete = {"reason": "max_output_tokens"}
            events.append(self._event("response.incomplete", response=self.response()))
        else:
            self.status = "completed"
            events.append(self._event("response.completed", response=self.response()))
        return events

    def fail(self, error: dict) -> List[dict]:
        """An error event and response.failed, for an error after the stream began."""
        self.status = "failed"
        self.error = {"code": error.get("code") or "server_error", "message": error.get("message", "")}
        return [
            self._event("error", code=error.get("code"), message=error.get("message", ""), param=error.get("param")),
            self._event("response.failed", response=self.response()),
        ]

    # ---- items ----------------------------------------------------------

    def _index(self, item: dict) -> int:
        return next(i for i, it in enumerate(self.output) if it is item)

    def _add(self, item: dict, events: List[dict]) -> None:
        self.output.append(item)
        self._open = item
        events.append(self._event("response.output_item.added", output_index=self._index(item), item=dict(item)))

    def _ensure(self, kind: str, events: List[dict]) -> dict:
        if self._open is not None and self._open["type"] == kind:
            return self._open
        events += self._close()
        if kind == "reasoning":
            part = {"type": "reasoning_text", "text": ""}
            item = {"id": new_id("rs"), "type": "reasoning", "summary": [], "content": [part], "status": "in_progress"}
        else:
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
            item = {
                "id": new_id("msg"),
                "type": "message",
                "role": "assistant",
                "status": "in_progress",
                "content": [part],
            }
        self._add(item, events)
        shown = dict(item, content=[])
        events[-1]["item"] = shown
        events.append(
            self._event(
                "response.content_part.added",
                item_id=item["id"],
                output_index=self._index(item),
                content_index=0,
                part=dict(part),
            )
        )
        return item

    def _close(self, status: str = "completed") -> List[dict]:
        item, self._open = self._open, None
        if item is None:
            return []
        i = self._index(item)
        item["status"] = status
        events = []
        if item["type"] == "function_call":
            events.append(
                self._event(
                    "response.function_call_arguments.done",
                    item_id=item["id"],
                    output_index=i,
                    name=item["name"],
                    arguments=item["arguments"],
                )
            )
        else:
            part = item["content"][0]
            done = "response.reasoning_text.done" if item["type"] == "reasoning" else "response.output_text.done"
            fields = {"logprobs": []} if item["type"] == "message" else {}
            events.append(
                self._event(done, item_id=item["id"], output_index=i, content_index=0, text=part["text"], **fields)
            )
            events.append(
                self._event(
                    "response.content_part.done", item_id=item["id"], output_index=i, content_index=0, part=dict(part)
                )
            )
        events.append(self._event("response.output_item.done", output_index=i, item=dict(item)))
        return events


def sse_event(event: dict) -> bytes:
    """One typed server-sent event (``event:`` line plus JSON data)."""
    data = json.dumps(event, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return f"event: {event['type']}\ndata: {data}\n\n".encode("utf-8")
