"""Tools, tool calls and tool results as a chat template can render them.

A model's own template renders `tools` and the conversation's tool turns
when it knows them (Qwen2.5/3, Llama 3.1+, Mistral). For those,
`prepare_messages` only turns each call's ``arguments`` JSON string into the
object such templates expect (vLLM does the same). A template that mentions
neither ``tools`` nor ``tool_calls`` (SmolLM2, most small chat models) would
drop the tools and fail on an assistant turn without content, so there:

* the tools go into the system message (appended to the first one, or as a
  new first message), described in the parser's output format;
* an assistant turn's tool calls become its text, written in that format;
* a ``tool`` message becomes a user turn holding
  ``<tool_response>...</tool_response>``, as Qwen2.5's template writes it.

The output of such a model is then read by the same parser (hermes unless
overridden).
"""

from __future__ import annotations

import json
import re
from typing import List, Optional, Tuple

_TOOLS_VAR = re.compile(r"\btools\b")
_CALLS_VAR = re.compile(r"\btool_calls\b")

_FORMATS = {
    "hermes": (
        "For each function call, return a JSON object with the function name and arguments "
        "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
        '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
    ),
    "llama3_json": (
        "To call a function, answer with only a JSON object of the form "
        '{"name": <function-name>, "parameters": <args-json-object>}; '
        "separate several calls with '; '."
    ),
    "mistral": (
        "To call functions, answer with [TOOL_CALLS] followed by a JSON array of "
        '{"name": <function-name>, "arguments": <args-json-object>} objects.'
    ),
}


def template_renders_tools(source: str) -> bool:
    """Whether a chat template reads the `tools` variable."""
    return bool(_TOOLS_VAR.search(source or ""))


def template_renders_tool_calls(source: str) -> bool:
    """Whether a chat template renders assistant `tool_calls`."""
    return bool(_CALLS_VAR.search(source or ""))


def tools_system_text(tools: list, parser: str) -> str:
    """The system-prompt text that offers `tools` to a model whose template cannot."""
    lines = [
        "# Tools",
        "",
        "You may call one or more functions to assist with the user query.",
        "",
        "You are provided with function signatures within <tools></tools> XML tags:",
        "<tools>",
    ]
    lines += [json.dumps(t, ensure_ascii=False) for t in tools]
    lines += ["</tools>", "", _FORMATS.get(parser, _FORMATS["hermes"])]
    return "\n".join(lines)


def call_text(calls: list, parser: str) -> str:
    """Assistant tool calls written as the model would write them in `parser`'s format."""
    objs = []
    for c in calls:
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict):
            raise ValueError("each tool call of an assistant message needs a 'function' object")
        objs.append({"name": fn.get("name"), "arguments": _arguments(fn.get("arguments"))})
    if parser == "llama3_json":
        return "; ".join(
            json.dumps({"name": o["name"], "parameters": o["arguments"]}, ensure_ascii=False) for o in objs
        )
    if parser == "mistral":
        return "[TOOL_CALLS]" + json.dumps(objs, ensure_ascii=False)
    return "\n".join("<tool_call>\n" + json.dumps(o, ensure_ascii=False) + "\n</tool_call>" for o in objs)


def _arguments(args):
    """A call's arguments as an object: the JSON string OpenAI sends, decoded where it is an object."""
    if isinstance(args, str):
        try:
            value = json.loads(args)
        except ValueError:
            return args
        return value if isinstance(value, dict) else args
    return {} if args is None else args


def prepare_messages(
    messages: list, tools: Optional[list], template_source: str, parser: str
) -> Tuple[List[dict], Optional[list]]:
    """(messages, tools) as the template can render them; see the module docstring."""
    renders_tools = template_renders_tools(template_source)
    renders_calls = template_renders_tool_calls(template_source)
    out = []
    for m in messages:
        m = dict(m)
        calls = m.get("tool_calls")
        if m.get("role") == "assistant" and calls:
            if renders_calls:
                m["tool_calls"] = [_decoded_call(c) for c in calls]
            else:
                text = m.get("content") or ""
                m["content"] = (text + "\n" if text else "") + call_text(calls, parser)
                del m["tool_calls"]
        elif m.get("role") == "tool" and not renders_calls:
            m = {"role": "user", "content": f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"}
        out.append(m)
    if not tools or renders_tools:
        return out, tools
    text = tools_system_text(tools, parser)
    if out and out[0].get("role") == "system" and isinstance(out[0].get("content"), str):
        out[0] = dict(out[0], content=out[0]["content"] + "\n\n" + text)
    else:
        out.insert(0, {"role": "system", "content": text})
    return out, None


def _decoded_call(call):
    if not isinstance(call, dict) or not isinstance(call.get("function"), dict):
        return call
    fn = dict(call["function"], arguments=_arguments(call["function"].get("arguments")))
    return dict(call, function=fn)
