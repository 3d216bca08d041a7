"""The CPU backend: the reference forward behind the Backend interface."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..config import ModelSource
from ..errors import EngineClosedError
from ..reference import ReferenceModel
from .base import Backend


class CPUBackend(Backend):
    """Runs a model with the pure-torch reference forward on the host.

    The weights are copied out of `source` at construction, so the caller
    may close the source right after.
    """

    device = "cpu"

    def __init__(self, source: ModelSource, n_ctx: int, dtype: torch.dtype = torch.float32,
                 progress: Optional[bool] = None):
        self.model = ReferenceModel(source, n_ctx, dtype=dtype, progress=progress)
        self.config = source.config
        self.n_ctx = self.model.max_context

    def reset(self) -> None:
        """Forget the KV cache contents (the allocation stays)."""
        self._live().reset()

    def forward(self, tokens: Sequence[int], start_pos: int, all_logits: bool = False) -> torch.Tensor:
        """Run tokens at positions start_pos.. and return float32 logits ([vocab] or [n, vocab])."""
        logits = self._live().forward(tokens, start_pos, all_logits=all_logits)
        return logits if all_logits else logits[0]

    def memory_info(self) -> dict:
        """Bytes held by weights and KV cache in host memory."""
        if self.model is None:
            return {}
        m = self.model
        seen, weights = set(), 0
        tensors = [m.embed, m.lm_head, m.output_norm]
        for L in m.layers:
            tensors += [getattr(L, s) for s in L.__slots__]
        for t in tensors:
            if t is not None and id(t) not in seen:
                seen.add(id(t))
                weights += t.numel() * t.element_size()
        kv = 2 * m.k_cache.numel() * m.k_cache.element_size()
        return {"device": "cpu", "weights_bytes": weights, "kv_cache_bytes": kv}

    def close(self) -> None:
        """Drop the weights and cache."""
        self.model = None

    def _live(self) -> ReferenceModel:
        if self.model is None:
            raise EngineClosedError("the CPU backend was closed")
        return self.model
