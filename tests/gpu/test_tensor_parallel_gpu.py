"""Tensor parallelism on GPUs: the sharded GpuModel against the single-GPU model and the CPU reference.

tensor_parallel=1 runs the whole sharded path (the sharded loader, rank 0's
accumulate-then-all-reduce over a communicator of one, the peer kernel's
one-rank case, the watchdog) on any GPU and must give the plain path's
tokens. N=2 and N=4 need as many GPUs (NCCL takes no two ranks on one
device) and skip otherwise: greedy tokens against one GPU (a split only
where one GPU's own logits tie), logits close to one GPU's and to the CPU
reference; the peer all-reduce against NCCL and the float32 sum on random
data; a torchrun launch against one process. The watchdog test makes a
step hang with a test hook (a kernel spinning until the abort) and expects
a DeviceError naming the rank within the limit, a failed model, and a
reload that works.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helexa_native import Engine
from helexa_native.backends.cpu import CPUBackend
from helexa_native.backends.cuda import CUDABackend
from helexa_native.errors import DeviceError
from helexa_native.params import SamplerState, SamplingParams

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parents[2]

N_PROMPT = 16
N_GREEDY = 64
N_CTX = N_PROMPT + N_GREEDY + 16
MIN_COSINE = 0.9999
MIN_REF_COSINE = 0.999
TIE_FRACTION = 0.01
WATCHDOG_LIMIT = 3.0

# Widths that split on 256-weight K-quant blocks over 4 ranks (attn_output
# columns: 2 heads of 128; ffn_down columns: 512), GQA with kv heads split
# over 2 ranks and replicated over 4.
LLAMA_TP = dict(
    num_layers=2, vocab_size=2048, hidden_size=1024, intermediate_size=2048, num_heads=8, num_kv_heads=2, head_dim=128
)
QWEN2_TP = dict(
    num_layers=2, vocab_size=2048, hidden_size=512, intermediate_size=1024, num_heads=8, num_kv_heads=2, head_dim=64
)
QWEN3_TP = dict(num_layers=2, vocab_size=2048, num_heads=8, num_kv_heads=4)

# (preset, format, type, overrides)
MODELS = [
    ("llama3-8b", "gguf", "Q4_K_M", LLAMA_TP),  # K-quants with v / down in Q6_K
    ("llama3-8b", "safetensors", "bf16", LLAMA_TP),
    ("qwen2.5-0.5b", "gguf", "Q8_0", QWEN2_TP),  # q/k/v biases, tied embeddings
    ("qwen3-0.6b", "safetensors", "bf16", QWEN3_TP),  # q/k norms
]


def _id(m):
    return f"{m[0]}-{m[1]}-{m[2]}"


def _gpus() -> int:
    try:
        import helexa_native._C as C

        if not getattr(C, "cuda", False):
            return 0
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _need(n: int) -> None:
    if _gpus() < n:
        pytest.skip(f"needs {n} GPUs, {_gpus()} visible")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(preset, format, type, overrides) -> (path, ModelSource), written and opened once per module."""
    from helexa_native import synthetic
    from helexa_native.loaders import load_source

    cache = {}

    def get(model):
        preset, fmt, qtype, overrides = model
        key = _id(model)
        if key not in cache:
            d = tmp_path_factory.mktemp(key.replace(".", "_"))
            if fmt == "gguf":
                path = d / "model.gguf"
                synthetic.write_synthetic_gguf(path, preset, qtype, seed=11, **overrides)
            else:
                path = d / "model"
                synthetic.write_synthetic_safetensors(path, preset, qtype, seed=11, **overrides)
            cache[key] = (path, load_source(path))
        return cache[key]

    yield get
    for _, src in cache.values():
        src.close()


def _sharded(src, devices, **kw):
    from helexa_native.parallel.cuda_backend import ShardedCUDABackend

    return ShardedCUDABackend(src, devices, N_CTX, **kw)


def _tokens(seed, n, vocab):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=g).tolist()


def _generate(backend, prompt, n, params=None):
    """n tokens through Backend.step: a prefill step, then decode steps (graph replays)."""
    params = params or SamplingParams(temperature=0.0)
    backend.reset()
    state = SamplerState(prompt_tokens=list(prompt))
    res = backend.step(prompt, 0, params, state)
    out, pos = [], len(prompt)
    while True:
        out.append(res.token)
        if len(out) == n:
            break
        state.generated_tokens.append(res.token)
        state.step += 1
        res = backend.step([res.token], pos, params, state)
        pos += 1
    backend.reset()
    return out


def _all_logits(backend, ids):
    backend.reset()
    out = backend.forward(list(ids), 0, all_logits=True)
    backend.reset()
    return out


def _near_argmax(logits, picks):
    """Per row: is the pick the argmax up to a float tie (1% of the row's logit spread)?"""
    best = logits.max(-1).values
    chosen = logits.gather(-1, picks[:, None])[:, 0]
    return chosen >= best - TIE_FRACTION * logits.std(-1)


def _assert_same_greedy(oracle, prompt, got, want):
    """got equals want, or every pick of got is the oracle's argmax up to a tie (teacher-forced along got)."""
    if got == want:
        return
    rows = _all_logits(oracle, list(prompt) + list(got[:-1]))[len(prompt) - 1 :]
    ok = _near_argmax(rows, torch.tensor(got))
    first = next(i for i, (a, b) in enumerate(zip(got, want)) if a != b)
    assert bool(ok.all()), (
        f"greedy tokens differ from step {first}; steps {torch.nonzero(~ok).flatten().tolist()} are not float ties"
    )


# ---------------------------------------------------------------- one GPU: the sharded path with N=1


@pytest.mark.parametrize("model", MODELS, ids=_id)
def test_tp1_sharded_path_gives_the_plain_paths_tokens(models, model):
    _, src = models(model)
    prompt = _tokens(1, N_PROMPT, src.config.vocab_size)
    plain = CUDABackend(src, 0, N_CTX)
    try:
        want = _generate(plain, prompt, N_GREEDY)
        want_logits = _all_logits(plain, prompt)
    finally:
        plain.close()
    tp = _sharded(src, [0])
    try:
        info = tp.memory_info()
        assert info["tensor_parallel"] == 1 and info["tp_size"] == 1 and info["tp_peer_linked"] == 1
        got = _generate(tp, prompt, N_GREEDY)
        assert got == want
        got_logits = _all_logits(tp, prompt)
        # One rank's sum is its own value: the same numbers as the plain path.
        assert (got_logits - want_logits).abs().max().item() <= 1e-4
        assert tp.memory_info()["graph_replays"] > 0
        assert tp.is_healthy()
    finally:
        tp.close()
    # NCCL alone (no peer kernel) over the communicator of one: the same tokens.
    nccl = _sharded(src, [0], peer_max_bytes=0)
    try:
        assert nccl.memory_info()["tp_peer_linked"] == 0
        assert _generate(nccl, prompt, 16) == want[:16]
    finally:
        nccl.close()


def test_tp1_engine_batches_and_samples_like_the_plain_path(models):
    from helexa_native.tokenizer import Tokenizer

    path, src = models(MODELS[0])
    vocab = src.config.vocab_size
    prompts = [_tokens(10 + i, n, vocab) for i, n in enumerate((5, 23, 9, 1))]
    kw = dict(max_tokens=12, ignore_eos=True)
    with Engine(path, device="cuda", n_ctx=N_CTX) as eng:
        want = [r.token_ids for r in eng.generate_batch(prompts, temperature=0, **kw)]
        seeded = eng.generate(prompts[1], temperature=0.8, top_p=0.9, seed=7, repetition_penalty=1.1, **kw).token_ids
    backend = _sharded(src, [0])
    with Engine.from_backend(backend, Tokenizer.from_source(src.tokenizer)) as eng:
        got = [r.token_ids for r in eng.generate_batch(prompts, temperature=0, **kw)]
        again = eng.generate(prompts[1], temperature=0.8, top_p=0.9, seed=7, repetition_penalty=1.1, **kw).token_ids
        assert eng.info()["tensor_parallel"] == 1 and eng.backend.is_healthy()
    assert got == want
    assert again == seeded


def test_tp1_bad_input_keeps_the_model_usable(models):
    _, src = models(MODELS[2])
    tp = _sharded(src, [0])
    try:
        prompt = _tokens(4, 8, src.config.vocab_size)
        before = _generate(tp, prompt, 8)
        with pytest.raises(ValueError):
            tp.forward_paged([1, 2], 0, [tp.blocks.num_blocks + 5])  # a block outside the pool, refused on every rank
        assert tp.is_healthy()
        assert _generate(tp, prompt, 8) == before
    finally:
        tp.close()


# ---------------------------------------------------------------- several GPUs against one


@pytest.mark.parametrize("n", [2, 4])
@pytest.mark.parametrize("model", MODELS, ids=_id)
def test_tensor_parallel_matches_one_gpu(models, model, n):
    _need(n)
    _, src = models(model)
    prompt = _tokens(2, N_PROMPT, src.config.vocab_size)
    single = CUDABackend(src, 0, N_CTX)
    tp = _sharded(src, list(range(n)))
    try:
        assert tp.memory_info()["tensor_parallel"] == n
        want = _generate(single, prompt, N_GREEDY)
        got = _generate(tp, prompt, N_GREEDY)
        _assert_same_greedy(single, prompt, got, want)
        want_logits, got_logits = _all_logits(single, prompt), _all_logits(tp, prompt)
        cos = F.cosine_similarity(got_logits.double(), want_logits.double(), dim=-1)
        assert cos.min().item() >= MIN_COSINE, cos.min().item()
        ref = CPUBackend(src, N_CTX)
        ref_logits = ref.forward(prompt, 0, all_logits=True)
        cos_ref = F.cosine_similarity(got_logits.double(), ref_logits.double(), dim=-1)
        assert cos_ref.min().item() >= MIN_REF_COSINE, cos_ref.min().item()
        assert tp.memory_info()["graph_replays"] > 0 and tp.is_healthy()
    finally:
        tp.close()
        single.close()


@pytest.mark.parametrize("n", [2, 4])
def test_engine_tensor_parallel_and_devices_match_one_gpu(models, n):
    _need(n)
    path, src = models(MODELS[0])
    prompts = [_tokens(20 + i, k, src.config.vocab_size) for i, k in enumerate((7, 30, 12))]
    kw = dict(temperature=0, max_tokens=16, ignore_eos=True)
    with Engine(path, device="cuda", n_ctx=N_CTX) as one:
        want = [r.token_ids for r in one.generate_batch(prompts, **kw)]
        oracle = one.backend
        with Engine(path, device="cuda", n_ctx=N_CTX, tensor_parallel=n) as eng:
            assert eng.info()["tensor_parallel"] == n and eng.device == "cuda:0"
            got = [r.token_ids for r in eng.generate_batch(prompts, **kw)]
        for p, g, w in zip(prompts, got, want):
            _assert_same_greedy(oracle, p, g, w)
        devices = list(range(n))[::-1]  # rank 0 on the last GPU
        with Engine(path, devices=devices, n_ctx=N_CTX) as eng:
            assert eng.backend.devices == devices and eng.device == f"cuda:{devices[0]}"
            again = [r.token_ids for r in eng.generate_batch(prompts, **kw)]
        for p, g, w in zip(prompts, again, want):
            _assert_same_greedy(oracle, p, g, w)


# ---------------------------------------------------------------- the all-reduce


@pytest.mark.parametrize("n", [1, 2, 4])
def test_peer_all_reduce_matches_nccl_and_the_float_sum(models, n):
    _need(n)
    _, src = models(MODELS[2])
    tp = _sharded(src, list(range(n)))
    try:
        if not tp.peer_all_reduce:
            pytest.skip(f"the GPUs {list(range(n))} have no peer access between every pair")
        ranks = tp._model.handles
        capacity = tp.memory_info()["tp_peer_max_bytes"] // 4
        gen = torch.Generator().manual_seed(int(time.time()))
        for count in (1, 3, 4, 5, 1000, 4096, 3 * 4096 + 7, capacity):
            for _ in range(3):  # back to back: the call counters and staging halves alternate
                data = [torch.randn(count, generator=gen).numpy() for _ in range(n)]
                want = data[0].copy()
                for d in data[1:]:
                    want += d  # float32, in rank order, as the kernel sums
                for peer in (True, False):
                    pending = [h.all_reduce_test_async(d, peer) for h, d in zip(ranks, data)]
                    got = [p.result() for p in pending]
                    for r, g in enumerate(got):
                        assert g.shape == (count,)
                        if peer:
                            np.testing.assert_array_equal(g, want, err_msg=f"peer, rank {r}, {count} floats")
                        else:
                            np.testing.assert_array_equal(g, got[0], err_msg=f"nccl, rank {r} vs 0")
                            np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-5)
        # Past the staging: refused on every rank before any launch, the group still works.
        pending = [h.all_reduce_test_async(np.ones(capacity + 4, np.float32), True) for h in ranks]
        for p in pending:
            with pytest.raises(ValueError, match="peer staging holds"):
                p.result()
        prompt = _tokens(5, 8, src.config.vocab_size)
        assert len(_generate(tp, prompt, 4)) == 4 and tp.is_healthy()
    finally:
        tp.close()


# ---------------------------------------------------------------- the watchdog


@pytest.mark.parametrize("n", [1, 2])
def test_watchdog_aborts_a_step_made_to_hang_and_a_reload_recovers(models, n):
    _need(n)
    _, src = models(MODELS[2])
    devices = list(range(n))
    prompt = _tokens(6, 8, src.config.vocab_size)
    tp = _sharded(src, devices, step_timeout=WATCHDOG_LIMIT)
    try:
        want = _generate(tp, prompt, 6)
        params, state = SamplingParams(temperature=0.0), SamplerState(prompt_tokens=list(prompt))
        tok = tp.step(prompt, 0, params, state).token
        late = n - 1
        tp._model.handles[late].hang_next_step()
        t0 = time.monotonic()
        with pytest.raises(DeviceError) as err:
            tp.step([tok], len(prompt), params, state)  # a decode step: the peer all-reduce path
        took = time.monotonic() - t0
        msg = str(err.value)
        assert f"did not finish within {WATCHDOG_LIMIT:g} s" in msg and f"rank {late}" in msg, msg
        assert WATCHDOG_LIMIT * 0.8 < took < WATCHDOG_LIMIT + 6, took
        assert not tp.is_healthy()
        with pytest.raises(DeviceError, match=f"rank {late}"):
            tp.step([tok], len(prompt), params, state)
    finally:
        tp.close()
    # The devices are fine: a new group (new communicators) loads and answers the same.
    again = _sharded(src, devices)
    try:
        assert _generate(again, prompt, 6) == want and again.is_healthy()
    finally:
        again.close()


# ---------------------------------------------------------------- torchrun


def test_torchrun_two_gpu_processes_generate_what_one_process_does(models):
    _need(2)
    path, _ = models(MODELS[0])
    env = dict(os.environ, HELEXA_NO_PROGRESS="1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    args = ["generate", "--device", "cuda", "--model", str(path), "--n-ctx", str(N_CTX), "--temperature", "0"]
    args += ["--max-tokens", "12", "--ignore-eos", "--json", "--tensor-parallel", "2", "The quick brown fox"]
    one = subprocess.run(
        [sys.executable, "-m", "helexa_native", *args], capture_output=True, text=True, timeout=300, env=env
    )
    assert one.returncode == 0, one.stderr
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    two = subprocess.run([*cmd, "-m", "helexa_native", *args], capture_output=True, text=True, timeout=300, env=env)
    assert two.returncode == 0, two.stderr
    want, got = json.loads(one.stdout), json.loads(two.stdout)
    # Two ranks' NCCL sum and the peer kernel's are the same a + b: the same tokens.
    assert got["token_ids"] == want["token_ids"] and len(got["token_ids"]) == 12
