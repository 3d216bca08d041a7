"""Chat output as message fields (reasoning, then tool calls) and tools rendered for templates without them."""

import json

import pytest

from helexa_native.chat_output import ChatOutputParser, assemble_message
from helexa_native.chat_template import ChatTemplate
from helexa_native.tool_prompt import prepare_messages, template_renders_tool_calls, template_renders_tools

TEXT = (
    "<think>\nI should call the tool.\n</think>\n\nSure.\n<tool_call>\n"
    '{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
)


def _run(pieces, **kw):
    p = ChatOutputParser(**kw)
    deltas = []
    for text, n in pieces:
        deltas += p.feed(text, n)
    deltas += p.finish()
    return assemble_message(deltas), p


@pytest.mark.parametrize("size", [1, 2, 3, 7, len(TEXT)])
def test_reasoning_then_tool_calls_under_any_split(size):
    pieces = [(TEXT[i : i + size], 1) for i in range(0, len(TEXT), size)]
    msg, p = _run(pieces, reasoning="think", tool_parser="hermes")
    assert msg.reasoning_content == "I should call the tool."
    assert msg.content == "Sure."
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in msg.tool_calls] == [
        ("get_weather", '{"city": "Oslo"}')
    ]
    assert p.tool_call_count == 1
    # Every piece up to the one holding </think> counts as reasoning.
    closes = next(i for i in range(len(pieces)) if "".join(t for t, _ in pieces[: i + 1]).find("</think>") >= 0)
    assert p.reasoning_tokens == closes + 1


def test_no_reasoning_counts_no_reasoning_tokens():
    msg, p = _run([("Hello", 1), (" there", 1)], reasoning="think")
    assert (msg.content, msg.reasoning_content, p.reasoning_tokens) == ("Hello there", None, 0)
    msg, p = _run([("I was told <think> is a tag", 3)], reasoning="think")
    assert msg.content == "I was told <think> is a tag" and p.reasoning_tokens == 0


def test_prompt_opened_reasoning_and_unclosed_reasoning():
    msg, p = _run(
        [("plan", 1), (" more", 1), ("</think>", 1), ("Answer", 1)], reasoning="think", start_in_reasoning=True
    )
    assert (msg.reasoning_content, msg.content, p.reasoning_tokens) == ("plan more", "Answer", 3)
    msg, p = _run([("<think>cut off", 2)], reasoning="think")
    assert (msg.reasoning_content, msg.content, p.reasoning_tokens) == ("cut off", None, 2)


def test_without_parsers_text_is_content():
    msg, _ = _run([("  <tool_call>{}", 1)])
    assert msg.content == "  <tool_call>{}" and msg.tool_calls == []


# ---------------------------------------------------------------- tools for templates without them

PLAIN = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
HISTORY = [
    {"role": "user", "content": "Weather?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
]


def test_template_without_tools_gets_them_as_text():
    assert not template_renders_tools(PLAIN) and not template_renders_tool_calls(PLAIN)
    msgs, tools = prepare_messages(HISTORY, TOOLS, PLAIN, "hermes")
    assert tools is None
    assert msgs[0]["role"] == "system" and "<tools>" in msgs[0]["content"]
    assert json.dumps(TOOLS[0]) in msgs[0]["content"] and "<tool_call>" in msgs[0]["content"]
    assert msgs[2] == {
        "role": "assistant",
        "content": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>',
    }
    assert msgs[3] == {"role": "user", "content": "<tool_response>\nsunny\n</tool_response>"}
    text = ChatTemplate(PLAIN).render(msgs)
    assert "<|tool|>" not in text and "<|assistant|><tool_call>" in text
    # A system message of the conversation keeps its text; the tools follow it.
    msgs, _ = prepare_messages([{"role": "system", "content": "Be brief."}] + HISTORY[:1], TOOLS, PLAIN, "hermes")
    assert msgs[0]["content"].startswith("Be brief.\n\n# Tools") and len(msgs) == 2


def test_template_with_tools_gets_arguments_as_objects():
    src = "{% for m in messages %}{{ m.tool_calls | tojson if m.tool_calls else m.content }}{% endfor %}{{ tools | tojson }}"
    msgs, tools = prepare_messages(HISTORY, TOOLS, src, "hermes")
    assert tools == TOOLS
    assert msgs[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Oslo"}
    assert msgs[2]["role"] == "tool"
    assert HISTORY[1]["tool_calls"][0]["function"]["arguments"] == '{"city": "Oslo"}'  # input untouched


@pytest.mark.parametrize(
    "parser,want",
    [
        ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Oslo"}}'),
        ("mistral", '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Oslo"}}]'),
    ],
)
def test_calls_written_in_the_parsers_format(parser, want):
    msgs, _ = prepare_messages(HISTORY, None, PLAIN, parser)
    assert msgs[1]["content"] == want
