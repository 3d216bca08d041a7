"""Tools, reasoning, structured outputs, the Responses API and embeddings, end to end (issue #15).

One real server process (default model, CPU, `--reasoning-parser think`,
`--tool-call-parser hermes`) answers the official `openai` client; an
in-process Engine on the same model checks what the server cannot show
(token masks, prefix sharing of n choices, the template's kwargs).
Generations stay a few dozen tokens long: the default model does about
10 tokens/s on two loaded cores. SmolLM2's template renders no tools, so
they reach it as a system message in the hermes format (tool_prompt.py)
and tool_choice "required" / a named function are enforced by constrained
decoding alone.
"""

import base64
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import jsonschema
import numpy as np
import openai
import pytest
import requests
import torch
from server_util import ServerProcess, assert_envelope

MODEL = "smol"

WEATHER_SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 20},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": WEATHER_SCHEMA,
        "strict": True,
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Local time in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20}},
            "required": ["city"],
        },
    },
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pet": {"enum": ["cat", "dog", "none"]},
    },
    "required": ["name", "age", "pet"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def server(default_model, tmp_path_factory):
    log = tmp_path_factory.mktemp("agent_api") / "server.log"
    with ServerProcess(
        [
            "--model",
            str(default_model),
            "--device",
            "cpu",
            "--served-model-name",
            MODEL,
            "--max-num-seqs",
            "8",
            "--reasoning-parser",
            "think",
            "--tool-call-parser",
            "hermes",
            "--response-store-size",
            "4",
        ],
        log,
    ) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def engine(default_model):
    from helexa_native import Engine

    with Engine(default_model, device="cpu", progress=False, max_num_seqs=8) as eng:
        yield eng


def post(server, path, body):
    return requests.post(server.url + path, json=body, timeout=300)


# ---------------------------------------------------------------- tool calls


def test_tool_choice_required_gives_a_valid_call(client):
    r = client.chat.completions.create(
        model=MODEL,
        messages=ASK,
        tools=[WEATHER, TIME],
        tool_choice="required",
        parallel_tool_calls=False,
        temperature=0,
        max_tokens=60,
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    schema = {"get_weather": WEATHER_SCHEMA, "get_time": TIME["function"]["parameters"]}[call.function.name]
    jsonschema.validate(json.loads(call.function.arguments), schema)


def test_named_tool_choice_streams_tool_call_deltas(client):
    stream = client.chat.completions.create(
        model=MODEL,
        messages=ASK,
        tools=[TIME, WEATHER],
        temperature=0,
        max_tokens=60,
        stream=True,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    chunks = list(stream)
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    # No markup (or any text) reaches content; the call arrives as OpenAI tool-call deltas.
    assert all(not d.content for d in deltas)
    calls = [tc for d in deltas for tc in (d.tool_calls or [])]
    assert calls[0].id and calls[0].function.name == "get_weather" and calls[0].type == "function"
    assert all(tc.index == 0 for tc in calls) and all(tc.id is None for tc in calls[1:])
    args = "".join(tc.function.arguments or "" for tc in calls)
    jsonschema.validate(json.loads(args), WEATHER_SCHEMA)
    assert len(calls) > 2  # the arguments came in pieces
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_round_trip(client, server):
    first = client.chat.completions.create(
        model=MODEL,
        messages=ASK,
        tools=[WEATHER],
        tool_choice="required",
        parallel_tool_calls=False,
        temperature=0,
        max_tokens=60,
    )
    call = first.choices[0].message.tool_calls[0]
    history = ASK + [
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "18 degrees celsius, sunny"},
    ]
    # The template renders the call and its result for the model.
    tok = post(server, "/tokenize", {"model": MODEL, "messages": history, "tools": [WEATHER]}).json()
    prompt = post(server, "/detokenize", {"model": MODEL, "tokens": tok["tokens"]}).json()["prompt"]
    assert "<tool_response>\n18 degrees celsius, sunny\n</tool_response>" in prompt
    assert call.function.arguments in prompt and '"name": "get_weather"' in prompt
    assert "<tools>" in prompt
    second = client.chat.completions.create(
        model=MODEL, messages=history, tools=[WEATHER], temperature=0, max_tokens=12
    )
    msg = second.choices[0].message
    assert second.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert msg.content or msg.tool_calls
    assert "<tool_call>" not in (msg.content or "")
    assert second.usage.prompt_tokens > first.usage.prompt_tokens
    # tool_choice "none": the tools stay out of the prompt, the history stays in.
    third = client.chat.completions.create(
        model=MODEL, messages=history, tools=[WEATHER], tool_choice="none", temperature=0, max_tokens=4
    )
    assert third.choices[0].message.content and not third.choices[0].message.tool_calls


def test_auto_tool_choice_parses_what_the_model_writes(client):
    # A regex grammar (an extension of response_format) makes the model write a
    # hermes call with text before it, as a model choosing a tool would.
    call = '{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}'
    regex = "Let me check[.]\n<tool_call>\n" + _re_escape(call) + "\n</tool_call>"
    for stream in (False, True):
        kw = dict(
            model=MODEL,
            messages=ASK,
            tools=[WEATHER],
            max_tokens=60,
            temperature=0,
            response_format={"type": "regex", "regex": regex},
        )
        if not stream:
            r = client.chat.completions.create(**kw)
            msg, finish = r.choices[0].message, r.choices[0].finish_reason
            content, calls = msg.content, [(c.function.name, c.function.arguments) for c in msg.tool_calls]
        else:
            chunks = list(client.chat.completions.create(stream=True, **kw))
            content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            parts = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
            calls = [(parts[0].function.name, "".join(p.function.arguments or "" for p in parts))]
            finish = chunks[-1].choices[0].finish_reason
        assert content == "Let me check."
        assert calls == [("get_weather", json.dumps(json.loads(call)["arguments"]))]
        assert finish == "tool_calls"


def _re_escape(text):
    return "".join("\\" + c if c in "{}[]().*+?|^$\\" else c for c in text)


# ---------------------------------------------------------------- structured outputs


def test_json_schema_output_validates(client):
    rf = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    for seed in (1, 2):
        r = client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "Describe a person."}],
            response_format=rf,
            max_tokens=60,
            seed=seed,
            temperature=1.0,
        )
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)


def test_json_object_and_streamed_schema(client):
    r = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Give me JSON."}],
        response_format={"type": "json_object"},
        max_tokens=80,
        temperature=0,
    )
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    else:
        assert r.choices[0].message.content.startswith("{")
    rf = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "A person?"}],
            response_format=rf,
            max_tokens=60,
            seed=4,
            stream=True,
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    jsonschema.validate(json.loads(text), PERSON)


def test_completions_take_response_format(client):
    r = client.completions.create(
        model=MODEL,
        prompt="The answer is",
        max_tokens=10,
        seed=3,
        extra_body={"response_format": {"type": "regex", "regex": " (yes|no)[.]"}},
    )
    assert r.choices[0].text in (" yes.", " no.")
    assert r.choices[0].finish_reason == "stop"


# ---------------------------------------------------------------- reasoning


def test_reasoning_goes_to_reasoning_content(client):
    # The model never thinks by itself; a grammar makes it write a <think> block.
    rf = {"type": "regex", "regex": "<think>[a-z]{3,8}( [a-z]{3,8}){2}</think>\n\n(Yes|No)[.]"}
    msgs = [{"role": "user", "content": "Is the sky blue?"}]
    r = client.chat.completions.create(model=MODEL, messages=msgs, response_format=rf, max_tokens=40, seed=5)
    msg = r.choices[0].message.model_dump()
    assert msg["content"] in ("Yes.", "No.")
    assert msg["reasoning_content"] and "<think>" not in msg["reasoning_content"]
    assert len(msg["reasoning_content"].split()) == 3
    assert 3 <= r.usage.completion_tokens_details.reasoning_tokens < r.usage.completion_tokens

    chunks = list(
        client.chat.completions.create(
            model=MODEL,
            messages=msgs,
            response_format=rf,
            max_tokens=40,
            seed=5,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    deltas = [c.choices[0].delta.model_dump() for c in chunks if c.choices]
    assert "".join(d.get("reasoning_content") or "" for d in deltas) == msg["reasoning_content"]
    assert "".join(d.get("content") or "" for d in deltas) == msg["content"]
    assert all("<think" not in (d.get("content") or "") for d in deltas)
    assert (
        chunks[-1].usage.completion_tokens_details.reasoning_tokens
        == r.usage.completion_tokens_details.reasoning_tokens
    )


def test_chat_template_kwargs_reach_the_template(engine, monkeypatch):
    from helexa_native.chat_template import ChatTemplate

    tpl = ChatTemplate(
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "<|im_start|>assistant\n{% if enable_thinking is defined and not enable_thinking %}"
        "<think>\n\n</think>\n\n{% endif %}"
    )
    monkeypatch.setattr(engine, "_template", tpl)
    r = engine.chat(ASK, chat_template_kwargs={"enable_thinking": False}, max_tokens=1, temperature=0)
    assert engine.detokenize(r.prompt_token_ids).endswith("<think>\n\n</think>\n\n")
    r = engine.chat(ASK, max_tokens=1, temperature=0)
    assert "<think>" not in engine.detokenize(r.prompt_token_ids)


# ---------------------------------------------------------------- logit_bias and n


def test_logit_bias_steers_greedy_choice(client, engine):
    target = engine.tokenize(" Banana", add_special_tokens=False)[0]
    r = client.chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=1, temperature=0, logit_bias={str(target): 100}
    )
    assert r.choices[0].message.content == engine.detokenize([target])
    plain = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=1, temperature=0)
    top = engine.tokenize(plain.choices[0].message.content, add_special_tokens=False)[0]
    banned = client.chat.completions.create(
        model=MODEL, messages=ASK, max_tokens=1, temperature=0, logit_bias={str(top): -100}
    )
    assert banned.choices[0].message.content != plain.choices[0].message.content


def test_n_choices(client):
    r = client.chat.completions.create(model=MODEL, messages=ASK, n=3, max_tokens=5, seed=7)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert len({c.message.content for c in r.choices}) > 1  # seeds 7, 8, 9
    assert 3 <= r.usage.completion_tokens <= 15
    one = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=5, seed=8)
    assert one.choices[0].message.content == r.choices[1].message.content
    assert r.usage.prompt_tokens == one.usage.prompt_tokens

    chunks = list(client.chat.completions.create(model=MODEL, messages=ASK, n=2, max_tokens=5, seed=7, stream=True))
    texts = {0: "", 1: ""}
    finishes = {}
    for c in chunks:
        for ch in c.choices:
            texts[ch.index] += ch.delta.content or ""
            if ch.finish_reason:
                finishes[ch.index] = ch.finish_reason
    assert texts[0] == r.choices[0].message.content and texts[1] == r.choices[1].message.content
    assert set(finishes) == {0, 1}


def test_n_choices_share_the_prompt_blocks(engine):
    msgs = [{"role": "system", "content": "You answer in one short sentence about fruit. " * 6}] + ASK
    before = engine.load()["prefix_cache_hit_tokens"]
    results = engine.chat(msgs, n=3, max_tokens=3, seed=1)
    n_prompt = len(results[0].prompt_token_ids)
    shared = (n_prompt - 1) // engine.backend.blocks.block_size * engine.backend.blocks.block_size
    assert shared >= 64
    assert engine.load()["prefix_cache_hit_tokens"] - before >= 2 * shared
    assert [r.index for r in results] == [0, 1, 2] and [r.seed for r in results] == [1, 2, 3]


def test_engine_constraint_masks_every_step(engine):
    pattern = "(red|green|blue) (cat|dog)"
    r = engine.generate(
        "My favourite:",
        response_format={"type": "regex", "regex": " ?" + pattern},
        max_tokens=10,
        temperature=1.5,
        seed=11,
    )
    import re

    assert re.fullmatch(" ?" + pattern, r.text) and r.finish_reason == "stop"


def test_backend_without_masks_refuses_what_needs_them(engine, monkeypatch):
    from helexa_native.errors import InvalidParameterError

    monkeypatch.setattr(engine.backend, "supports_constraints", False)
    for kw, field in (
        (dict(tools=[WEATHER], tool_choice="required"), "tool_choice"),
        (dict(response_format={"type": "json_object"}), "response_format"),
        (dict(logit_bias={5: 1.0}), "logit_bias"),
    ):
        with pytest.raises(InvalidParameterError) as e:
            engine.chat(ASK, max_tokens=1, **kw)
        assert e.value.field == field
    assert engine.chat(ASK, tools=[WEATHER], max_tokens=1).usage["completion_tokens"] == 1
    assert engine.info()["structured_outputs"] is False


def test_a_token_outside_the_grammar_fails_the_request(engine, monkeypatch):
    step_batch = engine.backend.step_batch

    def unmasked(seqs):
        for s in seqs:
            s.allowed = None
        return step_batch(seqs)

    monkeypatch.setattr(engine.backend, "step_batch", unmasked)
    with pytest.raises(RuntimeError, match="grammar"):
        engine.chat(ASK, response_format={"type": "regex", "regex": "qqqq"}, max_tokens=4, temperature=0)
    monkeypatch.undo()
    assert engine.chat(ASK, response_format={"type": "regex", "regex": "qqqq"}, max_tokens=8).text == "qqqq"


class _LateTable:
    """CUDABackend.late_masks in Python: rows written on another thread, then ready() or fail()."""

    def __init__(self, rows, words):
        self.table = np.zeros((rows, words), np.int32)
        self._done = threading.Event()
        self.why = None

    def ready(self):
        self._done.set()

    def fail(self, why):
        self.why = why
        self._done.set()

    def reset(self):
        self._done.clear()
        self.why = None

    def row(self, i):
        assert self._done.wait(60), "the masks never came"
        if self.why is not None:
            raise ValueError(self.why)
        return torch.from_numpy(self.table[i].copy())


def test_late_masks_give_what_masks_before_the_step_give(engine, monkeypatch):
    # The scheduler fills the masks on its helper thread while the step runs
    # when the backend takes late masks (the CUDA backend does).
    from helexa_native.backends.base import LateMask

    asks = [
        (ASK, {"type": "regex", "regex": "(sun|rain|snow)ny, [0-9]{2} degrees"}),
        ([{"role": "user", "content": "Describe a person."}], {"type": "json_object"}),
        (ASK, {"type": "regex", "regex": "qq(q|r)+"}),
    ]

    def run_all():
        with ThreadPoolExecutor(len(asks)) as pool:
            runs = [pool.submit(engine.chat, m, response_format=rf, max_tokens=10, temperature=0) for m, rf in asks]
            return [r.result().text for r in runs]

    before = run_all()
    table, rows = None, []
    step_batch = engine.backend.step_batch

    def late_masks(words):
        nonlocal table
        table = table or _LateTable(engine.backend.max_num_seqs + 1, words)
        table.reset()
        return table

    def late_step(seqs):
        for s in seqs:
            if isinstance(s.allowed, LateMask):
                rows.append(s.allowed.row)
                s.allowed = s.allowed.table.row(s.allowed.row)
        return step_batch(seqs)

    monkeypatch.setattr(engine.backend, "late_masks", late_masks)
    monkeypatch.setattr(engine.backend, "step_batch", late_step)
    assert run_all() == before
    assert rows and max(rows) >= 1  # rows of one table, several in a step

    # A fill that raises fails its requests with its own error, and nothing else.
    import helexa_native.scheduler as scheduler

    def broken(matchers, out):
        raise RuntimeError("the grammar engine is down")

    with monkeypatch.context() as m:
        m.setattr(scheduler, "fill_masks", broken)
        with pytest.raises(RuntimeError, match="the grammar engine is down"):
            engine.chat(ASK, response_format=asks[2][1], max_tokens=4, temperature=0)
        assert table.why is not None and "the grammar engine is down" in table.why
    assert engine.chat(asks[2][0], response_format=asks[2][1], max_tokens=10, temperature=0).text == before[2]


# ---------------------------------------------------------------- Responses API


def test_responses_plain_and_continued(client):
    r = client.responses.create(
        model=MODEL, input="Name a fruit.", instructions="Answer in one word.", max_output_tokens=8, temperature=0
    )
    assert r.object == "response" and r.status in ("completed", "incomplete") and r.id.startswith("resp_")
    assert r.output[0].type == "message" and r.output_text
    assert r.usage.output_tokens >= 1 and r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    again = client.responses.retrieve(r.id)
    assert again.output_text == r.output_text
    follow = client.responses.create(
        model=MODEL, input="And a vegetable?", previous_response_id=r.id, max_output_tokens=8, temperature=0
    )
    assert follow.previous_response_id == r.id
    assert follow.usage.input_tokens > r.usage.input_tokens
    assert follow.usage.input_tokens_details.cached_tokens > 0  # the earlier turn's blocks


def test_responses_streamed_events(client):
    events = list(
        client.responses.create(model=MODEL, input="Count: one, two,", max_output_tokens=6, temperature=0, stream=True)
    )
    types = [e.type for e in events]
    assert types[:2] == ["response.created", "response.in_progress"]
    assert types[-1] in ("response.completed", "response.incomplete")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "response.output_item.added" in types and "response.output_text.done" in types
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    final = events[-1].response
    assert text and final.output_text == text
    plain = client.responses.create(model=MODEL, input="Count: one, two,", max_output_tokens=6, temperature=0)
    assert plain.output_text == text


def test_responses_function_call_round_trip(client):
    tools = [
        {
            "type": "function",
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": WEATHER_SCHEMA,
            "strict": True,
        }
    ]
    events = list(
        client.responses.create(
            model=MODEL,
            input="Weather in Rome?",
            tools=tools,
            tool_choice="required",
            parallel_tool_calls=False,
            temperature=0,
            max_output_tokens=60,
            stream=True,
        )
    )
    assert events[-1].type == "response.completed"
    resp = events[-1].response
    (call,) = [o for o in resp.output if o.type == "function_call"]
    args = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    assert args == call.arguments
    jsonschema.validate(json.loads(call.arguments), WEATHER_SCHEMA)
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert done[0].arguments == call.arguments and done[0].item_id == call.id
    follow = client.responses.create(
        model=MODEL,
        previous_response_id=resp.id,
        tools=tools,
        max_output_tokens=10,
        temperature=0,
        input=[{"type": "function_call_output", "call_id": call.call_id, "output": "21 degrees celsius"}],
    )
    assert follow.status in ("completed", "incomplete") and follow.output_text


def test_responses_store_is_bounded(client, server):
    ids = [client.responses.create(model=MODEL, input=f"Say {i}.", max_output_tokens=1).id for i in range(5)]
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(ids[0])  # --response-store-size 4
    assert client.responses.retrieve(ids[-1]).id == ids[-1]
    err = assert_envelope(
        post(server, "/v1/responses", {"input": "x", "previous_response_id": ids[0]}), 400, param="previous_response_id"
    )
    assert "not found" in err["message"]
    r = client.responses.create(model=MODEL, input="Hi", max_output_tokens=1, store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(r.id)


# ---------------------------------------------------------------- embeddings


def test_embeddings(client, server, engine):
    texts = [
        "A cat sleeps on the warm sofa.",
        "The kitten naps on the couch.",
        "Quarterly revenue grew by eight percent.",
    ]
    r = client.embeddings.create(model=MODEL, input=texts)  # the client asks for base64
    vecs = np.array([d.embedding for d in r.data])
    assert vecs.shape == (3, engine.config.hidden_size)
    assert np.allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    sim = vecs @ vecs.T
    assert sim[0, 1] > sim[0, 2] and sim[0, 1] > sim[1, 2]
    assert r.usage.prompt_tokens == sum(len(engine.tokenize(t)) for t in texts)

    raw = post(server, "/v1/embeddings", {"model": MODEL, "input": texts[0], "encoding_format": "float"}).json()
    assert np.allclose(raw["data"][0]["embedding"], vecs[0], atol=1e-6)
    b64 = post(server, "/v1/embeddings", {"input": [engine.tokenize(texts[0])], "encoding_format": "base64"}).json()
    assert np.allclose(np.frombuffer(base64.b64decode(b64["data"][0]["embedding"]), "<f4"), vecs[0], atol=1e-6)
    short = client.embeddings.create(model=MODEL, input=texts[:1], dimensions=64)
    assert len(short.data[0].embedding) == 64
    assert np.linalg.norm(short.data[0].embedding) == pytest.approx(1.0, abs=1e-5)
    # Batched equals one at a time.
    alone = engine.embed(texts[2])
    assert torch.allclose(alone[0], torch.tensor(vecs[2], dtype=torch.float32), atol=1e-5)


def test_engine_embed_pooling(engine):
    assert engine.pooling == "mean"
    last = engine.embed(["hello there"], pooling="last")
    mean = engine.embed(["hello there"])
    assert last.shape == mean.shape == (1, engine.config.hidden_size)
    assert not torch.allclose(last, mean)
    assert torch.allclose(engine.embed(["hello there"], normalize=False).norm(dim=1) > 0, torch.tensor([True]))


def test_default_pooling_reads_the_model():
    from helexa_native.embeddings import default_pooling

    assert default_pooling({"pooling": "last"}) == "last"
    assert default_pooling({}, "Qwen3-Embedding-0.6B") == "last"
    assert default_pooling({}, "", "/models/qwen3-embedding-0.6b-q8_0.gguf") == "last"
    assert default_pooling({}, "SmolLM2 135M") == "mean"


# ---------------------------------------------------------------- bad requests


BAD = [
    (
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
        "response_format",
    ),
    (
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/missing"}}}},
        "response_format",
    ),
    ({"response_format": {"type": "yaml"}}, "response_format"),
    ({"response_format": {"type": "regex", "regex": "(unclosed"}}, "response_format"),
    ({"tools": [{"type": "web_search"}]}, "tools"),
    (
        {
            "tools": [
                {
                    "type": "function",
                    "function": {"name": "f", "parameters": {"type": "object", "properties": {"x": {"type": "bogus"}}}},
                }
            ]
        },
        "tools",
    ),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "nope"}}]}, "tools"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "launch_rocket"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
    ({"logit_bias": {"5": 101}}, "logit_bias"),
    ({"logit_bias": {"99999999": 1}}, "logit_bias"),
    ({"n": 0}, "n"),
]


@pytest.mark.parametrize("extra,param", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_requests_get_400(server, extra, param):
    err = assert_envelope(
        post(server, "/v1/chat/completions", dict({"messages": ASK, "max_tokens": 1}, **extra)), 400, param=param
    )
    assert err["type"] == "invalid_request_error"


def test_bad_responses_and_embeddings_requests(server):
    assert_envelope(
        post(server, "/v1/responses", {"input": "x", "tools": [{"type": "file_search"}]}), 400, param="tools"
    )
    assert_envelope(
        post(
            server,
            "/v1/responses",
            {
                "input": "x",
                "tools": [{"type": "function", "name": "f"}],
                "tool_choice": {"type": "function", "name": "g"},
            },
        ),
        400,
        param="tool_choice",
    )
    assert_envelope(
        post(server, "/v1/responses", {"input": "x", "text": {"format": {"type": "json_schema", "name": "x"}}}),
        400,
        param="text",
    )
    assert_envelope(post(server, "/v1/responses", {"input": [{"type": "computer_call"}]}), 400, param="input")
    assert_envelope(post(server, "/v1/responses", {}), 400, param="input")
    assert_envelope(post(server, "/v1/embeddings", {"input": []}), 400, param="input")
    assert_envelope(
        post(server, "/v1/embeddings", {"input": "x", "encoding_format": "hex"}), 400, param="encoding_format"
    )
    assert_envelope(post(server, "/v1/embeddings", {"input": "x", "dimensions": 100000}), 400, param="dimensions")
    assert_envelope(post(server, "/v1/embeddings", {"input": [[99999999]]}), 400, param="input")


def test_stream_events_are_well_formed(server):
    r = requests.post(
        server.url + "/v1/responses",
        json={"input": "Hi", "max_output_tokens": 2, "stream": True},
        stream=True,
        timeout=300,
    )
    events = sse_events_typed(r)
    assert events[0][0] == "response.created" and all(name == ev["type"] for name, ev in events)


def sse_events_typed(resp):
    out = []
    for raw in resp.content.split(b"\n\n"):
        if not raw.strip():
            continue
        lines = raw.decode().split("\n")
        assert lines[0].startswith("event: ") and lines[1].startswith("data: ")
        out.append((lines[0][7:], json.loads(lines[1][6:])))
    return out
