"""Rotary frequencies and rotations against transformers' own formulas."""

import math

import pytest
import torch

from helexa_native.config import ModelConfig
from helexa_native.rope import apply_rope, inv_freq, rope_cos_sin

transformers = pytest.importorskip("transformers")
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402


def _cfg(head_dim=64, theta=500000.0, scaling=None):
    return ModelConfig(
        arch="llama",
        vocab_size=10,
        hidden_size=head_dim * 4,
        intermediate_size=8,
        num_layers=1,
        num_heads=4,
        num_kv_heads=2,
        head_dim=head_dim,
        rms_norm_eps=1e-5,
        rope_theta=theta,
        rope_scaling=scaling,
    )


def _hf_inv_freq(head_dim, theta, params):
    params = dict(params, rope_theta=theta)
    cfg = transformers.LlamaConfig(
        hidden_size=head_dim * 4, num_attention_heads=4, head_dim=head_dim, rope_parameters=params
    )
    kind = params["rope_type"]
    if kind == "default":
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        return LlamaRotaryEmbedding.compute_default_rope_parameters(cfg)[0].double()
    return ROPE_INIT_FUNCTIONS[kind](cfg, None)[0].double()


LLAMA3 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


@pytest.mark.parametrize(
    "head_dim,theta,hf_params,ours",
    [
        (64, 10000.0, {"rope_type": "default"}, None),
        (128, 500000.0, {"rope_type": "default"}, None),
        (64, 10000.0, {"rope_type": "linear", "factor": 4.0}, {"type": "linear", "factor": 4.0}),
        (128, 500000.0, dict(LLAMA3, rope_type="llama3"), dict(LLAMA3, type="llama3")),
        (
            64,
            10000.0,
            {
                "rope_type": "llama3",
                "factor": 32.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
            {
                "rope_type": "llama3",
                "factor": 32.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        ),
    ],
)
def test_inv_freq_matches_transformers(head_dim, theta, hf_params, ours):
    got = inv_freq(_cfg(head_dim, theta, ours))
    assert got.dtype == torch.float64 and got.shape == (head_dim // 2,)
    want = _hf_inv_freq(head_dim, theta, hf_params)
    # transformers computes in float32.
    torch.testing.assert_close(got, want, rtol=2e-6, atol=0)


def test_llama3_touches_all_three_bands():
    base = inv_freq(_cfg(128, 500000.0))
    scaled = inv_freq(_cfg(128, 500000.0, dict(LLAMA3, type="llama3")))
    ratio = base / scaled
    assert ratio[0] == 1.0
    assert ratio[-1] == pytest.approx(8.0)
    assert bool(((ratio > 1.0 + 1e-9) & (ratio < 8.0 - 1e-9)).any())


def test_linear_equals_dividing_positions():
    plain = inv_freq(_cfg(32, 10000.0))
    lin = inv_freq(_cfg(32, 10000.0, {"type": "linear", "factor": 2.5}))
    pos = torch.arange(40)
    c1, s1 = rope_cos_sin(lin, pos)
    c2, s2 = rope_cos_sin(plain, pos.double() / 2.5)
    torch.testing.assert_close(c1, c2, rtol=0, atol=1e-12)
    torch.testing.assert_close(s1, s2, rtol=0, atol=1e-12)


def test_freq_factors_divide_and_replace_llama3():
    ff = torch.linspace(1.0, 8.0, 32)
    base = inv_freq(_cfg(64, 10000.0))
    torch.testing.assert_close(inv_freq(_cfg(64, 10000.0), ff), base / ff.double())
    # GGUF factors already encode llama3 scaling: applying both would double it.
    l3 = _cfg(64, 10000.0, dict(LLAMA3, type="llama3"))
    torch.testing.assert_close(inv_freq(l3, ff), base / ff.double())
    ffcfg = _cfg(64, 10000.0, {"type": "freq_factors"})
    torch.testing.assert_close(inv_freq(ffcfg, ff), base / ff.double())
    with pytest.raises(ValueError, match="rope_freqs"):
        inv_freq(ffcfg)
    with pytest.raises(ValueError, match="head_dim/2"):
        inv_freq(_cfg(64, 10000.0), torch.ones(31))


def test_rope_cos_sin_values():
    inv = torch.tensor([1.0, 0.25], dtype=torch.float64)
    cos, sin = rope_cos_sin(inv, [0, 3])
    assert cos.shape == (2, 2)
    assert cos[0].tolist() == [1.0, 1.0] and sin[0].tolist() == [0.0, 0.0]
    assert cos[1, 0].item() == pytest.approx(math.cos(3.0), abs=1e-15)
    assert sin[1, 1].item() == pytest.approx(math.sin(0.75), abs=1e-15)


def test_bad_scaling_is_rejected():
    with pytest.raises(ValueError, match="unsupported"):
        inv_freq(_cfg(16, 10000.0, {"type": "yarn", "factor": 2.0}))
    with pytest.raises(ValueError, match="low_freq_factor"):
        inv_freq(_cfg(16, 10000.0, {"type": "llama3", "factor": 8.0}))
    with pytest.raises(ValueError, match="factor"):
        inv_freq(_cfg(16, 10000.0, {"type": "linear", "factor": 0.0}))
    with pytest.raises(ValueError, match="even"):
        inv_freq(_cfg(15, 10000.0))


def test_half_style_matches_transformers_apply_rotary():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    d, n, heads = 32, 7, 3
    inv = inv_freq(_cfg(d, 10000.0))
    pos = torch.arange(5, 5 + n)
    cos, sin = rope_cos_sin(inv, pos)
    q = torch.randn(n, heads, d, dtype=torch.float64)
    k = torch.randn(n, 1, d, dtype=torch.float64)
    hf_cos = torch.cat((cos, cos), -1)[None]  # [1, n, d]
    hf_sin = torch.cat((sin, sin), -1)[None]
    hq, hk = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], hf_cos, hf_sin)
    torch.testing.assert_close(apply_rope(q, cos, sin, "half"), hq[0].transpose(0, 1))
    torch.testing.assert_close(apply_rope(k, cos, sin, "half"), hk[0].transpose(0, 1))


def test_pairs_style_equals_half_style_after_permutation():
    # Moving element i to 2i and i + d/2 to 2i + 1 turns half-style rotation
    # into pairs-style rotation: what llama GGUF converters rely on.
    d, n = 16, 5
    inv = inv_freq(_cfg(d, 10000.0))
    cos, sin = rope_cos_sin(inv, torch.arange(n) * 3)
    x = torch.randn(n, 2, d, dtype=torch.float64)
    perm = torch.stack((torch.arange(d // 2), torch.arange(d // 2) + d // 2), -1).reshape(-1)
    torch.testing.assert_close(apply_rope(x[..., perm], cos, sin, "pairs"), apply_rope(x, cos, sin, "half")[..., perm])
    assert not torch.allclose(apply_rope(x, cos, sin, "pairs"), apply_rope(x, cos, sin, "half"))
    # A rotation keeps norms, and position 0 is the identity.
    torch.testing.assert_close(apply_rope(x, cos, sin, "pairs").norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(apply_rope(x, cos, sin, "pairs")[0], x[0])
    with pytest.raises(ValueError, match="style"):
        apply_rope(x, cos, sin, "interleaved")
