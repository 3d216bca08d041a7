"""Random malformed requests against the server over a real CPU engine: never a 5xx, always a JSON error envelope.

Each request starts from a valid body of one route and gets one to four
mutations: a field set to an odd value (wrong type, NaN, huge, empty,
lone surrogate, a half-valid tool or schema), a field dropped, or a field
set to a nested odd object; a few bodies are not JSON at all. Fixed seeds,
so a failure reproduces.
"""

from __future__ import annotations

import json
import random

import pytest

from helexa_native import Engine
from helexa_native.server import create_app
from helexa_native.synthetic import write_synthetic_gguf

MODEL = "m"

ODD = [
    None, True, False, 0, -1, 1, 2, 3.5, -3.5, 1e308, float("nan"), float("inf"), -float("inf"),
    2**63, -(2**63), 2**70, "", "x", "\x00", "\ud800", "a" * 5000, [], [1], ["a"], [None], [[]], {}, {"a": 1},
    {"type": "x"}, [{"role": "user"}], {"type": "json_schema"}, {"type": "json_schema", "json_schema": {}},
    {"type": "json_schema", "json_schema": {"schema": 5}},
    {"type": "json_schema", "json_schema": {"name": "n", "schema": {"properties": {"a": {"type": "integer"}}}}},
    {"type": "json_object"}, {"type": "function"}, {"type": "function", "function": {}},
    {"type": "function", "function": {"name": "f"}},
    [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}], [{"type": "function"}],
    {"type": "function", "function": {"name": "nope"}}, "required", "auto", "none", "float", "base64",
    [{"role": "tool", "content": "x"}],
    [{"role": "assistant", "tool_calls": [{"id": "a", "function": {"name": "f", "arguments": "{"}}]}],
    [{"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "image_url"}]}],
    [{"role": "user", "content": None}], [{"role": "system", "content": 5}], [{"role": "bogus", "content": "x"}],
    {"1": 10}, {"99999": 100}, {"-1": 1}, {"x": 1}, [1, 2, 3], [[1, 2], [3]], [-5], [600], [2**40],
    {"enable_thinking": True}, {"effort": "high"},
]  # fmt: skip

FIELDS = [
    "model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "min_p",
    "n", "stream", "stop", "seed", "logprobs", "top_logprobs", "logit_bias", "presence_penalty", "frequency_penalty",
    "repetition_penalty", "response_format", "tools", "tool_choice", "parallel_tool_calls", "stream_options", "user",
    "echo", "best_of", "suffix", "input", "instructions", "max_output_tokens", "previous_response_id", "reasoning",
    "text", "encoding_format", "dimensions", "tokens", "chat_template_kwargs", "add_generation_prompt", "ignore_eos",
    "min_tokens", "include_stop_str_in_output", "skip_special_tokens", "name", "store", "metadata",
]  # fmt: skip

NOT_JSON = [b"{", b"\xff\xfe", b"[]", b"null", b"1", b'"x"', b'{"model": "m", "messages": NaN}']


SAMPLING = [
    "max_tokens", "temperature", "top_p", "top_k", "min_p", "n", "stream", "stop", "seed", "logprobs",
    "top_logprobs", "logit_bias", "presence_penalty", "frequency_penalty", "response_format", "ignore_eos",
]  # fmt: skip


def routes(tiny: str) -> list:
    """(path, a valid body, the fields the route takes) of every POST route."""
    return [
        (
            "/v1/chat/completions",
            {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
            ["messages", "tools", "tool_choice", "chat_template_kwargs", "max_completion_tokens"] + SAMPLING,
        ),
        ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 3}, ["prompt", "echo", "suffix"] + SAMPLING),
        (
            "/v1/responses",
            {"model": MODEL, "input": "hi", "max_output_tokens": 3},
            ["input", "instructions", "previous_response_id", "tools", "tool_choice", "reasoning", "text", "stream"],
        ),
        ("/v1/embeddings", {"model": MODEL, "input": "hi"}, ["input", "encoding_format", "dimensions"]),
        ("/tokenize", {"model": MODEL, "prompt": "hi"}, ["prompt", "messages", "add_generation_prompt"]),
        ("/detokenize", {"model": MODEL, "tokens": [1, 2]}, ["tokens"]),
        ("/v1/models/load", {"model": tiny, "name": "other"}, ["model", "name"]),
        ("/v1/models/unload", {"model": "other"}, ["model"]),
    ]


def mutated(rng: random.Random, body: dict, own: list) -> dict:
    """One to four mutations, mostly of the route's own fields (so more requests get past validation)."""
    out = json.loads(json.dumps(body))
    for _ in range(rng.randint(1, 4)):
        op, field = rng.random(), rng.choice(own if rng.random() < 0.75 else FIELDS)
        if op < 0.6:
            out[field] = rng.choice(ODD)
        elif op < 0.8 and out:
            out.pop(rng.choice(list(out)))
        else:
            out[field] = {rng.choice(FIELDS): rng.choice(ODD)}
    return out


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz")
    tiny, _ = write_synthetic_gguf(d / "tiny.gguf", "llama-tiny", "Q8_0", n_layers=1, progress=False)
    engine = Engine(str(tiny), device="cpu", n_ctx=256, max_num_seqs=4, progress=False)

    def loader(path, **kw):
        return Engine(path, device="cpu", n_ctx=64, progress=False)

    app = create_app(engine, served_model_name=MODEL, loader=loader, model_roots=[d])
    try:
        yield app.test_client(), str(tiny), engine
    finally:
        engine.close()


@pytest.mark.parametrize("seed", [0, 1])
def test_malformed_requests_get_client_errors_and_leave_the_server_serving(client, seed):
    c, tiny, _ = client
    rng = random.Random(seed)
    table = routes(tiny)
    for i in range(300):
        path, body, own = rng.choice(table)
        if rng.random() < 0.05:
            data = rng.choice(NOT_JSON)
        else:
            data = json.dumps(mutated(rng, body, own))
        r = c.post(path, data=data, content_type="application/json")
        text = r.get_data(as_text=True)  # a stream is read to its end
        where = f"request {i} (seed {seed}): POST {path} {data[:300]!r}"
        assert r.status_code < 500, f"{where} -> {r.status_code} {text[:300]}"
        if r.status_code >= 400:
            err = json.loads(text).get("error")
            assert isinstance(err, dict) and err.get("message"), f"{where} -> no error envelope: {text[:300]}"
    ok = c.post("/v1/chat/completions", json=routes(tiny)[0][1])
    assert ok.status_code == 200 and ok.get_json()["choices"][0]["message"]["content"] is not None


# Found by the requests above, kept as plain cases.


@pytest.mark.parametrize(
    "path,body,param",
    [
        ("/v1/responses", '{"model": "m", "input": "hi", "instructions": "\\ud800"}', "instructions"),
        ("/v1/chat/completions", '{"model": "m", "messages": [{"role": "user", "content": "a\\udc00b"}]}', "messages"),
        ("/tokenize", '{"model": "m", "prompt": "\\udfff"}', "prompt"),
        ("/v1/completions", '{"model": "m", "prompt": "x", "\\ud800": 1}', None),
    ],
)
def test_an_unpaired_surrogate_is_a_400_naming_the_field(client, path, body, param):
    c, _, _ = client
    r = c.post(path, data=body, content_type="application/json")
    assert r.status_code == 400, r.get_data(as_text=True)
    err = r.get_json()["error"]
    assert "unpaired surrogate" in err["message"] and err["param"] == param


def test_a_paired_surrogate_escape_is_text(client):
    c, _, _ = client
    r = c.post("/tokenize", data='{"model": "m", "prompt": "\\ud83d\\ude00"}', content_type="application/json")
    assert r.status_code == 200, r.get_data(as_text=True)


def test_the_engine_refuses_an_unpaired_surrogate_with_a_value_error(client):
    _, _, engine = client
    with pytest.raises(ValueError, match="unpaired surrogate U\\+D800 at index 1"):
        engine.generate("a\ud800", max_tokens=1)
    assert engine.generate("a", max_tokens=1, temperature=0).token_ids  # still serving


def test_a_model_path_too_long_for_the_file_system_is_a_load_error(client, tmp_path):
    from helexa_native import ModelLoadError

    c, _, _ = client
    with pytest.raises(ModelLoadError, match="not usable"):
        Engine(tmp_path / ("a" * 5000), device="cpu")
    r = c.post("/v1/models/load", json={"model": "a" * 5000, "name": "x"})
    assert r.status_code == 400 and r.get_json()["error"]["code"] == "model_load_failed"
