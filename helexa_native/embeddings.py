"""Sentence embeddings from a decoder's final hidden states: pooling, normalization, encoding.

A text's embedding pools the final hidden states (after the output norm) of
its tokens into one vector:

* ``last``: the last token's state. Causal embedding models are trained for
  it (Qwen3-Embedding, a qwen3 model whose tokenizer appends an end token);
* ``mean``: the average over the tokens, for models trained with mean
  pooling and the default for plain chat models;
* ``cls``: the first token's state.

`default_pooling` reads the model's own choice: a GGUF's
``<arch>.pooling_type``, a sentence-transformers folder's
``1_Pooling/config.json``, else ``last`` for a model whose name says
"embed" and ``mean`` otherwise. Vectors are L2-normalized, so a dot product
is the cosine similarity. `encode_base64` writes little-endian float32, as
OpenAI's ``encoding_format: "base64"`` does.
"""

from __future__ import annotations

import base64
from typing import Optional

import numpy as np
import torch

POOLINGS = ("last", "mean", "cls")


def check_pooling(pooling: str) -> str:
    """`pooling` if it is known, else ValueError listing the known ones."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
    return pooling


def default_pooling(metadata: Optional[dict], model_name: str = "", path: str = "") -> str:
    """The pooling the model was made for (see the module docstring)."""
    named = (metadata or {}).get("pooling")
    if named in POOLINGS:
        return named
    if "embed" in f"{model_name} {path}".lower():
        return "last"
    return "mean"


def pool(hidden: torch.Tensor, pooling: str) -> torch.Tensor:
    """One vector [hidden] from a sequence's hidden states [n, hidden]."""
    if pooling == "last":
        return hidden[-1]
    if pooling == "cls":
        return hidden[0]
    if pooling == "mean":
        return hidden.mean(dim=0)
    raise ValueError(f"unknown pooling {pooling!r}")


def normalize(vectors: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm (a zero row stays zero)."""
    return torch.nn.functional.normalize(vectors, p=2.0, dim=-1)


def encode_base64(vector) -> str:
    """A vector as base64 of its little-endian float32 bytes."""
    arr = np.asarray(vector, dtype="<f4")
    return base64.b64encode(arr.tobytes()).decode("ascii")
