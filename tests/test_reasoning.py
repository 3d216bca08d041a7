"""Reasoning splitting: whole outputs and every streamed split agree; tags never leak."""

import random

import pytest

from helexa_native.reasoning import (
    ReasoningStreamParser,
    assemble_reasoning,
    detect_reasoning,
    parse_reasoning,
    prompt_opens_reasoning,
)

# (output, starts inside reasoning, expected reasoning, expected content)
CASES = [
    (
        "<think>\nThe user asks for 2 + 2. That is 4.\n</think>\n\n2 + 2 = **4**.",
        False,
        "The user asks for 2 + 2. That is 4.",
        "2 + 2 = **4**.",
    ),
    (
        "Okay, so the user wants a haiku.\nLet me count syllables: 5-7-5.\n</think>\n\nCode runs through the night",
        True,
        "Okay, so the user wants a haiku.\nLet me count syllables: 5-7-5.",
        "Code runs through the night",
    ),
    ("<think>\n\n</think>\n\nHello! How can I help?", False, None, "Hello! How can I help?"),
    ("Hello! How can I help?\n", False, None, "Hello! How can I help?\n"),
    ("Use <think> tags like this: <think>x</think>", False, None, "Use <think> tags like this: <think>x</think>"),
    ("<think>\nStill thinking when max_tokens ran o", False, "Still thinking when max_tokens ran o", None),
    ("Still thinking when max_tokens ran o", True, "Still thinking when max_tokens ran o", None),
    ("<think>\nR1 opened it twice.\n</think>\nAnswer", True, "R1 opened it twice.", "Answer"),
    (
        "<think>Ünïcödé 思考 🎉 </ think> </thinking></think>答え：４",
        False,
        "Ünïcödé 思考 🎉 </ think> </thinking>",
        "答え：４",
    ),
    ("<think>a</think>b</think>c", False, "a", "b</think>c"),
    ("<thin", False, None, "<thin"),
    ("", False, None, None),
    ("\n\n", True, None, None),
]


@pytest.mark.parametrize("text,start,reasoning,content", CASES)
def test_whole_output(text, start, reasoning, content):
    r = parse_reasoning(text, start_in_reasoning=start)
    assert (r.reasoning_content, r.content) == (reasoning, content)


def _stream(pieces, start):
    p = ReasoningStreamParser(start_in_reasoning=start)
    deltas = []
    for piece in pieces:
        deltas += p.feed(piece)
    return deltas + p.finish()


def _check(deltas, text):
    for d in deltas:
        assert len(d) == 1 and next(iter(d)) in ("reasoning_content", "content")
        if "reasoning_content" in d:
            assert "<think>" not in d["reasoning_content"] and "</think>" not in d["reasoning_content"]


@pytest.mark.parametrize("text,start,reasoning,content", CASES)
def test_streamed_at_every_split(text, start, reasoning, content):
    whole = parse_reasoning(text, start)
    for k in range(len(text) + 1):
        deltas = _stream([text[:k], text[k:]], start)
        _check(deltas, text)
        assert assemble_reasoning(deltas) == whole
    assert assemble_reasoning(_stream(list(text), start)) == whole
    rng = random.Random(len(text))
    for _ in range(30):
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(1, 6))))
        pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
        assert assemble_reasoning(_stream(pieces, start)) == whole


def test_stream_order_and_holdback():
    p = ReasoningStreamParser()
    assert p.feed("<thi") == [] and p.in_reasoning
    assert p.feed("nk>\nStep one.</th") == [{"reasoning_content": "Step one."}]
    assert p.feed("ink>\n\nDone") == [{"content": "Done"}]
    assert not p.in_reasoning
    assert p.finish() == []


def test_feed_after_finish_raises():
    p = ReasoningStreamParser()
    p.finish()
    with pytest.raises(RuntimeError):
        p.feed("x")


QWEN3_TEMPLATE = (
    "{%- if reasoning_content %}{{- '<|im_start|>' + message.role + '\\n<think>\\n' + "
    "reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content }}{%- endif %}"
    "{%- if enable_thinking is defined and enable_thinking is false %}"
    "{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
)
R1_TEMPLATE = (
    "{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{% if add_generation_prompt %}{{'<｜Assistant｜><think>\\n'}}{% endif %}"
)


@pytest.mark.parametrize(
    "template,expected",
    [(QWEN3_TEMPLATE, "think"), (R1_TEMPLATE, "think"), ("{{ '<|im_start|>assistant\\n' }}", None), (None, None)],
)
def test_detect_reasoning(template, expected):
    assert detect_reasoning(template) == expected


def test_prompt_opens_reasoning():
    assert prompt_opens_reasoning("<｜User｜>Hi<｜Assistant｜><think>\n")
    assert not prompt_opens_reasoning("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert not prompt_opens_reasoning(
        "<|im_start|>assistant\n<think>\nold\n</think>\n\nx<|im_end|>\n<|im_start|>assistant\n"
    )
    assert not prompt_opens_reasoning("<|im_start|>assistant\n")
