"""The server through the official `openai` client, behind an API key.

One real server process (default model, CPU) serves the whole module;
generations are a few tokens long so the module stays fast on 2 cores.
"""

import openai
import pytest
import requests
from server_util import ServerProcess, assert_envelope

KEY = "sk-test-helexa"
MODEL = "smol"
CHAT = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def server(default_model, tmp_path_factory):
    log = tmp_path_factory.mktemp("server_openai") / "server.log"
    with ServerProcess(
        [
            "--model",
            str(default_model),
            "--device",
            "cpu",
            "--api-key",
            KEY,
            "--served-model-name",
            MODEL,
            "--max-queue",
            "2",
            "--max-num-seqs",
            "32",
        ],
        log,
    ) as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=180)


def test_models_list(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].object == "model"
    assert client.models.retrieve(MODEL).id == MODEL


def test_chat_streamed_equals_non_streamed(client):
    full = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=5, seed=11)
    choice = full.choices[0]
    assert full.object == "chat.completion"
    assert choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    assert full.usage.completion_tokens >= 1
    assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens
    assert full.usage.prompt_tokens > 10

    stream = client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=5, seed=11, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    # The usage chunk comes last, with no choices; every earlier chunk has usage null.
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].usage.model_dump() == full.usage.model_dump()
    finishes = [c.choices[0].finish_reason for c in chunks[:-1]]
    assert finishes[-1] == choice.finish_reason and all(f is None for f in finishes[:-1])
    text = "".join(c.choices[0].delta.content or "" for c in chunks[:-1])
    assert text == choice.message.content


def test_chat_seed_reproduces_and_differs(client):
    a = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4, seed=5)
    b = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=4, seed=5)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.id != b.id


def test_chat_logprobs(client):
    r = client.chat.completions.create(
        model=MODEL, messages=CHAT, max_tokens=3, temperature=0, logprobs=True, top_logprobs=3
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0
        assert len(entry.top_logprobs) == 3
        # Greedy: the chosen token is the most likely one.
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob, abs=1e-5)
        assert bytes(entry.bytes).decode("utf-8", errors="replace") == entry.token
    joined = b"".join(bytes(e.bytes) for e in content).decode("utf-8", errors="replace")
    assert joined.startswith(r.choices[0].message.content)


def test_completions(client):
    full = client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=4, seed=3, logprobs=2)
    assert full.object == "text_completion"
    c = full.choices[0]
    assert c.finish_reason in ("stop", "length")
    assert full.usage.completion_tokens == len(c.logprobs.tokens)
    assert c.logprobs.text_offset[0] == 0
    assert all(len(t) <= 2 for t in c.logprobs.top_logprobs)
    chunks = list(
        client.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=4, seed=3, stream=True)
    )
    assert "".join(ch.choices[0].text for ch in chunks) == c.text
    assert chunks[-1].choices[0].finish_reason == c.finish_reason


def test_error_classes(client, server):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=CHAT, n=0)
    assert e.value.status_code == 400 and e.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL, messages=[])
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=-1)
    assert e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=CHAT, response_format={"type": "xml"})
    assert e.value.body["param"] == "response_format"
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-nothing", messages=CHAT)
    assert e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-nothing")
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0, timeout=30)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    with pytest.raises(openai.AuthenticationError):
        bad.chat.completions.create(model=MODEL, messages=CHAT)
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="x" * 40000, max_tokens=1)
    assert e.value.body["code"] == "context_length_exceeded"


def test_api_key_rules(server):
    url = server.url
    assert_envelope(requests.get(url + "/v1/models", timeout=30), 401, code="invalid_api_key")
    r = requests.get(url + "/v1/models", headers={"Authorization": "Bearer nope"}, timeout=30)
    assert_envelope(r, 401, code="invalid_api_key")
    assert r.headers.get("WWW-Authenticate") == "Bearer"
    assert_envelope(requests.get(url + "/metrics", timeout=30), 401)
    assert_envelope(requests.post(url + "/tokenize", json={"prompt": "hi"}, timeout=30), 401)
    # /health stays open for probes.
    assert requests.get(url + "/health", timeout=30).status_code == 200
    ok = requests.get(url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert ok.status_code == 200 and ok.json()["data"][0]["id"] == MODEL


def test_32_concurrent_streaming_clients_match_sequential_runs(client, server):
    """Continuous batching through HTTP: every stream finishes with its sequential text."""
    from concurrent.futures import ThreadPoolExecutor

    def ask(i, stream):
        msgs = [{"role": "user", "content": f"Count to {i}."}]
        if not stream:
            r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=6, seed=500 + i, temperature=0.8)
            return r.choices[0].message.content
        parts = client.chat.completions.create(
            model=MODEL, messages=msgs, max_tokens=6, seed=500 + i, temperature=0.8, stream=True
        )
        return "".join(c.choices[0].delta.content or "" for c in parts if c.choices)

    sequential = [ask(i, False) for i in range(32)]
    with ThreadPoolExecutor(32) as pool:
        concurrent = list(pool.map(lambda i: ask(i, True), range(32)))
    assert concurrent == sequential
    metrics = requests.get(server.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    sizes = [
        int(line.split('batch_size="')[1].split('"')[0])
        for line in metrics.splitlines()
        if line.startswith("helexa_batch_size_steps_total{")
    ]
    assert max(sizes) > 1  # the streams shared steps
