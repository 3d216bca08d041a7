"""Continuous batching on the CPU reference: the scheduler, the paged KV pool and the prefix cache.

Real tiny models (random llama / qwen2 / qwen3 checkpoints) run through the
same scheduler the GPU uses, so admission, chunked prefill, preemption,
prefix hits and cancellation are exercised for real: sequences decoded
together must give the tokens each gives alone, and transformers checks
the batched logits.
"""

import threading
import time

import pytest
import torch
from hf_factory import VOCAB, hf_logits

from helexa_native import Engine
from helexa_native.backends.base import SeqStep
from helexa_native.backends.cpu import CPUBackend
from helexa_native.kv_blocks import KVBlockManager, OutOfBlocks
from helexa_native.loaders import load_source
from helexa_native.params import SamplerState, SamplingParams

pytest.importorskip("transformers")

VARIANTS = ("llama", "qwen2", "qwen3")


def _tokens(seed, n):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n,), generator=g).tolist()


def _engine(folder, **kw):
    kw.setdefault("n_ctx", 128)
    return Engine(folder, device="cpu", **kw)


PROMPTS = [_tokens(10 + i, n) for i, n in enumerate((3, 17, 9, 33, 5))]


# ---------------------------------------------------------------- the block manager


def test_block_manager_shares_prefixes_and_evicts_least_recently_released():
    m = KVBlockManager(6, block_size=4)
    a = list(range(10, 23))  # 13 tokens: 3 full blocks
    seq, hit = m.open(a)
    assert hit == 0 and m.lookups == 13
    m.ensure(seq, 13)
    assert len(seq.table) == 4 and m.free_blocks == 2
    m.commit(seq, a, 13)
    assert m.cached_blocks == 3
    first_blocks = list(seq.table[:3])
    m.release(seq)
    assert m.used_blocks == 0 and m.free_blocks == 6  # cached blocks stay reusable
    # The same prefix shares whole blocks; the last prompt token never comes from the cache.
    s2, hit = m.open(a[:12] + [99])
    assert hit == 12 and s2.table == first_blocks
    s3, hit3 = m.open(a[:12])
    assert hit3 == 8  # 12 tokens: the third block holds the last one
    assert m.used_blocks == 3
    m.release(s2)
    m.release(s3)
    # Pressure: fresh allocations take never-cached blocks first, then the LRU cached ones.
    s4, _ = m.open([1] * 24)
    m.ensure(s4, 24)
    assert m.evictions == 3 and m.cached_blocks == 0
    with pytest.raises(OutOfBlocks):
        m.ensure(s4, 28)
    assert len(s4.table) == 6  # a failed ensure takes nothing
    m.release(s4)
    assert m.free_blocks == 6


def test_block_manager_without_prefix_cache_never_shares():
    m = KVBlockManager(8, block_size=4, prefix_cache=False)
    toks = list(range(9))
    s, _ = m.open(toks)
    m.ensure(s, 9)
    m.commit(s, toks, 9)
    m.release(s)
    s2, hit = m.open(toks)
    assert hit == 0 and m.cached_blocks == 0


# ---------------------------------------------------------------- batched forward


@pytest.mark.parametrize("variant", VARIANTS)
def test_batched_step_matches_transformers_and_each_alone(hf_models, variant):
    folder, hf = hf_models(variant)
    be = CPUBackend(load_source(folder, progress=False), 64, progress=False, block_size=8)
    greedy = SamplingParams(temperature=0.0)
    tables, lens = [], []
    # Prompts of different lengths on shuffled blocks, run together.
    order = torch.randperm(be.blocks.num_blocks, generator=torch.Generator().manual_seed(3)).tolist()
    for p in PROMPTS:
        n = -(-(len(p) + 8) // 8)
        tables.append(order[:n])
        order = order[n:]
        lens.append(len(p))
    steps = [
        SeqStep(
            slot=i,
            tokens=p,
            start_pos=0,
            block_table=t,
            params=greedy,
            state=SamplerState(prompt_tokens=p),
            want_logits=True,
        )
        for i, (p, t) in enumerate(zip(PROMPTS, tables))
    ]
    outs = be.step_batch(steps)
    toks = [[int(o.result.token)] for o in outs]
    for _ in range(6):
        steps = [
            SeqStep(
                slot=i,
                tokens=[tk[-1]],
                start_pos=lens[i] + len(tk) - 1,
                block_table=tables[i],
                params=greedy,
                state=SamplerState(prompt_tokens=PROMPTS[i]),
                want_logits=True,
            )
            for i, tk in enumerate(toks)
        ]
        outs = be.step_batch(steps)
        for tk, o in zip(toks, outs):
            tk.append(int(o.result.token))
    for i, p in enumerate(PROMPTS):
        want = hf_logits(hf, p + toks[i][:-1])
        got = outs[i].logits
        torch.testing.assert_close(got, want[-1], rtol=0, atol=1e-4)
        # Greedy tokens are transformers' argmax at every step.
        assert toks[i] == [int(want[len(p) - 1 + j].argmax()) for j in range(len(toks[i]))]


# ---------------------------------------------------------------- the scheduler


@pytest.mark.parametrize("variant", VARIANTS)
def test_concurrent_requests_equal_each_alone(hf_models, variant):
    folder, _ = hf_models(variant)
    with _engine(folder, prefix_cache=False, max_batch_tokens=24) as eng:
        alone = [eng.generate(p, temperature=0, max_tokens=12, ignore_eos=True).token_ids for p in PROMPTS]
        # Staggered starts: sequences join while others decode, and leave at different lengths.
        results, threads = {}, []
        for i, p in enumerate(PROMPTS):

            def work(i=i, p=p):
                results[i] = eng.generate(p, temperature=0, max_tokens=12 - i, ignore_eos=True).token_ids

            threads.append(threading.Thread(target=work))
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert [results[i] for i in range(len(PROMPTS))] == [a[: 12 - i] for i, a in enumerate(alone)]
        stats = eng.load()
        assert max(stats["batch_size_histogram"]) > 1
        assert stats["kv_blocks_used"] == 0 and stats["running"] == 0


def test_streams_keep_their_order_as_events_switch_delivery(hf_models, monkeypatch):
    # A step with more than scheduler.INLINE_EVENTS events hands them to the
    # delivery thread; smaller ones are put at once when nothing is in flight.
    # Twelve streams leaving one by one cross that line both ways.
    from helexa_native import scheduler

    monkeypatch.delenv("HELEXA_INLINE_EVENTS", raising=False)
    folder, _ = hf_models("llama")
    prompts = [_tokens(40 + i, 3 + i) for i in range(12)]
    with _engine(folder, prefix_cache=False, max_num_seqs=12) as eng:
        alone = [eng.generate(p, temperature=0, max_tokens=14, ignore_eos=True).token_ids for p in prompts]
        got = {}

        def work(i):
            ids = []
            for chunk in eng.generate_stream(prompts[i], temperature=0, max_tokens=3 + i, ignore_eos=True):
                ids += chunk.token_ids
            got[i] = ids

        threads = [threading.Thread(target=work, args=(i,)) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert [got[i] for i in range(len(prompts))] == [a[: 3 + i] for i, a in enumerate(alone)]
        assert max(eng.load()["batch_size_histogram"]) > scheduler.INLINE_EVENTS


def test_generate_batch_and_seeded_sampling(hf_models):
    folder, _ = hf_models("qwen2")
    with _engine(folder) as eng:
        batch = eng.generate_batch(
            PROMPTS, temperature=0.9, top_p=0.9, seed=5, max_tokens=10, ignore_eos=True, repetition_penalty=1.3
        )
        alone = [
            eng.generate(p, temperature=0.9, top_p=0.9, seed=5, max_tokens=10, ignore_eos=True, repetition_penalty=1.3)
            for p in PROMPTS
        ]
        assert [r.token_ids for r in batch] == [r.token_ids for r in alone]
        assert [r.prompt_token_ids for r in batch] == PROMPTS


def test_preemption_recomputes_and_gives_the_same_tokens(hf_models):
    folder, _ = hf_models("llama")
    per_block = 2 * 2 * 2 * 16 * 4 * 4  # layers x kv heads x k,v x head_dim x fp32 x block 4
    # 8 blocks of 4 positions = 32: four sequences growing to 40+ positions cannot all fit.
    with _engine(folder, n_ctx=32, prefix_cache=False) as ref:
        want = [ref.generate(p[:6], temperature=0, max_tokens=20, ignore_eos=True).token_ids for p in PROMPTS[:4]]
    backend = CPUBackend(
        load_source(folder, progress=False),
        32,
        progress=False,
        block_size=4,
        kv_cache_memory=12 * per_block,
        prefix_cache=False,
    )
    eng = Engine.from_backend(backend, _tokenizer(folder), prefix_cache=False)
    try:
        got = eng.generate_batch([p[:6] for p in PROMPTS[:4]], temperature=0, max_tokens=20, ignore_eos=True)
        assert [r.token_ids for r in got] == want
        assert eng.load()["preemptions"] > 0
        assert sum(r.timings["preemptions"] for r in got) > 0
        assert eng.load()["kv_blocks_used"] == 0
    finally:
        eng.close()


def _tokenizer(folder):
    from helexa_native.tokenizer import Tokenizer

    src = load_source(folder, progress=False)
    try:
        return Tokenizer.from_source(src.tokenizer)
    finally:
        src.close()


def test_prefix_cache_hits_and_outputs_match_without_it(hf_models):
    folder, _ = hf_models("qwen3")
    system = _tokens(99, 40)
    turns = [system + _tokens(200 + i, 7) for i in range(4)]
    with _engine(folder, prefix_cache=False) as cold:
        want = [cold.generate(t, temperature=0.7, seed=3, max_tokens=8, ignore_eos=True).token_ids for t in turns]
    with _engine(folder) as warm:
        got = []
        for t in turns:
            r = warm.generate(t, temperature=0.7, seed=3, max_tokens=8, ignore_eos=True)
            got.append(r.token_ids)
        assert got == want
        assert r.timings["cached_prompt_tokens"] == 32  # two blocks of 16 of the shared system prompt
        # A multi-turn chat: the next turn starts with the whole previous exchange.
        first = warm.generate(turns[0], temperature=0, max_tokens=8, ignore_eos=True)
        follow = turns[0] + first.token_ids + _tokens(7, 5)
        r2 = warm.generate(follow, temperature=0, max_tokens=4, ignore_eos=True)
        assert r2.timings["cached_prompt_tokens"] == (len(turns[0]) + 7) // 16 * 16
        stats = warm.load()
        assert stats["prefix_cache_hit_tokens"] > 0 and stats["kv_blocks_used"] == 0


def test_eviction_under_pressure_and_every_block_returns(hf_models):
    folder, _ = hf_models("llama")
    per_pos = 2 * 2 * 2 * 16 * 4
    with _engine(folder, n_ctx=64, kv_cache_memory=8 * 16 * per_pos) as eng:  # 8 blocks of 16
        blocks = eng._backend.blocks
        assert blocks.num_blocks == 8
        for i in range(12):
            eng.generate(_tokens(300 + i, 40), temperature=0, max_tokens=4, ignore_eos=True)
        assert blocks.evictions > 0 and blocks.used_blocks == 0
        # Cancelled and finished requests alike give every block back.
        streams = [
            eng.generate_stream(_tokens(400 + i, 20), temperature=0, max_tokens=30, ignore_eos=True) for i in range(6)
        ]
        for i, s in enumerate(streams):
            next(s)
            if i % 2:
                s.close()
        for s in streams[::2]:
            assert list(s)[-1].finish_reason == "length"
        assert eng.load()["kv_blocks_used"] == 0


def test_pool_too_small_for_one_context_is_a_clear_error(hf_models):
    folder, _ = hf_models("llama")
    with pytest.raises(ValueError, match="kv_cache_memory"):
        _engine(folder, n_ctx=64, kv_cache_memory=1000)
    with pytest.raises(ValueError, match="max_num_seqs"):
        _engine(folder, max_num_seqs=0)


# ---------------------------------------------------------------- several decode steps per backend call


def _run_together(eng, prompts, limits, **kw):
    """Each prompt in its own thread (its own max_tokens), started together: token ids per prompt."""
    got, threads = {}, []
    for i, (p, n) in enumerate(zip(prompts, limits)):

        def work(i=i, p=p, n=n):
            got[i] = eng.generate(p, max_tokens=n, **kw).token_ids

        threads.append(threading.Thread(target=work))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [got[i] for i in range(len(prompts))]


@pytest.mark.parametrize(
    "params",
    [
        dict(temperature=0),
        dict(temperature=0.9, top_k=20, seed=3),
        dict(temperature=0.9, seed=4, repetition_penalty=1.3, presence_penalty=0.5),
        # The reference runs logit_bias in a decode_steps call (the CUDA backend refuses it).
        dict(temperature=0.9, seed=5, logit_bias={7: 4.0, 11: -100.0}),
    ],
    ids=["greedy", "seeded", "penalties", "logit_bias"],
)
def test_decode_steps_give_the_tokens_of_single_steps(hf_models, params):
    folder, _ = hf_models("qwen3")
    limits = [13, 6, 9, 1, 11]
    with _engine(folder, prefix_cache=False) as one:
        want = [one.generate(p, max_tokens=n, ignore_eos=True, **params).token_ids for p, n in zip(PROMPTS, limits)]
    # A stop token that one sequence samples mid-way through a call of 4 steps.
    stop = want[0][5]
    first = [w.index(stop) + 1 if stop in w else len(w) for w in want]
    with _engine(folder, prefix_cache=False, decode_steps=4) as eng:
        got = _run_together(eng, PROMPTS, limits, ignore_eos=True, **params)
        assert got == want
        assert eng.load()["multi_step_calls"] > 0
        stopped = _run_together(eng, PROMPTS, limits, ignore_eos=True, stop_token_ids=[stop], **params)
        assert stopped == [w[:k] for w, k in zip(want, first)]
        stats = eng.load()
        assert stats["kv_blocks_used"] == 0 and stats["running"] == 0


def test_decode_steps_keep_the_prefix_cache_and_cancellation(hf_models):
    folder, _ = hf_models("llama")
    prompt = _tokens(77, 21)
    with _engine(folder, decode_steps=8) as eng:
        first = eng.generate(prompt, temperature=0, max_tokens=30, ignore_eos=True)
        assert eng.load()["multi_step_calls"] > 0
        # The prompt and the tokens written by multi-step calls are cached: a
        # second turn that extends them reuses every full block of it.
        turn = prompt + first.token_ids + _tokens(78, 3)
        blocks = eng._backend.blocks
        hits = blocks.hits
        again = eng.generate(turn, temperature=0, max_tokens=5, ignore_eos=True)
        assert blocks.hits - hits == (len(turn) - 1) // blocks.block_size * blocks.block_size
    with _engine(folder, prefix_cache=False) as ref:
        assert ref.generate(turn, temperature=0, max_tokens=5, ignore_eos=True).token_ids == again.token_ids
    with _engine(folder, decode_steps=8) as eng:
        streams = [eng.generate_stream(_tokens(500 + i, 9), temperature=0, max_tokens=40) for i in range(4)]
        for i, s in enumerate(streams):
            next(s)
            if i % 2:
                s.close()
        for s in streams[::2]:
            list(s)
        assert eng.load()["kv_blocks_used"] == 0


def test_decode_steps_is_checked(hf_models, monkeypatch):
    folder, _ = hf_models("llama")
    for bad in (0, -1, 65, 2.0, True):
        with pytest.raises(ValueError, match="decode_steps"):
            _engine(folder, decode_steps=bad)
    # The CPU backend's decode_steps only loops step_batch: one step a call unless asked.
    monkeypatch.delenv("HELEXA_DECODE_STEPS", raising=False)
    with _engine(folder) as eng:
        assert eng.decode_steps == 1
    monkeypatch.setenv("HELEXA_DECODE_STEPS", "3")
    with _engine(folder) as eng:
        assert eng.decode_steps == 3
    monkeypatch.setenv("HELEXA_DECODE_STEPS", "many")
    with pytest.raises(ValueError, match="HELEXA_DECODE_STEPS"):
        _engine(folder)


def test_max_batch_tokens_is_checked(hf_models, monkeypatch):
    folder, _ = hf_models("llama")
    for bad in (0, -3, 2.5, True, "64"):
        with pytest.raises(ValueError, match="max_batch_tokens"):
            _engine(folder, max_batch_tokens=bad)
    monkeypatch.delenv("HELEXA_MAX_BATCH_TOKENS", raising=False)
    with _engine(folder) as eng:
        assert eng._scheduler.max_batch_tokens == 512
    monkeypatch.setenv("HELEXA_MAX_BATCH_TOKENS", "24")
    with _engine(folder) as eng:
        assert eng._scheduler.max_batch_tokens == 24
        # The budget splits a 40-token prompt into steps of 24 and 16: the
        # answer is the one an unsplit prompt gives.
        prompt = _tokens(77, 40)
        split = eng.generate(prompt, temperature=0, max_tokens=6, ignore_eos=True).token_ids
    with _engine(folder, max_batch_tokens=4096, prefix_cache=False) as eng:
        assert eng._scheduler.max_batch_tokens == 4096
        assert eng.generate(prompt, temperature=0, max_tokens=6, ignore_eos=True).token_ids == split
    monkeypatch.setenv("HELEXA_MAX_BATCH_TOKENS", "lots")
    with pytest.raises(ValueError, match="HELEXA_MAX_BATCH_TOKENS"):
        _engine(folder)
    # Unless told, a wrapped backend's own preference sets the budget (one
    # GPU prefers one pass of its prefill rows).
    monkeypatch.delenv("HELEXA_MAX_BATCH_TOKENS")
    backend = CPUBackend(load_source(folder, progress=False), 64, progress=False, prefix_cache=False)
    backend.default_max_batch_tokens = 40
    eng = Engine.from_backend(backend, _tokenizer(folder), prefix_cache=False)
    try:
        assert eng._scheduler.max_batch_tokens == 40
        assert eng.generate(prompt, temperature=0, max_tokens=6, ignore_eos=True).token_ids == split
    finally:
        eng.close()


def test_bench_times_the_engines_decode_steps(hf_models):
    from helexa_native.bench import bench_engine

    folder, _ = hf_models("llama")
    with _engine(folder, decode_steps=4) as eng:
        assert eng.decode_steps == 4
        out = bench_engine(eng, prompt_tokens=6, decode_tokens=10, repeats=1)
        assert out["decode_steps_per_call"] == 4 and out["decode_tokens_per_s"] > 0
        # The private sequence's multi-step calls give the tokens of single steps.
        backend = eng.backend
        params = SamplingParams(temperature=0)
        prompt = _tokens(90, 7)
        backend.reset()
        state = SamplerState(prompt_tokens=list(prompt))
        tok = backend.step(prompt, 0, params, state).token
        many = [r.token for r in backend.step_many(tok, len(prompt), 6, params, state)]
        backend.reset()
        one = [backend.step(prompt, 0, params, SamplerState(prompt_tokens=list(prompt))).token]
        for i in range(6):
            one.append(backend.step([one[-1]], len(prompt) + i, params, state).token)
        backend.reset()
        assert many == one[1:]


def test_time_per_output_token_ignores_bursts():
    from helexa_native.bench import _tpot

    # Eight tokens arriving four at a time, 40 ms apart: gaps of 0 and 40 ms,
    # but 40 / 7 ms per token after the first.
    stamps = [[0.0] * 4 + [0.04] * 4, [1.0, 1.01, 1.02], [5.0]]
    got = _tpot(stamps)
    assert got == pytest.approx([0.04 / 7, 0.01])  # a one-token stream has no TPOT


class _TimedBackend:
    """A stand-in backend whose every decode step takes `step` seconds; it records each call's steps."""

    def __init__(self, step):
        from helexa_native.kv_blocks import KVBlockManager

        self.blocks = KVBlockManager(256, 16)
        self.max_num_seqs = 4
        self.lock = threading.RLock()
        self.default_decode_steps = 8
        self.step = step
        self.calls = []

    def decode_steps_ok(self, params, logit_bias=None):
        return True

    def late_masks(self, words):
        return None

    def step_batch(self, seqs):
        from helexa_native.backends.base import StepOutput
        from helexa_native.params import SampleResult

        time.sleep(self.step)
        self.calls.append(1)
        return [StepOutput(SampleResult(token=7) if s.sample else None, None) for s in seqs]

    def decode_steps(self, seqs, n):
        from helexa_native.params import SampleResult

        time.sleep(self.step * n)
        self.calls.append(n)
        return [[SampleResult(token=7) for _ in range(n)] for _ in seqs]


def test_decode_calls_last_about_decode_call_seconds():
    from helexa_native.scheduler import Request, Scheduler

    be = _TimedBackend(0.015)
    sch = Scheduler(be, decode_steps=8, decode_call_seconds=0.05)
    try:
        req = sch.submit(Request(prompt=[1, 2, 3], params=SamplingParams(temperature=0), limit=30))
        events = []
        while not events or events[-1][0] == "token":
            events.append(req.events.get(timeout=30))
        assert events[-1][:2] == ("done", "length") and len(events) == 31
        # The prompt's step, a first call of 8 steps (no step measured yet), then
        # calls of about 0.05 s: at most 3 steps of 15+ ms (2 or 3 unless the
        # machine stalls a sleep by 10 ms).
        assert be.calls[:2] == [1, 8] and sum(be.calls) == 30
        assert max(be.calls[2:]) <= 3 and max(be.calls[2:]) >= 2
    finally:
        sch.close()
    with pytest.raises(ValueError, match="decode_call_seconds"):
        Scheduler(_TimedBackend(0.0), decode_call_seconds=0)


def test_decode_call_seconds_from_the_environment(monkeypatch):
    from helexa_native.scheduler import DEFAULT_DECODE_CALL_SECONDS, Scheduler

    for env, want in ((None, DEFAULT_DECODE_CALL_SECONDS), ("30", 0.03), (" ", DEFAULT_DECODE_CALL_SECONDS)):
        if env is None:
            monkeypatch.delenv("HELEXA_DECODE_CALL_MS", raising=False)
        else:
            monkeypatch.setenv("HELEXA_DECODE_CALL_MS", env)
        sch = Scheduler(_TimedBackend(0.0))
        try:
            assert sch.decode_call_seconds == pytest.approx(want)
        finally:
            sch.close()
    monkeypatch.setenv("HELEXA_DECODE_CALL_MS", "30")
    sch = Scheduler(_TimedBackend(0.0), decode_call_seconds=0.2)  # the argument wins
    try:
        assert sch.decode_call_seconds == 0.2
    finally:
        sch.close()
    for bad, match in (("0", "decode_call_seconds"), ("fast", "HELEXA_DECODE_CALL_MS")):
        monkeypatch.setenv("HELEXA_DECODE_CALL_MS", bad)
        with pytest.raises(ValueError, match=match):
            Scheduler(_TimedBackend(0.0))


class _BlockedBackend(_TimedBackend):
    """Every step waits until `release` is set."""

    def __init__(self):
        super().__init__(0.0)
        self.release, self.entered = threading.Event(), threading.Event()

    def step_batch(self, seqs):
        self.entered.set()
        self.release.wait(60)
        return super().step_batch(seqs)


def test_stop_at_exit_waits_for_the_step_within_its_limit():
    from helexa_native import scheduler as sched
    from helexa_native.errors import EngineClosedError

    be = _BlockedBackend()
    sch = sched.Scheduler(be)
    req = sch.submit(sched.Request(prompt=[1, 2, 3], params=SamplingParams(temperature=0), limit=5))
    assert be.entered.wait(30)
    # The step outlasts the wait: the loop is reported still inside it.
    assert sch.stop_at_exit(0.05) is False and sch not in sched._LIVE
    be.release.set()
    assert sch.stop_at_exit(30) is True
    assert not sch._thread.is_alive() and not sch._deliverer.is_alive()
    # Left unanswered at exit: at most the finished step's tokens, no error, no end.
    got = []
    while not req.events.empty():
        got.append(req.events.get_nowait()[0])
    assert "error" not in got and "done" not in got and set(got) <= {"token"}
    with pytest.raises(EngineClosedError):
        sch.submit(sched.Request(prompt=[1], params=SamplingParams(temperature=0), limit=1))
