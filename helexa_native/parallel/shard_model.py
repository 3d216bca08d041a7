"""One tensor-parallel rank's part of the CPU reference decoder.

`ShardModel` is the reference forward (reference/model.py) restricted to the
rank's slice of every weight (sharding.py): its query heads and the kv heads
they read, its rows of the MLP and its slice of the vocabulary. The math is
the reference's own (rms_norm, apply_rope, the same attention); what
changes is where partial results meet:
  x += all_reduce(attn_heads @ W_o[:, my heads]^T) (+ b_o once)
  x += all_reduce(mlp_rows @ W_down[:, my rows]^T)
  logits = gather_columns(h @ W_head[my vocabulary]^T)   (on rank 0)
so the ranks together compute the unsplit model up to the order of the
partial sums. Each rank keeps the KV cache of its own kv heads, in the same
paged block layout, and follows the block tables the leader hands it.
"""

from __future__ import annotations

import numbers
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..config import ModelSource
from ..errors import ModelLoadError, UnsupportedModelError
from ..progress import Progress
from ..reference.model import ReferenceModel, load_attention, load_dense_ffn, rms_norm
from ..rope import apply_rope, inv_freq, rope_cos_sin
from .collective import Collective
from .sharding import ShardPlan, shard_tensor


class _ShardLayer:
    """One decoder block's slices in compute layout."""

    __slots__ = ("attn_norm", "w_qkv", "b_qkv", "w_o", "b_o", "q_norm", "k_norm", "ffn_norm", "w_gate_up", "w_down")


class ShardModel(ReferenceModel):
    """Rank `rank`'s slice of the reference decoder; its collective joins it to the other ranks.

    check_ids, check_span and the attention itself are the reference's.
    `forward_batch` returns the logits on rank 0 and None on the others.
    """

    def __init__(
        self,
        source: ModelSource,
        plan: ShardPlan,
        rank: int,
        collective: Collective,
        max_context: int,
        dtype: torch.dtype = torch.float32,
        progress: Optional[bool] = None,
        num_blocks: Optional[int] = None,
        block_size: int = 16,
    ):
        cfg = source.config
        if plan.config != cfg:
            raise ValueError("the shard plan was made for another model config")
        if isinstance(max_context, bool) or not isinstance(max_context, numbers.Integral) or max_context < 1:
            raise ValueError(f"max_context must be a positive integer, got {max_context!r}")
        if cfg.num_heads % cfg.num_kv_heads:
            raise UnsupportedModelError(
                f"num_heads {cfg.num_heads} is not a multiple of num_kv_heads {cfg.num_kv_heads}"
            )
        self.config = cfg
        self.plan = plan
        self.rank = int(rank)
        self.collective = collective
        self.dtype = dtype
        self.max_context = int(max_context)
        local = plan.rank_config(self.rank)
        self.n_heads = local["num_heads"]
        self.n_kv_heads = local["num_kv_heads"]
        self.ffn_size = local["intermediate_size"]
        self.vocab_range = local["vocab"]
        self.vocab_widths = [b - a for a, b in plan.vocab]
        # Query head i reads kv head kv_of_q[i] of this rank. When that is the
        # usual grouping (consecutive runs of equal length) the reference's
        # grouped attention applies; otherwise kv heads are repeated per query head.
        kv_of_q = plan.kv_of_q(self.rank)
        g = self.n_heads // self.n_kv_heads if self.n_heads % self.n_kv_heads == 0 else 0
        grouped = g > 0 and kv_of_q == [i // g for i in range(self.n_heads)]
        self._kv_index = None if grouped else torch.tensor(kv_of_q, dtype=torch.long)

        self._tensors = source.tensors
        freq_factors = None
        if "rope_freqs.weight" in source.tensors:
            freq_factors = source.tensors["rope_freqs.weight"].to_float()
        self.inv_freq = inv_freq(cfg, freq_factors)
        cos, sin = rope_cos_sin(self.inv_freq, torch.arange(max_context))
        self._cos = cos.float()
        self._sin = sin.float()

        total = sum(shard_tensor(t, plan, self.rank, name).nbytes for name, t in source.tensors.items())
        with Progress(total, f"Loading rank {self.rank}'s shard", unit="B", progress=progress) as self._bar:
            self._load_weights()
        self._tensors = self._bar = None

        self.block_size = int(block_size)
        self.num_blocks = int(num_blocks) if num_blocks is not None else -(-self.max_context // self.block_size)
        if self.num_blocks < 1 or self.block_size < 1:
            raise ValueError("the KV pool needs at least one block of at least one position")
        pool_shape = (cfg.num_layers, self.num_blocks, self.n_kv_heads, self.block_size, cfg.head_dim)
        self.k_pool = torch.empty(pool_shape, dtype=dtype)
        self.v_pool = torch.empty(pool_shape, dtype=dtype)

    # ---------------------------------------------------------------- loading

    def _get(self, name: str, shape: tuple, required: bool = True) -> Optional[torch.Tensor]:
        raw = self._tensors.get(name)
        if raw is None:
            if required:
                raise ModelLoadError(f"missing tensor {name}")
            return None
        part = shard_tensor(raw, self.plan, self.rank, name)
        if tuple(part.shape) != tuple(shape):
            raise ModelLoadError(
                f"tensor {name}: rank {self.rank}'s slice has shape {tuple(part.shape)}, expected {tuple(shape)}"
            )
        try:
            t = part.to_float()
        except (ValueError, RuntimeError, NotImplementedError) as e:
            raise ModelLoadError(f"cannot dequantize tensor {name} ({raw.dtype}): {e}") from e
        self._bar.update(part.nbytes)
        return t.reshape(shape).to(self.dtype).contiguous()

    def _load_weights(self) -> None:
        cfg = self.config
        h, d = cfg.hidden_size, cfg.head_dim
        q, kv, f = self.n_heads * d, self.n_kv_heads * d, self.ffn_size
        va, vb = self.vocab_range

        self.embed = self._get("token_embd.weight", (cfg.vocab_size, h))
        self.output_norm = self._get("output_norm.weight", (h,))
        self.lm_head = self._get("output.weight", (vb - va, h), required=False)
        if self.lm_head is None:
            self.lm_head = self.embed[va:vb]

        self.layers = []
        for i in range(cfg.num_layers):
            p = f"blk.{i}."
            L = _ShardLayer()
            load_attention(L, self._get, p, cfg, q, kv, self.dtype)
            load_dense_ffn(L, self._get, p, cfg, f)
            self.layers.append(L)

    def weight_bytes(self) -> int:
        """Bytes of the weights this rank holds (a tied head shares the embedding's)."""
        seen, total = set(), 0
        tensors = [self.embed, self.lm_head, self.output_norm]
        for L in self.layers:
            tensors += [getattr(L, s) for s in L.__slots__]
        for t in tensors:
            if t is not None and t.untyped_storage().data_ptr() not in seen:
                seen.add(t.untyped_storage().data_ptr())
                total += t.untyped_storage().nbytes()
        return total

    # ---------------------------------------------------------------- forward

    @torch.inference_mode()
    def forward_batch(self, seqs: Sequence[tuple], all_logits: bool = False) -> Optional[list]:
        """The reference's forward_batch over this rank's slices; logits on rank 0, None elsewhere."""
        x, counts = self._blocks(seqs)
        rows, a = [], 0
        for n in counts:
            rows.append(x[a : a + n] if all_logits else x[a + n - 1 : a + n])
            a += n
        h = rms_norm(torch.cat(rows), self.output_norm, self.config.rms_norm_eps)
        part = F.linear(h, self.lm_head).float()
        logits = self.collective.gather_columns(part, self.vocab_widths)
        if logits is None:
            return None
        out, a = [], 0
        for r in rows:
            out.append(logits[a : a + r.shape[0]])
            a += r.shape[0]
        return out

    def _blocks(self, seqs) -> tuple:
        cfg = self.config
        nq, nk, d = self.n_heads, self.n_kv_heads, cfg.head_dim
        q_size, kv_size = nq * d, nk * d
        eps = cfg.rms_norm_eps
        reduce = self.collective.all_reduce
        lay = self._batch_layout(seqs)
        cos, sin, ids = lay.cos, lay.sin, lay.ids

        T = ids.numel()
        x = self.embed[ids]
        for li, L in enumerate(self.layers):
            h = rms_norm(x, L.attn_norm, eps)
            q, k, v = F.linear(h, L.w_qkv, L.b_qkv).split([q_size, kv_size, kv_size], -1)
            q, k, v = q.reshape(T, nq, d), k.reshape(T, nk, d), v.reshape(T, nk, d)
            if L.q_norm is not None:
                q = rms_norm(q, L.q_norm, eps)
                k = rms_norm(k, L.k_norm, eps)
            q = apply_rope(q.float(), cos, sin, cfg.rope_style).to(self.dtype)
            k = apply_rope(k.float(), cos, sin, cfg.rope_style).to(self.dtype)
            attn = self._paged_attention(li, q, k, v, lay, self._kv_index)
            x = x + reduce(F.linear(attn, L.w_o))
            if L.b_o is not None:
                x = x + L.b_o

            h = rms_norm(x, L.ffn_norm, eps)
            gate, up = F.linear(h, L.w_gate_up).chunk(2, -1)
            x = x + reduce(F.linear(F.silu(gate) * up, L.w_down))
        return x, lay.counts
