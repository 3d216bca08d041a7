"""Tensor parallelism on the CPU: shard plans, shard loading, the sharded reference and the multi-process protocol.

The sharded reference (N ranks whose partial sums are added) must compute
the unsplit model: the same greedy tokens and logits within float rounding
of the partial sums' order. The multi-process runs start real processes
(torchrun, or two processes with torchrun's environment) on gloo, each one
bounded by a timeout.
"""

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from hf_factory import VOCAB

from helexa_native import Engine
from helexa_native.backends.cpu import CPUBackend
from helexa_native.config import ModelConfig, RawTensor
from helexa_native.errors import DeviceError, LaunchError, ShardingError, UnsupportedModelError
from helexa_native.ggml_types import FLOAT_TYPES, QUANT_TYPES
from helexa_native.loaders import load_source
from helexa_native.loaders.validate import expected_shapes
from helexa_native.parallel.backend import ShardedCPUBackend
from helexa_native.parallel.cuda_backend import ShardedCUDABackend
from helexa_native.parallel.cuda_distributed import MODE_ALL_LOGITS, MODE_STEP, decode_gpu_step, encode_gpu_step
from helexa_native.parallel.distributed import Launch, check_launch, decode_step, encode_step, launch_from_env
from helexa_native.parallel.gpu_shard import gpu_plan, rank_tensors
from helexa_native.parallel.launch import tensor_parallel_backend
from helexa_native.parallel.sharding import ROWS, shard_plan, shard_tensor
from helexa_native.params import SamplerState, SamplingParams
from helexa_native.writers.gguf_writer import write_gguf

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
SUBPROCESS_TIMEOUT = 240


# Step limit of the multi-process watchdog tests, in seconds.
WATCHDOG_LIMIT = 8


def config(arch="llama", **kw):
    base = dict(
        arch=arch,
        vocab_size=384,
        hidden_size=256,
        intermediate_size=512,
        num_layers=1,
        num_heads=4,
        num_kv_heads=2,
        head_dim=128,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        rope_style="pairs" if arch == "llama" else "half",
        max_position_embeddings=256,
    )
    if arch == "qwen2":
        base.update(attention_bias=True, tie_word_embeddings=True)
    if arch == "qwen3":
        base.update(qk_norm=True)
    base.update(kw)
    return ModelConfig(**base)


def random_weights(cfg, seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in expected_shapes(cfg).items():
        scale = 0.1 if len(shape) == 1 else 1.0 / np.sqrt(shape[-1])
        base = 1.0 if name.endswith("norm.weight") else 0.0
        out[name] = (base + scale * rng.standard_normal(shape)).astype(np.float32)
    return out


@pytest.fixture(scope="module")
def hf_models(hf_models):
    """Variant name -> its checkpoint folder (the shared fixture's folder alone)."""
    return lambda variant: hf_models(variant)[0]


# ---------------------------------------------------------------- plans


def test_plan_splits_heads_mlp_and_vocabulary():
    cfg = config("qwen2", num_heads=8, num_kv_heads=4, head_dim=32, vocab_size=385)
    p = shard_plan(cfg, 2)
    assert p.kv_split and p.q_heads == [(0, 4), (4, 8)] and p.kv_heads == [(0, 2), (2, 4)]
    assert p.ffn == [(0, 256), (256, 512)]
    assert p.vocab == [(0, 193), (193, 385)] and p.vocab_width == 193
    q = p.split("blk.0.attn_q.weight")
    assert q.direction == ROWS and q.bounds == ((0, 128), (128, 256))
    assert p.split("blk.0.attn_k.bias").bounds == ((0, 64), (64, 128))
    o = p.split("blk.0.attn_output.weight")
    assert o.direction == "columns" and o.bounds == ((0, 128), (128, 256))
    assert p.split("blk.0.ffn_down.weight").direction == "columns"
    assert p.split("blk.0.ffn_up.weight").bounds == ((0, 256), (256, 512))
    assert p.split("output.weight").bounds == ((0, 193), (193, 385))
    for name in (
        "token_embd.weight",
        "output_norm.weight",
        "blk.0.attn_norm.weight",
        "blk.0.ffn_norm.weight",
        "blk.0.attn_q_norm.weight",
        "blk.0.attn_output.bias",
        "rope_freqs.weight",
    ):
        assert p.split(name) is None, name
    assert p.kv_of_q(1) == [0, 0, 1, 1]
    assert shard_plan(cfg, 1).split("blk.0.attn_q.weight") is None


def test_plan_replicates_kv_heads_when_they_do_not_divide():
    # Fewer kv heads than ranks: each rank keeps the one its query heads read.
    p = shard_plan(config(num_heads=4, num_kv_heads=2), 4)
    assert not p.kv_split and p.kv_heads == [(0, 1), (0, 1), (1, 2), (1, 2)]
    assert [p.kv_of_q(r) for r in range(4)] == [[0]] * 4
    # Not a multiple either way: a rank's query heads straddle two kv heads.
    p = shard_plan(config(num_heads=6, num_kv_heads=3, head_dim=64), 2)
    assert not p.kv_split and p.kv_heads == [(0, 2), (1, 3)]
    assert p.kv_of_q(0) == [0, 0, 1] and p.kv_of_q(1) == [0, 1, 1]
    # MHA and MQA.
    assert shard_plan(config(num_heads=4, num_kv_heads=4), 2).kv_heads == [(0, 2), (2, 4)]
    assert shard_plan(config(num_heads=4, num_kv_heads=1), 2).kv_heads == [(0, 1), (0, 1)]


def test_plan_errors_are_clear():
    with pytest.raises(ShardingError, match="num_heads 6 is not a multiple of tensor_parallel 4"):
        shard_plan(config(num_heads=6, num_kv_heads=2, head_dim=64), 4)
    with pytest.raises(ShardingError, match="intermediate_size 510 is not a multiple of tensor_parallel 4"):
        shard_plan(config(intermediate_size=510), 4)
    for bad in (0, -2, 1.5, True, "2"):
        with pytest.raises(ValueError, match="tensor_parallel must be a positive integer"):
            shard_plan(config(), bad)
    with pytest.raises(UnsupportedModelError, match="qwen3moe"):
        shard_plan(config(arch="qwen3moe"), 2)


# ---------------------------------------------------------------- shards of every weight type


def _gguf_dequant(data: np.ndarray, qtype: str) -> np.ndarray:
    arr = np.ascontiguousarray(data)
    if qtype not in ("F32", "F16"):
        arr = arr.view(np.uint8)
    return gguf.quants.dequantize(arr, gguf.GGMLQuantizationType[qtype])


@pytest.mark.parametrize("qtype", FLOAT_TYPES + QUANT_TYPES)
def test_gguf_shards_are_views_that_reassemble(tmp_path, qtype):
    # Column slices of 256 (one head of 128 x 2, half the MLP) fall on every block boundary.
    cfg = config("qwen3")
    path = write_gguf(tmp_path / f"m-{qtype}.gguf", cfg, random_weights(cfg), qtype)
    src = load_source(path, progress=False)
    try:
        plan = shard_plan(cfg, 2)
        plan.check(src.tensors)
        split = 0
        for name, raw in src.tensors.items():
            sp = plan.split(name)
            shards = [shard_tensor(raw, plan, r) for r in range(2)]
            if sp is None:
                assert all(s is raw for s in shards)
                continue
            split += 1
            full, full_ref = raw.to_float().numpy(), _gguf_dequant(raw.data, raw.dtype)
            parts, ref_parts = [], []
            for r, s in enumerate(shards):
                a, b = sp.bounds[r]
                want = (b - a,) + raw.shape[1:] if sp.direction == ROWS else raw.shape[:-1] + (b - a,)
                assert s.shape == want and s.dtype == raw.dtype
                # A view of the memory-mapped file: nothing copied, only its own bytes.
                assert np.shares_memory(s.data, raw.data) and s.nbytes * 2 == raw.nbytes
                parts.append(s.to_float().numpy())
                ref_parts.append(_gguf_dequant(s.data, s.dtype).reshape(s.shape))
            axis = 0 if sp.direction == ROWS else -1
            np.testing.assert_array_equal(np.concatenate(parts, axis), full)
            np.testing.assert_allclose(
                np.concatenate(ref_parts, axis), full_ref.reshape(full.shape), rtol=1e-6, atol=1e-7
            )
            np.testing.assert_allclose(full, full_ref.reshape(full.shape), rtol=1e-6, atol=1e-7)
        assert split == 8  # q, k, v, o, gate, up, down and output.weight
    finally:
        src.close()


def test_quantized_column_split_off_a_block_boundary_names_the_tensor(tmp_path):
    cfg = config("llama", head_dim=64, num_heads=4, num_kv_heads=4)
    w = random_weights(cfg)
    path = write_gguf(tmp_path / "q4k.gguf", cfg, w, "Q4_K")
    src = load_source(path, progress=False)
    try:
        # attn_output columns split per 64-wide head: not a 256-weight Q4_K block.
        with pytest.raises(ShardingError, match=r"blk\.0\.attn_output\.weight \(Q4_K.*blocks of 256"):
            shard_plan(cfg, 4).check(src.tensors)
        with pytest.raises(ShardingError, match=r"blk\.0\.attn_output\.weight"):
            shard_tensor(src.tensors["blk.0.attn_output.weight"], shard_plan(cfg, 2), 1)
        with pytest.raises(ShardingError, match="blocks of 256"):
            ShardedCPUBackend(src, 32, tensor_parallel=2)
    finally:
        src.close()
    path = write_gguf(tmp_path / "q8.gguf", cfg, w, "Q8_0")  # 32-weight blocks split fine
    src = load_source(path, progress=False)
    try:
        shard_plan(cfg, 4).check(src.tensors)
    finally:
        src.close()


def test_hf_shards_are_views_of_the_safetensors_map(hf_models):
    src = load_source(hf_models("llama"), progress=False)
    try:
        plan = shard_plan(src.config, 2)
        raw = src.tensors["blk.0.attn_output.weight"]
        parts = [shard_tensor(raw, plan, r, "blk.0.attn_output.weight") for r in range(2)]
        assert all(np.shares_memory(p.data, raw.data) for p in parts)
        np.testing.assert_array_equal(np.concatenate([p.to_float().numpy() for p in parts], -1), raw.to_float().numpy())
    finally:
        src.close()


# ---------------------------------------------------------------- the sharded reference


def _greedy_run(backend, prompt, steps=16):
    params = SamplingParams(temperature=0.0)
    state = SamplerState(prompt_tokens=list(prompt))
    tokens, logits = [], []
    feed, pos = list(prompt), 0
    for _ in range(steps):
        res, lg = backend.step_with_logits(feed, pos, params, state)
        pos += len(feed)
        tokens.append(res.token)
        logits.append(lg)
        state.generated_tokens.append(res.token)
        state.step += 1
        feed = [res.token]
    backend.reset()
    return tokens, torch.stack(logits)


def _prompt(seed, n):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n,), generator=g).tolist()


@pytest.mark.parametrize("variant", ["llama", "qwen2", "qwen3"])
def test_sharded_reference_equals_the_unsplit_model(hf_models, variant):
    src = load_source(hf_models(variant), progress=False)
    try:
        ref = CPUBackend(src, 64)
        prompt = _prompt(1, 9)
        want_tokens, want_logits = _greedy_run(ref, prompt)
        want_all = ref.forward(prompt, 0, all_logits=True)
        for n in (2, 4):
            tp = ShardedCPUBackend(src, 64, tensor_parallel=n)
            try:
                tokens, logits = _greedy_run(tp, prompt)
                assert tokens == want_tokens, (variant, n)
                assert (logits - want_logits).abs().max().item() < 1e-4, (variant, n)
                got_all = tp.forward(prompt, 0, all_logits=True)
                assert (got_all - want_all).abs().max().item() < 1e-4
                assert tp.is_healthy() and tp.memory_info()["tensor_parallel"] == n
            finally:
                tp.close()
    finally:
        src.close()


def test_sharded_reference_on_quantized_gguf_with_straddling_kv_heads(tmp_path):
    # 6 query heads over 3 kv heads on 2 ranks: rank 0 reads kv heads 0,0,1 and
    # rank 1 kv heads 1,2,2, which the reference's grouped attention cannot express.
    cfg = config("llama", num_heads=6, num_kv_heads=3, head_dim=64, hidden_size=384, num_layers=2)
    path = write_gguf(tmp_path / "m.gguf", cfg, random_weights(cfg, seed=3), "Q8_0")
    src = load_source(path, progress=False)
    try:
        ref, tp = CPUBackend(src, 64), ShardedCPUBackend(src, 64, tensor_parallel=2)
        assert tp.shards[0]._kv_index is not None
        prompt = _prompt(2, 7)
        want_tokens, want_logits = _greedy_run(ref, prompt, steps=8)
        tokens, logits = _greedy_run(tp, prompt, steps=8)
        assert tokens == want_tokens
        assert (logits - want_logits).abs().max().item() < 1e-4
        tp.close()
    finally:
        src.close()


def test_engine_batches_sequences_on_the_sharded_reference(hf_models):
    folder = hf_models("qwen3")
    prompts = [_prompt(10 + i, n) for i, n in enumerate((3, 17, 6))]
    with Engine(folder, device="cpu", n_ctx=64) as eng:
        want = [r.token_ids for r in eng.generate_batch(prompts, temperature=0, max_tokens=6, ignore_eos=True)]
    with Engine(folder, device="cpu", n_ctx=64, tensor_parallel=2) as eng:
        got = [r.token_ids for r in eng.generate_batch(prompts, temperature=0, max_tokens=6, ignore_eos=True)]
        assert eng.info()["tensor_parallel"] == 2 and eng.info()["healthy"]
        # Sampling sees the full distribution: seeded sampling matches too.
        seeded = eng.generate(prompts[0], temperature=0.8, seed=5, max_tokens=6, ignore_eos=True).token_ids
    assert got == want
    with Engine(folder, device="cpu", n_ctx=64) as eng:
        assert eng.generate(prompts[0], temperature=0.8, seed=5, max_tokens=6, ignore_eos=True).token_ids == seeded


def test_gpu_tensor_parallel_arguments_fail_clearly_before_any_device(hf_models):
    folder = hf_models("llama")
    src = load_source(folder, progress=False)
    try:
        # More ranks than visible GPUs (cuda:96 and cuda:97 exist nowhere): named before any native call.
        with pytest.raises(DeviceError, match=r"needs cuda:96, cuda:97, but \d+ GPU\(s\) are visible"):
            tensor_parallel_backend(src, "cuda", 96, 64, 2)
        with pytest.raises(DeviceError, match=r"needs (cuda:0, )?cuda:97, but"):
            ShardedCUDABackend(src, [0, 97], 64)
        with pytest.raises(ValueError, match="devices must be distinct"):
            ShardedCUDABackend(src, [0, 0], 64)
        with pytest.raises(ValueError, match="devices must hold non-negative GPU indices"):
            ShardedCUDABackend(src, [0, -1], 64)
        with pytest.raises(ValueError, match=r"devices \[0, 1\] name 2 GPUs, tensor_parallel is 3"):
            tensor_parallel_backend(src, "cuda", 0, 64, 3, devices=[0, 1])
        with pytest.raises(ValueError, match="block_size must be a power of two"):
            ShardedCUDABackend(src, [0, 97], 64, block_size=24)
    finally:
        src.close()
    with pytest.raises(ValueError, match="tensor_parallel must be a positive integer"):
        Engine(folder, device="cpu", tensor_parallel=0)
    with pytest.raises(ValueError, match="step_timeout"):
        Engine(folder, device="cpu", tensor_parallel=2, step_timeout=-1)
    with pytest.raises(ValueError, match=r"devices \[0, 1\] name 2 GPUs, but tensor_parallel is 4"):
        Engine(folder, devices=[0, 1], tensor_parallel=4)
    with pytest.raises(ValueError, match="devices= names GPUs"):
        Engine(folder, device="cpu", devices=[0, 1])
    with pytest.raises(ValueError, match="devices must be a non-empty list"):
        Engine(folder, devices=[])


def test_gpu_split_refuses_straddling_kv_heads(tmp_path):
    # The CPU reference runs 6 query heads over 3 kv heads on 2 ranks; the GPU
    # attention needs each rank's query heads in equal groups over its kv heads.
    cfg = config("llama", num_heads=6, num_kv_heads=3, head_dim=64, hidden_size=384, intermediate_size=768)
    path = write_gguf(tmp_path / "m.gguf", cfg, random_weights(cfg), "F16")
    src = load_source(path, progress=False)
    try:
        with pytest.raises(ShardingError, match=r"rank 0's 3 query heads read kv heads \[0, 0, 1\]"):
            gpu_plan(src, 2)
        with pytest.raises(ShardingError, match="not in equal groups"):
            ShardedCUDABackend(src, [0, 97], 64)
        gpu_plan(src, 3)  # one kv head per rank
    finally:
        src.close()
    # A quantized column split off a block boundary is refused as on the CPU.
    cfg = config("llama", head_dim=64, num_heads=4, num_kv_heads=4)
    path = write_gguf(tmp_path / "q4k.gguf", cfg, random_weights(cfg), "Q4_K")
    src = load_source(path, progress=False)
    try:
        with pytest.raises(ShardingError, match=r"blk\.0\.attn_output\.weight \(Q4_K.*blocks of 256"):
            ShardedCUDABackend(src, [0, 1, 2, 3], 64)
    finally:
        src.close()


@pytest.mark.parametrize("qtype", ["F32", "BF16", "Q8_0", "Q4_K"])
def test_gpu_rank_tensors_reassemble_and_keep_the_head_on_rank_0(tmp_path, qtype):
    cfg = config("qwen2", attention_bias=True, tie_word_embeddings=False)
    path = write_gguf(tmp_path / f"m-{qtype}.gguf", cfg, random_weights(cfg), qtype)
    src = load_source(path, progress=False)
    try:
        # A row-parallel bias (no loaded architecture has one yet) goes to rank 0 alone.
        bias = np.full(cfg.hidden_size, 0.5, np.float32)
        src.tensors["blk.0.attn_output.bias"] = RawTensor(
            "blk.0.attn_output.bias", bias.shape, "F32", bias, lambda t: torch.from_numpy(np.asarray(t.data))
        )
        plan = gpu_plan(src, 2)
        assert plan.split("output.weight") is None and plan.describe()["lm_head"] == "replicated"
        ranks = [{name: (tid, shape, arr) for name, tid, shape, arr in rank_tensors(src, plan, r)} for r in range(2)]
        # The head, its norm and the row-parallel bias: rank 0 only (followers have no head; the bias is added once).
        for name in ("output.weight", "output_norm.weight", "blk.0.attn_output.bias"):
            assert name in ranks[0] and name not in ranks[1], name
        assert ranks[0]["output.weight"][1] == [cfg.vocab_size, cfg.hidden_size]
        for name, (tid, shape, arr) in ranks[0].items():
            sp = plan.split(name)
            if sp is None:
                if name in ranks[1]:
                    np.testing.assert_array_equal(arr, ranks[1][name][2])
                continue
            other = ranks[1][name]
            assert tid == other[0] and arr.flags.c_contiguous and other[2].flags.c_contiguous
            raw = src.tensors[name]
            axis = 0 if sp.direction == ROWS else -1
            if name.endswith(".bias"):  # biases go as flat float32
                full = raw.to_float().numpy().reshape(-1)
                np.testing.assert_array_equal(np.concatenate([arr, other[2]]), full)
                continue
            assert shape[axis] + other[1][axis] == raw.shape[axis]
            # The stored bytes of the two slices reassemble the stored tensor.
            data = np.ascontiguousarray(raw.data)
            np.testing.assert_array_equal(np.concatenate([arr, other[2]], axis=axis), data)
    finally:
        src.close()


def test_gpu_step_messages_round_trip_as_plain_integers():
    seqs = [([5, 6, 7], 0, [3, 4], 2, True), ([9], 33, [0, 1, 2], 0, False)]
    mode, got = decode_gpu_step(encode_gpu_step(MODE_STEP, seqs))
    assert mode == MODE_STEP and got == seqs
    msg = encode_gpu_step(MODE_ALL_LOGITS, [([1, 2], 4, [7], 0, False)])
    assert msg.dtype == torch.long and decode_gpu_step(msg) == (MODE_ALL_LOGITS, [([1, 2], 4, [7], 0, False)])
    with pytest.raises(LaunchError, match="each GPU rank is one process driving one GPU"):
        check_launch(4, Launch(0, 2, 0, "127.0.0.1", 1), device="cuda")


def test_watchdog_fails_a_step_whose_rank_hangs(hf_models):
    src = load_source(hf_models("llama"), progress=False)
    try:
        tp = ShardedCPUBackend(src, 64, tensor_parallel=2, step_timeout=2.0)
    finally:
        src.close()
    prompt = _prompt(3, 5)
    tp.forward(prompt, 0)
    release = threading.Event()
    stuck = tp.shards[1]
    forward = stuck.forward_batch
    stuck.forward_batch = lambda *a, **kw: (release.wait(30), forward(*a, **kw))[1]
    t0 = time.monotonic()
    with pytest.raises(DeviceError, match="rank 1") as err:
        tp.forward(prompt, 0)
    took = time.monotonic() - t0
    release.set()
    assert 1.5 < took < 6, took
    assert "2 s" in str(err.value)
    assert not tp.is_healthy() and tp.shards is None
    with pytest.raises(DeviceError, match="rank 1"):
        tp.forward(prompt, 0)
    tp.close()


# ---------------------------------------------------------------- the multi-process protocol


def test_step_messages_round_trip_as_plain_integers():
    batch = [(torch.tensor([5, 6, 7]), 0, [3, 4]), (torch.tensor([9]), 33, [0, 1, 2])]
    msg = encode_step(batch, all_logits=True)
    assert msg.dtype == torch.long
    got, all_logits = decode_step(msg)
    assert all_logits is True
    assert [(t.tolist(), s, b) for t, s, b in got] == [([5, 6, 7], 0, [3, 4]), ([9], 33, [0, 1, 2])]


def test_launch_environment_and_mismatch():
    assert launch_from_env({}) is None
    env = {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}
    assert launch_from_env(env) == Launch(1, 2, 1, "10.0.0.1", 29500)
    with pytest.raises(LaunchError, match="RANK"):
        launch_from_env({"WORLD_SIZE": "2"})
    with pytest.raises(LaunchError, match="mismatched launch: 2 processes"):
        check_launch(3, launch_from_env(env))


def _env(**extra):
    env = dict(
        os.environ, HELEXA_NO_PROGRESS="1", OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), str(TESTS)])
    )
    for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _torchrun(*args):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "helexa_native",
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT, env=_env())


def test_torchrun_two_processes_generate_what_one_process_does(hf_models):
    folder = str(hf_models("llama"))
    args = [
        "generate",
        "--device",
        "cpu",
        "--model",
        folder,
        "--temperature",
        "0",
        "--max-tokens",
        "12",
        "--ignore-eos",
        "--json",
        "w5 w9 w17 w33",
    ]
    one = subprocess.run(
        [sys.executable, "-m", "helexa_native", *args],
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT,
        env=_env(),
    )
    assert one.returncode == 0, one.stderr
    two = _torchrun(*args, "--tensor-parallel", "2")
    assert two.returncode == 0, two.stderr
    want, got = json.loads(one.stdout), json.loads(two.stdout)
    assert got["token_ids"] == want["token_ids"] and len(got["token_ids"]) == 12
    assert got["text"] == want["text"]


def test_torchrun_mismatched_launch_fails_clearly(hf_models):
    p = _torchrun(
        "generate",
        "--device",
        "cpu",
        "--model",
        str(hf_models("llama")),
        "--tensor-parallel",
        "3",
        "--max-tokens",
        "2",
        "w5",
    )
    assert p.returncode != 0
    assert "mismatched launch: 2 processes were started (WORLD_SIZE=2) but tensor_parallel is 3" in p.stderr
    assert "rank 1: mismatched launch" in p.stderr


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Ranks:
    """Two driver processes with torchrun's environment; rank 0's stdout is read line by line."""

    def __init__(self, model, *args, follower_model=None):
        port = _free_port()
        self.procs = []
        for r in (0, 1):
            env = _env(RANK=r, WORLD_SIZE=2, LOCAL_RANK=r, MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
            path = follower_model if r == 1 and follower_model is not None else model
            self.procs.append(
                subprocess.Popen(
                    [sys.executable, str(TESTS / "tp_driver.py"), str(path), *args],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                    env=env,
                )
            )

    def line(self, timeout=SUBPROCESS_TIMEOUT) -> dict:
        out = {}

        def read():
            out["line"] = self.procs[0].stdout.readline()

        t = threading.Thread(target=read, daemon=True)
        t.start()
        t.join(timeout)
        if not out.get("line"):
            self.close()
            raise AssertionError(f"rank 0 printed nothing: {self.procs[0].stderr.read()[-3000:]}")
        return json.loads(out["line"])

    def close(self):
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=30)


@pytest.mark.parametrize("fault", ["hang", "kill"])
def test_watchdog_names_the_follower_that_hangs_or_dies(hf_models, fault):
    # The limit leaves room for a loaded machine: a dead follower must still be
    # named as exited (its pid is gone) well before the limit would fire.
    ranks = _Ranks(hf_models("qwen2"), "--fault", fault, "--fault-step", "3", "--step-timeout", str(WATCHDOG_LIMIT))
    try:
        r = ranks.line()
    finally:
        ranks.close()
    assert r["error"] == "DeviceError", r
    assert "rank 1" in r["message"] and "step 3" in r["message"], r
    assert r["healthy"] is False
    if fault == "kill":
        assert "has exited" in r["message"] and r["seconds"] < WATCHDOG_LIMIT, r
    else:
        assert "did not answer" in r["message"] and r["seconds"] < 2 * WATCHDOG_LIMIT, r


def test_leader_notices_a_follower_dying_between_steps(hf_models):
    ranks = _Ranks(hf_models("qwen2"), "--fault", "idle", "--step-timeout", str(WATCHDOG_LIMIT), "--max-tokens", "3")
    try:
        assert ranks.line()["ready"]
        ranks.procs[1].kill()
        r = ranks.line()
    finally:
        ranks.close()
    assert len(r["tokens"]) == 3 and r["healthy"] is True
    assert r["healthy_after_kill"] is False and r["seconds"] < WATCHDOG_LIMIT, r
    assert r["error"] == "DeviceError" and "rank 1" in r["message"], r


def test_ranks_that_load_different_models_fail_the_launch(hf_models):
    ranks = _Ranks(hf_models("qwen2"), follower_model=hf_models("llama"))
    try:
        r = ranks.line()
        assert ranks.procs[1].wait(timeout=SUBPROCESS_TIMEOUT) != 0
    finally:
        ranks.close()
    assert r["error"] == "LaunchError", r
    assert "rank 1: LaunchError: rank 1 loaded a different model than rank 0" in r["message"], r


def test_gpu_ranks_refuse_embeddings_clearly():
    # The ranks' pass ends in logits: a tensor-parallel CUDA backend says so
    # (the server's embeddings route answers NotImplementedError with a
    # clear error) instead of failing on an attribute it does not have.
    from helexa_native.parallel.cuda_distributed import CUDALeaderBackend

    for cls in (ShardedCUDABackend, CUDALeaderBackend):
        backend = object.__new__(cls)
        backend.tensor_parallel = 2
        with pytest.raises(NotImplementedError, match=f"tensor parallelism yet \\({cls.__name__}, 2 GPUs\\)"):
            backend.hidden_states([[1, 2, 3]], pooling="mean")
