"""ChatTemplate against transformers' apply_chat_template on real template texts."""

import re

import pytest

from helexa_native.chat_template import DEFAULT_CHAT_TEMPLATE, ChatTemplate, normalize_messages
from helexa_native.errors import ChatTemplateError

transformers = pytest.importorskip("transformers")

# Meta-Llama-3-8B-Instruct's template.
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# Qwen2.5-Instruct's template (tools, tool calls and tool responses).
QWEN25_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

# Mistral-style: alternation enforced with raise_exception; plain (non-dash)
# blocks on their own lines exercise trim_blocks / lstrip_blocks.
MISTRAL_TEMPLATE = """{{ bos_token }}
{% for message in messages %}
    {% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {% endif %}
    {% if message['role'] == 'user' %}
        {{ '[INST] ' + message['content'] + ' [/INST]' }}
    {% elif message['role'] == 'assistant' %}
        {% generation %}{{ message['content'] + eos_token }}{% endgeneration %}
    {% endif %}
{% endfor %}
"""

# namespace(), loop controls, tojson options, a custom kwarg and a date.
FEATURES_TEMPLATE = """{%- set ns = namespace(system='', n=0) -%}
{%- for m in messages -%}
  {%- if m.role == 'system' -%}{%- set ns.system = m.content -%}{%- continue -%}{%- endif -%}
  {%- set ns.n = ns.n + 1 -%}
  {%- if ns.n > max_turns | default(99) -%}{%- break -%}{%- endif -%}
  <{{ m.role }}>{{ m.content }}</{{ m.role }}>
{% endfor -%}
SYS={{ ns.system }}|{{ {'b': 1, 'a': ['é', '<x>']} | tojson }}|{{ {'b': 1, 'a': 2} | tojson(indent=2, sort_keys=True) }}
{%- if tools %}|TOOLS={{ tools | length }}{% endif %}
{%- if documents %}|DOCS={{ documents | map(attribute='title') | join(',') }}{% endif %}
|{{ custom_flag }}|{{ strftime_now('%Y') | length }}
{%- if add_generation_prompt %}<assistant>{% endif %}"""

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city — ünïcode",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]

CONVERSATIONS = {
    "single": [{"role": "user", "content": "Hello!"}],
    "system": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What's 2+2?"}],
    "multi": [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "  hi there  "},
        {"role": "assistant", "content": "Hello! How can I help? 🙂"},
        {"role": "user", "content": "Tell me about 中文.\nThanks."},
    ],
    "tools": [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
        },
        {"role": "tool", "name": "get_weather", "content": '{"temp": 21}'},
        {"role": "user", "content": "Thanks"},
    ],
}


@pytest.fixture(scope="module")
def hf_tok():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({"<s>": 0, "</s>": 1, "<unk>": 2}, unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def hf_render(hf_tok, template, messages, add_generation_prompt, **kw):
    return hf_tok.apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt, **kw
    )


@pytest.fixture(scope="module")
def smollm_template(default_model):
    from helexa_native.loaders import load_source

    src = load_source(default_model, progress=False)
    src.close()
    assert src.chat_template
    return src.chat_template


def _templates(smollm_template):
    return {
        "smollm": smollm_template,
        "llama3": LLAMA3_TEMPLATE,
        "qwen25": QWEN25_TEMPLATE,
        "chatml-default": DEFAULT_CHAT_TEMPLATE,
    }


@pytest.mark.parametrize("name", ["smollm", "llama3", "qwen25", "chatml-default"])
@pytest.mark.parametrize("conv", ["single", "system", "multi"])
@pytest.mark.parametrize("agp", [True, False])
def test_matches_transformers(hf_tok, smollm_template, name, conv, agp):
    template = _templates(smollm_template)[name]
    messages = CONVERSATIONS[conv]
    ours = ChatTemplate(template, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    got = ours.render(messages, add_generation_prompt=agp)
    assert got == hf_render(hf_tok, template, messages, agp)
    assert got.endswith("assistant\n" if name != "llama3" else "<|end_header_id|>\n\n") == agp


def test_smollm_template_text(smollm_template):
    ct = ChatTemplate(smollm_template)
    assert ct.render([{"role": "user", "content": "Hi"}]) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


@pytest.mark.parametrize("agp", [True, False])
def test_qwen_tools_match_transformers(hf_tok, agp):
    messages = CONVERSATIONS["tools"]
    ours = ChatTemplate(QWEN25_TEMPLATE).render(messages, add_generation_prompt=agp, tools=TOOLS)
    ref = hf_render(hf_tok, QWEN25_TEMPLATE, messages, agp, tools=TOOLS)
    assert ours == ref
    assert '"description": "Weather for a city — ünïcode"' in ours  # tojson keeps non-ASCII
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}' in ours


def test_mistral_template_trim_and_raise(hf_tok):
    ct = ChatTemplate(MISTRAL_TEMPLATE, bos_token="<s>", eos_token="</s>")
    good = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]
    got = ct.render(good, add_generation_prompt=False)
    assert got == hf_render(hf_tok, MISTRAL_TEMPLATE, good, False)
    assert "[INST] a [/INST]" in got and "b</s>" in got
    bad = [{"role": "assistant", "content": "x"}]
    with pytest.raises(ChatTemplateError, match="Conversation roles must alternate"):
        ct.render(bad)
    with pytest.raises(Exception, match="Conversation roles must alternate"):
        hf_render(hf_tok, MISTRAL_TEMPLATE, bad, False)


@pytest.mark.parametrize("agp", [True, False])
def test_template_features_match_transformers(hf_tok, agp):
    messages = CONVERSATIONS["multi"] + [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]
    docs = [{"title": "A", "text": "aa"}, {"title": "B", "text": "bb"}]
    kw = dict(tools=TOOLS, documents=docs, custom_flag="on", max_turns=3)
    ours = ChatTemplate(FEATURES_TEMPLATE).render(messages, add_generation_prompt=agp, **kw)
    assert ours == hf_render(hf_tok, FEATURES_TEMPLATE, messages, agp, **kw)
    assert "SYS=Be kind." in ours and '"a": ["é", "<x>"]' in ours
    assert '{\n  "a": 2,\n  "b": 1\n}' in ours
    assert "|TOOLS=1" in ours and "|DOCS=A,B" in ours and "|on|4" in ours
    assert ours.count("<user>") == 2  # the loop broke after three turns
    assert ours.endswith("<assistant>") == agp


def test_default_template_is_chatml():
    ct = ChatTemplate(None)
    assert ct.is_default
    got = ct.render([{"role": "system", "content": "S"}, {"role": "user", "content": "U"}])
    assert got == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n"
    assert (
        ChatTemplate("").render([{"role": "user", "content": "U"}], add_generation_prompt=False)
        == "<|im_start|>user\nU<|im_end|>\n"
    )


def test_text_parts_are_joined():
    ct = ChatTemplate(None)
    msgs = [{"role": "user", "content": [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]}]
    assert ct.render(msgs, add_generation_prompt=False) == "<|im_start|>user\none\ntwo<|im_end|>\n"
    # The caller's messages are not modified.
    assert isinstance(msgs[0]["content"], list)


def test_kwargs_override_special_tokens():
    ct = ChatTemplate("{{ bos_token }}|{{ eos_token }}|{{ pad_token }}|{{ flag }}", bos_token="<s>", pad_token="<p>")
    assert ct.render([{"role": "user", "content": "x"}], flag=1) == "<s>||<p>|1"
    assert ct.render([{"role": "user", "content": "x"}], bos_token="B", flag=2) == "B||<p>|2"


@pytest.mark.parametrize(
    "messages, field",
    [
        ("hello", "messages"),
        ([["user", "hi"]], "messages[0]"),
        ([{"content": "hi"}], "messages[0].role"),
        ([{"role": 3, "content": "hi"}], "messages[0].role"),
        ([{"role": "user"}], "messages[0].content"),
        ([{"role": "user", "content": None}], "messages[0].content"),
        ([{"role": "user", "content": 5}], "messages[0].content"),
        (
            [{"role": "user", "content": "a"}, {"role": "user", "content": [{"type": "image_url", "image_url": {}}]}],
            "messages[1].content[0].type",
        ),
        ([{"role": "user", "content": [{"type": "text"}]}], "messages[0].content[0].text"),
        ([{"role": "user", "content": [7]}], "messages[0].content[0]"),
        ([{"role": "user", "content": "x", "extra": object()}], "messages[0].extra"),
    ],
)
def test_bad_messages_name_the_field(messages, field):
    with pytest.raises(ValueError, match=re.escape(field)):
        ChatTemplate(None).render(messages)


def test_tool_call_message_may_have_null_content():
    msgs = normalize_messages(
        [{"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "f", "arguments": {}}}]}]
    )
    assert msgs[0]["content"] is None


def test_bad_templates_raise_chat_template_error():
    with pytest.raises(ChatTemplateError, match="parse"):
        ChatTemplate("{% for m in messages %}{{ m.content }")
    with pytest.raises(ChatTemplateError, match="parse"):
        ChatTemplate("{% if x %}no end")
    with pytest.raises(ChatTemplateError, match="must be a string"):
        ChatTemplate(42)
    with pytest.raises(ChatTemplateError, match="division by zero"):
        ChatTemplate("{{ 1 / 0 }}").render([])
    with pytest.raises(ChatTemplateError):
        ChatTemplate("{{ messages[0]['content'] + 1 }}").render([{"role": "user", "content": "a"}])
    # The sandbox refuses attribute games and mutation.
    with pytest.raises(ChatTemplateError):
        ChatTemplate("{{ ''.__class__.__mro__[1].__subclasses__() }}").render([])
    with pytest.raises(ChatTemplateError):
        ChatTemplate("{% set x = messages.append(1) %}").render([])
    with pytest.raises(ChatTemplateError):
        ChatTemplate("{% set ns = namespace(_secret=1) %}").render([])
