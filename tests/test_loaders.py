"""GGUF and HF-folder loading: configs, tensors, templates and every bad input."""

import collections
import dataclasses
import gc
import json
import os
import struct

import gguf
import numpy as np
import pytest
import torch

from helexa_native.config import SUPPORTED_ARCHS, ModelConfig
from helexa_native.errors import ModelLoadError, UnsupportedModelError
from helexa_native.ggml_types import FLOAT_TYPES, QUANT_TYPES
from helexa_native.loaders import describe, load_source
from helexa_native.loaders.gguf_loader import read_gguf
from helexa_native.loaders.validate import expected_shapes
from helexa_native.writers.gguf_writer import (
    gguf_to_hf_qk,
    hf_to_gguf_qk,
    llama3_freq_factors,
    minimal_tokenizer_meta,
    write_gguf,
)


def tiny_config(arch="llama", **kw):
    base = dict(
        arch=arch,
        vocab_size=384,
        hidden_size=256,
        intermediate_size=512,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=64,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        rope_style="pairs" if arch == "llama" else "half",
        max_position_embeddings=1024,
        name=f"tiny-{arch}",
    )
    if arch == "qwen2":
        base.update(attention_bias=True, tie_word_embeddings=True, rms_norm_eps=1e-6)
    if arch == "qwen3":
        # head_dim larger than hidden / heads, as in real Qwen3 models
        base.update(qk_norm=True, head_dim=128, rms_norm_eps=1e-6)
    if arch == "qwen3moe":
        # Stacked experts of rows of 256, so every block type applies; layer 1 dense.
        base.update(
            qk_norm=True,
            head_dim=128,
            rms_norm_eps=1e-6,
            num_experts=4,
            num_experts_per_tok=2,
            moe_intermediate_size=256,
            norm_topk_prob=True,
            mlp_only_layers=(1,),
        )
    base.update(kw)
    return ModelConfig(**base)


def random_weights(cfg, seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in expected_shapes(cfg).items():
        if len(shape) == 1:
            out[name] = (1.0 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        else:
            out[name] = (0.02 * rng.standard_normal(shape)).astype(np.float32)
    return out


def mapped(path) -> bool:
    """Whether this process still maps `path`."""
    gc.collect()
    with open("/proc/self/maps") as f:
        return str(path) in f.read()


# ---------------------------------------------------------------- default model


def test_default_model_config(default_model):
    src = load_source(default_model, progress=False)
    try:
        c = src.config
        assert (c.arch, c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads) == ("llama", 30, 576, 9, 3)
        assert (c.head_dim, c.vocab_size, c.intermediate_size) == (64, 49152, 1536)
        assert c.tie_word_embeddings and c.rope_style == "pairs" and c.rope_scaling is None
        assert not c.attention_bias and not c.qk_norm
        assert c.rope_theta == 100000.0 and c.max_position_embeddings == 8192
        assert src.format == "gguf"
        assert "<|im_start|>" in src.chat_template
        assert src.bos_token_id == 1 and src.eos_token_ids == [2]
        tok = src.tokenizer
        assert tok.kind == "gguf" and tok.gguf_meta["model"] == "gpt2"
        assert len(tok.gguf_meta["tokens"]) == 49152 and tok.gguf_meta["tokens"][2] == "<|im_end|>"
        assert isinstance(tok.gguf_meta["merges"][0], str) and tok.gguf_meta["add_bos_token"] is False
        assert len(src.tensors) == 2 + 9 * 30 and "output.weight" not in src.tensors
        q = src.tensors["blk.0.attn_q.weight"]
        assert q.dtype == "Q4_1" and q.shape == (576, 576)
        assert q.data.dtype == np.uint8 and q.data.shape == (576, 576 // 32 * 20)
        emb = src.tensors["token_embd.weight"]
        assert emb.dtype == "Q8_0" and emb.shape == (49152, 576)
        norm = src.tensors["output_norm.weight"]
        assert norm.dtype == "F32" and norm.data.dtype == np.float32 and norm.shape == (576,)
    finally:
        src.close()


def test_default_model_header_matches_gguf_reader(default_model):
    # The header parser against the gguf package's reader: every field, and
    # every tensor's bytes.
    fields, infos, data_start, mm = read_gguf(default_model)
    reader = gguf.GGUFReader(default_model)
    assert data_start == reader.data_offset
    for key, field in reader.fields.items():
        if not key.startswith("GGUF."):
            assert fields[key] == field.contents(), key
    src = load_source(default_model, progress=False)
    try:
        for t in reader.tensors:
            raw = src.tensors[t.name]
            assert raw.dtype == t.tensor_type.name
            assert raw.shape == tuple(int(d) for d in reversed(t.shape.tolist()))
            assert np.array_equal(
                np.asarray(raw.data).reshape(-1).view(np.uint8), np.asarray(t.data).reshape(-1).view(np.uint8)
            )
    finally:
        src.close()


def test_describe_default_model(default_model):
    src = load_source(default_model, progress=False)
    try:
        d = describe(src)
    finally:
        src.close()
    assert d["params"] == 134515008  # sum of n_elements per the gguf package's reader
    assert {k: v["count"] for k, v in d["tensor_types"].items()} == {"Q4_1": 210, "Q8_0": 1, "F32": 61}
    assert d["tensor_types"]["Q8_0"]["bytes"] == 49152 * 576 // 32 * 34
    assert d["file_size"] == os.path.getsize(default_model)
    assert d["arch"] == "llama" and d["num_layers"] == 30 and d["context_length"] == 8192
    assert d["chat_template"] is True and d["tie_word_embeddings"] is True
    json.dumps(d)


def test_close_releases_the_map(default_model):
    src = load_source(default_model, progress=False)
    assert mapped(default_model)
    src.close()
    assert not mapped(default_model)


# ---------------------------------------------------------------- GGUF round trips


def test_every_supported_arch_has_its_gguf_facts():
    from helexa_native.loaders import gguf_loader, safetensors_loader

    assert set(gguf_loader.GGUF_ROPE_STYLE) == set(SUPPORTED_ARCHS)
    assert set(gguf_loader._DEFAULT_EPS) == set(SUPPORTED_ARCHS)
    assert set(safetensors_loader._MODEL_TYPES.values()) == set(SUPPORTED_ARCHS)


ROUND_TRIP_BOUND = {
    "F32": 0.0,
    "F16": 1e-3,
    "BF16": 8e-3,
    "Q8_0": 0.01,
    "Q6_K": 0.04,
    "Q5_0": 0.06,
    "Q5_1": 0.06,
    "Q5_K": 0.06,
    "Q3_K": 0.3,
    "Q2_K": 0.45,
}


@pytest.mark.parametrize("qtype", FLOAT_TYPES + QUANT_TYPES)
@pytest.mark.parametrize("arch", SUPPORTED_ARCHS)
def test_gguf_round_trip(tmp_models, arch, qtype):
    cfg = tiny_config(arch)
    weights = random_weights(cfg)
    path = tmp_models / f"{arch}-{qtype}.gguf"
    write_gguf(path, cfg, weights, qtype)
    src = load_source(path, progress=False)
    try:
        assert src.config == cfg
        assert set(src.tensors) == set(weights)
        reader = gguf.GGUFReader(path)
        by_name = {t.name: t for t in reader.tensors}
        for name, w in weights.items():
            t = src.tensors[name]
            assert t.shape == w.shape
            # MoE routers stay F32, as llama.cpp keeps them.
            want_type = "F32" if w.ndim == 1 or name.endswith("ffn_gate_inp.weight") else qtype
            assert t.dtype == want_type == by_name[name].tensor_type.name
            got = t.to_float()
            assert got.dtype == torch.float32 and tuple(got.shape) == w.shape
            ref = gguf.quants.dequantize(by_name[name].data, by_name[name].tensor_type)
            np.testing.assert_allclose(got.numpy(), ref.reshape(w.shape), rtol=1e-6, atol=1e-9)
            rel = float(np.sqrt(((got.numpy() - w) ** 2).mean()) / w.std())
            assert rel <= ROUND_TRIP_BOUND.get(want_type, 0.12), (name, rel)
        if qtype in QUANT_TYPES:
            assert src.tensors["blk.1.ffn_up.weight"].data.dtype == np.uint8
        assert src.chat_template is not None and src.eos_token_ids == [2]
        assert src.tokenizer.gguf_meta["tokens"] == minimal_tokenizer_meta(cfg.vocab_size)["tokens"]
    finally:
        src.close()


def test_llama3_rope_scaling_becomes_freq_factors(tmp_models):
    scaling = {
        "type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    cfg = tiny_config("llama", rope_scaling=scaling)
    path = tmp_models / "l3.gguf"
    write_gguf(path, cfg, random_weights(cfg), "Q8_0")
    src = load_source(path, progress=False)
    try:
        assert src.config.rope_scaling == {"type": "freq_factors"}
        ff = src.tensors["rope_freqs.weight"]
        assert ff.dtype == "F32" and ff.shape == (cfg.head_dim // 2,)
        np.testing.assert_array_equal(ff.to_float().numpy(), llama3_freq_factors(64, 10000.0, scaling))
    finally:
        src.close()


def test_llama3_freq_factors_match_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    hf = LlamaConfig(
        hidden_size=256,
        num_attention_heads=2,
        head_dim=128,
        max_position_embeddings=1024,
        rope_theta=10000.0,
        rope_scaling=dict(scaling, rope_type="llama3"),
    )
    inv_hf, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, "cpu")
    base = 1.0 / 10000.0 ** (np.arange(0, 128, 2, dtype=np.float64) / 128)
    ff = llama3_freq_factors(128, 10000.0, dict(scaling, type="llama3"))
    assert ff.min() == pytest.approx(1.0) and ff.max() == pytest.approx(8.0)
    np.testing.assert_allclose(base / ff, inv_hf.double().numpy(), rtol=1e-6)


def test_linear_rope_scaling_round_trip(tmp_models):
    cfg = tiny_config("llama", rope_scaling={"type": "linear", "factor": 4.0})
    path = tmp_models / "lin.gguf"
    write_gguf(path, cfg, random_weights(cfg), "F16")
    src = load_source(path, progress=False)
    try:
        assert src.config.rope_scaling == {"type": "linear", "factor": 4.0}
    finally:
        src.close()


def _rope(x, pos, style, theta=10000.0):
    """Rotate [heads, head_dim] rows at position `pos` (float64 reference)."""
    d = x.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, d, 2) / d)
    c, s = np.cos(pos * inv), np.sin(pos * inv)
    if style == "half":
        a, b = x[..., : d // 2], x[..., d // 2 :]
        return np.concatenate((a * c - b * s, a * s + b * c), axis=-1)
    a, b = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = a * c - b * s, a * s + b * c
    return out


def test_llama_qk_permutation(tmp_models):
    cfg = tiny_config("llama", attention_bias=True)
    hf = random_weights(cfg, seed=3)
    path = tmp_models / "perm.gguf"
    write_gguf(path, cfg, hf, "F32", hf_qk_permute=True)
    src = load_source(path, progress=False)
    try:
        for kind, heads in (("q", cfg.num_heads), ("k", cfg.num_kv_heads)):
            for suffix in ("weight", "bias"):
                name = f"blk.1.attn_{kind}.{suffix}"
                got = src.tensors[name].to_float().numpy()
                assert not np.array_equal(got, hf[name])
                np.testing.assert_array_equal(got, hf_to_gguf_qk(hf[name], heads))
                np.testing.assert_array_equal(gguf_to_hf_qk(got, heads), hf[name])
        # What the permutation is for: adjacent-pair rotation of the GGUF
        # rows gives the same attention scores as HF's rotate-half.
        rng = np.random.default_rng(1)
        x = rng.standard_normal(cfg.hidden_size)
        hd = cfg.head_dim

        def proj(w, b, heads):
            return (w.astype(np.float64) @ x + b).reshape(heads, hd)

        qh = proj(hf["blk.1.attn_q.weight"], hf["blk.1.attn_q.bias"], cfg.num_heads)
        kh = proj(hf["blk.1.attn_k.weight"], hf["blk.1.attn_k.bias"], cfg.num_kv_heads)
        t = {
            n: src.tensors[n].to_float().numpy()
            for n in ("blk.1.attn_q.weight", "blk.1.attn_q.bias", "blk.1.attn_k.weight", "blk.1.attn_k.bias")
        }
        qg = proj(t["blk.1.attn_q.weight"], t["blk.1.attn_q.bias"], cfg.num_heads)
        kg = proj(t["blk.1.attn_k.weight"], t["blk.1.attn_k.bias"], cfg.num_kv_heads)
        group = cfg.num_heads // cfg.num_kv_heads
        for pq, pk in ((5, 2), (17, 17), (300, 1)):
            sh = np.einsum("hd,hd->h", _rope(qh, pq, "half"), np.repeat(_rope(kh, pk, "half"), group, 0))
            sg = np.einsum("hd,hd->h", _rope(qg, pq, "pairs"), np.repeat(_rope(kg, pk, "pairs"), group, 0))
            np.testing.assert_allclose(sg, sh, rtol=1e-10, atol=1e-12)
    finally:
        src.close()


def test_hf_qk_permute_is_llama_only(tmp_models):
    cfg = tiny_config("qwen2")
    with pytest.raises(ValueError):
        write_gguf(tmp_models / "x.gguf", cfg, random_weights(cfg), "F32", hf_qk_permute=True)
    assert not (tmp_models / "x.gguf").exists()
    # HF-layout llama weights without the permutation would load silently wrong
    cfg = tiny_config("llama", rope_style="half")
    with pytest.raises(ValueError, match="hf_qk_permute"):
        write_gguf(tmp_models / "y.gguf", cfg, random_weights(cfg), "F32")
    assert not (tmp_models / "y.gguf").exists()


def test_raw_tensors_are_written_as_given(tmp_models):
    cfg = tiny_config("llama")
    w = random_weights(cfg)
    name = "blk.0.ffn_down.weight"
    raw = gguf.quants.quantize(w.pop(name), gguf.GGMLQuantizationType.Q5_1)
    path = tmp_models / "raw.gguf"
    write_gguf(path, cfg, w, "Q8_0", raw_tensors={name: (raw, "Q5_1", (256, 512))})
    src = load_source(path, progress=False)
    try:
        t = src.tensors[name]
        assert t.dtype == "Q5_1" and t.shape == (256, 512)
        assert np.array_equal(np.asarray(t.data), raw)
    finally:
        src.close()


# ---------------------------------------------------------------- HF folders

HF_VARIANTS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=False)),
    "llama3": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(
            tie_word_embeddings=False,
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        ),
    ),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(tie_word_embeddings=False)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(tie_word_embeddings=False, head_dim=24)),
}


def make_hf(folder, variant, dtype=torch.float32, shard=None):
    import transformers

    cfg_cls, model_cls, extra = HF_VARIANTS[variant]
    kw = dict(
        vocab_size=320,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
    )
    kw.update(extra)
    config = getattr(transformers, cfg_cls)(**kw)
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.3 if "norm" not in n else 0.1) + (1.0 if "norm" in n else 0.0))
    model = model.to(dtype)
    if shard:
        model.save_pretrained(folder, max_shard_size=shard)
    else:
        model.save_pretrained(folder)
    return model


def hf_to_canonical(sd):
    from helexa_native.loaders.safetensors_loader import canonical_name

    return {canonical_name(k): v for k, v in sd.items() if canonical_name(k) is not None}


@pytest.mark.parametrize("variant", list(HF_VARIANTS))
def test_hf_folder_config(tmp_models, variant):
    folder = tmp_models / variant
    model = make_hf(folder, variant)
    src = load_source(folder, progress=False)
    try:
        c, h = src.config, model.config
        assert src.format == "safetensors" and c.rope_style == "half"
        assert c.arch == {"mistral": "llama", "llama3": "llama"}.get(variant, variant)
        assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_layers) == (320, 64, 96, 2)
        assert (c.num_heads, c.num_kv_heads) == (4, 2)
        assert c.head_dim == (24 if variant == "qwen3" else 16)
        assert c.tie_word_embeddings == bool(h.tie_word_embeddings)
        assert c.attention_bias == (variant == "qwen2") and c.qk_norm == (variant == "qwen3")
        assert c.rms_norm_eps == pytest.approx(1e-5)
        theta = (
            500000.0
            if variant == "llama3"
            else float(getattr(h, "rope_theta", None) or h.rope_parameters["rope_theta"])
        )
        assert c.rope_theta == theta
        if variant == "llama3":
            assert c.rope_scaling == {
                "type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            }
        else:
            assert c.rope_scaling is None
        assert src.tokenizer.kind == "hf" and src.tokenizer.hf_dir == folder
        assert src.eos_token_ids == [2] and src.bos_token_id == 1
        want = hf_to_canonical(model.state_dict())
        if c.tie_word_embeddings:
            want.pop("output.weight", None)
        assert set(src.tensors) == set(want)
        for name, t in want.items():
            assert torch.equal(src.tensors[name].to_float(), t.float()), name
    finally:
        src.close()


@pytest.mark.parametrize("dtype,tag", [(torch.bfloat16, "BF16"), (torch.float16, "F16"), (torch.float32, "F32")])
@pytest.mark.parametrize("shard", [None, "40KB"])
def test_hf_folder_dtypes_and_shards(tmp_models, dtype, tag, shard):
    folder = tmp_models / f"m-{tag}-{shard}"
    model = make_hf(folder, "qwen2", dtype=dtype, shard=shard)
    if shard:
        assert (folder / "model.safetensors.index.json").exists()
        assert len(list(folder.glob("*.safetensors"))) > 1
    src = load_source(folder, progress=False)
    try:
        want = hf_to_canonical(model.state_dict())
        want.pop("output.weight", None)
        for name, t in want.items():
            raw = src.tensors[name]
            assert raw.dtype == tag
            assert raw.data.dtype == {"BF16": np.uint16, "F16": np.float16, "F32": np.float32}[tag]
            assert torch.equal(raw.to_float(), t.float()), name
        assert len(src.metadata["files"]) == (1 if not shard else len(list(folder.glob("*.safetensors"))))
        assert describe(src)["tensor_types"][tag]["count"] == len(want)
    finally:
        src.close()
    assert not mapped(folder / "model.safetensors") and not mapped(folder)


def test_hf_folder_extras(tmp_models):
    folder = tmp_models / "extras"
    make_hf(folder, "llama")
    (folder / "generation_config.json").write_text(
        json.dumps({"eos_token_id": [2, 7], "bos_token_id": 1, "temperature": 0.6, "top_p": 0.9})
    )
    (folder / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]})
    )
    src = load_source(folder, progress=False)
    assert src.eos_token_ids == [2, 7] and src.generation_config["temperature"] == 0.6
    assert src.chat_template == "D"
    src.close()
    (folder / "chat_template.jinja").write_text("J{{ messages }}")
    src = load_source(folder / "model.safetensors", progress=False)  # a weights file finds its folder
    assert src.chat_template == "J{{ messages }}"
    src.close()


def test_hf_config_with_rope_parameters(tmp_models):
    folder = tmp_models / "rp"
    make_hf(folder, "llama")
    cfg = json.loads((folder / "config.json").read_text())
    cfg.pop("rope_scaling", None)
    cfg.pop("rope_theta", None)
    cfg["rope_parameters"] = {"rope_type": "linear", "factor": 2.0, "rope_theta": 12345.0}
    (folder / "config.json").write_text(json.dumps(cfg))
    src = load_source(folder, progress=False)
    assert src.config.rope_theta == 12345.0 and src.config.rope_scaling == {"type": "linear", "factor": 2.0}
    src.close()


# ---------------------------------------------------------------- bad input


def _good_gguf(tmp_models, name="good.gguf", cfg=None, **kw):
    cfg = cfg or tiny_config("llama")
    w = random_weights(cfg)
    path = tmp_models / name
    write_gguf(path, cfg, w, "Q4_0", **kw)
    return path, cfg, w


def _raises(exc, path, *words):
    with pytest.raises(exc) as e:
        load_source(path, progress=False)
    msg = str(e.value)
    assert str(path) in msg, msg
    for w in words:
        assert w in msg, msg
    assert not mapped(path), "a failed load left the file mapped"
    return msg


def test_missing_path(tmp_models):
    _raises(ModelLoadError, tmp_models / "nope.gguf", "no such file")


def test_folder_without_config(tmp_models):
    _raises(ModelLoadError, tmp_models, "config.json")


def test_wrong_magic(tmp_models):
    p = tmp_models / "junk.bin"
    p.write_bytes(b"PK\x03\x04" + bytes(100))
    _raises(ModelLoadError, p, "GGUF")
    e = tmp_models / "empty.gguf"
    e.write_bytes(b"")
    _raises(ModelLoadError, e)


@pytest.mark.parametrize("fraction", [0.0005, 0.01, 0.5, 0.999])
def test_truncated_gguf(tmp_models, fraction):
    path, _, _ = _good_gguf(tmp_models)
    data = path.read_bytes()
    cut = tmp_models / "cut.gguf"
    cut.write_bytes(data[: max(5, int(len(data) * fraction))])
    _raises(ModelLoadError, cut)


def _mutate_header(data: bytes, end: int, rng) -> bytes:
    """One to four random edits within the first `end` bytes: a byte, or a u64 / u32 set to an edge value."""
    d = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        at, kind = rng.randrange(end), rng.random()
        if kind < 0.5:
            d[at] = rng.randrange(256)
        elif kind < 0.8:
            v = rng.choice([0, 1, 7, 1000, 2**31 - 1, 2**32 - 1, 2**63 - 1, 2**64 - 1])
            struct.pack_into("<Q", d, min(at, len(d) - 8), v)
        else:
            struct.pack_into("<I", d, min(at, len(d) - 4), rng.choice([0, 12, 13, 99, 2**31]))
    return bytes(d)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_corrupt_gguf_headers_fail_as_load_errors(tmp_models, default_model, seed):
    # Random edits of a real file's header (counts, lengths, types, dims,
    # offsets, metadata values, the tokenizer's strings, the chat template):
    # the Engine either loads and generates, or raises ModelLoadError (the
    # tokenizer's and template's defects included), never anything else.
    import random

    from helexa_native import Engine
    from helexa_native.synthetic import write_synthetic_gguf

    good, _ = write_synthetic_gguf(
        tmp_models / "good.gguf", "llama-tiny", ["Q8_0", "Q4_K_M", "Q4_0"][seed], progress=False, context=256
    )
    data = good.read_bytes()
    end = gguf.GGUFReader(good).data_offset
    rng = random.Random(seed)
    bad = tmp_models / "bad.gguf"
    outcomes = collections.Counter()
    for _ in range(40):
        bad.write_bytes(_mutate_header(data, end, rng))
        try:
            e = Engine(bad, device="cpu", progress=False)
        except ModelLoadError as ex:
            assert str(ex), "a load error without a message"
            outcomes["refused"] += 1
            continue
        try:
            e.generate("hi", max_tokens=2)
        finally:
            e.close()
        outcomes["loaded"] += 1
    assert outcomes["refused"] > 0, outcomes
    assert not mapped(bad), "a failed load left the file mapped"


def test_broken_chat_template_and_tokenizer_are_load_errors(tmp_models):
    from helexa_native import Engine
    from helexa_native.errors import TokenizerError
    from helexa_native.synthetic import write_synthetic_gguf

    path, _ = write_synthetic_gguf(tmp_models / "t.gguf", "llama-tiny", "Q8_0", progress=False, n_layers=1)
    data = path.read_bytes()
    # The chat template's "{% for" becomes "{% fXr": it no longer parses.
    at = data.index(b"{% for")
    path.write_bytes(data[:at] + b"{% fXr" + data[at + 6 :])
    with pytest.raises(ModelLoadError, match="chat template does not parse") as e:
        Engine(path, device="cpu", progress=False)
    assert str(path) in str(e.value)
    # The tokenizer model's name, an unknown one: a TokenizerError, which is a load error.
    at = data.index(b"tokenizer.ggml.model") + len(b"tokenizer.ggml.model") + 4 + 8
    path.write_bytes(data[:at] + b"X" + data[at + 1 :])
    with pytest.raises(TokenizerError):
        Engine(path, device="cpu", progress=False)


def _split_with_gguf_py(src, out_dir, max_tensors):
    """Rewrite `src` as llama.cpp's gguf-split does, through the gguf package's writer; returns the parts."""
    r = gguf.GGUFReader(src)
    out_dir.mkdir(exist_ok=True)
    arch = r.fields["general.architecture"].contents()
    w = gguf.GGUFWriter(out_dir / "model.gguf", arch, split_max_tensors=max_tensors)
    for f in r.fields.values():
        if f.name.startswith("GGUF.") or f.name == "general.architecture":
            continue
        vtype = f.types[0]
        sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(f.name, f.contents(), vtype, sub_type=sub)
    for t in r.tensors:
        w.add_tensor(t.name, np.asarray(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return sorted(out_dir.glob("model-*-of-*.gguf"))


@pytest.mark.parametrize("preset, quant", [("llama-tiny", "Q4_K_M"), ("qwen3moe-tiny", "Q8_0")])
def test_split_gguf_loads_from_any_part(tmp_models, preset, quant):
    from helexa_native import Engine
    from helexa_native.synthetic import write_synthetic_gguf

    whole, _ = write_synthetic_gguf(tmp_models / "whole.gguf", preset, quant, progress=False)
    parts = _split_with_gguf_py(whole, tmp_models / "split", 7)
    assert len(parts) >= 3 and parts[0].name == f"model-00001-of-{len(parts):05d}.gguf"
    ref = load_source(whole, progress=False)
    try:
        for given in (parts[0], parts[-1]):
            src = load_source(given, progress=False)
            try:
                assert src.config == ref.config and src.chat_template == ref.chat_template
                assert src.metadata["files"] == [str(p) for p in parts]
                assert src.tokenizer.gguf_meta == ref.tokenizer.gguf_meta
                assert sorted(src.tensors) == sorted(ref.tensors)
                for name, t in ref.tensors.items():
                    got = src.tensors[name]
                    assert (got.dtype, got.shape) == (t.dtype, t.shape), name
                    assert np.array_equal(np.asarray(got.data).view(np.uint8), np.asarray(t.data).view(np.uint8)), name
            finally:
                src.close()
            assert not any(mapped(p) for p in parts), "closing left a part mapped"
    finally:
        ref.close()
    a = Engine(whole, device="cpu", progress=False)
    b = Engine(parts[1], device="cpu", progress=False)
    try:
        ids = [5, 17, 42, 99]
        assert b.generate(ids, max_tokens=8, temperature=0, ignore_eos=True).token_ids == (
            a.generate(ids, max_tokens=8, temperature=0, ignore_eos=True).token_ids
        )
    finally:
        a.close()
        b.close()


def test_split_gguf_errors_name_the_part(tmp_models):
    from helexa_native.synthetic import write_synthetic_gguf

    whole, _ = write_synthetic_gguf(tmp_models / "whole.gguf", "llama-tiny", "Q8_0", progress=False)
    parts = _split_with_gguf_py(whole, tmp_models / "split", 7)
    n = len(parts)

    # A missing part: named, and no part stays mapped, whichever part was given.
    moved = parts[1].rename(tmp_models / "away.gguf")
    for given in (parts[0], parts[-1]):
        _raises(ModelLoadError, given, f"part 2 of {n}", "missing", parts[1].name)
        assert not any(mapped(p) for p in parts if p.exists())

    # Parts 2 and 3 swapped: the split.no inside disagrees with the name.
    parts[2].rename(parts[1])
    moved.rename(parts[2])
    _raises(ModelLoadError, parts[0], "split.no 2", f"expected 1 of {n}")
    assert not any(mapped(p) for p in parts)
    swap = tmp_models / "swap.gguf"
    parts[1].rename(swap)
    parts[2].rename(parts[1])
    swap.rename(parts[2])

    # A part renamed so the others cannot be found.
    odd = tmp_models / "split" / "renamed.gguf"
    parts[0].rename(odd)
    _raises(ModelLoadError, odd, f"one of {n} parts", f"NAME-00001-of-{n:05d}.gguf")


def test_missing_and_misshapen_tensors(tmp_models):
    cfg = tiny_config("llama")
    w = random_weights(cfg)
    del w["blk.1.ffn_up.weight"]
    path = tmp_models / "missing.gguf"
    write_gguf(path, cfg, w, "F16")
    _raises(ModelLoadError, path, "blk.1.ffn_up.weight", "missing")

    w = random_weights(cfg)
    w["blk.0.attn_k.weight"] = w["blk.0.attn_k.weight"][:64]
    path = tmp_models / "shape.gguf"
    write_gguf(path, cfg, w, "F16")
    _raises(ModelLoadError, path, "blk.0.attn_k.weight", "[64, 256]", "[128, 256]")


def test_unknown_architecture(tmp_models):
    cfg = dataclasses.replace(tiny_config("llama"), arch="gpt2")
    path = tmp_models / "gpt2.gguf"
    write_gguf(path, cfg, random_weights(tiny_config("llama")), "F16")
    _raises(UnsupportedModelError, path, "gpt2")


def _patch_tensor_type(path, name, type_id):
    """Rewrite one tensor's type id in the header (name, n_dims, dims, type)."""
    data = bytearray(path.read_bytes())
    key = struct.pack("<Q", len(name)) + name.encode()
    at = data.index(key) + len(key)
    n_dims = struct.unpack_from("<I", data, at)[0]
    struct.pack_into("<I", data, at + 4 + 8 * n_dims, type_id)
    path.write_bytes(bytes(data))


def test_unsupported_tensor_type(tmp_models):
    path, _, _ = _good_gguf(tmp_models)
    _patch_tensor_type(path, "blk.0.ffn_up.weight", int(gguf.GGMLQuantizationType.Q8_K))
    _raises(ModelLoadError, path, "blk.0.ffn_up.weight", "Q8_K", "not supported")
    path, _, _ = _good_gguf(tmp_models, "odd.gguf")
    _patch_tensor_type(path, "blk.0.ffn_gate.weight", 999)
    _raises(ModelLoadError, path, "blk.0.ffn_gate.weight", "999")


def test_missing_metadata(tmp_models):
    path, cfg, w = _good_gguf(tmp_models)
    data = bytearray(path.read_bytes())
    key = b"llama.feed_forward_length"
    at = data.index(key)
    data[at : at + len(key)] = b"llama.feed_forward_lengtX"
    path.write_bytes(bytes(data))
    _raises(ModelLoadError, path, "llama.feed_forward_length")


def test_bad_config_json(tmp_models):
    folder = tmp_models / "hf"
    make_hf(folder, "llama")
    good = (folder / "config.json").read_text()
    cfg_path = folder / "config.json"

    cfg_path.write_text(good[: len(good) // 2])
    _raises(ModelLoadError, cfg_path, "config.json")

    bad = json.loads(good)
    del bad["hidden_size"]
    cfg_path.write_text(json.dumps(bad))
    _raises(ModelLoadError, cfg_path, "hidden_size")

    bad = json.loads(good)
    bad["model_type"], bad["architectures"] = "gpt2", ["GPT2LMHeadModel"]
    cfg_path.write_text(json.dumps(bad))
    _raises(UnsupportedModelError, cfg_path, "gpt2")

    bad = json.loads(good)
    bad["num_key_value_heads"] = 3
    cfg_path.write_text(json.dumps(bad))
    _raises(ModelLoadError, cfg_path, "num_key_value_heads")


@pytest.mark.parametrize(
    "field, value, words",
    [
        ("architectures", 5, ["architectures", "list"]),
        ("architectures", [["LlamaForCausalLM"]], ["architectures"]),
        ("model_type", {"a": 1}, ["model_type"]),
        ("head_dim", {"type": "x"}, ["head_dim", "not a number"]),
        ("hidden_size", "64", ["hidden_size", "not a number"]),
        ("vocab_size", 320.5, ["vocab_size", "not an integer"]),
        ("intermediate_size", float("inf"), ["intermediate_size", "not an integer"]),
        ("rope_theta", [1], ["rope_theta"]),
        ("rope_theta", -1.0, ["rope_theta", "positive"]),
        ("rms_norm_eps", float("nan"), ["rms_norm_eps"]),
        ("max_position_embeddings", 0, ["max_position_embeddings", "positive"]),
        ("num_hidden_layers", -2, ["num_hidden_layers", "positive"]),
    ],
)
def test_config_json_fields_of_the_wrong_kind(tmp_models, field, value, words):
    folder = tmp_models / "hf"
    make_hf(folder, "llama")
    cfg_path = folder / "config.json"
    bad = json.loads(cfg_path.read_text())
    bad[field] = value
    cfg_path.write_text(json.dumps(bad))
    _raises(ModelLoadError, cfg_path, *words)


def test_safetensors_header_entries_of_the_wrong_kind(tmp_models):
    folder = tmp_models / "hf"
    make_hf(folder, "llama")
    st = folder / "model.safetensors"
    data = st.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    name = "model.layers.0.mlp.up_proj.weight"
    odd = [("dtype", ["F32"]), ("dtype", {"F32": 1}), ("data_offsets", {"a": 1, "b": 2}), ("shape", [-4, -8])]
    for key, value in odd:
        header = json.loads(data[8 : 8 + n])
        header[name][key] = value
        hb = json.dumps(header).encode()
        st.write_bytes(struct.pack("<Q", len(hb)) + hb + data[8 + n :])
        msg = _raises(ModelLoadError, folder, name)
        assert "bad header entry" in msg or "dtype" in msg, msg


def test_gguf_context_length_zero(tmp_models):
    cfg = dataclasses.replace(tiny_config("llama"), max_position_embeddings=0)
    path = tmp_models / "ctx0.gguf"
    write_gguf(path, cfg, random_weights(tiny_config("llama")), "Q8_0")
    _raises(ModelLoadError, path, "llama.context_length", "positive")


def test_bad_safetensors(tmp_models):
    folder = tmp_models / "hf"
    make_hf(folder, "llama")
    st = folder / "model.safetensors"
    data = st.read_bytes()

    st.write_bytes(data[: len(data) - 100])
    _raises(ModelLoadError, st, "truncated")

    st.write_bytes(b"\xff" * 8 + data[8:])
    _raises(ModelLoadError, st, "header")

    # drop one tensor from the header: the loader must notice it is missing
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + n])
    del header["model.layers.1.mlp.up_proj.weight"]
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (n - len(hb))
    st.write_bytes(data[:8] + hb + data[8 + n :])
    _raises(ModelLoadError, folder, "blk.1.ffn_up.weight")

    st.unlink()
    _raises(ModelLoadError, folder, "model.safetensors")


def test_missing_shard(tmp_models):
    folder = tmp_models / "sharded"
    make_hf(folder, "llama", shard="40KB")
    shards = sorted(folder.glob("model-*.safetensors"))
    shards[-1].unlink()
    _raises(ModelLoadError, folder, "model.safetensors.index.json", shards[-1].name)


def test_failed_load_leaves_no_map(tmp_models):
    # The error comes after the file was mapped (the tensor check).
    cfg = tiny_config("qwen2")
    w = random_weights(cfg)
    del w["blk.0.attn_v.bias"]
    path = tmp_models / "nobias.gguf"
    write_gguf(path, cfg, w, "Q8_0")
    _raises(ModelLoadError, path, "blk.0.attn_v.bias")


# ---------------------------------------------------------------- progress bars


def test_progress_bar_visibility(capsys, monkeypatch):
    from helexa_native.progress import Progress, progress_enabled, track

    monkeypatch.delenv("HELEXA_NO_PROGRESS", raising=False)
    assert progress_enabled(None) and not progress_enabled(False) and progress_enabled(True)
    monkeypatch.setenv("HELEXA_NO_PROGRESS", "1")
    assert not progress_enabled(None) and progress_enabled(True)

    with Progress(10, "Quick", progress=True) as bar:  # finishes before the delay: silent
        bar.update(10)
    with Progress(10, "Shown", progress=True, delay=0) as bar:
        bar.update(10)
    with Progress(10, "Off", progress=False, delay=0) as bar:
        bar.update(10)
    assert list(track([1, 2, 3], "Items", progress=False)) == [1, 2, 3]
    out, err = capsys.readouterr()
    assert out == "" and "Shown" in err and "Quick" not in err and "Off" not in err


def test_gguf_sampling_defaults(tmp_models):
    from helexa_native.writers.gguf_writer import GGUFStream

    cfg = tiny_config("llama")
    w = random_weights(cfg)
    path = tmp_models / "sampling.gguf"
    stream = GGUFStream(path, cfg, sampling={"temp": 0.7, "top_k": 40, "top_p": 0.95})
    for name, a in w.items():
        stream.declare(name, a.shape, "F32")
    for name, a in w.items():
        stream.write(name, a)
    stream.close()
    src = load_source(path, progress=False)
    assert src.generation_config == {"temperature": 0.7, "top_k": 40, "top_p": 0.95}
    src.close()
