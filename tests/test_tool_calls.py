"""Tool-call parsing: realistic outputs of each family, whole and streamed at every split."""

import itertools
import json
import random
import re

import pytest

from helexa_native.tool_calls import (
    PARSERS,
    ToolCallStreamParser,
    assemble_deltas,
    check_parser,
    detect_parser,
    new_mistral_tool_call_id,
    new_tool_call_id,
    parse_tool_calls,
)

MARKUP = ("<tool_call>", "</tool_call>", "<|python_tag|>", "[TOOL_CALLS]", "[ARGS]", "[CALL_ID]")


def counter_ids():
    c = itertools.count()
    return lambda: f"call_{next(c)}"


UNICODE_ARGS = {
    "text": "Grüße aus Köln — 東京 🎉",
    "quote": 'he said "hi"\n',
    "path": "C:\\temp\\new",
    "escaped": "é\u0001",
    "tab": "a\tb",
}
UNICODE_JSON = json.dumps(UNICODE_ARGS)  # \uXXXX escapes
UNICODE_JSON_RAW = json.dumps(UNICODE_ARGS, ensure_ascii=False)

# (parser, model output, expected content, expected [(name, arguments dict)], well-formed)
CASES = [
    # ---- hermes (Qwen2.5 / Qwen3) ----
    (
        "hermes",
        '<tool_call>\n{"name": "get_current_temperature", "arguments": {"location": "San Francisco, CA, USA", '
        '"unit": "celsius"}}\n</tool_call>',
        None,
        [("get_current_temperature", {"location": "San Francisco, CA, USA", "unit": "celsius"})],
        True,
    ),
    (
        "hermes",
        'I\'ll look up both cities.\n\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
        '</tool_call>\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Tokyo", "days": 3}}\n'
        "</tool_call>",
        "I'll look up both cities.",
        [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Tokyo", "days": 3})],
        True,
    ),
    (
        "hermes",
        "The capital of France is Paris. Use <b>bold</b> and a < b.",
        "The capital of France is Paris. Use <b>bold</b> and a < b.",
        [],
        True,
    ),
    (
        "hermes",
        f'<tool_call>\n{{"name": "translate", "arguments": {UNICODE_JSON}}}\n</tool_call>',
        None,
        [("translate", UNICODE_ARGS)],
        True,
    ),
    (
        "hermes",
        f'<tool_call>\n{{"name": "translate", "arguments": {UNICODE_JSON_RAW}}}\n</tool_call>',
        None,
        [("translate", UNICODE_ARGS)],
        True,
    ),
    (
        "hermes",
        '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>\nChecking the clock now.',
        "Checking the clock now.",
        [("get_time", {})],
        True,
    ),
    (
        "hermes",  # arguments before the name, nested values
        '<tool_call>\n{"arguments": {"q": {"and": [1, -2.5e3, true, null]}}, "name": "search"}\n</tool_call>',
        None,
        [("search", {"q": {"and": [1, -2.5e3, True, None]}})],
        True,
    ),
    (
        "hermes",  # arguments given as a JSON string
        '<tool_call>\n{"name": "f", "arguments": "{\\"a\\": 1}"}\n</tool_call>',
        None,
        [("f", {"a": 1})],
        True,
    ),
    # malformed: not JSON inside the marker -> content
    (
        "hermes",
        '<tool_call>\nget_weather(city="Paris")\n</tool_call>',
        '<tool_call>\nget_weather(city="Paris")\n</tool_call>',
        [],
        False,
    ),
    (
        "hermes",
        "<tool_call>\n{name: 'get_weather'}\n</tool_call>",
        "<tool_call>\n{name: 'get_weather'}\n</tool_call>",
        [],
        False,
    ),
    # malformed: cut off before the call is known -> content
    ("hermes", 'Sure.\n<tool_call>\n{"name": "get_wea', 'Sure.\n<tool_call>\n{"name": "get_wea', [], False),
    # malformed: a missing closing brace after complete arguments keeps the call
    (
        "hermes",
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}\n</tool_call>',
        None,
        [("get_weather", {"city": "Paris"})],
        False,
    ),
    # ---- llama3_json (Llama 3.1 / 3.2) ----
    (
        "llama3_json",
        '{"name": "get_weather", "parameters": {"city": "San Francisco", "unit": "fahrenheit"}}',
        None,
        [("get_weather", {"city": "San Francisco", "unit": "fahrenheit"})],
        True,
    ),
    (
        "llama3_json",
        '<|python_tag|>{"type": "function", "name": "get_weather", "parameters": {"city": "Paris"}}',
        None,
        [("get_weather", {"city": "Paris"})],
        True,
    ),
    (
        "llama3_json",
        '{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "get_time", "parameters": '
        '{"timezone": "Europe/Paris"}}',
        None,
        [("get_weather", {"city": "Paris"}), ("get_time", {"timezone": "Europe/Paris"})],
        True,
    ),
    (
        "llama3_json",
        'Let me check that.<|python_tag|>{"name": "search", "parameters": {"query": "llama"}}',
        "Let me check that.",
        [("search", {"query": "llama"})],
        True,
    ),
    ("llama3_json", "The weather in Paris is sunny today.", "The weather in Paris is sunny today.", [], True),
    ("llama3_json", '{"result": 42, "unit": "m"}', '{"result": 42, "unit": "m"}', [], True),
    (
        "llama3_json",
        f'{{"name": "translate", "parameters": {UNICODE_JSON_RAW}}}',
        None,
        [("translate", UNICODE_ARGS)],
        True,
    ),
    ("llama3_json", '{"name": "get_weather", "parameters": }', '{"name": "get_weather", "parameters": }', [], False),
    # ---- mistral ----
    (
        "mistral",
        '[TOOL_CALLS][{"name": "get_current_weather", "arguments": {"location": "Paris, France", '
        '"format": "celsius"}}]',
        None,
        [("get_current_weather", {"location": "Paris, France", "format": "celsius"})],
        True,
    ),
    (
        "mistral",
        'Let me check both. [TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}, '
        '{"name": "get_weather", "arguments": {"city": "Berlin"}}]',
        "Let me check both.",
        [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Berlin"})],
        True,
    ),
    (
        "mistral",
        '[TOOL_CALLS]get_weather[ARGS]{"location": "Paris", "unit": "celsius"}',
        None,
        [("get_weather", {"location": "Paris", "unit": "celsius"})],
        True,
    ),
    (
        "mistral",
        '[TOOL_CALLS]get_weather[ARGS]{"location": "Paris"}[TOOL_CALLS]get_time[CALL_ID]a1B2c3D4e[ARGS]{}',
        None,
        [("get_weather", {"location": "Paris"}), ("get_time", {})],
        True,
    ),
    (
        "mistral",
        f'[TOOL_CALLS][{{"name": "translate", "arguments": {UNICODE_JSON}}}]',
        None,
        [("translate", UNICODE_ARGS)],
        True,
    ),
    (
        "mistral",
        "Bonjour ! Comment puis-je vous aider [aujourd'hui] ?",
        "Bonjour ! Comment puis-je vous aider [aujourd'hui] ?",
        [],
        True,
    ),
    ("mistral", "[TOOL_CALLS] get weather(Paris)", "[TOOL_CALLS] get weather(Paris)", [], False),
]


def _ids(case):
    return f"{case[0]}-{CASES.index(case)}"


def _check_result(res, content, calls):
    assert res.content == content
    assert [c["function"]["name"] for c in res.tool_calls] == [n for n, _ in calls]
    for call, (_, args) in zip(res.tool_calls, calls):
        assert call["type"] == "function"
        assert json.loads(call["function"]["arguments"]) == args


def _stream(parser, pieces):
    p = ToolCallStreamParser(parser, id_factory=counter_ids())
    deltas = []
    for piece in pieces:
        deltas += p.feed(piece)
    deltas += p.finish()
    return deltas


def _check_deltas(deltas, well_formed):
    seen = set()
    for d in deltas:
        assert set(d) in ({"content"}, {"tool_calls"})
        if "content" in d:
            assert d["content"]
            if well_formed:
                assert not any(m in d["content"] for m in MARKUP), d
        else:
            (tc,) = d["tool_calls"]
            if tc["index"] not in seen:
                assert set(tc) == {"index", "id", "type", "function"} and tc["type"] == "function"
                assert tc["function"]["name"] and "arguments" in tc["function"]
                assert tc["index"] == len(seen)
                seen.add(tc["index"])
            else:
                assert set(tc) == {"index", "function"} and set(tc["function"]) == {"arguments"}


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_whole_output(case):
    parser, text, content, calls, _ = case
    res = parse_tool_calls(text, parser)
    _check_result(res, content, calls)
    ids = [c["id"] for c in res.tool_calls]
    assert len(set(ids)) == len(ids)
    for i in ids:
        if parser == "mistral":
            assert re.fullmatch(r"[A-Za-z0-9]{9}", i)
        else:
            assert re.fullmatch(r"call_[A-Za-z0-9]{24}", i)


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_streamed_at_every_split(case):
    parser, text, content, calls, well_formed = case
    whole = parse_tool_calls(text, parser, id_factory=counter_ids())
    for k in range(len(text) + 1):
        deltas = _stream(parser, [text[:k], text[k:]])
        _check_deltas(deltas, well_formed)
        assert assemble_deltas(deltas) == whole, k
    deltas = _stream(parser, list(text))
    _check_deltas(deltas, well_formed)
    assert assemble_deltas(deltas) == whole
    # Character by character, arguments that follow the name and are an object arrive in
    # pieces; ones written before the name, or as a JSON string, come whole.
    whole_args = '"arguments": "' in text or 0 <= text.find('"arguments"') < text.find('"name"')
    for i, (_, args) in enumerate(calls):
        pieces = [
            tc["function"]["arguments"]
            for d in deltas
            for tc in d.get("tool_calls", ())
            if tc["index"] == i and tc["function"]["arguments"]
        ]
        if len(json.dumps(args)) > 2:
            assert len(pieces) == 1 if whole_args else len(pieces) > 1


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_streamed_random_splits(case):
    parser, text, _, _, well_formed = case
    whole = parse_tool_calls(text, parser, id_factory=counter_ids())
    rng = random.Random(hash(text) & 0xFFFF)
    for _ in range(50):
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(1, 8))))
        pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
        deltas = _stream(parser, pieces)
        _check_deltas(deltas, well_formed)
        assert assemble_deltas(deltas) == whole, pieces


def test_marker_prefix_is_held_back():
    p = ToolCallStreamParser("hermes", id_factory=counter_ids())
    assert p.feed("Checking <tool") == [{"content": "Checking"}]
    assert p.feed('_call>\n{"name": "f"') == []
    first = p.feed(', "arguments": {"x"')
    assert first == [
        {
            "tool_calls": [
                {"index": 0, "id": "call_0", "type": "function", "function": {"name": "f", "arguments": '{"x"'}}
            ]
        }
    ]
    assert p.feed(": 1}}\n</tool_call>") == [{"tool_calls": [{"index": 0, "function": {"arguments": ": 1}"}}]}]
    assert p.finish() == []
    # A prefix that turns out not to be a marker is content after all.
    p = ToolCallStreamParser("hermes")
    assert p.feed("a <tool") == [{"content": "a"}]
    assert p.feed("s list") == [{"content": " <tools list"}]


def test_cut_off_arguments_are_kept():
    text = '<tool_call>\n{"name": "write", "arguments": {"text": "Hello wor'
    res = parse_tool_calls(text, "hermes")
    assert res.content is None
    assert res.tool_calls[0]["function"] == {"name": "write", "arguments": '{"text": "Hello wor'}


def test_broken_json_after_commit_drops_rest_of_block():
    text = '<tool_call>\n{"name": "f", "arguments": {"a": 1,}}\n</tool_call>\nDone.'
    res = parse_tool_calls(text, "hermes")
    assert res.content == "Done."
    assert res.tool_calls[0]["function"] == {"name": "f", "arguments": '{"a": 1,'}


def test_raw_control_character_in_string_is_invalid():
    text = '<tool_call>\n{"name": "f\n", "arguments": {}}\n</tool_call>'
    res = parse_tool_calls(text, "hermes")
    assert res.tool_calls == [] and res.content == text


def test_feed_after_finish_raises():
    p = ToolCallStreamParser("mistral")
    p.finish()
    with pytest.raises(RuntimeError):
        p.feed("x")


def test_unknown_parser():
    with pytest.raises(ValueError, match="hermes"):
        ToolCallStreamParser("nope")
    assert check_parser("mistral") == "mistral"


def test_ids():
    assert re.fullmatch(r"call_[A-Za-z0-9]{24}", new_tool_call_id())
    assert re.fullmatch(r"[A-Za-z0-9]{9}", new_mistral_tool_call_id())
    assert new_tool_call_id() != new_tool_call_id()


# Excerpts of the real templates, enough to carry each family's markers.
QWEN25_TEMPLATE = (
    "{%- if tools %}\n    {{- '<|im_start|>system\\n' }}\n    {{- \"\\n\\n# Tools\\n\\nYou may call one or more "
    "functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools>"
    '</tools> XML tags:\\n<tools>" }}\n    {%- for tool in tools %}\n        {{- "\\n" }}\n        {{- tool | tojson }}'
    '\n    {%- endfor %}\n    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name '
    'and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, '
    '\\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}'
)
LLAMA31_TEMPLATE = (
    '{%- if tools is not none %}\n    {{- "Environment: ipython\\n" }}\n{%- endif %}\n'
    '{{- \'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.'
    "' }}\n{%- if builtin_tools is defined and tool_call.name in builtin_tools %}\n"
    "{{- '<|python_tag|>' + tool_call.name + '.call(' }}"
)
LLAMA32_TEMPLATE = (
    '{%- if tools is not none %}\n    {{- "Environment: ipython\\n" }}\n{%- endif %}\n'
    "{{- '{\"name\": \"' + tool_call.name + '\", ' }}"
)
MISTRAL_V3_TEMPLATE = (
    '{%- if message["role"] == "user" %}{%- if tools is not none and (message == user_messages[-1]) %}'
    '{{- "[AVAILABLE_TOOLS] [" }}{%- endif %}{%- elif message.tool_calls is defined %}{{- "[TOOL_CALLS] [" }}'
)
MISTRAL_NEW_TEMPLATE = '{{- "[TOOL_CALLS]" + tool.function.name + "[ARGS]" + arguments }}'
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
)


@pytest.mark.parametrize(
    "template,expected",
    [
        (QWEN25_TEMPLATE, "hermes"),
        (LLAMA31_TEMPLATE, "llama3_json"),
        (LLAMA32_TEMPLATE, "llama3_json"),
        (MISTRAL_V3_TEMPLATE, "mistral"),
        (MISTRAL_NEW_TEMPLATE, "mistral"),
        (CHATML_TEMPLATE, None),
        ("", None),
        (None, None),
    ],
)
def test_detect_parser(template, expected):
    assert detect_parser(template) == expected
    assert expected is None or expected in PARSERS


def test_detect_parser_default_model(default_model):
    from helexa_native.loaders import load_source

    src = load_source(default_model)
    try:
        assert detect_parser(src.chat_template) is None  # SmolLM2-135M has no tool format
    finally:
        src.close()


FUZZ_PIECES = [
    "<tool_call>",
    "</tool_call>",
    "<tool",
    "_call>",
    "{",
    "}",
    "[",
    "]",
    '"name"',
    '"arguments"',
    '"parameters"',
    ": ",
    ":",
    ", ",
    ",",
    '"f"',
    '"g\\n"',
    '"é"',
    "1",
    "-2.5",
    "true",
    "null",
    "[TOOL_CALLS]",
    "[TOOL",
    "[ARGS]",
    "[CALL_ID]",
    "get",
    "<|python_tag|>",
    ";",
    " ",
    "\n",
    "text",
    '"',
    "\\",
    '<tool_call>\n{"name": "f", "arguments": {"a": [1, "x"]}}\n</tool_call>',
    '{"name": "f", "parameters": {"b": null}}',
    '[TOOL_CALLS][{"name": "f", "arguments": {}}]',
    '[TOOL_CALLS]f[ARGS]{"a": 1}',
    '<|python_tag|>{"name": "g", "arguments": {"c": "d"}}',
]


@pytest.mark.parametrize("parser", PARSERS)
def test_fuzz_split_invariance(parser):
    """Random markup-heavy texts: one-piece, char-by-char and random splits agree."""
    rng = random.Random(1234 + PARSERS.index(parser))
    for _ in range(400):
        text = "".join(rng.choice(FUZZ_PIECES) for _ in range(rng.randint(1, 30)))
        whole = parse_tool_calls(text, parser, id_factory=counter_ids())
        assert assemble_deltas(_stream(parser, list(text))) == whole, text
        for _ in range(3):
            cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(1, 6))))
            pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
            assert assemble_deltas(_stream(parser, pieces)) == whole, (text, pieces)
