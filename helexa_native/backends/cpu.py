"""The CPU backend: the reference forward behind the Backend interface."""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from .. import defaults
from ..config import ModelSource
from ..embeddings import check_pooling
from ..errors import ContextLengthError, EngineClosedError
from ..kv_blocks import DEFAULT_BLOCK_SIZE, KVBlockManager
from ..reference import ReferenceModel
from ..reference import model as reference_model
from .base import HostSampledBackend, check_positive_ints, pooled_rows

# Pool size when none is given, in sequences of the full context: the pool
# is allocated untouched (torch.empty), so host memory is only used as
# positions are written.
DEFAULT_CPU_POOL_CONTEXTS = 4


def pool_blocks(
    n_ctx: int, block_size: int, bytes_per_position: int, kv_cache_memory: Optional[int], default_positions: int
) -> int:
    """Blocks of a KV pool: from a byte budget, else from default_positions; never below one full context."""
    per_block = bytes_per_position * block_size
    if kv_cache_memory is not None:
        if isinstance(kv_cache_memory, bool) or not isinstance(kv_cache_memory, int) or kv_cache_memory < 1:
            raise ValueError(f"kv_cache_memory must be a positive number of bytes, got {kv_cache_memory!r}")
        blocks = kv_cache_memory // per_block
    else:
        blocks = -(-default_positions // block_size)
    need = -(-n_ctx // block_size)
    if blocks < need:
        raise ValueError(
            f"kv_cache_memory of {kv_cache_memory} bytes holds {blocks} blocks of "
            f"{block_size} positions; one sequence of the full context ({n_ctx} "
            f"positions) needs {need} ({need * per_block} bytes)"
        )
    return int(blocks)


class CPUBackend(HostSampledBackend):
    """Runs a model with the pure-torch reference forward on the host.

    The weights are copied out of `source` at construction, so the caller
    may close the source right after. `kv_dtype` is the KV cache's element
    type (default: `dtype`); torch.bfloat16 stores keys and values rounded
    as the CUDA backend stores them (ReferenceModel).
    """

    device = "cpu"
    supports_constraints = True

    def __init__(
        self,
        source: ModelSource,
        n_ctx: int,
        dtype: torch.dtype = torch.float32,
        progress: Optional[bool] = None,
        max_num_seqs: int = defaults.DEFAULT_MAX_NUM_SEQS,
        kv_cache_memory: Optional[int] = None,
        block_size: int = DEFAULT_BLOCK_SIZE,
        prefix_cache: bool = True,
        kv_dtype: Optional[torch.dtype] = None,
    ):
        cfg = source.config
        check_positive_ints(max_num_seqs=max_num_seqs, block_size=block_size, max_context=n_ctx)
        kv_dtype = reference_model.check_kv_dtype(kv_dtype, dtype)
        per_pos = 2 * cfg.num_layers * cfg.kv_size * torch.finfo(kv_dtype).bits // 8
        blocks = pool_blocks(n_ctx, block_size, per_pos, kv_cache_memory, DEFAULT_CPU_POOL_CONTEXTS * n_ctx)
        self.model = ReferenceModel(
            source,
            n_ctx,
            dtype=dtype,
            progress=progress,
            num_blocks=blocks,
            block_size=block_size,
            kv_dtype=kv_dtype,
        )
        self.config = cfg
        self.n_ctx = self.model.max_context
        self.max_num_seqs = max_num_seqs
        self.blocks = KVBlockManager(blocks, block_size, prefix_cache=prefix_cache)

    def _run(self, batch: list, all_logits: bool) -> list:
        return self._live().forward_batch(batch, all_logits=all_logits)

    def hidden_states(self, seqs: Sequence[Sequence[int]], pooling: Optional[str] = None) -> List[torch.Tensor]:
        """Final hidden states of each sequence (pooled when asked), several sequences per pass.

        Sequences run together while their tokens fit one prefill chunk; a
        longer one runs alone, chunk by chunk, through borrowed KV blocks
        (Backend._in_borrowed_blocks). OutOfBlocks when the pool cannot hold
        a sequence right now.
        """
        if pooling is not None:
            check_pooling(pooling)
        m = self._live()
        ids = [m.check_ids(s) for s in seqs]
        for x in ids:
            if x.numel() > self.n_ctx:
                raise ContextLengthError(f"an input of {x.numel()} tokens exceeds the context of {self.n_ctx} tokens")
        chunk = reference_model.PREFILL_CHUNK
        out: List[Optional[torch.Tensor]] = [None] * len(ids)

        def run(group, tables):
            if len(group) == 1:
                x, table = ids[group[0]], tables[0]
                parts = [m.hidden_batch([(x[a : a + chunk], a, table)])[0] for a in range(0, x.numel(), chunk)]
                out[group[0]] = pooled_rows(torch.cat(parts), pooling)
            else:
                rows = m.hidden_batch([(ids[j], 0, t) for j, t in zip(group, tables)])
                for j, r in zip(group, rows):
                    out[j] = pooled_rows(r, pooling)

        with self.lock:
            self._in_borrowed_blocks([x.numel() for x in ids], chunk, len(ids), run)
        return out

    def memory_info(self) -> dict:
        """Bytes held by weights and the KV pool in host memory, and the pool's blocks."""
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
        kv = 2 * m.k_pool.numel() * m.k_pool.element_size()
        out = {"device": "cpu", "weights_bytes": weights, "kv_cache_bytes": kv}
        out.update(self.blocks.stats())
        return out

    def close(self) -> None:
        """Drop the weights and cache."""
        self.model = None

    def _live(self) -> ReferenceModel:
        if self.model is None:
            raise EngineClosedError("the CPU backend was closed")
        return self.model
