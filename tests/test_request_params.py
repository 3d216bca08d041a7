"""Request fields resolved into SamplingParams: precedence, checks, and the errors that name a field."""

import pickle

import pytest

from helexa_native import defaults
from helexa_native.errors import InvalidParameterError
from helexa_native.request_params import MAX_TOKENS_ALIAS, SAMPLING_FIELDS, resolve_params


def test_resolve_precedence_request_over_generation_config_over_defaults():
    gc = {
        "temperature": 0.6,
        "top_p": 0.9,
        "top_k": 20,
        "max_new_tokens": 77,
        "repetition_penalty": 1.1,
        "eos_token_id": [5, 9],
    }
    p, mt, stop, ids = resolve_params({}, gc)
    assert (p.temperature, p.top_p, p.top_k, p.repetition_penalty, mt) == (0.6, 0.9, 20, 1.1, 77)
    assert p.min_p == defaults.DEFAULT_MIN_P
    assert ids == [5, 9] and stop == []
    p, mt, stop, ids = resolve_params(
        {"temperature": 0.0, "top_p": 0.5, "max_tokens": 3, "top_k": None, "stop": "x", "stop_token_ids": [7]}, gc
    )
    assert (p.temperature, p.top_p, p.top_k, mt) == (0.0, 0.5, 20, 3)
    assert stop == ["x"] and ids == [7, 5, 9]
    p, mt, _, ids = resolve_params({"ignore_eos": True}, gc)
    assert ids == []
    p, mt, _, _ = resolve_params({}, {})
    assert (p.temperature, p.top_p, p.top_k, mt) == (
        defaults.DEFAULT_TEMPERATURE,
        defaults.DEFAULT_TOP_P,
        defaults.DEFAULT_TOP_K,
        defaults.DEFAULT_MAX_TOKENS,
    )


def test_resolve_seed_given_or_fresh():
    p, *_ = resolve_params({"seed": 123})
    assert p.seed == 123
    seeds = {resolve_params({})[0].seed for _ in range(5)}
    assert len(seeds) == 5


def test_resolve_logprobs_forms():
    p, *_ = resolve_params({"logprobs": True, "top_logprobs": 5})
    assert p.logprobs and p.top_logprobs == 5
    p, *_ = resolve_params({"logprobs": 3})
    assert p.logprobs and p.top_logprobs == 3
    p, *_ = resolve_params({})
    assert not p.logprobs


INVALID = [
    ("max_tokens", -1),
    ("max_tokens", 1.5),
    ("max_tokens", True),
    ("max_tokens", "10"),
    ("temperature", -0.1),
    ("temperature", "hot"),
    ("temperature", True),
    ("temperature", float("nan")),
    ("top_p", 0.0),
    ("top_p", 1.01),
    ("top_p", -0.5),
    ("top_k", -1),
    ("top_k", 2.5),
    ("top_k", False),
    ("min_p", -0.01),
    ("min_p", 1.5),
    ("repetition_penalty", 0.0),
    ("repetition_penalty", -1.0),
    ("presence_penalty", 2.5),
    ("presence_penalty", -2.01),
    ("frequency_penalty", 3),
    ("top_logprobs", 21),
    ("top_logprobs", -1),
    ("top_logprobs", 1.0),
    ("logprobs", "yes"),
    ("logprobs", 99),
    ("seed", 1.5),
    ("seed", "1"),
    ("seed", True),
    ("stop", 5),
    ("stop", ["a", 3]),
    ("stop_token_ids", [-1]),
    ("stop_token_ids", ["a"]),
    ("stop_token_ids", "3"),
    ("ignore_eos", "no"),
]


@pytest.mark.parametrize("field,value", INVALID)
def test_resolve_rejects_invalid(field, value):
    with pytest.raises(InvalidParameterError, match=field) as e:
        resolve_params({field: value})
    assert e.value.field == field
    assert isinstance(e.value, ValueError)


def test_every_field_has_a_rejected_value():
    assert {f for f, _ in INVALID} == set(SAMPLING_FIELDS)


def test_malformed_generation_config_falls_back_to_defaults():
    p, mt, _, ids = resolve_params({}, {"temperature": -3, "top_p": "x", "max_new_tokens": -5, "eos_token_id": "bad"})
    assert p.temperature == defaults.DEFAULT_TEMPERATURE and p.top_p == defaults.DEFAULT_TOP_P
    assert mt == defaults.DEFAULT_MAX_TOKENS and ids == []


def test_max_completion_tokens_stands_in_for_max_tokens():
    assert resolve_params({MAX_TOKENS_ALIAS: 7})[1] == 7
    assert resolve_params({"max_tokens": 3, MAX_TOKENS_ALIAS: 7})[1] == 3
    with pytest.raises(InvalidParameterError) as e:
        resolve_params({MAX_TOKENS_ALIAS: -1})
    assert e.value.field == MAX_TOKENS_ALIAS


def test_seed_wraps_to_64_bits():
    assert resolve_params({"seed": -1})[0].seed == (1 << 64) - 1
    assert resolve_params({"seed": (1 << 64) + 5})[0].seed == 5


def test_invalid_parameter_error_survives_pickling():
    e = pickle.loads(pickle.dumps(InvalidParameterError("top_p", "top_p must be in (0, 1], got 2")))
    assert e.field == "top_p" and str(e) == "top_p must be in (0, 1], got 2"
