"""Synthetic models: loadable, real shapes, sane weight statistics, deterministic."""

import hashlib
import json

import gguf
import numpy as np
import pytest
import torch

from helexa_native.ggml_types import FLOAT_TYPES, QUANT_TYPES
from helexa_native.loaders import describe, load_source
from helexa_native.synthetic import PRESETS, preset_config, write_synthetic_gguf, write_synthetic_safetensors
from helexa_native.writers.gguf_writer import llama3_freq_factors

SMALL = dict(n_layers=1, vocab_size=1024)


def check_stats(src, names=None):
    for name, t in src.tensors.items():
        if names is not None and name not in names:
            continue
        w = t.to_float()
        assert torch.isfinite(w).all(), name
        if name == "rope_freqs.weight":
            continue
        mean, std = float(w.mean()), float(w.std())
        if name.endswith("norm.weight"):
            assert abs(mean - 1.0) < 0.01 and 0.01 < std < 0.03, (name, mean, std)
        else:
            assert abs(mean) < 0.003 and 0.017 < std < 0.023, (name, t.dtype, mean, std)


def file_hash(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


# MoE presets (routers in F32, Q6_K expert down projections) are checked in test_moe.py.
@pytest.mark.parametrize("preset", [p for p in PRESETS if p != "llama3-8b" and not PRESETS[p].get("num_experts")])
def test_presets_q4_k_m(tmp_models, preset):
    path, nbytes = write_synthetic_gguf(
        tmp_models / f"{preset}.gguf", preset, "Q4_K_M", progress=False, n_layers=2, vocab_size=2048
    )
    assert nbytes == path.stat().st_size
    src = load_source(path, progress=False)
    try:
        c, p = src.config, PRESETS[preset]
        assert (c.arch, c.num_layers, c.vocab_size) == (p["arch"], 2, 2048)
        for field in (
            "hidden_size",
            "intermediate_size",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "rope_theta",
            "tie_word_embeddings",
            "max_position_embeddings",
        ):
            assert getattr(c, field) == p[field], field
        assert c.attention_bias == p.get("attention_bias", False) and c.qk_norm == p.get("qk_norm", False)
        assert c.rope_style == ("pairs" if p["arch"] == "llama" else "half")
        assert src.chat_template and src.eos_token_ids == [2]
        types = {n: t.dtype for n, t in src.tensors.items()}
        for name, t in types.items():
            if src.tensors[name].data.ndim == 1:
                assert t == "F32"
            elif name.endswith(("attn_v.weight", "ffn_down.weight")):
                # Q6_K, or Q8_0 where a row is not whole 256-blocks (as llama.cpp does)
                assert t == ("Q6_K" if src.tensors[name].shape[1] % 256 == 0 else "Q8_0"), name
            else:
                assert t == ("Q4_K" if src.tensors[name].shape[1] % 256 == 0 else "Q5_0"), name
        check_stats(src)
    finally:
        src.close()


def test_llama3_8b_preset(tmp_models):
    path, nbytes = write_synthetic_gguf(tmp_models / "l3.gguf", "llama3-8b", "Q4_K_M", progress=False, n_layers=1)
    src = load_source(path, progress=False)
    try:
        c = src.config
        assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads, c.head_dim) == (
            128256,
            4096,
            14336,
            32,
            8,
            128,
        )
        assert c.rope_theta == 500000.0 and not c.tie_word_embeddings
        assert c.rope_scaling == {"type": "freq_factors"}
        np.testing.assert_array_equal(
            src.tensors["rope_freqs.weight"].to_float().numpy(),
            llama3_freq_factors(128, 500000.0, PRESETS["llama3-8b"]["rope_scaling"]),
        )
        d = describe(src)
        assert d["tensor_types"]["Q6_K"]["count"] == 3 and d["tensor_types"]["Q4_K"]["count"] == 6
        # 4.5 bits per Q4_K weight, 6.5625 per Q6_K
        assert src.tensors["blk.0.ffn_up.weight"].nbytes == 14336 * 4096 // 256 * 144
        check_stats(src, {"blk.0.attn_q.weight", "blk.0.attn_v.weight", "blk.0.attn_norm.weight"})
    finally:
        src.close()


@pytest.mark.parametrize("qtype", FLOAT_TYPES + QUANT_TYPES)
def test_every_type(tmp_models, qtype):
    # qwen3-0.6b's rows (1024, 2048, 3072) are whole 256-blocks: every
    # tensor gets the requested type, no fallback.
    path, _ = write_synthetic_gguf(tmp_models / f"{qtype}.gguf", "qwen3-0.6b", qtype, progress=False, **SMALL)
    src = load_source(path, progress=False)
    try:
        reader = gguf.GGUFReader(path)
        for t in reader.tensors:
            want = "F32" if len(t.shape) == 1 else qtype
            assert t.tensor_type.name == want, t.name
            if t.name == "blk.0.ffn_gate.weight":
                ref = gguf.quants.dequantize(t.data, t.tensor_type)
                np.testing.assert_allclose(
                    src.tensors[t.name].to_float().numpy(), ref.reshape(3072, 1024), rtol=1e-6, atol=1e-9
                )
        check_stats(src)
        if qtype in QUANT_TYPES:
            # no NaN/inf fp16 scales anywhere (they would make weights non-finite)
            assert all(torch.isfinite(t.to_float()).all() for t in src.tensors.values())
    finally:
        src.close()


def _logits(src, tokens):
    """Embedding -> one SwiGLU MLP block -> final norm -> tied/untied head (float64)."""

    def rms(x, w):
        return x / np.sqrt((x**2).mean(-1, keepdims=True) + 1e-6) * w

    t = {n: v.to_float().double().numpy() for n, v in src.tensors.items()}
    h = t["token_embd.weight"][tokens]
    x = rms(h, t["blk.0.ffn_norm.weight"])
    g, u = x @ t["blk.0.ffn_gate.weight"].T, x @ t["blk.0.ffn_up.weight"].T
    h = h + (g / (1 + np.exp(-g)) * u) @ t["blk.0.ffn_down.weight"].T
    head = t.get("output.weight", t["token_embd.weight"])
    return rms(h, t["output_norm.weight"]) @ head.T


def test_activations_are_sane(tmp_models):
    path, _ = write_synthetic_gguf(tmp_models / "s.gguf", "smollm2-135m", "Q4_1", progress=False, **SMALL)
    src = load_source(path, progress=False)
    try:
        logits = _logits(src, [0, 5, 77, 1000])
    finally:
        src.close()
    assert np.isfinite(logits).all()
    assert 0.1 < logits.std(axis=-1).min() and logits.std(axis=-1).max() < 10
    assert len(set(logits.argmax(-1).tolist())) > 1  # different tokens, different predictions


def test_deterministic(tmp_models):
    a, _ = write_synthetic_gguf(
        tmp_models / "a.gguf", "qwen2.5-0.5b", "Q4_K_M", seed=7, progress=False, threads=1, **SMALL
    )
    b, _ = write_synthetic_gguf(
        tmp_models / "b.gguf", "qwen2.5-0.5b", "Q4_K_M", seed=7, progress=False, threads=3, **SMALL
    )
    c, _ = write_synthetic_gguf(tmp_models / "c.gguf", "qwen2.5-0.5b", "Q4_K_M", seed=8, progress=False, **SMALL)
    assert file_hash(a) == file_hash(b) != file_hash(c)


@pytest.mark.parametrize("dtype,tag", [("bf16", "BF16"), ("fp16", "F16"), ("fp32", "F32")])
def test_safetensors_folder(tmp_models, dtype, tag):
    folder, nbytes = write_synthetic_safetensors(
        tmp_models / f"hf-{dtype}", "qwen2.5-0.5b", dtype, progress=False, **SMALL
    )
    assert nbytes == (folder / "model.safetensors").stat().st_size
    src = load_source(folder, progress=False)
    try:
        c = src.config
        assert (c.arch, c.hidden_size, c.num_layers, c.vocab_size, c.num_kv_heads) == ("qwen2", 896, 1, 1024, 2)
        assert c.attention_bias and c.tie_word_embeddings and c.rope_style == "half"
        assert {t.dtype for t in src.tensors.values()} == {tag}
        assert src.chat_template and src.eos_token_ids == [2]
        check_stats(src)
    finally:
        src.close()


def test_safetensors_folder_loads_in_transformers(tmp_models):
    import transformers
    from tokenizers import Tokenizer

    folder, _ = write_synthetic_safetensors(tmp_models / "hf", "qwen3-0.6b", "fp32", progress=False, **SMALL)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    assert type(model).__name__ == "Qwen3ForCausalLM"
    with torch.no_grad():
        logits = model(torch.tensor([[1, 50, 300, 2]])).logits[0]
    assert torch.isfinite(logits).all() and float(logits.std()) > 0.05
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    text = "hello, wörld <|im_end|>"
    ids = tok.encode(text).ids
    assert max(ids) < 1024 and tok.decode(ids, skip_special_tokens=False) == text
    assert json.loads((folder / "tokenizer_config.json").read_text())["eos_token"] == "<|im_end|>"


def test_bad_arguments(tmp_models):
    with pytest.raises(ValueError, match="preset"):
        preset_config("gpt-5")
    with pytest.raises(ValueError, match="override"):
        preset_config("smollm2-135m", n_experts=8)
    with pytest.raises(ValueError, match="quant"):
        write_synthetic_gguf(tmp_models / "x.gguf", "smollm2-135m", "Q7_Z", progress=False, **SMALL)
    assert not (tmp_models / "x.gguf").exists()
    with pytest.raises(ValueError, match="dtype"):
        write_synthetic_safetensors(tmp_models / "y", "smollm2-135m", "int8", progress=False, **SMALL)


def test_llama3_2_1b_preset_has_the_real_shapes_and_count():
    from helexa_native.loaders.validate import expected_shapes

    c = preset_config("llama3.2-1b")
    assert (c.arch, c.num_layers, c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads, c.head_dim) == (
        "llama",
        16,
        2048,
        8192,
        32,
        8,
        64,
    )
    assert c.vocab_size == 128256 and c.tie_word_embeddings and c.rope_theta == 500000.0
    total = sum(int(np.prod(s)) for s in expected_shapes(c).values())
    # The model card's 1.24B parameters (tied embeddings, counted once), the rope factors aside.
    assert int((total - 32) / 1e7) == 123
