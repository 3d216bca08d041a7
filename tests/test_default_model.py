"""The default model (SmolLM2-135M-Instruct Q4_1) end to end on the CPU backend."""

import threading

import pytest

from helexa_native import ContextLengthError, Engine


@pytest.fixture(scope="module")
def engine(default_model):
    eng = Engine(default_model, device="cpu", progress=False)
    yield eng
    eng.close()


def ask(engine, question, **kw):
    kw.setdefault("temperature", 0)
    kw.setdefault("max_tokens", 24)
    return engine.chat([{"role": "user", "content": question}], **kw)


def test_arithmetic(engine):
    r = ask(engine, "What is 2 + 2?")
    assert "4" in r.text, r.text


def test_sky_is_blue(engine):
    assert "blue" in ask(engine, "What color is the sky on a clear day?").text.lower()


def test_romeo_and_juliet(engine):
    assert "shakespeare" in ask(engine, "Who wrote Romeo and Juliet?").text.lower()


def test_info_and_template(engine):
    info = engine.info()
    assert info["device"] == "cpu" and info["n_ctx"] == 4096
    assert info["config"]["arch"] == "llama" and info["config"]["vocab_size"] == 49152
    assert info["weight_bytes"] > 50_000_000 and info["chat_template"] == "model"
    assert info["eos_token_ids"] == [2]
    text = engine.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert "<|im_start|>user\nHi<|im_end|>" in text


def test_same_seed_same_text_different_seeds_differ(engine):
    kw = dict(temperature=1.0, max_tokens=8)
    a = engine.generate("Once upon a time", seed=5, **kw)
    b = engine.generate("Once upon a time", seed=5, **kw)
    assert a.text == b.text and a.token_ids == b.token_ids and a.seed == 5
    others = {engine.generate("Once upon a time", seed=s, **kw).text for s in (6, 7, 8)}
    assert len(others | {a.text}) >= 2


def test_unseeded_requests_record_their_seed(engine):
    r = engine.generate("Once upon a time", temperature=1.0, max_tokens=6)
    again = engine.generate("Once upon a time", temperature=1.0, max_tokens=6, seed=r.seed)
    assert again.text == r.text


def test_stream_equals_non_stream(engine):
    kw = dict(temperature=0.9, top_p=0.95, seed=3, max_tokens=16)
    r = engine.generate("The best way to learn a language is", **kw)
    chunks = list(engine.generate_stream("The best way to learn a language is", **kw))
    assert "".join(c.text for c in chunks) == r.text
    assert sum((c.token_ids for c in chunks), []) == r.token_ids
    last = chunks[-1]
    assert last.finish_reason == r.finish_reason and last.usage == r.usage
    assert all(c.finish_reason is None for c in chunks[:-1])


def test_stop_string_spanning_tokens(engine):
    kw = dict(temperature=0, max_tokens=24, ignore_eos=True)
    prompt = "Here is a short story about a dragon:"
    full = engine.generate(prompt, **kw)
    ids = full.token_ids
    # A stop string made of three consecutive generated tokens, late in the text.
    for k in range(8, len(ids) - 3):
        start = len(engine.detokenize(ids[:k]))
        stop = full.text[start : len(engine.detokenize(ids[: k + 3]))]
        if len(stop.strip()) >= 4 and full.text.find(stop) == start:
            break
    else:
        pytest.fail(f"no usable stop string in {full.text!r}")
    r = engine.generate(prompt, stop=[stop], **kw)
    assert r.text == full.text[:start]
    assert r.finish_reason == "stop" and r.stop_reason == stop
    assert len(r.token_ids) == k + 3
    chunks = [c.text for c in engine.generate_stream(prompt, stop=stop, **kw)]
    assert "".join(chunks) == r.text
    assert not any(stop in c for c in chunks)


def test_multibyte_characters_whole(engine):
    r = engine.generate("The Japanese word for cat is 猫. The Japanese word for dog is", temperature=0, max_tokens=10)
    chunks = [
        c.text
        for c in engine.generate_stream(
            "The Japanese word for cat is 猫. The Japanese word for dog is", temperature=0, max_tokens=10
        )
    ]
    assert "".join(chunks) == r.text == engine.detokenize(r.token_ids)
    assert any(ord(ch) > 0x2E80 for ch in r.text), r.text  # a CJK character came out ...
    assert all("\ufffd" not in c for c in chunks)  # ... never split


def test_logprobs(engine):
    r = engine.generate("The capital of France is", temperature=0, max_tokens=4, logprobs=True, top_logprobs=5)
    assert len(r.logprobs) == len(r.token_ids) == 4
    for e, t in zip(r.logprobs, r.token_ids):
        tops = e["top_logprobs"]
        assert e["token_id"] == t == tops[0]["token_id"]  # greedy picked the best
        assert e["logprob"] == pytest.approx(tops[0]["logprob"])
        lps = [x["logprob"] for x in tops]
        assert lps == sorted(lps, reverse=True) and all(lp <= 0 for lp in lps)
    one = engine.generate("The capital of France is", temperature=0, max_tokens=1, logprobs=True)
    assert one.logprobs[0]["logprob"] == pytest.approx(r.logprobs[0]["logprob"], abs=1e-4)


def test_context_length_error_then_still_works(engine):
    with pytest.raises(ContextLengthError, match="4096"):
        engine.generate("hello " * 5000)
    assert "4" in ask(engine, "What is 2 + 2?").text


@pytest.mark.parametrize(
    "kw",
    [
        dict(temperature=-0.5),
        dict(top_p=1.5),
        dict(top_k=-1),
        dict(min_p=2.0),
        dict(repetition_penalty=0),
        dict(presence_penalty=3.0),
        dict(frequency_penalty=-2.5),
        dict(max_tokens=-1),
        dict(top_logprobs=21),
        dict(seed="x"),
        dict(temperature=True),
        dict(stop=3),
        dict(stop_token_ids=[-4]),
    ],
    ids=lambda kw: next(iter(kw)),
)
def test_invalid_parameter_raises_and_engine_still_works(engine, kw):
    field = next(iter(kw))
    with pytest.raises(ValueError, match=field):
        engine.generate("Hi", **kw)
    assert engine.generate("Hi", temperature=0, max_tokens=2).usage["completion_tokens"] == 2


def test_threads_match_sequential(engine):
    prompts = ["The sun is", "My favourite food is", "In the year 2050,"]
    kw = dict(temperature=0.7, seed=9, max_tokens=8)
    assert engine.prefix_cache is True  # the default; seeded requests repeat exactly with cache hits too
    seq = [engine.generate(p, **kw).text for p in prompts]
    out = {}

    def work(i, j):
        out[(i, j)] = engine.generate(prompts[i], **kw).text

    threads = [threading.Thread(target=work, args=(i, j)) for i in range(3) for j in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(out[(i, j)] == seq[i] for i in range(3) for j in range(2))


def test_multi_turn_reuses_cached_prefix(engine):
    msgs = [{"role": "user", "content": "Name a fruit."}]
    r1 = engine.chat(msgs, temperature=0, max_tokens=12)
    msgs += [{"role": "assistant", "content": r1.text}, {"role": "user", "content": "Another one?"}]
    r2 = engine.chat(msgs, temperature=0, max_tokens=12)
    assert r2.timings["cached_prompt_tokens"] > r1.usage["prompt_tokens"] // 2
    assert r2.text
    # Turned off, the same conversation is computed from scratch.
    engine.prefix_cache = False
    try:
        r3 = engine.chat(msgs, temperature=0, max_tokens=12)
    finally:
        engine.prefix_cache = True
    assert r3.timings["cached_prompt_tokens"] == 0 and r3.text == r2.text
