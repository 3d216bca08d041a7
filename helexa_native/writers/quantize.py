"""Simple float32 -> GGUF block encoders for the types `gguf.quants` cannot write.

Used by the GGUF writer to build test and benchmark models. Each encoder
picks scales from the block's range (no error search, unlike llama.cpp's
importance-weighted quantizers), which is plenty for round-trip tests: the
decoded values are within a quantization step of the input. Layouts are
the ones `loaders/dequant.py` decodes.
"""

from __future__ import annotations

import numpy as np

from ..ggml_types import BLOCK_SIZES, IQ4_VALUES

_IQ4 = np.array(IQ4_VALUES, dtype=np.float32)


def _f16(x: np.ndarray) -> tuple:
    """Round scales to fp16: (the stored bytes [n, 2], their float32 values [n, 1])."""
    h = np.nan_to_num(x.astype(np.float32), nan=0.0, posinf=6e4, neginf=-6e4).clip(-6e4, 6e4).astype(np.float16)
    return h.reshape(-1, 1).view(np.uint8), h.astype(np.float32).reshape(-1, 1)


def _div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b != 0, a / np.where(b != 0, b, 1), 0.0).astype(np.float32)


def _pack_nibbles(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    return (lo.astype(np.uint8) & 0x0F) | (hi.astype(np.uint8) << 4)


def _asym_groups(x: np.ndarray, levels: int, scale_max: int):
    """Groups [n, g, k] -> (super d, dmin, 6/4-bit scales, mins, quants) for x = d*sc*q - dmin*m."""
    gmin = np.minimum(x.min(axis=2), 0.0)
    gmax = x.max(axis=2)
    s = (gmax - gmin) / levels
    off = -gmin
    d_bytes, d = _f16(s.max(axis=1) / scale_max)
    m_bytes, dmin = _f16(off.max(axis=1) / scale_max)
    sc = np.clip(np.rint(_div(s, d)), 0, scale_max)
    mn = np.clip(np.rint(_div(off, dmin)), 0, scale_max)
    step = (d * sc)[:, :, None]
    q = np.clip(np.rint(_div(x + (dmin * mn)[:, :, None], step)), 0, levels)
    return d_bytes, m_bytes, sc.astype(np.uint8), mn.astype(np.uint8), q.astype(np.uint8)


def pack_k_scales(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """8 six-bit scales and mins -> the 12-byte Q4_K/Q5_K scale field."""
    s0 = sc[:, 0:4] | ((sc[:, 4:8] >> 4) << 6)
    s1 = mn[:, 0:4] | ((mn[:, 4:8] >> 4) << 6)
    s2 = (sc[:, 4:8] & 0x0F) | ((mn[:, 4:8] & 0x0F) << 4)
    return np.concatenate((s0, s1, s2), axis=1).astype(np.uint8)


def _q4_k(x):
    n = x.shape[0]
    d, dm, sc, mn, q = _asym_groups(x.reshape(n, 8, 32), 15, 63)
    q = q.reshape(n, 4, 2, 32)
    qs = _pack_nibbles(q[:, :, 0], q[:, :, 1]).reshape(n, 128)
    return np.concatenate((d, dm, pack_k_scales(sc, mn), qs), axis=1)


def _q5_k(x):
    n = x.shape[0]
    d, dm, sc, mn, q = _asym_groups(x.reshape(n, 8, 32), 31, 63)
    qh = np.zeros((n, 32), np.uint8)
    for g in range(8):
        qh |= ((q[:, g] >> 4) & 1) << g
    q = (q & 0x0F).reshape(n, 4, 2, 32)
    qs = _pack_nibbles(q[:, :, 0], q[:, :, 1]).reshape(n, 128)
    return np.concatenate((d, dm, pack_k_scales(sc, mn), qh, qs), axis=1)


def _q2_k(x):
    n = x.shape[0]
    d, dm, sc, mn, q = _asym_groups(x.reshape(n, 16, 16), 3, 15)
    scales = sc | (mn << 4)
    q = q.reshape(n, 2, 4, 32)
    qs = (q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)).reshape(n, 64)
    return np.concatenate((scales, qs, d, dm), axis=1)


def _sym_groups(x: np.ndarray, qmin: int, qmax: int, scale_max: int):
    """Groups [n, g, k] -> (super d, signed scales, quants) for x = d*sc*q."""
    s = np.abs(x).max(axis=2) / qmax
    d_bytes, d = _f16(s.max(axis=1) / scale_max)
    sc = np.clip(np.rint(_div(s, d)), 0, scale_max)
    q = np.clip(np.rint(_div(x, (d * sc)[:, :, None])), qmin, qmax)
    return d_bytes, sc.astype(np.int16), q.astype(np.int16)


def pack_q3_scales(s6: np.ndarray) -> np.ndarray:
    """16 six-bit Q3_K scales (stored value = scale + 32) -> the 12-byte field."""
    s6 = s6.astype(np.uint8)
    lo4 = s6 & 0x0F
    hi2 = (s6 >> 4).reshape(-1, 4, 4)  # scale 4a+b -> byte 8+b, bits 2a
    return np.concatenate(
        (lo4[:, 0:8] | (lo4[:, 8:16] << 4), hi2[:, 0] | (hi2[:, 1] << 2) | (hi2[:, 2] << 4) | (hi2[:, 3] << 6)), axis=1
    )


def pack_iq4xs_scales(u: np.ndarray) -> np.ndarray:
    """8 six-bit IQ4_XS scales (stored value = scale + 32) -> scales_h (2 bytes) + scales_l (4 bytes)."""
    u = u.astype(np.uint16)
    scales_h = np.zeros(u.shape[0], np.uint16)
    for i in range(8):
        scales_h |= (u[:, i] >> 4) << (2 * i)
    lo = (u & 0x0F).astype(np.uint8)
    scales_l = lo[:, 0::2] | (lo[:, 1::2] << 4)
    return np.concatenate((scales_h.reshape(-1, 1).view(np.uint8), scales_l), axis=1)


def _q3_k(x):
    n = x.shape[0]
    d, sc, q = _sym_groups(x.reshape(n, 16, 16), -4, 3, 31)
    u = (q + 4).astype(np.uint8).reshape(n, 2, 4, 32)
    low = u & 3
    qs = (low[:, :, 0] | (low[:, :, 1] << 2) | (low[:, :, 2] << 4) | (low[:, :, 3] << 6)).reshape(n, 64)
    high = (u >> 2).reshape(n, 8, 32)
    hmask = np.zeros((n, 32), np.uint8)
    for b in range(8):
        hmask |= high[:, b] << b
    return np.concatenate((hmask, qs, pack_q3_scales(sc + 32), d), axis=1)


def _q6_k(x):
    n = x.shape[0]
    d, sc, q = _sym_groups(x.reshape(n, 16, 16), -32, 31, 127)
    u = (q + 32).astype(np.uint8).reshape(n, 2, 2, 2, 32)  # [h, nibble, a, l]
    ql = _pack_nibbles(u[:, :, 0], u[:, :, 1]).reshape(n, 128)
    top = (u >> 4).reshape(n, 2, 4, 32)
    qh = (top[:, :, 0] | (top[:, :, 1] << 2) | (top[:, :, 2] << 4) | (top[:, :, 3] << 6)).reshape(n, 64)
    return np.concatenate((ql, qh, sc.astype(np.int8).view(np.uint8), d), axis=1)


def _iq4_index(v: np.ndarray) -> np.ndarray:
    """Nearest IQ4 code book entry for each value (already divided by its scale)."""
    mid = (_IQ4[1:] + _IQ4[:-1]) / 2
    return np.searchsorted(mid, v).astype(np.uint8)


def _signed_extreme(x: np.ndarray, axis: int) -> np.ndarray:
    idx = np.abs(x).argmax(axis=axis)
    return np.take_along_axis(x, np.expand_dims(idx, axis), axis).squeeze(axis)


def _iq4_nl(x):
    n = x.shape[0]
    b, d = _f16(_signed_extreme(x, 1) / -127.0)
    q = _iq4_index(_div(x, d)).reshape(n, 2, 16)
    return np.concatenate((b, _pack_nibbles(q[:, 0], q[:, 1])), axis=1)


def _iq4_xs(x):
    n = x.shape[0]
    g = x.reshape(n, 8, 32)
    dg = _signed_extreme(g, 2) / -127.0
    b, d = _f16(np.abs(dg).max(axis=1) / 31.0)
    ls = np.clip(np.rint(_div(dg, d)), -32, 31)
    q = _iq4_index(_div(g, (d * ls)[:, :, None])).reshape(n, 8, 2, 16)
    qs = _pack_nibbles(q[:, :, 0], q[:, :, 1]).reshape(n, 128)
    return np.concatenate((b, pack_iq4xs_scales(ls + 32), qs), axis=1)


_ENCODERS = {
    "Q2_K": _q2_k,
    "Q3_K": _q3_k,
    "Q4_K": _q4_k,
    "Q5_K": _q5_k,
    "Q6_K": _q6_k,
    "IQ4_NL": _iq4_nl,
    "IQ4_XS": _iq4_xs,
}


def quantize(x: np.ndarray, qtype: str) -> np.ndarray:
    """Encode float rows [..., k] into uint8 rows of `qtype` blocks [..., k / block * bytes]."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    be, bb = BLOCK_SIZES[qtype]
    if x.shape[-1] % be:
        raise ValueError(f"row length {x.shape[-1]} is not a multiple of the {qtype} block size {be}")
    if qtype in _ENCODERS:
        blocks = _ENCODERS[qtype](x.reshape(-1, be))
    else:
        import gguf

        return gguf.quants.quantize(x, gguf.GGMLQuantizationType[qtype])
    assert blocks.shape[1] == bb
    return np.ascontiguousarray(blocks).reshape(*x.shape[:-1], x.shape[-1] // be * bb)
