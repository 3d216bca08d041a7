"""Block decoders against the `gguf` package's reference dequantizers."""

import gguf
import numpy as np
import pytest
import torch

from helexa_native.ggml_types import BLOCK_SIZES, FLOAT_TYPES, GGML_TYPE_IDS, QUANT_TYPES
from helexa_native.loaders.dequant import dequantize
from helexa_native.writers.quantize import quantize

# Byte offsets of the fp16 scale fields in each block: filled with finite
# values so both decoders see real numbers (random bits can make inf/NaN).
FP16_FIELDS = {
    "Q4_0": [0],
    "Q4_1": [0, 2],
    "Q5_0": [0],
    "Q5_1": [0, 2],
    "Q8_0": [0],
    "Q2_K": [80, 82],
    "Q3_K": [108],
    "Q4_K": [0, 2],
    "Q5_K": [0, 2],
    "Q6_K": [208],
    "IQ4_NL": [0],
    "IQ4_XS": [0],
}


def random_blocks(qtype, rows, blocks_per_row, rng):
    be, bb = BLOCK_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows, blocks_per_row * bb), dtype=np.uint8)
    view = raw.reshape(-1, bb)
    for off in FP16_FIELDS[qtype]:
        # wide dynamic range, both signs, some fp16 subnormals and zeros
        mag = np.exp(rng.uniform(np.log(1e-7), np.log(4.0), size=view.shape[0]))
        val = (mag * rng.choice([-1.0, 1.0], size=view.shape[0])).astype(np.float16)
        val[rng.random(view.shape[0]) < 0.05] = 0
        view[:, off : off + 2] = val.reshape(-1, 1).view(np.uint8)
    return raw, (rows, blocks_per_row * be)


def test_ggml_types_match_the_gguf_package():
    assert set(GGML_TYPE_IDS) == set(BLOCK_SIZES) == set(FLOAT_TYPES) | set(QUANT_TYPES)
    for name, tid in GGML_TYPE_IDS.items():
        t = gguf.GGMLQuantizationType[name]
        assert int(t) == tid, name
        assert tuple(gguf.GGML_QUANT_SIZES[t]) == BLOCK_SIZES[name], name


@pytest.mark.parametrize("qtype", FLOAT_TYPES + QUANT_TYPES)
def test_every_supported_type_has_a_decoder(qtype):
    be, bb = BLOCK_SIZES[qtype]
    out = dequantize(np.zeros(2 * bb, dtype=np.uint8), qtype, (2, be))
    assert out.shape == (2, be) and not out.any()


@pytest.mark.parametrize("qtype", QUANT_TYPES)
@pytest.mark.parametrize("rows,blocks", [(1, 1), (3, 2), (17, 5), (64, 3)])
def test_matches_gguf_reference(qtype, rows, blocks):
    rng = np.random.default_rng()
    raw, shape = random_blocks(qtype, rows, blocks, rng)
    ref = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[qtype]).astype(np.float32)
    out = dequantize(raw, qtype, shape)
    assert out.dtype == torch.float32 and tuple(out.shape) == shape
    out = out.numpy()
    assert np.isfinite(out).all()
    # Same formula, same fp32 operation order: agreement to fp32 rounding.
    scale = np.abs(ref).max() + 1e-30
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6 * scale)


@pytest.mark.parametrize("qtype", QUANT_TYPES)
def test_large_tensor_crosses_slices(qtype):
    # more blocks than one decoding slice holds, so slice edges are exercised
    rng = np.random.default_rng()
    be = BLOCK_SIZES[qtype][0]
    raw, shape = random_blocks(qtype, 2 * (1 << 20) // be // 8 + 3, 8, rng)
    ref = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[qtype])
    out = dequantize(raw, qtype, shape).numpy()
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6 * (np.abs(ref).max() + 1e-30))


def test_float_types():
    rng = np.random.default_rng()
    x = rng.normal(size=(5, 7)).astype(np.float32)
    assert np.array_equal(dequantize(x, "F32", x.shape).numpy(), x)
    h = x.astype(np.float16)
    assert np.array_equal(dequantize(h, "F16", x.shape).numpy(), h.astype(np.float32))
    bf = torch.from_numpy(x).to(torch.bfloat16)
    bits = bf.view(torch.int16).numpy().view(np.uint16)
    assert torch.equal(dequantize(bits, "BF16", x.shape), bf.float())


def test_wrong_buffer_size_is_an_error():
    raw = np.zeros((2, 18), np.uint8)
    with pytest.raises(ValueError, match="Q4_0"):
        dequantize(raw, "Q4_0", (2, 64))
    with pytest.raises(ValueError):
        dequantize(raw, "Q9_9", (2, 32))


@pytest.mark.parametrize("qtype", QUANT_TYPES)
def test_writer_encoders_round_trip(qtype):
    # The encoders build test models: their blocks must decode (per the gguf
    # reference) to within a quantization step of the input.
    rng = np.random.default_rng()
    x = rng.normal(0, 0.02, size=(33, 512)).astype(np.float32)
    q = quantize(x, qtype)
    ref = gguf.quants.dequantize(q, gguf.GGMLQuantizationType[qtype])
    rel = np.sqrt(((ref - x) ** 2).mean()) / x.std()
    bound = {"Q2_K": 0.45, "Q3_K": 0.3, "Q8_0": 0.01, "Q6_K": 0.04}.get(qtype, 0.12)
    assert rel < bound, f"{qtype}: relative RMS error {rel:.3f}"
    np.testing.assert_allclose(dequantize(q, qtype, x.shape).numpy(), ref, rtol=1e-6, atol=1e-9)


def test_default_model_dequantizes_fast_and_right(default_model):
    from helexa_native.loaders import load_source

    src = load_source(default_model, progress=False)
    try:
        for name, rows in (
            ("token_embd.weight", slice(0, 2000)),
            ("blk.0.attn_q.weight", slice(None)),
            ("blk.29.ffn_down.weight", slice(None)),
        ):
            t = src.tensors[name]
            raw = np.asarray(t.data)[rows]
            ref = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[t.dtype])
            got = dequantize(raw, t.dtype, ref.shape).numpy()
            np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-7)
            np.testing.assert_array_equal(t.to_float().numpy()[rows], got)
        # Every tensor of the model dequantizes (its speed is the benchmark's business).
        n = sum(t.to_float().numel() for t in src.tensors.values())
        assert n == 134515008
    finally:
        src.close()
