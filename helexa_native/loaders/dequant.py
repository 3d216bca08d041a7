"""GGUF/ggml block formats decoded to float32 on the CPU.

Each block type stores a fixed number of weights in a fixed number of bytes
(`ggml_types.BLOCK_SIZES`); a row of a tensor is a whole number of blocks. The
decoders below unpack whole arrays of blocks at once with torch integer ops
(multi-threaded, no Python loops over blocks) and work through big tensors
in slices so the integer temporaries stay cache-sized.

Block layouts (little endian, fp16 scales):
    Q4_0   [d | qs:16]                       x = d * (q - 8)
    Q4_1   [d | m | qs:16]                   x = d * q + m
    Q5_0   [d | qh:4 | qs:16]                x = d * (q | h << 4) - 16 d
    Q5_1   [d | m | qh:4 | qs:16]            x = d * (q | h << 4) + m
    Q8_0   [d | qs:32 int8]                  x = d * q
    Q2_K   [scales:16 | qs:64 | d | dmin]    16 groups of 16, 4-bit scale/min
    Q3_K   [hmask:32 | qs:64 | scales:12 | d]        16 groups, 6-bit signed scale
    Q4_K   [d | dmin | scales:12 | qs:128]           8 groups of 32, 6-bit scale/min
    Q5_K   [d | dmin | scales:12 | qh:32 | qs:128]
    Q6_K   [ql:128 | qh:64 | scales:16 int8 | d]     16 groups of 16
    IQ4_NL [d | qs:16]                       x = d * table[q]
    IQ4_XS [d | scales_h:2 | scales_l:4 | qs:128]    8 groups, 6-bit signed scale
In 32-weight blocks the low nibbles hold weights 0..15 and the high nibbles
16..31; the K-quant orders are spelled out in each decoder.
"""

from __future__ import annotations

import os
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Sequence

import numpy as np
import torch

from ..ggml_types import BLOCK_SIZES, IQ4_VALUES

# Weights decoded per slice: keeps each thread's temporaries cache-sized.
_SLICE_WEIGHTS = 1 << 16


def _f16(b: np.ndarray, start: int) -> np.ndarray:
    """fp16 field at byte `start` of every block -> float32 [nblocks, 1]."""
    return np.ascontiguousarray(b[:, start : start + 2]).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[..., n] bytes -> [..., 2, n]: low nibbles then high nibbles."""
    return np.stack((qs & 0x0F, qs >> 4), axis=-2)


def _bits(x: np.ndarray, shifts: Sequence[int], mask: int, axis: int) -> np.ndarray:
    """Stack (x >> s) & mask for each shift along a new axis `axis`."""
    return np.stack([(x >> s) & mask for s in shifts], axis=axis)


def _q4_0(b):
    n = b.shape[0]
    q = _nibbles(b[:, 2:18]).reshape(n, 32)
    return (q.astype(np.float32) - 8.0) * _f16(b, 0)


def _q4_1(b):
    n = b.shape[0]
    q = _nibbles(b[:, 4:20]).reshape(n, 32)
    return q.astype(np.float32) * _f16(b, 0) + _f16(b, 2)


def _q5_high(qh: np.ndarray) -> np.ndarray:
    # 32 high bits, bit j of the little-endian uint32 belongs to weight j.
    return _bits(qh, range(8), 1, axis=2).reshape(qh.shape[0], 32)


def _q5_0(b):
    n = b.shape[0]
    q = _nibbles(b[:, 6:22]).reshape(n, 32) | (_q5_high(b[:, 2:6]) << 4)
    return (q.astype(np.float32) - 16.0) * _f16(b, 0)


def _q5_1(b):
    n = b.shape[0]
    q = _nibbles(b[:, 8:24]).reshape(n, 32) | (_q5_high(b[:, 4:8]) << 4)
    return q.astype(np.float32) * _f16(b, 0) + _f16(b, 2)


def _q8_0(b):
    q = b[:, 2:34].view(np.int8)
    return q.astype(np.float32) * _f16(b, 0)


def _k_2bit(qs: np.ndarray) -> np.ndarray:
    # Two halves of 128 weights share 32 bytes; shift 2j gives weights
    # 32j..32j+31 of the half. Result [n, 2, 4, 32] = weight order.
    n = qs.shape[0]
    return _bits(qs.reshape(n, 2, 32), (0, 2, 4, 6), 3, axis=2)


def _q2_k(b):
    n = b.shape[0]
    sc = b[:, 0:16]
    q = _k_2bit(b[:, 16:80]).reshape(n, 16, 16)
    dl = _f16(b, 80) * (sc & 0x0F).astype(np.float32)
    ml = _f16(b, 82) * (sc >> 4).astype(np.float32)
    return (q.astype(np.float32) * dl[:, :, None] - ml[:, :, None]).reshape(n, 256)


def _q3_k(b):
    n = b.shape[0]
    low = _k_2bit(b[:, 32:96])  # [n, 2, 4, 32]
    # hmask bit 4h+j of byte l is the third bit of weight 128h + 32j + l.
    high = _bits(b[:, 0:32], range(8), 1, axis=1).reshape(n, 2, 4, 32)
    q = (low.astype(np.int8) + (high.astype(np.int8) << 2) - 4).reshape(n, 16, 16)
    s = b[:, 96:108]
    lo4 = np.concatenate((s[:, 0:8] & 0x0F, s[:, 0:8] >> 4), axis=1)  # scales 0..15
    hi2 = _bits(s[:, 8:12], (0, 2, 4, 6), 3, axis=1).reshape(n, 16)  # scale 4a+b: byte 8+b, bits 2a
    scale = (lo4 | (hi2 << 4)).astype(np.float32) - 32.0
    dl = _f16(b, 108) * scale
    return (q.astype(np.float32) * dl[:, :, None]).reshape(n, 256)


def _k_scale_min(s: np.ndarray):
    """12 packed bytes -> 8 six-bit scales and 8 six-bit mins (Q4_K, Q5_K)."""
    s0, s1, s2 = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = np.concatenate((s0 & 63, (s2 & 0x0F) | ((s0 >> 6) << 4)), axis=1)
    mn = np.concatenate((s1 & 63, (s2 >> 4) | ((s1 >> 6) << 4)), axis=1)
    return sc.astype(np.float32), mn.astype(np.float32)


def _q4_k(b):
    n = b.shape[0]
    sc, mn = _k_scale_min(b[:, 4:16])
    d1 = (_f16(b, 0) * sc)[:, :, None]
    m1 = (_f16(b, 2) * mn)[:, :, None]
    # Chunk c of 32 bytes: low nibbles are weights 64c..64c+31 (group 2c),
    # high nibbles 64c+32.. (group 2c+1).
    q = _nibbles(b[:, 16:144].reshape(n, 4, 32)).reshape(n, 8, 32)
    return (q.astype(np.float32) * d1 - m1).reshape(n, 256)


def _q5_k(b):
    n = b.shape[0]
    sc, mn = _k_scale_min(b[:, 4:16])
    d1 = (_f16(b, 0) * sc)[:, :, None]
    m1 = (_f16(b, 2) * mn)[:, :, None]
    q = _nibbles(b[:, 48:176].reshape(n, 4, 32)).reshape(n, 8, 32)
    # Bit g of qh[l] is the fifth bit of weight l of group g.
    q = q | (_bits(b[:, 16:48], range(8), 1, axis=1) << 4)
    return (q.astype(np.float32) * d1 - m1).reshape(n, 256)


def _q6_k(b):
    n = b.shape[0]
    # Per half h: 64 ql bytes as [a, l] (a = first/second 32), low nibbles
    # are groups s = a, high nibbles s = 2 + a; qh byte l holds the two top
    # bits of group s at bits 2s.
    ql = b[:, 0:128].reshape(n, 2, 2, 32)
    low = _nibbles(ql).swapaxes(2, 3).reshape(n, 2, 4, 32)
    high = _bits(b[:, 128:192].reshape(n, 2, 32), (0, 2, 4, 6), 3, axis=2)
    q = ((low | (high << 4)).astype(np.int8) - 32).reshape(n, 16, 16)
    sc = b[:, 192:208].view(np.int8).astype(np.float32)
    dl = (_f16(b, 208) * sc)[:, :, None]
    return (dl * q.astype(np.float32)).reshape(n, 256)


_IQ4_TABLE = np.array(IQ4_VALUES, dtype=np.float32)


def _iq4_nl(b):
    n = b.shape[0]
    q = _nibbles(b[:, 2:18]).reshape(n, 32)
    return _IQ4_TABLE[q] * _f16(b, 0)


def _iq4_xs(b):
    n = b.shape[0]
    sl = b[:, 4:8]
    lo4 = _nibbles(sl).swapaxes(1, 2).reshape(n, 8)  # group 2i: low nibble of byte i
    hi2 = _bits(b[:, 2:4], (0, 2, 4, 6), 3, axis=2).reshape(n, 8)  # bits 2g of the uint16
    dl = (_f16(b, 0) * ((lo4 | (hi2 << 4)).astype(np.float32) - 32.0))[:, :, None]
    q = _nibbles(b[:, 8:136].reshape(n, 8, 16)).reshape(n, 8, 32)
    return (_IQ4_TABLE[q] * dl).reshape(n, 256)


_DECODERS = {
    "Q4_0": _q4_0,
    "Q4_1": _q4_1,
    "Q5_0": _q5_0,
    "Q5_1": _q5_1,
    "Q8_0": _q8_0,
    "Q2_K": _q2_k,
    "Q3_K": _q3_k,
    "Q4_K": _q4_k,
    "Q5_K": _q5_k,
    "Q6_K": _q6_k,
    "IQ4_NL": _iq4_nl,
    "IQ4_XS": _iq4_xs,
}


def _as_torch(arr: np.ndarray) -> torch.Tensor:
    # Memory-mapped model files are read-only; nothing here writes into the
    # input, so torch's warning about non-writable arrays is moot.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return torch.from_numpy(np.ascontiguousarray(arr))


_POOL: Optional[ThreadPoolExecutor] = None
_POOL_LOCK = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    # numpy releases the GIL inside its loops, so plain threads scale, and
    # unlike torch's OpenMP pool they do not spin when the CPU is shared.
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1)), thread_name_prefix="hx-dequant")
        return _POOL


def dequantize(data: np.ndarray, qtype: str, shape: Sequence[int]) -> torch.Tensor:
    """Decode a buffer of type `qtype` to a float32 torch tensor of `shape` (torch order)."""
    shape = tuple(int(s) for s in shape)
    numel = int(np.prod(shape)) if shape else 1
    if qtype == "F32":
        return _as_torch(np.asarray(data).view(np.float32)).reshape(shape).clone()
    if qtype == "F16":
        return _as_torch(np.asarray(data).view(np.float16)).reshape(shape).float()
    if qtype == "BF16":
        return _as_torch(np.asarray(data).view(np.int16)).view(torch.bfloat16).reshape(shape).float()
    if qtype not in _DECODERS:
        raise ValueError(f"no decoder for tensor type {qtype!r}")
    be, bb = BLOCK_SIZES[qtype]
    raw = np.asarray(data).reshape(-1).view(np.uint8)
    if numel % be or raw.size != numel // be * bb:
        raise ValueError(f"{qtype} buffer of {raw.size} bytes does not hold shape {shape}")
    nblocks = numel // be
    blocks = raw.reshape(nblocks, bb)
    out = torch.empty((nblocks, be), dtype=torch.float32)
    dst = out.numpy()
    decode = _DECODERS[qtype]
    step = max(1, _SLICE_WEIGHTS // be)

    def run(i: int) -> None:
        dst[i : i + step] = decode(blocks[i : i + step])

    starts = range(0, nblocks, step)
    if len(starts) == 1:
        run(0)
    else:
        list(_pool().map(run, starts))
    return out.reshape(shape)


def dequantize_raw(t) -> torch.Tensor:
    """`RawTensor.dequantize` hook: the tensor's weights as float32 of its shape."""
    return dequantize(t.data, t.dtype, t.shape)
