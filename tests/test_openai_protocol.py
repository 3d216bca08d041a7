"""openai_protocol's request checks on plain dicts, without a server."""

import pytest

from helexa_native.openai_protocol import ApiError, parse_chat_request, parse_completion_request
from helexa_native.request_params import MAX_TOKENS_ALIAS, PASSTHROUGH_FIELDS

MESSAGES = [{"role": "user", "content": "x"}]

BAD = [
    ("max_tokens", -1),
    ("temperature", "hot"),
    ("top_p", 0),
    ("top_k", 1.5),
    ("min_p", 2),
    ("repetition_penalty", 0),
    ("presence_penalty", 9),
    ("frequency_penalty", -3),
    ("seed", "s"),
    ("stop", 5),
    ("stop_token_ids", [-1]),
    ("ignore_eos", "no"),
]


def test_every_passthrough_field_has_a_bad_value():
    assert {f for f, _ in BAD} == set(PASSTHROUGH_FIELDS)


@pytest.mark.parametrize("field,value", BAD + [(MAX_TOKENS_ALIAS, -1)])
def test_bad_chat_sampling_field_is_the_param(field, value):
    with pytest.raises(ApiError) as e:
        parse_chat_request({"messages": MESSAGES, field: value})
    assert e.value.status == 400 and e.value.param == field and e.value.message.startswith(field)


@pytest.mark.parametrize("field,value", BAD)
def test_bad_completion_sampling_field_is_the_param(field, value):
    with pytest.raises(ApiError) as e:
        parse_completion_request({"prompt": "x", field: value})
    assert e.value.status == 400 and e.value.param == field and e.value.message.startswith(field)


def test_the_offending_field_is_named_among_good_ones():
    with pytest.raises(ApiError) as e:
        parse_chat_request({"messages": MESSAGES, "temperature": 0.5, "top_k": 40, "stop": ["a", 3], "seed": 1})
    assert e.value.param == "stop"


def test_sampling_arguments_pass_through_by_name():
    r = parse_chat_request({"messages": MESSAGES, MAX_TOKENS_ALIAS: 5, "temperature": 0, "stop": "x", "top_p": None})
    assert r.sampling == {"max_tokens": 5, "temperature": 0, "stop": "x"}
    # max_tokens wins over its alias, which is then not looked at.
    r = parse_chat_request({"messages": MESSAGES, "max_tokens": 3, MAX_TOKENS_ALIAS: -1})
    assert r.sampling == {"max_tokens": 3}
    r = parse_completion_request({"prompt": "x", "seed": 7, "ignore_eos": True, "logprobs": 2})
    assert r.sampling == {"seed": 7, "ignore_eos": True, "logprobs": True, "top_logprobs": 2}
