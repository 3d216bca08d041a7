"""Rotary position embedding frequencies, shared by the CPU reference and the GPU forward.

Every scaling scheme the engine supports reduces to one table of inverse
frequencies (float64, [head_dim / 2]): the angle of pair i at position p is
p * inv_freq[i]. Computing it once on the host keeps the GPU kernel free of
scaling logic and makes both backends rotate by exactly the same angles.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from .config import ModelConfig


def _base_inv_freq(theta: float, head_dim: int) -> torch.Tensor:
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim
    return 1.0 / (float(theta) ** exponents)


def _scaling_field(scaling: dict, key: str):
    if key not in scaling:
        raise ValueError(f"rope_scaling of type {scaling.get('type')!r} needs field {key!r}")
    return scaling[key]


def _llama3(inv: torch.Tensor, scaling: dict) -> torch.Tensor:
    # Llama 3.1 keeps short wavelengths, divides long ones by `factor`, and
    # blends linearly (in 1/wavelength) across the band between them.
    factor = float(_scaling_field(scaling, "factor"))
    low = float(_scaling_field(scaling, "low_freq_factor"))
    high = float(_scaling_field(scaling, "high_freq_factor"))
    orig = float(_scaling_field(scaling, "original_max_position_embeddings"))
    if high == low:
        raise ValueError("rope_scaling: high_freq_factor must differ from low_freq_factor")
    low_freq_wavelen = orig / low
    high_freq_wavelen = orig / high
    wavelen = 2.0 * math.pi / inv
    smooth = (orig / wavelen - low) / (high - low)
    blended = (1.0 - smooth) * inv / factor + smooth * inv
    out = torch.where(wavelen < high_freq_wavelen, inv, blended)
    return torch.where(wavelen > low_freq_wavelen, inv / factor, out)


def inv_freq(config: ModelConfig, freq_factors: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Inverse rotary frequencies (float64 [head_dim/2]) with the config's scaling applied.

    Scaling types: None (plain), "linear" (positions divided by `factor`),
    "llama3" (HF's wavelength bands), "freq_factors" (GGUF rope_freqs tensor).
    When `freq_factors` is given the base frequencies are divided by it and
    llama3 band scaling is not applied again, because GGUF converters bake
    that scaling into the factors; linear scaling still applies on top.
    """
    if config.head_dim % 2:
        raise ValueError(f"head_dim must be even for rotary embeddings, got {config.head_dim}")
    half = config.head_dim // 2
    inv = _base_inv_freq(config.rope_theta, config.head_dim)
    scaling = config.rope_scaling or {}
    kind = scaling.get("type", scaling.get("rope_type"))
    if kind in (None, "default", "none"):
        kind = None

    if freq_factors is not None:
        ff = torch.as_tensor(freq_factors).detach().to("cpu", torch.float64).reshape(-1)
        if ff.numel() != half:
            raise ValueError(f"rope freq_factors has {ff.numel()} values, expected head_dim/2 = {half}")
        if not bool(torch.all(ff > 0)):
            raise ValueError("rope freq_factors must be positive")
        inv = inv / ff
        if kind in ("llama3", "freq_factors"):
            kind = None
    elif kind == "freq_factors":
        raise ValueError("rope_scaling type 'freq_factors' needs the rope_freqs tensor")

    if kind is None:
        return inv
    if kind == "linear":
        factor = float(_scaling_field(scaling, "factor"))
        if factor <= 0:
            raise ValueError(f"rope_scaling factor must be positive, got {factor}")
        return inv / factor
    if kind == "llama3":
        return _llama3(inv, scaling)
    raise ValueError(f"unsupported rope_scaling type {kind!r}")


def rope_cos_sin(inv_freq: torch.Tensor, positions) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (float64 [n, head_dim/2]) of positions[:, None] * inv_freq[None, :]."""
    pos = torch.as_tensor(positions, dtype=torch.float64).reshape(-1, 1)
    angles = pos * inv_freq.to(torch.float64).reshape(1, -1)
    return torch.cos(angles), torch.sin(angles)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, style: str) -> torch.Tensor:
    """Rotate x [n, heads, head_dim] by per-position cos/sin [n, head_dim/2].

    style "half" pairs element i with i + head_dim/2 (HF's rotate_half);
    "pairs" pairs 2i with 2i+1 (GGML's normal mode, for permuted llama GGUFs).
    """
    cos = cos.to(x.dtype).unsqueeze(1)
    sin = sin.to(x.dtype).unsqueeze(1)
    if style == "half":
        a, b = x.chunk(2, dim=-1)
        return torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1)
    if style == "pairs":
        p = x.unflatten(-1, (-1, 2))
        a, b = p[..., 0], p[..., 1]
        return torch.stack((a * cos - b * sin, b * cos + a * sin), dim=-1).flatten(-2)
    raise ValueError(f"rope style must be 'half' or 'pairs', got {style!r}")
