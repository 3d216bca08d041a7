"""What the int8-activation (dp4a) matvec kernels compute, in numpy: shared by
the host emulator tests (test_cuda_compile.py) and the GPU tests
(gpu/test_quant_kernels.py)."""

from __future__ import annotations

import numpy as np

# Types whose matvec can quantize x to int8 blocks of 32 (csrc/kernels/matvec_dp4a.cuh).
DP4A_TYPES = {"Q4_0", "Q8_0", "Q4_K", "Q6_K"}


def stage_fits(name: str, n_tok: int, k: int, terms: int) -> bool:
    """True when `name` has the int8 kernel and its activation stage (per term:
    k int8 values, a float scale per 32 and an int sum per 16) fits 48 KiB;
    otherwise the float kernel runs."""
    return name in DP4A_TYPES and terms * n_tok * (k + k // 32 * 4 + k // 16 * 4) <= 48 * 1024


def quantized_x(x: np.ndarray, terms: int = 1) -> np.ndarray:
    """x as the dp4a kernels see it: per 32 values d = max|x| / 127 and
    q = rint(x * (1 / d)), in float32 like the device; with two terms the
    residual fma(-q, d, x) (exact in float64, then rounded once to float32)
    is quantized the same way. Returns sum q * d in float64."""
    r = x.astype(np.float32).reshape(x.shape[0], -1, 32)
    total = np.zeros(r.shape, np.float64)
    for _ in range(terms):
        d = (np.abs(r).max(axis=2, keepdims=True) / np.float32(127)).astype(np.float32)
        with np.errstate(divide="ignore", invalid="ignore"):
            inv = np.where(d > 0, np.float32(1) / d, np.float32(0)).astype(np.float32)
            q = np.rint(r * inv).astype(np.float64)
        part = q * d.astype(np.float64)
        total += part
        r = (r.astype(np.float64) - part).astype(np.float32)
    return total.reshape(x.shape)
