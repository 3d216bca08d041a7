"""The HTTP server over raw HTTP: statuses and envelopes, streaming, queueing, disconnects, admin.

A real server process (default model, CPU, no API key) serves the first
part; the rest drives `create_app` in-process over scripted engines to reach
states a healthy CPU model never gets into (poisoned device, failing stream,
a model still loading).
"""

import http.client
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from server_util import ServerProcess, assert_envelope, metric, sse_events, sse_json

from helexa_native.errors import DeviceError
from helexa_native.openai_protocol import ApiError
from helexa_native.server import ModelRegistry, create_app

MODEL = "smol"
MAX_QUEUE = 3
MAX_NUM_SEQS = 2
TIMEOUT = 180
# A generation far longer than any test waits for: it ends only by cancellation.
LONG = 3000
CHAT = [{"role": "user", "content": "Say something."}]
# Japanese characters are several byte-level tokens each in this vocabulary,
# so greedy decoding of this prompt splits characters across tokens.
JA_PROMPT = "Good morning = おはようございます\nThank you = ありがとう\nHello ="


@pytest.fixture(scope="module")
def server(default_model, tmp_path_factory):
    log = tmp_path_factory.mktemp("server") / "server.log"
    with ServerProcess(
        [
            "--model",
            str(default_model),
            "--device",
            "cpu",
            "--served-model-name",
            MODEL,
            "--max-queue",
            str(MAX_QUEUE),
            "--max-num-seqs",
            str(MAX_NUM_SEQS),
        ],
        log,
    ) as s:
        yield s


@pytest.fixture(scope="module")
def url(server):
    return server.url


def post(url, path, body=None, data=None, **kw):
    if data is None:
        data = json.dumps(body)
    return requests.post(url + path, data=data, headers={"Content-Type": "application/json"}, timeout=TIMEOUT, **kw)


def chat(url, **fields):
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 3}
    body.update(fields)
    return post(url, "/v1/chat/completions", body)


def metrics(url) -> str:
    r = requests.get(url + "/metrics", timeout=30)
    assert r.status_code == 200
    assert r.headers["Content-Type"].startswith("text/plain")
    return r.text


def wait_for(cond, timeout=60.0, every=0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = cond()
        if v:
            return v
        time.sleep(every)
    raise AssertionError("condition not reached in time")


# ---------------------------------------------------------------------------
# bad input: status, envelope, and the server keeps serving

BAD_CHAT = [
    # (raw body, status, param, code)
    (b"{", 400, None, None),
    (b"", 400, None, None),
    (b"\xff\xfe{}", 400, None, None),
    (b"[1, 2]", 400, None, None),
    (b'"text"', 400, None, None),
    (b'{"messages": []}', 400, "messages", None),
    (b'{"messages": "hello"}', 400, "messages", None),
    (b'{"max_tokens": 3}', 400, "messages", None),
    (b'{"messages": [{"role": "wizard", "content": "x"}]}', 400, "messages", None),
    (b'{"messages": [{"role": "user"}]}', 400, "messages", None),
    (b'{"messages": [{"role": "user", "content": 7}]}', 400, "messages", None),
    (b'{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}', 400, "messages", None),
    (b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": -1}', 400, "max_tokens", None),
    (
        b'{"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": -5}',
        400,
        "max_completion_tokens",
        None,
    ),
    (b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": "ten"}', 400, "max_tokens", None),
    (b'{"messages": [{"role": "user", "content": "x"}], "temperature": -1}', 400, "temperature", None),
    (b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}', 400, None, None),
    (b'{"messages": [{"role": "user", "content": "x"}], "top_p": 0}', 400, "top_p", None),
    (b'{"messages": [{"role": "user", "content": "x"}], "top_k": 1.5}', 400, "top_k", None),
    (b'{"messages": [{"role": "user", "content": "x"}], "presence_penalty": 9}', 400, "presence_penalty", None),
    (b'{"messages": [{"role": "user", "content": "x"}], "n": 0}', 400, "n", None),
    (b'{"messages": [{"role": "user", "content": "x"}], "stop": 5}', 400, "stop", None),
    (b'{"messages": [{"role": "user", "content": "x"}], "seed": "s"}', 400, "seed", None),
    (b'{"messages": [{"role": "user", "content": "x"}], "stream": "yes"}', 400, "stream", None),
    (
        b'{"messages": [{"role": "user", "content": "x"}], "stream_options": {"include_usage": true}}',
        400,
        "stream_options",
        None,
    ),
    (b'{"messages": [{"role": "user", "content": "x"}], "logprobs": 3}', 400, "logprobs", None),
    (b'{"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}', 400, "top_logprobs", None),
    (
        b'{"messages": [{"role": "user", "content": "x"}], "logprobs": true, "top_logprobs": 99}',
        400,
        "top_logprobs",
        None,
    ),
    (
        b'{"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_schema"}}',
        400,
        "response_format",
        None,
    ),
    (b'{"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}', 400, "tools", None),
    (b'{"messages": [{"role": "user", "content": "x"}], "tool_choice": "required"}', 400, "tool_choice", None),
    (b'{"messages": [{"role": "user", "content": "x"}], "logit_bias": {"5": 1000}}', 400, "logit_bias", None),
    (b'{"messages": [{"role": "user", "content": "x"}], "temprature": 1}', 400, "temprature", "unknown_parameter"),
    (b'{"messages": [{"role": "user", "content": "x"}], "model": 5}', 400, "model", None),
    (b'{"messages": [{"role": "user", "content": "x"}], "skip_special_tokens": 1}', 400, "skip_special_tokens", None),
    (
        b'{"messages": [{"role": "user", "content": "x"}], "chat_template_kwargs": {"messages": []}}',
        400,
        "chat_template_kwargs",
        None,
    ),
    (b'{"messages": [{"role": "user", "content": "x"}], "model": "no-such-model"}', 404, "model", "model_not_found"),
]


@pytest.mark.parametrize("body,status,param,code", BAD_CHAT, ids=[str(i) for i in range(len(BAD_CHAT))])
def test_bad_chat_requests(url, body, status, param, code):
    assert_envelope(post(url, "/v1/chat/completions", data=body), status, param=param, code=code)


BAD_COMPLETIONS = [
    (b'{"max_tokens": 2}', 400, "prompt"),
    (b'{"prompt": ["a", "b"]}', 400, "prompt"),
    (b'{"prompt": []}', 400, "prompt"),
    (b'{"prompt": [1, -2]}', 400, "prompt"),
    (b'{"prompt": [1, 99999999]}', 400, "prompt"),
    (b'{"prompt": {"text": "x"}}', 400, "prompt"),
    (b'{"prompt": "x", "logprobs": true}', 400, "logprobs"),
    (b'{"prompt": "x", "echo": true, "logprobs": 1}', 400, "echo"),
    (b'{"prompt": "x", "suffix": "y"}', 400, "suffix"),
    (b'{"prompt": "x", "best_of": 3}', 400, "best_of"),
    (b'{"prompt": "x", "messages": []}', 400, "messages"),
]


@pytest.mark.parametrize("body,status,param", BAD_COMPLETIONS, ids=[str(i) for i in range(len(BAD_COMPLETIONS))])
def test_bad_completion_requests(url, body, status, param):
    assert_envelope(post(url, "/v1/completions", data=body), status, param=param)


def test_context_length_exceeded(url):
    long = "word " * 6000
    err = assert_envelope(
        post(url, "/v1/completions", {"prompt": long, "max_tokens": 1}), 400, code="context_length_exceeded"
    )
    assert "4096" in err["message"]
    assert_envelope(
        chat(url, messages=[{"role": "user", "content": long}]), 400, param="messages", code="context_length_exceeded"
    )


def test_routes_and_methods(url):
    err = assert_envelope(requests.get(url + "/v1/nothing", timeout=30), 404, code="not_found")
    assert "/v1/nothing" in err["message"]
    r = requests.get(url + "/v1/chat/completions", timeout=30)
    assert_envelope(r, 405, code="method_not_allowed")
    assert "POST" in r.headers["Allow"]
    assert_envelope(requests.delete(url + "/v1/models", timeout=30), 405)
    assert_envelope(requests.put(url + "/health", timeout=30), 405)
    assert_envelope(requests.get(url + "/v1/models/nope", timeout=30), 404, code="model_not_found")


def test_server_still_serves_after_bad_input(url):
    r = chat(url, max_tokens=2, seed=1)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["usage"]["completion_tokens"] == 2
    assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + 2
    assert requests.get(url + "/health", timeout=30).json()["status"] == "ok"


def test_accepted_request_variants(url):
    sys_msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    dev_msgs = [
        {"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "text", "text": "Hi"}, " there"]},
    ]
    # developer is system, and text parts join with a newline (so "Hi\n there").
    t_sys = post(url, "/tokenize", {"messages": sys_msgs}).json()["tokens"]
    t_dev = post(url, "/tokenize", {"messages": dev_msgs}).json()["tokens"]
    t_dev_str = post(
        url,
        "/tokenize",
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi\n there"}]},
    ).json()
    assert t_dev == t_dev_str["tokens"] and t_sys != t_dev
    rendered = post(url, "/detokenize", {"tokens": t_dev}).json()["prompt"]
    assert "system\nBe brief." in rendered and "developer" not in rendered
    r = chat(
        url,
        messages=dev_msgs + [{"role": "assistant", "content": "Hello."}, {"role": "user", "content": "More?"}],
        max_tokens=None,
        max_completion_tokens=2,
        stop="\n\n\n",
        top_k=40,
        top_p=0.9,
        min_p=0.05,
        temperature=0.7,
        presence_penalty=0.5,
        frequency_penalty=0.1,
        repetition_penalty=1.1,
        seed=None,
        response_format={"type": "text"},
        user="u1",
        metadata={"a": "b"},
        n=1,
        logit_bias={},
        tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
        tool_choice="auto",
        stream=False,
    )
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] <= 2
    e = post(url, "/v1/completions", {"prompt": "One, two,", "max_tokens": 2, "echo": True, "seed": 2, "stop": ["zzz"]})
    assert e.status_code == 200, e.text
    assert e.json()["choices"][0]["text"].startswith("One, two,")
    ids = post(url, "/tokenize", {"prompt": "One, two,"}).json()["tokens"]
    by_ids = post(url, "/v1/completions", {"prompt": ids, "max_tokens": 2, "seed": 2})
    assert by_ids.json()["choices"][0]["text"] == e.json()["choices"][0]["text"][len("One, two,") :]


# ---------------------------------------------------------------------------
# streaming


def _greedy_japanese(url):
    body = {"model": MODEL, "prompt": JA_PROMPT, "max_tokens": 6, "temperature": 0, "logprobs": 0}
    r = post(url, "/v1/completions", body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    return body, choice["text"], choice["logprobs"]["tokens"], choice["finish_reason"]


def test_multibyte_characters_are_never_split_and_stream_matches(url):
    body, text, tokens, finish = _greedy_japanese(url)
    # The test has teeth only if some generated token is a fragment of a
    # character (its own text is U+FFFD) while the whole text has none.
    assert any("\ufffd" in t for t in tokens), tokens
    assert "\ufffd" not in text and any(ord(ch) > 0x7F for ch in text), text

    body.pop("logprobs")
    r = post(url, "/v1/completions", dict(body, stream=True), stream=True)
    assert r.headers["Content-Type"].startswith("text/event-stream")
    raw = sse_events(r)
    assert raw[-1] == b"[DONE]"
    # Every event is valid UTF-8 on its own: no character straddles two events.
    events = [json.loads(e.decode("utf-8", errors="strict")) for e in raw[:-1]]
    pieces = [e["choices"][0]["text"] for e in events]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    assert events[-1]["choices"][0]["finish_reason"] == finish


def test_chat_stream_shape_and_usage(url):
    r = chat(url, stream=True, seed=4, max_tokens=3, ignore_eos=True)
    events = sse_json(r)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    last = events[-1]
    assert last["choices"][0]["finish_reason"] == "length" and last["choices"][0]["delta"] == {}
    # Without include_usage the usage rides on the final chunk.
    assert last["usage"]["completion_tokens"] == 3
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events)
    assert text == chat(url, seed=4, max_tokens=3, ignore_eos=True).json()["choices"][0]["message"]["content"]


def test_stop_string_spanning_tokens_never_appears(url):
    body, text, tokens, _ = _greedy_japanese(url)
    body.pop("logprobs")
    # A two-character stop string that no single generated token contains
    # spans a token boundary.
    stops = [
        text[i : i + 2]
        for i in range(1, len(text) - 1)
        if text[i : i + 2].strip() == text[i : i + 2] and not any(text[i : i + 2] in t for t in tokens)
    ]
    assert stops, (text, tokens)
    stop = stops[0]
    want = text[: text.index(stop)]
    body["stop"] = [stop]
    r = post(url, "/v1/completions", body).json()
    assert r["choices"][0]["text"] == want
    assert r["choices"][0]["finish_reason"] == "stop"
    events = sse_json(post(url, "/v1/completions", dict(body, stream=True), stream=True))
    pieces = [e["choices"][0]["text"] for e in events]
    assert "".join(pieces) == want
    assert not any(stop in p for p in pieces)
    assert events[-1]["choices"][0]["finish_reason"] == "stop"


def test_concurrent_clients_match_sequential(url):
    jobs = [
        dict(messages=[{"role": "user", "content": f"Tell me about the number {i}."}], seed=100 + i, max_tokens=3)
        for i in range(4)
    ]
    sequential = [chat(url, **j).json()["choices"][0]["message"]["content"] for j in jobs]

    def run(j):
        if j["seed"] % 2:  # half of them stream
            events = sse_json(post(url, "/v1/chat/completions", dict(model=MODEL, stream=True, **j), stream=True))
            return "".join(e["choices"][0]["delta"].get("content", "") for e in events)
        r = chat(url, **j)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["message"]["content"]

    with ThreadPoolExecutor(4) as pool:
        concurrent = list(pool.map(run, jobs))
    assert concurrent == sequential


class _RawStream:
    """A streaming request on its own socket, so the test can hang up mid-stream."""

    def __init__(self, url, body):
        host, port = url.split("//")[1].split(":")
        self.conn = http.client.HTTPConnection(host, int(port), timeout=TIMEOUT)
        self.conn.request(
            "POST", "/v1/chat/completions", body=json.dumps(body), headers={"Content-Type": "application/json"}
        )
        self.resp = self.conn.getresponse()
        assert self.resp.status == 200

    def next_event(self) -> dict:
        while True:
            line = self.resp.fp.readline()
            assert line, "stream ended"
            if line.startswith(b"data: "):
                return json.loads(line[6:])

    def hang_up(self):
        self.resp.close()
        self.conn.close()


def test_disconnect_stops_generation(url):
    start = metrics(url)
    s = _RawStream(
        url, {"model": MODEL, "messages": CHAT, "max_tokens": LONG, "stream": True, "ignore_eos": True, "seed": 9}
    )
    assert "role" in s.next_event()["choices"][0]["delta"]
    seen = 0
    while seen < 2:
        seen += bool(s.next_event()["choices"][0]["delta"].get("content"))
    at_hang_up = metrics(url)
    s.hang_up()
    cancelled = metric(start, "helexa_cancelled_by_disconnect_total", model=MODEL)
    wait_for(lambda: metric(metrics(url), "helexa_cancelled_by_disconnect_total", model=MODEL) > cancelled)
    wait_for(lambda: metric(metrics(url), "helexa_running_requests", model=MODEL) == 0)
    # The cancelled sequence gave its KV blocks back.
    wait_for(lambda: metric(metrics(url), "helexa_kv_blocks_used", model=MODEL) == 0)
    end = metrics(url)
    gen = "helexa_generation_tokens_total"
    total = metric(end, gen, model=MODEL) - metric(start, gen, model=MODEL)
    after = metric(end, gen, model=MODEL) - metric(at_hang_up, gen, model=MODEL)
    # Generation stopped within a few tokens of the hang-up, far short of LONG.
    assert total >= 2 and after <= 5, (total, after)
    assert metric(end, "helexa_requests_total", model=MODEL, finish_reason="cancelled") >= 1
    assert chat(url, max_tokens=1).status_code == 200


def test_full_queue_gets_503_with_retry_after(url):
    streams = []
    for _ in range(MAX_NUM_SEQS):  # every run place taken
        s = _RawStream(url, {"model": MODEL, "messages": CHAT, "max_tokens": LONG, "stream": True, "ignore_eos": True})
        s.next_event()
        s.next_event()
        streams.append(s)
    wait_for(lambda: metric(metrics(url), "helexa_running_requests", model=MODEL) == MAX_NUM_SEQS)
    assert metric(metrics(url), "helexa_running_sequences", model=MODEL) == MAX_NUM_SEQS
    with ThreadPoolExecutor(MAX_QUEUE) as pool:
        waiting = [pool.submit(chat, url, max_tokens=1) for _ in range(MAX_QUEUE)]
        wait_for(lambda: metric(metrics(url), "helexa_queue_depth", model=MODEL) == MAX_QUEUE)
        r = chat(url, max_tokens=1)
        assert_envelope(r, 503, code="queue_full")
        assert int(r.headers["Retry-After"]) >= 1
        for s in streams:
            s.hang_up()
        assert all(f.result(timeout=TIMEOUT).status_code == 200 for f in waiting)
    assert metric(metrics(url), "helexa_queue_depth", model=MODEL) == 0


# ---------------------------------------------------------------------------
# operations


def test_health_models_metrics(url):
    h = requests.get(url + "/health", timeout=30)
    assert h.status_code == 200 and h.json()["status"] == "ok"
    models = requests.get(url + "/v1/models", timeout=30).json()
    assert models["object"] == "list"
    card = next(m for m in models["data"] if m["id"] == MODEL)
    assert card["object"] == "model" and card["max_model_len"] > 0
    text = metrics(url)
    for name in (
        "helexa_prompt_tokens_total",
        "helexa_generation_tokens_total",
        "helexa_requests_total",
        "helexa_time_to_first_token_seconds_count",
        "helexa_inter_token_latency_seconds_count",
        "helexa_queue_depth",
        "helexa_cancelled_by_disconnect_total",
    ):
        assert name in text, name
    before = metric(text, "helexa_generation_tokens_total", model=MODEL)
    prompt_before = metric(text, "helexa_prompt_tokens_total", model=MODEL)
    r = chat(url, max_tokens=2, ignore_eos=True).json()
    text = metrics(url)
    assert metric(text, "helexa_generation_tokens_total", model=MODEL) == before + 2
    assert metric(text, "helexa_prompt_tokens_total", model=MODEL) == prompt_before + r["usage"]["prompt_tokens"]
    assert metric(text, "helexa_requests_total", model=MODEL, finish_reason="length") >= 1
    assert metric(text, "helexa_time_to_first_token_seconds_count", model=MODEL) >= 1


def test_tokenize_detokenize(url):
    t = post(url, "/tokenize", {"prompt": "Hello world"}).json()
    assert t["count"] == len(t["tokens"]) > 0 and t["max_model_len"] > 0
    d = post(url, "/detokenize", {"tokens": t["tokens"]}).json()
    assert d["prompt"].endswith("Hello world")
    plain = post(url, "/tokenize", {"prompt": "Hello world", "add_special_tokens": False}).json()
    assert post(url, "/detokenize", {"tokens": plain["tokens"]}).json()["prompt"] == "Hello world"
    m = post(url, "/tokenize", {"messages": CHAT}).json()
    r = chat(url, max_tokens=1).json()
    assert m["count"] == r["usage"]["prompt_tokens"]
    strs = post(url, "/tokenize", {"prompt": "Hello", "add_special_tokens": False, "return_token_strs": True}).json()
    assert "".join(strs["token_strs"]) == "Hello"
    assert_envelope(post(url, "/tokenize", {"prompt": 5}), 400, param="prompt")
    assert_envelope(post(url, "/tokenize", {}), 400, param="prompt")
    assert_envelope(post(url, "/detokenize", {"tokens": [1, 10**9]}), 400, param="tokens")
    assert_envelope(post(url, "/detokenize", {"tokens": "abc"}), 400, param="tokens")
    assert_envelope(post(url, "/tokenize", {"prompt": "x", "model": "nope"}), 404, code="model_not_found")


def test_load_replace_unload(url, tmp_path):
    from helexa_native.synthetic import write_synthetic_gguf

    tiny = dict(n_layers=1, progress=False)
    a, _ = write_synthetic_gguf(tmp_path / "tiny-a.gguf", "llama-tiny", "Q8_0", seed=1, **tiny)
    b, _ = write_synthetic_gguf(tmp_path / "tiny-b.gguf", "llama-tiny", "Q8_0", seed=2, **tiny)

    r = post(url, "/v1/models/load", {"model": str(a), "name": "tiny"})
    assert r.status_code == 200, r.text
    assert r.json()["id"] == "tiny" and r.json()["replaced"] is False
    ids = {m["id"] for m in requests.get(url + "/v1/models", timeout=30).json()["data"]}
    assert ids == {MODEL, "tiny"}
    one = chat(url, model="tiny", max_tokens=4, seed=3, ignore_eos=True)
    assert one.status_code == 200 and one.json()["model"] == "tiny"

    r = post(url, "/v1/models/load", {"model": str(b), "name": "tiny"})
    assert r.status_code == 200 and r.json()["replaced"] is True
    card = requests.get(url + "/v1/models/tiny", timeout=30).json()
    assert card["root"] == str(b)
    two = chat(url, model="tiny", max_tokens=4, seed=3, ignore_eos=True).json()
    assert two["usage"]["completion_tokens"] == 4

    assert post(url, "/v1/models/unload", {"model": "tiny"}).json()["deleted"] is True
    assert_envelope(chat(url, model="tiny"), 404, code="model_not_found")
    assert_envelope(post(url, "/v1/models/unload", {"model": "tiny"}), 404, code="model_not_found")
    assert_envelope(
        post(url, "/v1/models/load", {"model": str(tmp_path / "missing.gguf")}),
        400,
        param="model",
        code="model_load_failed",
    )
    assert_envelope(post(url, "/v1/models/load", {}), 400, param="model")
    assert_envelope(post(url, "/v1/models/load", {"model": str(a), "n_ctx": 0}), 400, param="n_ctx")
    assert [m["id"] for m in requests.get(url + "/v1/models", timeout=30).json()["data"]] == [MODEL]
    assert chat(url, max_tokens=1).status_code == 200


def test_health_while_loading_and_sigterm(default_model, tmp_path):
    # A second process, stopped with SIGTERM before or just after its model is ready.
    s = ServerProcess(["--model", str(default_model), "--device", "cpu"], tmp_path / "log")
    s.start(wait_ready=False)
    try:
        h = requests.get(s.url + "/health", timeout=30)
        assert h.status_code in (200, 503)
        if h.status_code == 503:
            assert h.json()["status"] == "loading" and h.headers["Retry-After"]
            assert_envelope(
                requests.post(s.url + "/v1/completions", json={"prompt": "x"}, timeout=30), 503, code="model_loading"
            )
    finally:
        assert s.stop() == 0, s.log()


def test_sigterm_while_streams_run(default_model, tmp_path):
    # Streams are mid-generation when SIGTERM comes: they end, the model
    # closes, the request threads finish before the sockets close, and the
    # process exits 0 with no traceback.
    s = ServerProcess(["--model", str(default_model), "--device", "cpu"], tmp_path / "log")
    s.start()
    got = []

    def stream():
        body = {"prompt": "Once upon a time", "max_tokens": 4000, "stream": True, "ignore_eos": True}
        try:
            with requests.post(s.url + "/v1/completions", json=body, stream=True, timeout=120) as r:
                got.append(sum(1 for line in r.iter_lines() if line.startswith(b"data: ")))
        except requests.RequestException:
            got.append(-1)

    threads = [threading.Thread(target=stream) for _ in range(4)]
    try:
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            running = metric(requests.get(s.url + "/metrics", timeout=30).text, "helexa_running_sequences")
            if running == 4:
                break
            time.sleep(0.1)
    finally:
        rc = s.stop()
    for t in threads:
        t.join(60)
    log = s.log()
    assert rc == 0, log
    assert "Traceback" not in log and "terminate called" not in log, log
    # Every client saw its stream start and then end (no hang).
    assert len(got) == 4 and all(n >= 1 for n in got), got


# ---------------------------------------------------------------------------
# in-process: states a healthy CPU model cannot reach


class _Chunk:
    def __init__(self, text, ids, finish=None, usage=None):
        self.text, self.token_ids, self.logprobs = text, ids, None
        self.finish_reason, self.usage = finish, usage
        self.timings, self.seed, self.stop_reason = None, 0, None


class _PromptStream:
    def __init__(self, gen, ids):
        self._gen, self.prompt_ids = gen, ids

    def __iter__(self):
        return self._gen

    def __next__(self):
        return next(self._gen)

    def close(self):
        self._gen.close()


class _Backend:
    def __init__(self):
        self.ok = True

    def is_healthy(self):
        return self.ok


class FakeEngine:
    """Just enough of Engine for the server: a fixed reply, optionally failing mid-stream."""

    def __init__(self, reply=("Hel", "lo"), fail_after=None, model_path="fake.gguf"):
        self.reply, self.fail_after = reply, fail_after
        self.n_ctx, self.device, self.model_path = 64, "cpu", Path(model_path)
        self._backend = _Backend()
        self.closed = 0

    @property
    def backend(self):
        return self._backend

    def apply_chat_template(self, messages, add_generation_prompt=True, tools=None, tokenize=False, **kw):
        self.rendered = dict(messages=messages, tools=tools, kwargs=kw)
        return [1] * len(messages)

    def tokenize(self, text, add_special_tokens=True):
        return list(range(1, len(text) + 1))

    def detokenize(self, ids):
        return "x" * len(ids)

    def chat_stream(self, messages, tools=None, cancel=None, chat_template_kwargs=None, tool_choice=None, **sampling):
        kwargs = dict(chat_template_kwargs or {})
        kwargs.pop("add_generation_prompt", None)
        ids = self.apply_chat_template(messages, tools=None if tool_choice == "none" else tools, **kwargs)
        stream = self.generate_stream(ids, cancel=cancel, **sampling)
        self.prompt_ids = ids
        return _PromptStream(stream, ids)

    def generate_stream(self, ids, cancel=None, **sampling):
        def gen():
            for i, piece in enumerate(self.reply):
                if self.fail_after is not None and i >= self.fail_after:
                    raise DeviceError("cuda:0: illegal memory access")
                yield _Chunk(piece, [i])
            n = len(self.reply)
            yield _Chunk(
                "", [], "length", {"prompt_tokens": len(ids), "completion_tokens": n, "total_tokens": len(ids) + n}
            )

        return gen()

    def close(self):
        self.closed += 1


def _client(engine=None, **kw):
    app = create_app(engine if engine is not None else FakeEngine(), served_model_name="fake", **kw)
    return app.test_client()


def test_poisoned_device_gives_503_on_health_and_requests():
    eng = FakeEngine()
    c = _client(eng)
    assert c.get("/health").status_code == 200
    eng._backend.ok = False
    h = c.get("/health")
    assert h.status_code == 503 and h.get_json()["status"] == "unhealthy"
    r = c.post("/v1/chat/completions", json={"messages": CHAT})
    assert r.status_code == 503 and r.headers["Retry-After"]
    assert r.get_json()["error"]["code"] == "device_unavailable"
    assert 'helexa_model_healthy{model="fake"} 0.0' in c.get("/metrics").get_data(as_text=True)


def test_error_mid_stream_sends_error_chunk_then_done():
    c = _client(FakeEngine(reply=("a", "b", "c"), fail_after=1))
    r = c.post("/v1/chat/completions", json={"messages": CHAT, "stream": True})
    assert r.status_code == 200
    raw = [e for e in r.get_data().split(b"\n\n") if e]
    assert raw[-1] == b"data: [DONE]"
    err = json.loads(raw[-2][6:])
    assert err["error"]["code"] == "device_unavailable"
    assert json.loads(raw[1][6:])["choices"][0]["delta"]["content"] == "a"
    # Non-streaming: the same failure is a 503 envelope, and the app keeps serving.
    r = c.post("/v1/completions", json={"prompt": "hi"})
    assert r.status_code == 503 and r.get_json()["error"]["code"] == "device_unavailable"
    assert c.get("/v1/models").status_code == 200
    text = c.get("/metrics").get_data(as_text=True)
    assert metric(text, "helexa_requests_total", finish_reason="error") == 2


def test_health_503_while_loading_then_ready():
    reg = ModelRegistry(loader=None)
    reg.mark_loading("fake")
    c = create_app(reg, served_model_name="fake").test_client()
    h = c.get("/health")
    assert h.status_code == 503 and h.get_json()["status"] == "loading" and h.headers["Retry-After"]
    r = c.post("/v1/chat/completions", json={"messages": CHAT})
    assert r.status_code == 503 and r.get_json()["error"]["code"] == "model_loading"
    reg.add("fake", FakeEngine())
    reg._loading.clear()
    assert c.get("/health").status_code == 200
    assert (
        c.post("/v1/chat/completions", json={"messages": CHAT}).get_json()["choices"][0]["message"]["content"]
        == "Hello"
    )


def test_messages_and_tools_reach_the_template():
    eng = FakeEngine()
    c = _client(eng)
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
    msgs = [
        {"role": "developer", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "user", "content": "q"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "1", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}],
        },
        {"role": "tool", "tool_call_id": "1", "content": "42"},
    ]
    r = c.post(
        "/v1/chat/completions",
        json={"messages": msgs, "tools": tools, "chat_template_kwargs": {"enable_thinking": False}},
    )
    assert r.status_code == 200, r.get_json()
    got = eng.rendered
    assert got["tools"] == tools and got["kwargs"] == {"enable_thinking": False}
    assert [m["role"] for m in got["messages"]] == ["system", "user", "assistant", "tool"]
    assert got["messages"][0]["content"] == "a\nb"
    assert (
        c.post("/v1/chat/completions", json={"messages": msgs, "tools": tools, "tool_choice": "none"}).status_code
        == 200
    )
    assert eng.rendered["tools"] is None


def test_reasoning_effort_reaches_the_template():
    eng = FakeEngine()
    c = _client(eng)
    msgs = [{"role": "user", "content": "q"}]

    def sent(**body):
        r = c.post("/v1/chat/completions", json={"messages": msgs, **body})
        assert r.status_code == 200, r.get_json()
        return eng.rendered["kwargs"]

    assert sent(reasoning_effort="none") == {"reasoning_effort": "none", "enable_thinking": False}
    assert sent(reasoning_effort="high") == {"reasoning_effort": "high"}
    # The request's own template variables win.
    assert sent(reasoning_effort="none", chat_template_kwargs={"enable_thinking": True}) == {
        "reasoning_effort": "none",
        "enable_thinking": True,
    }
    assert sent() == {}
    r = c.post("/v1/responses", json={"input": "q", "reasoning": {"effort": "none"}})
    assert r.status_code == 200, r.get_json()
    assert eng.rendered["kwargs"] == {"reasoning_effort": "none", "enable_thinking": False}
    assert r.get_json()["reasoning"]["effort"] == "none"
    bad = c.post("/v1/chat/completions", json={"messages": msgs, "reasoning_effort": 3})
    assert bad.status_code == 400 and bad.get_json()["error"]["param"] == "reasoning_effort"


@pytest.mark.parametrize(
    "extra, param, status",
    [
        ({"prompt_cache_key": "k", "safety_identifier": "s", "user": "u"}, None, 200),
        ({"modalities": ["text"], "audio": None, "verbosity": "low"}, None, 200),
        ({"prediction": {"type": "content", "content": "Hello"}}, None, 200),
        ({"modalities": ["text", "audio"]}, "modalities", 400),
        ({"modalities": "text"}, "modalities", 400),
        ({"audio": {"voice": "alloy", "format": "wav"}}, "audio", 400),
        ({"prediction": {"type": "other"}}, "prediction", 400),
        ({"verbosity": "loud"}, "verbosity", 400),
        ({"prompt_cache_key": 5}, "prompt_cache_key", 400),
        ({"web_search_options": {}}, "web_search_options", 400),
    ],
)
def test_openai_fields_for_other_models_are_accepted_or_refused_clearly(extra, param, status):
    c = _client()
    r = c.post("/v1/chat/completions", json={"messages": CHAT, **extra})
    assert r.status_code == status, r.get_json()
    if status != 200:
        assert r.get_json()["error"]["param"] == param


def test_replace_and_unload_close_the_old_engine():
    made = []

    def loader(path, device="auto", n_ctx=None):
        made.append(FakeEngine(reply=(Path(path).stem,), model_path=path))
        return made[-1]

    first = FakeEngine()
    c = create_app(first, served_model_name="fake", loader=loader).test_client()
    r = c.post("/v1/models/load", json={"model": "/m/other.gguf", "name": "fake"})
    assert r.status_code == 200 and r.get_json()["replaced"] is True
    assert first.closed == 1
    out = c.post("/v1/chat/completions", json={"messages": CHAT}).get_json()
    assert out["choices"][0]["message"]["content"] == "other"
    assert c.post("/v1/models/unload", json={"model": "fake"}).status_code == 200
    assert made[0].closed == 1
    assert c.get("/health").status_code == 503
    r = c.post("/v1/chat/completions", json={"messages": CHAT})
    assert r.status_code == 503 and r.get_json()["error"]["code"] == "model_not_loaded"


class _SlowLoad:
    """A registry whose loader blocks until `release` is set, with one load of it running in a thread."""

    def __init__(self):
        self.release, self.started, self.made, self.outcome = threading.Event(), threading.Event(), [], []
        self.reg = ModelRegistry(loader=self._loader)
        self.thread = threading.Thread(target=self._load)
        self.thread.start()
        assert self.started.wait(30)

    def _loader(self, path, device="auto", n_ctx=None):
        self.started.set()
        self.release.wait(30)
        self.made.append(FakeEngine())
        return self.made[-1]

    def _load(self):
        try:
            self.reg.load("/m/slow.gguf", name="slow")
            self.outcome.append("served")
        except ApiError as e:
            self.outcome.append(e.code)


def test_close_during_a_load_waits_for_it_then_frees_what_it_made():
    s = _SlowLoad()
    # The load outlasts the wait: close says something is still running.
    assert s.reg.close(timeout=0.05) is False
    s.release.set()
    s.thread.join(30)
    # The model that finished loading after close was freed, never served.
    assert s.outcome == ["shutting_down"] and s.made[0].closed == 1 and s.reg.slots() == []
    with pytest.raises(ApiError) as e:
        s.reg.load("/m/later.gguf")
    assert e.value.status == 503 and e.value.code == "shutting_down" and len(s.made) == 1
    with pytest.raises(ApiError):
        s.reg.add("late", FakeEngine())


def test_close_waits_for_a_load_that_ends_in_time():
    s = _SlowLoad()
    threading.Timer(0.2, s.release.set).start()
    assert s.reg.close(timeout=30) is True
    s.thread.join(30)
    assert s.outcome == ["shutting_down"] and s.made[0].closed == 1


def test_startup_load_reports_failures_and_is_quiet_when_stopped():
    from helexa_native.server.serve import load_at_startup

    failed = []
    reg = ModelRegistry(loader=None)  # every load is refused (an ApiError)
    load_at_startup(reg, "/m/a.gguf", "a", False, lambda: failed.append(1))
    assert failed == [1] and "cannot load models" in reg.load_error

    reg = ModelRegistry(loader=lambda path, **kw: FakeEngine())
    reg.close()
    load_at_startup(reg, "/m/a.gguf", "a", False, lambda: failed.append(2))
    assert failed == [1] and reg.load_error is None  # stopped first: not a failure


def test_close_frees_idle_models():
    reg = ModelRegistry(loader=None)
    engines = [FakeEngine(), FakeEngine()]
    reg.add("a", engines[0])
    reg.add("b", engines[1])
    assert reg.close(timeout=1) is True
    assert [e.closed for e in engines] == [1, 1] and reg.slots() == []


def test_stream_closed_before_its_first_chunk_frees_the_queue():
    from werkzeug.test import EnvironBuilder

    app = create_app(FakeEngine(), served_model_name="fake")
    slot = app.extensions["helexa_native"].registry.get("fake")
    env = EnvironBuilder(
        method="POST", path="/v1/chat/completions", json={"messages": CHAT, "stream": True}
    ).get_environ()
    app_iter = app(env, lambda status, headers, exc_info=None: None)
    assert slot.counts() == (1, 0)
    app_iter.close()  # as a WSGI server does when the client is already gone
    assert slot.counts() == (0, 0)
    r = app.test_client().post("/v1/chat/completions", json={"messages": CHAT})
    assert r.get_json()["choices"][0]["message"]["content"] == "Hello"


def test_in_process_auth_and_catch_all():
    c = _client(api_key="k")
    assert c.get("/health").status_code == 200
    assert c.get("/v1/models").status_code == 401
    assert c.get("/v1/models", headers={"Authorization": "Basic k"}).status_code == 401
    assert c.get("/v1/models", headers={"Authorization": "Bearer k"}).status_code == 200
    assert c.get("/nope", headers={"Authorization": "Bearer k"}).get_json()["error"]["code"] == "not_found"
    big = b'{"messages": [' * 100000 + b"]" * 100000
    r = c.post("/v1/chat/completions", data=big, headers={"Authorization": "Bearer k"})
    assert r.status_code == 400 and "error" in r.get_json()


def test_queue_order_and_limit():
    from helexa_native.openai_protocol import ApiError
    from helexa_native.server import ModelSlot

    slot = ModelSlot("m", FakeEngine(), max_queue=1)
    a = slot.admit()
    assert slot.wait_turn(a, lambda: False) == "run"
    b = slot.admit()
    with pytest.raises(ApiError) as e:
        slot.admit()
    assert e.value.status == 503 and e.value.headers["Retry-After"]
    order = []
    t = threading.Thread(target=lambda: order.append(slot.wait_turn(b, lambda: False)))
    t.start()
    time.sleep(0.3)
    assert order == [] and slot.counts() == (1, 1)
    slot.release(a)
    t.join(5)
    assert order == ["run"] and slot.counts() == (0, 1)
    c = slot.admit()
    assert slot.wait_turn(c, lambda: True) == "gone"
    slot.release(b)
    assert slot.counts() == (0, 0)


def test_queue_admits_one_runner_and_max_queue_waiters_before_any_runs():
    # Requests are admitted when they arrive and take their turn later: a burst
    # of max_queue + 1 into an idle model must all be admitted (one of them runs
    # next), whether or not the first has reached wait_turn yet.
    from helexa_native.openai_protocol import ApiError
    from helexa_native.server import ModelSlot

    for max_queue in (0, 1, 3):
        slot = ModelSlot("m", FakeEngine(), max_queue=max_queue)
        tickets = [slot.admit() for _ in range(max_queue + 1)]
        with pytest.raises(ApiError) as e:
            slot.admit()
        assert e.value.status == 503
        assert slot.wait_turn(tickets[0], lambda: False) == "run"
        with pytest.raises(ApiError):
            slot.admit()
        slot.release(tickets[0])
        extra = slot.admit()  # the runner left: one place is free again
        for t in tickets[1:] + [extra]:
            slot.release(t)
        assert slot.counts() == (0, 0)


def test_model_roots_confine_loading(tmp_path):
    opened = []

    def loader(path, device="auto", n_ctx=None):
        opened.append(path)
        return FakeEngine(model_path=path)

    root, outside = tmp_path / "models", tmp_path / "private"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    (root / "a.gguf").write_bytes(b"x")
    (root / "sub" / "b.gguf").write_bytes(b"x")
    (outside / "secret.gguf").write_bytes(b"x")
    (root / "link.gguf").symlink_to(outside / "secret.gguf")
    (root / "inner.gguf").symlink_to(root / "a.gguf")
    c = create_app(FakeEngine(), served_model_name="fake", loader=loader, model_roots=[root]).test_client()

    def load(model, **kw):
        return c.post("/v1/models/load", json=dict(model=model, **kw))

    r = load(str(root / "a.gguf"))
    assert r.status_code == 200 and r.get_json()["id"] == "a"
    r = load("sub/b.gguf")  # relative: looked up in the roots
    assert r.status_code == 200 and r.get_json()["id"] == "b"
    r = load("inner.gguf")  # a link that stays inside is fine, named as asked
    assert r.status_code == 200 and r.get_json()["id"] == "inner"
    assert opened == [
        str((root / "a.gguf").resolve()),
        str((root / "sub" / "b.gguf").resolve()),
        str((root / "a.gguf").resolve()),
    ]
    for bad in (
        str(outside / "secret.gguf"),
        "../private/secret.gguf",
        str(root / ".." / "private" / "secret.gguf"),
        "link.gguf",
        str(root / "link.gguf"),
        "/etc/passwd",
    ):
        r = load(bad)
        assert r.status_code == 403, (bad, r.get_json())
        err = r.get_json()["error"]
        assert err["code"] == "model_load_forbidden" and err["param"] == "model" and "--model-root" in err["message"]
    r = load("missing.gguf")
    assert r.status_code == 400 and r.get_json()["error"]["code"] == "model_load_failed"
    assert len(opened) == 3
    ids = {m["id"] for m in c.get("/v1/models").get_json()["data"]}
    assert ids == {"fake", "a", "b", "inner"}
    assert c.post("/v1/chat/completions", json={"model": "fake", "messages": CHAT}).status_code == 200


def test_model_loading_over_http_can_be_turned_off(tmp_path):
    c = create_app(
        FakeEngine(), served_model_name="fake", loader=lambda *a, **k: FakeEngine(), model_roots=[]
    ).test_client()
    (tmp_path / "m.gguf").write_bytes(b"x")
    r = c.post("/v1/models/load", json={"model": str(tmp_path / "m.gguf")})
    assert r.status_code == 403 and r.get_json()["error"]["code"] == "model_load_forbidden"
    assert [m["id"] for m in c.get("/v1/models").get_json()["data"]] == ["fake"]


def test_model_root_arguments(tmp_path):
    import argparse

    from helexa_native.server.serve import add_serve_arguments, is_loopback, model_roots_from_args

    p = argparse.ArgumentParser()
    add_serve_arguments(p)
    assert model_roots_from_args(p.parse_args([])) is None
    assert model_roots_from_args(p.parse_args(["--no-model-load", "--model-root", str(tmp_path)])) == []
    assert model_roots_from_args(p.parse_args(["--model-root", str(tmp_path), "--model-root", "~"])) == [
        tmp_path,
        Path.home(),
    ]
    with pytest.raises(ValueError, match="--model-root must be a directory"):
        model_roots_from_args(p.parse_args(["--model-root", str(tmp_path / "nope")]))
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("[::1]")
    assert is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("") and not is_loopback("10.1.2.3")
    assert not is_loopback("example.org")


def test_slot_runs_up_to_the_engines_max_num_seqs_together():
    from helexa_native.openai_protocol import ApiError
    from helexa_native.server import ModelSlot

    eng = FakeEngine()
    eng.max_num_seqs = 3
    slot = ModelSlot("m", eng, max_queue=1)
    tickets = [slot.admit() for _ in range(4)]
    with pytest.raises(ApiError) as e:
        slot.admit()
    assert e.value.status == 503
    assert [slot.wait_turn(t, lambda: False) for t in tickets[:3]] == ["run"] * 3
    assert slot.counts() == (1, 3)
    order = []
    th = threading.Thread(target=lambda: order.append(slot.wait_turn(tickets[3], lambda: False)))
    th.start()
    time.sleep(0.3)
    assert order == []
    slot.release(tickets[1])
    th.join(5)
    assert order == ["run"] and slot.counts() == (0, 3)
