"""The ggml tensor types the engine runs: their ids and block sizes, in one table.

Ids are ggml.h's numbering, the ids GGUF files store; csrc/common/ggml_types.h
declares the same types for the kernels. A quantized type stores a row as
whole blocks, each holding a fixed number of weights in a fixed number of
bytes; a plain float type is a block of one weight. Type names are ggml's
(`Q4_K`, `BF16`), as loaders put them in `RawTensor.dtype`.
"""

from __future__ import annotations

# name -> (ggml type id, weights per block, bytes per block)
_TABLE = {
    "F32": (0, 1, 4),
    "F16": (1, 1, 2),
    "Q4_0": (2, 32, 18),
    "Q4_1": (3, 32, 20),
    "Q5_0": (6, 32, 22),
    "Q5_1": (7, 32, 24),
    "Q8_0": (8, 32, 34),
    "Q2_K": (10, 256, 84),
    "Q3_K": (11, 256, 110),
    "Q4_K": (12, 256, 144),
    "Q5_K": (13, 256, 176),
    "Q6_K": (14, 256, 210),
    "IQ4_NL": (20, 32, 18),
    "IQ4_XS": (23, 256, 136),
    "BF16": (30, 1, 2),
}

GGML_TYPE_IDS = {name: tid for name, (tid, _, _) in _TABLE.items()}
GGML_TYPE_NAMES = {tid: name for name, tid in GGML_TYPE_IDS.items()}

# Plain dtypes and GGUF block types a RawTensor can hold.
FLOAT_TYPES = ("F32", "F16", "BF16")
QUANT_TYPES = tuple(name for name in _TABLE if name not in FLOAT_TYPES)

# name -> (weights per block, bytes per block)
BLOCK_SIZES = {name: _TABLE[name][1:] for name in FLOAT_TYPES + QUANT_TYPES}

# The non-linear 4-bit code book shared by IQ4_NL and IQ4_XS.
IQ4_VALUES = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


def row_bytes(qtype: str, n_per_row: int) -> int:
    """Bytes one row of `n_per_row` weights takes in type `qtype`."""
    be, bb = BLOCK_SIZES[qtype]
    if n_per_row % be:
        raise ValueError(f"row length {n_per_row} is not a multiple of the {qtype} block size {be}")
    return n_per_row // be * bb
