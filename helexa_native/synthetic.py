"""Random-weight models with the shapes of real ones, for tests and benchmarks.

`write_synthetic_gguf` writes quantized blocks directly (random quant bits,
scale fields chosen so decoded weights have std ~0.02 and mean ~0, never a
NaN/inf fp16 scale); `write_synthetic_safetensors` writes an HF folder. Both
stream tensor by tensor and generate data in parallel threads with a
counter-based hash (splitmix64), so the bytes depend only on the seed and
tensor, not on the thread count, and multi-GB files take seconds of CPU.
"""

from __future__ import annotations

import dataclasses
import json
import os
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path
from typing import Optional, Union

import numpy as np

from .config import ModelConfig
from .ggml_types import BLOCK_SIZES
from .loaders.dequant import dequantize
from .loaders.validate import ROPE_FREQS, expected_shapes
from .progress import Progress
from .writers.gguf_writer import (
    CHATML_TEMPLATE,
    ROUTER_SUFFIX,
    GGUFStream,
    llama3_freq_factors,
    minimal_tokenizer_meta,
    tensor_order,
)
from .writers.quantize import pack_iq4xs_scales, pack_k_scales, pack_q3_scales

WEIGHT_STD = 0.02

PRESETS = {
    "llama3-8b": dict(
        arch="llama",
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling={
            "type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        max_position_embeddings=131072,
        tie_word_embeddings=False,
        name="synthetic-llama3-8b",
    ),
    "llama3.2-1b": dict(
        arch="llama",
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_layers=16,
        num_heads=32,
        num_kv_heads=8,
        head_dim=64,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling={
            "type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        max_position_embeddings=131072,
        tie_word_embeddings=True,
        name="synthetic-llama3.2-1b",
    ),
    "smollm2-135m": dict(
        arch="llama",
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_layers=30,
        num_heads=9,
        num_kv_heads=3,
        head_dim=64,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        name="synthetic-smollm2-135m",
    ),
    "qwen2.5-0.5b": dict(
        arch="qwen2",
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_layers=24,
        num_heads=14,
        num_kv_heads=2,
        head_dim=64,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        max_position_embeddings=32768,
        tie_word_embeddings=True,
        attention_bias=True,
        name="synthetic-qwen2.5-0.5b",
    ),
    "qwen3-0.6b": dict(
        arch="qwen3",
        vocab_size=151936,
        hidden_size=1024,
        intermediate_size=3072,
        num_layers=28,
        num_heads=16,
        num_kv_heads=8,
        head_dim=128,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        max_position_embeddings=40960,
        tie_word_embeddings=True,
        qk_norm=True,
        name="synthetic-qwen3-0.6b",
    ),
    "qwen3-30b-a3b": dict(
        arch="qwen3moe",
        vocab_size=151936,
        hidden_size=2048,
        intermediate_size=6144,
        num_layers=48,
        num_heads=32,
        num_kv_heads=4,
        head_dim=128,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        max_position_embeddings=40960,
        tie_word_embeddings=False,
        qk_norm=True,
        num_experts=128,
        num_experts_per_tok=8,
        moe_intermediate_size=768,
        norm_topk_prob=True,
        name="synthetic-qwen3-30b-a3b",
    ),
    # A smollm2-like llama of toy size, for tests that need a real file fast.
    "llama-tiny": dict(
        arch="llama",
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        name="synthetic-llama-tiny",
    ),
    # Small enough for tests; rows of 256 so every block type, K-quants included, applies.
    "qwen3moe-tiny": dict(
        arch="qwen3moe",
        vocab_size=512,
        hidden_size=256,
        intermediate_size=512,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=64,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        qk_norm=True,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=256,
        norm_topk_prob=True,
        name="synthetic-qwen3moe-tiny",
    ),
}

_ALIASES = {"n_layers": "num_layers", "context": "max_position_embeddings", "vocab": "vocab_size"}

# Quant mixes: (base type, type for attn_v / ffn_down / ffn_down_exps / output).
MIXES = {"Q4_K_M": ("Q4_K", "Q6_K"), "Q5_K_M": ("Q5_K", "Q6_K")}
_MIX_HI = ("attn_v.weight", "ffn_down.weight", "ffn_down_exps.weight")

# What llama.cpp falls back to when a row is not a whole number of 256-blocks.
_FALLBACK = {"Q2_K": "IQ4_NL", "Q3_K": "IQ4_NL", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0", "IQ4_XS": "IQ4_NL"}

# llama.cpp's general.file_type numbers.
_FILE_TYPES = {
    "F32": 0,
    "F16": 1,
    "Q4_0": 2,
    "Q4_1": 3,
    "Q8_0": 7,
    "Q5_0": 8,
    "Q5_1": 9,
    "Q2_K": 10,
    "Q3_K": 12,
    "Q4_K": 15,
    "Q5_K": 17,
    "Q6_K": 18,
    "IQ4_NL": 25,
    "IQ4_XS": 30,
    "BF16": 32,
    "Q4_K_M": 15,
    "Q5_K_M": 17,
}

_HF_CLASSES = {
    "llama": ("llama", "LlamaForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
    "qwen3moe": ("qwen3_moe", "Qwen3MoeForCausalLM"),
}

# Work unit of the generator threads (weights per chunk).
_CHUNK = 1 << 22


def preset_config(preset: str, rope_style: str = "half", **overrides) -> ModelConfig:
    """ModelConfig of a preset, with overrides (n_layers, vocab_size, context or any field)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r} (choose from {', '.join(PRESETS)})")
    kw = dict(PRESETS[preset])
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    for k, v in overrides.items():
        k = _ALIASES.get(k, k)
        if k not in fields:
            raise ValueError(f"unknown override {k!r}")
        kw[k] = v
    kw["rope_style"] = rope_style
    return ModelConfig(**kw)


def type_for(name: str, shape: tuple, quant: str) -> str:
    """Storage type of one tensor in a file of type or mix `quant` (MoE routers stay F32, as in llama.cpp)."""
    if len(shape) < 2 or name.endswith(ROUTER_SUFFIX):
        return "F32"
    if quant in MIXES:
        base, hi = MIXES[quant]
        t = hi if name.endswith(_MIX_HI) or name == "output.weight" else base
    elif quant in BLOCK_SIZES:
        t = quant
    else:
        raise ValueError(f"unknown quant {quant!r} (types {', '.join(BLOCK_SIZES)} or mixes {', '.join(MIXES)})")
    if shape[-1] % BLOCK_SIZES[t][0]:
        t = _FALLBACK.get(t, "F16")
        if shape[-1] % BLOCK_SIZES[t][0]:
            t = "F16"
    return t


# ---------------------------------------------------------------- random bits

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _key(*parts: int) -> int:
    h = 0x243F6A8885A308D3
    for p in parts:
        h = ((h ^ (p & 0xFFFFFFFFFFFFFFFF)) * 0x100000001B3 + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 29
    return h


def _u64(key: int, start: int, n: int) -> np.ndarray:
    """splitmix64 of counters start..start+n under `key`: uniform uint64 words."""
    x = np.arange(start, start + n, dtype=np.uint64)
    x *= _GOLDEN
    x += np.uint64(key & 0xFFFFFFFFFFFFFFFF)
    x ^= x >> np.uint64(30)
    x *= _M1
    x ^= x >> np.uint64(27)
    x *= _M2
    x ^= x >> np.uint64(31)
    return x


def _bytes(key: int, start_word: int, nbytes: int) -> np.ndarray:
    return _u64(key, start_word, (nbytes + 7) // 8).view(np.uint8)[:nbytes]


def _uniform(key: int, start: int, n: int) -> np.ndarray:
    return ((_u64(key, start, n) >> np.uint64(40)).astype(np.float32) + 0.5) * np.float32(2.0**-24)


@lru_cache(maxsize=None)
def _normal_table(qtype: str, mean: float, std: float) -> np.ndarray:
    """Stored values of N(mean, std) quantiles at 65536 evenly spaced probabilities.

    Indexing it with uniform random uint16 draws normal samples in one gather.
    """
    import torch

    p = (torch.arange(65536, dtype=torch.float64) + 0.5) / 65536
    v = (mean + std * torch.special.ndtri(p)).float().numpy()
    return _dense(qtype, v)


def _normal(key: int, start: int, n: int, qtype: str = "F32", mean: float = 0.0, std: float = 1.0) -> np.ndarray:
    """n samples of N(mean, std) stored as `qtype` (F32, F16 or BF16 bits)."""
    u = _u64(key, start, (n + 3) // 4).view(np.uint16)[:n]
    return _normal_table(qtype, mean, std)[u]


def _fill_chunks(out: np.ndarray, total: int, step: int, fn, pool: Optional[ThreadPoolExecutor]) -> None:
    """Call fn(lo, hi) over [0, total) in pieces of `step`, in the pool when given."""
    ranges = [(i, min(i + step, total)) for i in range(0, total, step)]
    if pool is None or len(ranges) == 1:
        for lo, hi in ranges:
            fn(lo, hi)
    else:
        list(pool.map(lambda r: fn(*r), ranges))


# ---------------------------------------------------------------- quant blocks


def _signed_scale(key: int, start: int, n: int, base: float) -> np.ndarray:
    """Per-block super scale: random sign (zero mean), log-uniform jitter of +-25%."""
    u = _uniform(key, start, n)
    sign = np.where(_u64(key ^ 0x5A5A, start, n) & np.uint64(1), -1.0, 1.0).astype(np.float32)
    return sign * np.float32(base) * np.exp((u - 0.5) * 0.5).astype(np.float32)


def _f16_bytes(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).reshape(-1, 1).view(np.uint8)


def _small_ints(key: int, start: int, n: int, width: int, lo: int, hi: int) -> np.ndarray:
    """[n, width] integers uniform in lo..hi."""
    u = _u64(key, start * width, n * width) % np.uint64(hi - lo + 1)
    return (u.astype(np.int64) + lo).reshape(n, width)


def _random_sign(key: int, start: int, n: int, width: int) -> np.ndarray:
    return np.where(_u64(key, start * width, n * width).reshape(n, width) & np.uint64(1), -1, 1)


def _blocks(qtype: str, key: int, start: int, n: int, base: float) -> np.ndarray:
    """n random blocks of `qtype` (block indices start..start+n) with super scale ~ `base`."""
    bb = BLOCK_SIZES[qtype][1]
    b = _bytes(key, start * ((bb + 7) // 8), n * ((bb + 7) // 8) * 8).reshape(n, -1)[:, :bb].copy()
    d = _signed_scale(key + 1, start, n, base)
    k2 = key + 2
    if qtype in ("Q4_0", "Q5_0", "Q8_0", "IQ4_NL"):
        b[:, 0:2] = _f16_bytes(d)
    elif qtype in ("Q4_1", "Q5_1"):
        dh = d.astype(np.float16).astype(np.float32)
        b[:, 0:2] = _f16_bytes(dh)
        b[:, 2:4] = _f16_bytes(-(7.5 if qtype == "Q4_1" else 15.5) * dh)
    elif qtype == "Q2_K":
        sc = 2 * _small_ints(k2, start, n, 16, 1, 5)
        b[:, 0:16] = (sc | ((3 * sc // 2) << 4)).astype(np.uint8)
        b[:, 80:82] = _f16_bytes(d)
        b[:, 82:84] = _f16_bytes(d)
    elif qtype == "Q3_K":
        s = _small_ints(k2, start, n, 16, 8, 31) * _random_sign(key + 3, start, n, 16)
        b[:, 96:108] = pack_q3_scales(s + 32)
        b[:, 108:110] = _f16_bytes(d)
    elif qtype in ("Q4_K", "Q5_K"):
        sc = _small_ints(k2, start, n, 8, 8, 31).astype(np.uint8)
        dh = d.astype(np.float16).astype(np.float32)
        b[:, 0:2] = _f16_bytes(dh)
        b[:, 2:4] = _f16_bytes((7.5 if qtype == "Q4_K" else 15.5) * dh)
        b[:, 4:16] = pack_k_scales(sc, sc)
    elif qtype == "Q6_K":
        s = _small_ints(k2, start, n, 16, 2, 8) * _random_sign(key + 3, start, n, 16)
        b[:, 192:208] = s.astype(np.int8).view(np.uint8)
        b[:, 208:210] = _f16_bytes(d)
    elif qtype == "IQ4_XS":
        s = _small_ints(k2, start, n, 8, 1, 4) * _random_sign(key + 3, start, n, 8)
        b[:, 0:2] = _f16_bytes(d)
        b[:, 2:8] = pack_iq4xs_scales(s + 32)
    else:
        raise ValueError(f"no block generator for {qtype}")
    return b


@lru_cache(maxsize=None)
def _unit_rms(qtype: str) -> float:
    """RMS of decoded weights when the super scale is ~1 (measured, not derived)."""
    be = BLOCK_SIZES[qtype][0]
    n = 8192 // be * 4
    b = _blocks(qtype, _key(12345, len(qtype)), 0, n, 1.0)
    w = dequantize(b, qtype, (n * be,)).numpy().astype(np.float64)
    return float(np.sqrt((w**2).mean()))


def _dense(qtype: str, x: np.ndarray) -> np.ndarray:
    if qtype == "F32":
        return x.astype(np.float32)
    if qtype == "F16":
        return x.astype(np.float16)
    if qtype == "BF16":
        return (x.astype(np.float32).view(np.uint32) >> np.uint32(16)).astype(np.uint16)
    raise ValueError(qtype)


def _tensor_bytes(
    name: str, shape: tuple, qtype: str, key: int, config: ModelConfig, pool: Optional[ThreadPoolExecutor]
) -> np.ndarray:
    """The stored bytes of one synthetic tensor."""
    numel = int(np.prod(shape))
    if name == ROPE_FREQS:
        return llama3_freq_factors(config.head_dim, config.rope_theta, config.rope_scaling)
    if len(shape) == 1:
        mean = 1.0 if name.endswith("norm.weight") else 0.0  # norms near 1, biases near 0
        return _normal(key, 0, numel, qtype, mean, WEIGHT_STD)
    if qtype in ("F32", "F16", "BF16"):
        item = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}[qtype]
        out = np.empty(numel, dtype=item)

        def fill(lo, hi):
            out[lo:hi] = _normal(key, lo, hi - lo, qtype, 0.0, WEIGHT_STD)

        _fill_chunks(out, numel, _CHUNK, fill, pool)
        return out
    be, bb = BLOCK_SIZES[qtype]
    nblocks = numel // be
    out = np.empty((nblocks, bb), dtype=np.uint8)
    base = WEIGHT_STD / _unit_rms(qtype)

    def fill_blocks(lo, hi):
        out[lo:hi] = _blocks(qtype, key, lo, hi - lo, base)

    _fill_chunks(out, nblocks, max(1, _CHUNK // be), fill_blocks, pool)
    return out


def _plan(config: ModelConfig, quant: str, fmt: str) -> list:
    shapes = expected_shapes(config)
    if fmt == "gguf" and (config.rope_scaling or {}).get("type") == "llama3":
        shapes[ROPE_FREQS] = (config.head_dim // 2,)
    out = []
    for name in tensor_order(config, shapes):
        shape = shapes[name]
        t = type_for(name, shape, quant) if fmt == "gguf" else quant
        out.append((name, tuple(shape), "F32" if (fmt == "gguf" and len(shape) < 2) else t))
    return out


def _workers(threads: Optional[int]) -> int:
    return max(1, threads or os.cpu_count() or 1)


def _stream(plan, config, seed, write, progress, threads):
    """Generate each planned tensor (in a pool) and hand its bytes to `write`, one tensor ahead."""
    total = sum(int(np.prod(s)) for _, s, _ in plan)
    with (
        ThreadPoolExecutor(_workers(threads)) as pool,
        ThreadPoolExecutor(1) as ahead,
        Progress(total, "Writing synthetic model", unit="weights", progress=progress) as bar,
    ):

        def make(i):
            name, shape, qtype = plan[i]
            return _tensor_bytes(name, shape, qtype, _key(seed, i), config, pool)

        nxt = ahead.submit(make, 0) if plan else None
        for i, (name, shape, qtype) in enumerate(plan):
            data = nxt.result()
            nxt = ahead.submit(make, i + 1) if i + 1 < len(plan) else None
            write(name, shape, qtype, data)
            bar.update(int(np.prod(shape)))


def write_synthetic_gguf(
    path: Union[str, os.PathLike],
    preset: str,
    quant: str = "Q4_K_M",
    seed: int = 0,
    *,
    progress: Optional[bool] = None,
    threads: Optional[int] = None,
    **overrides,
):
    """Write a random GGUF model of `preset`'s shapes; returns (path, bytes written).

    `quant` is a type name (F32, F16, BF16, Q4_0 ... IQ4_XS) or a mix
    (Q4_K_M, Q5_K_M: Q6_K for attn_v, ffn_down, ffn_down_exps and output). Overrides:
    n_layers, vocab_size, context, or any ModelConfig field.
    """
    arch = PRESETS.get(preset, {}).get("arch")
    config = preset_config(preset, rope_style="pairs" if arch == "llama" else "half", **overrides)
    plan = _plan(config, quant, "gguf")
    path = Path(path)
    stream = GGUFStream(
        path,
        config,
        tokenizer_meta=minimal_tokenizer_meta(config.vocab_size),
        chat_template=CHATML_TEMPLATE,
        file_type=_FILE_TYPES.get(quant),
    )
    try:
        for name, shape, qtype in plan:
            stream.declare(name, shape, qtype)
        _stream(plan, config, seed, lambda n, s, q, d: stream.write(n, d), progress, threads)
        size = stream.close()
    except BaseException:
        stream.abort()
        raise
    return path, size


_HF_NAMES_GLOBAL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_HF_NAMES_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
    "ffn_gate_inp.weight": "mlp.gate.weight",
}
# Stacked expert tensor -> the projection each expert's slice is named after.
_HF_EXPERT_NAMES = {
    "ffn_gate_exps.weight": "gate_proj.weight",
    "ffn_up_exps.weight": "up_proj.weight",
    "ffn_down_exps.weight": "down_proj.weight",
}


def hf_name(name: str, expert: Optional[int] = None) -> str:
    """HF checkpoint name of a canonical (GGUF-style) tensor name; `expert` picks a stacked tensor's slice."""
    if name in _HF_NAMES_GLOBAL:
        return _HF_NAMES_GLOBAL[name]
    _, i, rest = name.split(".", 2)
    if rest in _HF_EXPERT_NAMES:
        if expert is None:
            raise ValueError(f"{name} is stored per expert in HF checkpoints: give the expert index")
        return f"model.layers.{i}.mlp.experts.{expert}.{_HF_EXPERT_NAMES[rest]}"
    return f"model.layers.{i}.{_HF_NAMES_LAYER[rest]}"


def hf_config_dict(config: ModelConfig, torch_dtype: str = "bfloat16") -> dict:
    """config.json contents for `config` (Llama / Qwen2 / Qwen3 / Qwen3Moe ForCausalLM)."""
    model_type, cls = _HF_CLASSES[config.arch]
    d = {
        "architectures": [cls],
        "model_type": model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,
        "max_position_embeddings": config.max_position_embeddings,
        "tie_word_embeddings": config.tie_word_embeddings,
        "hidden_act": "silu",
        "torch_dtype": torch_dtype,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "attention_bias": config.attention_bias,
    }
    rs = config.rope_scaling
    if rs:
        rs = dict(rs)
        rs["rope_type"] = rs.pop("type")
        d["rope_scaling"] = rs
    if config.arch != "llama":
        d["use_sliding_window"] = False
    if config.num_experts:
        d.update(
            num_experts=config.num_experts,
            num_experts_per_tok=config.num_experts_per_tok,
            moe_intermediate_size=config.moe_intermediate_size,
            norm_topk_prob=config.norm_topk_prob,
            decoder_sparse_step=1,
            mlp_only_layers=list(config.mlp_only_layers),
        )
    return d


def write_hf_tokenizer(folder: Union[str, os.PathLike], vocab_size: int) -> None:
    """tokenizer.json + tokenizer_config.json for the minimal byte-level vocabulary."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    meta = minimal_tokenizer_meta(vocab_size)
    vocab = {t: i for i, t in enumerate(meta["tokens"])}
    merges = [tuple(m.split(" ")) for m in meta["merges"]]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in meta["tokens"][:3]])
    folder = Path(folder)
    tok.save(str(folder / "tokenizer.json"))
    cfg = {
        "bos_token": meta["tokens"][0],
        "eos_token": meta["tokens"][2],
        "pad_token": meta["tokens"][0],
        "unk_token": None,
        "add_bos_token": False,
        "chat_template": CHATML_TEMPLATE,
        "model_max_length": 1 << 30,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1))


def write_synthetic_safetensors(
    folder: Union[str, os.PathLike],
    preset: str,
    dtype: str = "bf16",
    seed: int = 0,
    *,
    progress: Optional[bool] = None,
    threads: Optional[int] = None,
    **overrides,
):
    """Write a random HF model folder (config.json, model.safetensors, tokenizer); returns (folder, bytes).

    `dtype` is bf16, fp16 or fp32.
    """
    st = {
        "bf16": ("BF16", "bfloat16"),
        "fp16": ("F16", "float16"),
        "f16": ("F16", "float16"),
        "fp32": ("F32", "float32"),
        "f32": ("F32", "float32"),
    }
    if dtype.lower() not in st:
        raise ValueError(f"dtype must be bf16, fp16 or fp32, got {dtype!r}")
    qtype, torch_dtype = st[dtype.lower()]
    config = preset_config(preset, rope_style="half", **overrides)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    plan = _plan(config, qtype, "safetensors")
    item = 4 if qtype == "F32" else 2
    header, offset = {}, 0
    for name, shape, _ in plan:
        # A stacked expert tensor is written whole; each expert's slice gets its own header entry.
        slices = (
            [(hf_name(name, e), shape[1:]) for e in range(shape[0])] if len(shape) == 3 else [(hf_name(name), shape)]
        )
        for hname, part in slices:
            n = int(np.prod(part)) * item
            header[hname] = {"dtype": qtype, "shape": list(part), "data_offsets": [offset, offset + n]}
            offset += n
    header["__metadata__"] = {"format": "pt"}
    hjson = json.dumps(header, separators=(",", ":")).encode()
    hjson += b" " * (-len(hjson) % 8)
    target = folder / "model.safetensors"
    try:
        with open(target, "wb") as f:
            f.write(len(hjson).to_bytes(8, "little"))
            f.write(hjson)
            _stream(plan, config, seed, lambda n, s, q, d: np.ascontiguousarray(d).tofile(f), progress, threads)
    except BaseException:
        target.unlink(missing_ok=True)
        raise
    (folder / "config.json").write_text(json.dumps(hf_config_dict(config, torch_dtype), indent=1))
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 2}, indent=1))
    write_hf_tokenizer(folder, config.vocab_size)
    return folder, target.stat().st_size
