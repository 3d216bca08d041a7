"""The CPU reference forward: a plain torch decoder for every supported architecture.

This is the numerical oracle the GPU path is checked against, so it favours
the obvious formula over the clever one. It is still quick enough to chat
with a small model: weights are dequantized once at load, q/k/v and
gate/up projections are fused into one matmul each, attention runs all
heads at once, and the KV cache is preallocated.

One decoder covers llama, qwen2, qwen3 and qwen3moe; they differ only in
flags the loader already put in the config (q/k/v bias, per-head q/k
RMSNorm, rope pairing and scaling, tied embeddings) and, for qwen3moe, in
the FFN: a router picks experts per token (`route`, `moe_ffn`).
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F

from ..config import SUPPORTED_ARCHS, ModelConfig, ModelSource
from ..errors import ContextLengthError, ModelLoadError, UnsupportedModelError
from ..progress import Progress
from ..rope import apply_rope, inv_freq, rope_cos_sin

# Long prompts run through the layers this many tokens at a time, which
# bounds the attention score matrix without changing the result.
PREFILL_CHUNK = 512

# Element types the KV pool may store (ReferenceModel's kv_dtype).
KV_DTYPES = (torch.float32, torch.bfloat16)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) * weight over the last dim, accumulated in float32 (as HF does)."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * y.to(x.dtype)


def routing_margins(sorted_probs: torch.Tensor, k: int) -> torch.Tensor:
    """Per row, how far the k-th choice is from losing its place: (p_k - p_{k+1}) / p_k, float32 [T].

    sorted_probs [T, E] are each row's router probabilities in descending
    order. A margin near zero means the k-th and (k+1)-th experts nearly tie,
    so a tiny change of the row's activations can swap them. With k = E
    nothing can take the k-th place: the margin is infinite. A zero p_k (so
    a zero p_{k+1} too) is a tie: margin 0.
    """
    t, e = sorted_probs.shape
    if k >= e:
        return torch.full((t,), math.inf)
    pk, pk1 = sorted_probs[:, k - 1].float(), sorted_probs[:, k].float()
    return torch.where(pk > 0, (pk - pk1) / pk.clamp_min(torch.finfo(torch.float32).tiny), torch.zeros_like(pk))


def route(
    h: torch.Tensor,
    w_router: torch.Tensor,
    k: int,
    normalize: bool,
    margins: Optional[list] = None,
    probs_out: Optional[list] = None,
    choose: Optional[dict] = None,
) -> tuple:
    """Each token's k experts and their weights: ([T, k] float32 weights, [T, k] expert ids).

    Router probabilities are softmax(h W_router^T) in float32; the k most
    probable experts are chosen, and on equal probabilities the lower expert
    id comes first (a stable descending sort), so ties never depend on the
    platform. With `normalize` (norm_topk_prob) the k weights are rescaled
    to sum to one.

    Hooks for checking another implementation against this one, all off
    by default: when `margins` is a list, each token's routing margin
    (`routing_margins`) is appended to it as one [T] tensor; when
    `probs_out` is a list, the [T, E] router probabilities are; `choose`
    ({row: k expert ids}) makes those tokens use the given experts instead,
    weighted by their own probabilities (a near tie tipped the other way).
    """
    probs = torch.softmax(F.linear(h, w_router).float(), dim=-1)
    weights, experts = torch.sort(probs, dim=-1, descending=True, stable=True)
    if margins is not None:
        margins.append(routing_margins(weights, k))
    if probs_out is not None:
        probs_out.append(probs)
    weights, experts = weights[:, :k], experts[:, :k]
    if choose:
        rows = torch.as_tensor(list(choose), dtype=torch.long)
        ids = torch.as_tensor([list(v) for v in choose.values()], dtype=torch.long)
        if ids.shape != (rows.numel(), k):
            raise ValueError(f"choose needs {k} expert ids per row")
        experts = experts.clone()
        experts[rows] = ids
        weights = weights.clone()
        weights[rows] = probs[rows[:, None], ids]
    if normalize:
        weights = weights / weights.sum(-1, keepdim=True)
    return weights, experts


def moe_ffn(
    h: torch.Tensor,
    w_router: torch.Tensor,
    w_gate_up: torch.Tensor,
    w_down: torch.Tensor,
    k: int,
    normalize: bool,
    margins: Optional[list] = None,
    probs_out: Optional[list] = None,
    choose: Optional[dict] = None,
) -> torch.Tensor:
    """sum over each token's k routed experts of w_e * down_e(silu(gate_e h) * up_e h).

    h [T, hidden]; w_router [E, hidden]; w_gate_up [E, 2 * F, hidden] (gate
    rows then up rows); w_down [E, hidden, F] -> [T, hidden]. Experts run
    in id order over the tokens routed to them. `margins`, `probs_out` and
    `choose` as for `route`.
    """
    weights, experts = route(h, w_router, k, normalize, margins, probs_out, choose)
    out = torch.zeros_like(h)
    for e in torch.unique(experts).tolist():
        tok, slot = (experts == e).nonzero(as_tuple=True)
        gate, up = F.linear(h[tok], w_gate_up[e]).chunk(2, -1)
        y = F.linear(F.silu(gate) * up, w_down[e])
        out.index_add_(0, tok, y * weights[tok, slot, None].to(y.dtype))
    return out


class _Layer:
    """One decoder block's weights in compute layout.

    A dense layer has w_gate_up and w_down; a MoE layer has router
    [E, hidden], exp_gate_up [E, 2 * F, hidden] and exp_down [E, hidden, F]
    instead. The others are None.
    """

    __slots__ = (
        "attn_norm",
        "w_qkv",
        "b_qkv",
        "w_o",
        "b_o",
        "q_norm",
        "k_norm",
        "ffn_norm",
        "w_gate_up",
        "w_down",
        "router",
        "exp_gate_up",
        "exp_down",
    )


class _BatchLayout(NamedTuple):
    """A batch's tokens in the paged pool (ReferenceModel._batch_layout)."""

    ids: torch.Tensor  # [T] token ids, sequences one after another
    counts: list  # tokens per sequence
    blk: torch.Tensor  # [T] pool block of each token
    off: torch.Tensor  # [T] offset inside it
    cos: torch.Tensor  # [T, head_dim / 2] rope angles at each token's position
    sin: torch.Tensor
    views: list  # per sequence: (first row, end row, positions, its block ids, causal mask or None)


def check_kv_dtype(kv_dtype: Optional[torch.dtype], dtype: torch.dtype) -> torch.dtype:
    """The KV pool's element type: `dtype` when kv_dtype is None, else float32 or bfloat16 (ValueError otherwise)."""
    if kv_dtype is None:
        return dtype
    if kv_dtype not in KV_DTYPES:
        raise ValueError(f"kv_dtype must be torch.float32 or torch.bfloat16, got {kv_dtype!r}")
    return kv_dtype


def load_attention(L, get, p: str, cfg: ModelConfig, q: int, kv: int, dtype) -> None:
    """Layer `p`'s norms and attention weights into L, read through get(name, shape, required=True).

    q and kv: the query and key/value rows held (all of them, or a rank's
    slice); q/k/v biases are kept when any exists, zeros standing in for the
    others.
    """
    h, d = cfg.hidden_size, cfg.head_dim
    L.attn_norm = get(p + "attn_norm.weight", (h,))
    L.w_qkv = torch.cat(
        [get(p + "attn_q.weight", (q, h)), get(p + "attn_k.weight", (kv, h)), get(p + "attn_v.weight", (kv, h))]
    )
    sizes = (q, kv, kv)
    biases = [get(p + f"attn_{x}.bias", (n,), required=cfg.attention_bias) for x, n in zip("qkv", sizes)]
    if any(b is not None for b in biases):
        L.b_qkv = torch.cat([b if b is not None else torch.zeros(n, dtype=dtype) for b, n in zip(biases, sizes)])
    else:
        L.b_qkv = None
    L.w_o = get(p + "attn_output.weight", (h, q))
    L.b_o = get(p + "attn_output.bias", (h,), required=False)
    L.q_norm = get(p + "attn_q_norm.weight", (d,), required=cfg.qk_norm)
    L.k_norm = get(p + "attn_k_norm.weight", (d,), required=cfg.qk_norm)
    L.ffn_norm = get(p + "ffn_norm.weight", (h,))


def load_dense_ffn(L, get, p: str, cfg: ModelConfig, f: int) -> None:
    """Layer `p`'s dense SwiGLU FFN (f rows of gate and of up: all, or a rank's slice) into L."""
    h = cfg.hidden_size
    L.w_gate_up = torch.cat([get(p + "ffn_gate.weight", (f, h)), get(p + "ffn_up.weight", (f, h))])
    L.w_down = get(p + "ffn_down.weight", (h, f))


class ReferenceModel:
    """A llama-family decoder in plain torch over a paged KV pool.

    Sequences hold up to `max_context` positions each; the pool has
    `num_blocks` blocks of `block_size` positions (default: one sequence's
    worth), and each call names the blocks of its sequence (see kv_blocks.py).

    The pool stores keys and values in `kv_dtype` (default: the compute
    dtype). With bfloat16, as the CUDA backend stores them, each key and
    value is rounded to bfloat16 (nearest even) when written and attention
    runs in the compute dtype over the rounded values.

    Routing hooks for checking another implementation against this one,
    all off (None) by default and free when off. Rows are a pass's tokens
    in order (sequences one after another).
    `route_margins`: a list to which every pass appends a float32 [T]
    tensor, each row's smallest routing margin over the MoE layers
    (`routing_margins`; infinite for a model without MoE layers).
    `route_probs`: a list to which every pass appends {layer index: [T, E]
    float32 router probabilities} of its MoE layers.
    `route_choices`: {layer index: {row: k expert ids}}, rows that use the
    given experts in that layer instead of their k most probable ones
    (`route`'s `choose`), applied to every pass while set.
    """

    route_margins: Optional[list] = None
    route_probs: Optional[list] = None
    route_choices: Optional[dict] = None

    def __init__(
        self,
        source: ModelSource,
        max_context: int,
        dtype: torch.dtype = torch.float32,
        progress: Optional[bool] = None,
        num_blocks: Optional[int] = None,
        block_size: int = 16,
        kv_dtype: Optional[torch.dtype] = None,
    ):
        cfg = source.config
        self.kv_dtype = check_kv_dtype(kv_dtype, dtype)
        if cfg.arch not in SUPPORTED_ARCHS:
            raise UnsupportedModelError(
                f"architecture {cfg.arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHS)})"
            )
        if isinstance(max_context, bool) or not isinstance(max_context, numbers.Integral) or max_context < 1:
            raise ValueError(f"max_context must be a positive integer, got {max_context!r}")
        if cfg.num_heads % cfg.num_kv_heads:
            raise UnsupportedModelError(
                f"num_heads {cfg.num_heads} is not a multiple of num_kv_heads {cfg.num_kv_heads}"
            )
        self.config: ModelConfig = cfg
        self.dtype = dtype
        self.max_context = int(max_context)
        self._tensors = source.tensors

        # Rope first: a bad scaling config fails before the slow dequantization.
        freq_factors = None
        if "rope_freqs.weight" in source.tensors:
            freq_factors = source.tensors["rope_freqs.weight"].to_float()
        self.inv_freq = inv_freq(cfg, freq_factors)
        cos, sin = rope_cos_sin(self.inv_freq, torch.arange(max_context))
        # Angles stay float32 even for bf16 weights: rotation accuracy is cheap.
        self._cos = cos.float()
        self._sin = sin.float()

        total = sum(t.nbytes for t in source.tensors.values())
        with Progress(total, "Dequantizing weights", unit="B", progress=progress) as self._bar:
            self._load_weights()
        self._tensors = self._bar = None

        # The paged KV pool: [layers, blocks, kv heads, block_size, head_dim].
        # torch.empty: pages are touched only as positions are written.
        self.block_size = int(block_size)
        self.num_blocks = int(num_blocks) if num_blocks is not None else -(-self.max_context // self.block_size)
        if self.num_blocks < 1 or self.block_size < 1:
            raise ValueError("the KV pool needs at least one block of at least one position")
        pool_shape = (cfg.num_layers, self.num_blocks, cfg.num_kv_heads, self.block_size, cfg.head_dim)
        self.k_pool = torch.empty(pool_shape, dtype=self.kv_dtype)
        self.v_pool = torch.empty(pool_shape, dtype=self.kv_dtype)

    # ---------------------------------------------------------------- loading

    def _get(self, name: str, shape: tuple, required: bool = True) -> Optional[torch.Tensor]:
        raw = self._tensors.get(name)
        if raw is None:
            if required:
                raise ModelLoadError(f"missing tensor {name}")
            return None
        if tuple(raw.shape) != tuple(shape):
            raise ModelLoadError(f"tensor {name} has shape {tuple(raw.shape)}, expected {tuple(shape)}")
        try:
            t = raw.to_float()
        except (ValueError, RuntimeError, NotImplementedError) as e:
            raise ModelLoadError(f"cannot dequantize tensor {name} ({raw.dtype}): {e}") from e
        self._bar.update(raw.nbytes)
        return t.reshape(shape).to(self.dtype).contiguous()

    def _load_weights(self) -> None:
        cfg = self.config
        h, f = cfg.hidden_size, cfg.intermediate_size
        q, kv = cfg.q_size, cfg.kv_size

        self.embed = self._get("token_embd.weight", (cfg.vocab_size, h))
        self.output_norm = self._get("output_norm.weight", (h,))
        # GGUF files of tied models simply omit output.weight.
        self.lm_head = self._get("output.weight", (cfg.vocab_size, h), required=False)
        if self.lm_head is None:
            self.lm_head = self.embed

        self.layers = []
        for i in range(cfg.num_layers):
            p = f"blk.{i}."
            L = _Layer()
            load_attention(L, self._get, p, cfg, q, kv, self.dtype)
            L.w_gate_up = L.w_down = L.router = L.exp_gate_up = L.exp_down = None
            if cfg.is_moe_layer(i):
                e, fe = cfg.num_experts, cfg.moe_intermediate_size
                L.router = self._get(p + "ffn_gate_inp.weight", (e, h))
                L.exp_gate_up = torch.cat(
                    [
                        self._get(p + "ffn_gate_exps.weight", (e, fe, h)),
                        self._get(p + "ffn_up_exps.weight", (e, fe, h)),
                    ],
                    dim=1,
                )
                L.exp_down = self._get(p + "ffn_down_exps.weight", (e, h, fe))
            else:
                load_dense_ffn(L, self._get, p, cfg, f)
            self.layers.append(L)

    # ---------------------------------------------------------------- forward

    def check_ids(self, tokens) -> torch.Tensor:
        """tokens as a 1-D long tensor; ValueError when empty or outside the vocabulary."""
        if isinstance(tokens, torch.Tensor):
            tokens = tokens.detach().cpu()
        try:
            ids = torch.as_tensor(tokens, dtype=torch.long).reshape(-1)
        except (TypeError, ValueError, RuntimeError) as e:
            raise ValueError(f"tokens must be a sequence of integer ids ({e})") from e
        if ids.numel() == 0:
            raise ValueError("tokens must not be empty")
        bad = (ids < 0) | (ids >= self.config.vocab_size)
        if bool(bad.any()):
            raise ValueError(f"token id {int(ids[bad][0])} is outside the vocabulary (size {self.config.vocab_size})")
        return ids

    def check_span(self, start_pos: int, n: int, block_table: Sequence[int]) -> None:
        """Positions start_pos..start_pos+n must fit the context and the block table."""
        if isinstance(start_pos, bool) or not isinstance(start_pos, numbers.Integral) or start_pos < 0:
            raise ValueError(f"start_pos must be a non-negative integer, got {start_pos!r}")
        end = int(start_pos) + n
        if end > self.max_context:
            raise ContextLengthError(f"positions up to {end} exceed the context of {self.max_context} tokens")
        need = -(-end // self.block_size)
        if len(block_table) < need:
            raise ValueError(f"the block table holds {len(block_table)} blocks; positions up to {end} need {need}")
        for b in block_table[:need]:
            if isinstance(b, bool) or not isinstance(b, numbers.Integral) or not 0 <= b < self.num_blocks:
                raise ValueError(f"block id {b!r} is outside the pool of {self.num_blocks} blocks")

    @torch.inference_mode()
    def forward_batch(self, seqs: Sequence[tuple], all_logits: bool = False) -> list:
        """Run several sequences in one pass; float32 logits per sequence.

        seqs: (ids, start_pos, block_table) triples, ids as check_ids returns
        them, already checked with check_span. Every token of every sequence
        goes through the projections together (one matmul per weight for the
        whole batch); attention runs per sequence over its own blocks. Returns
        [n_i, vocab] per sequence, or [1, vocab] (its last position) unless
        all_logits.
        """
        x, counts = self._blocks(seqs)
        rows, out, a = [], [], 0
        for n in counts:
            rows.append(x[a : a + n] if all_logits else x[a + n - 1 : a + n])
            a += n
        h = rms_norm(torch.cat(rows), self.output_norm, self.config.rms_norm_eps)
        logits = F.linear(h, self.lm_head).float()
        a = 0
        for r in rows:
            out.append(logits[a : a + r.shape[0]])
            a += r.shape[0]
        return out

    @torch.inference_mode()
    def hidden_batch(self, seqs: Sequence[tuple]) -> list:
        """Final hidden states (after the output norm) of every token: float32 [n_i, hidden] per sequence.

        seqs as for forward_batch; the keys and values are written to the pool as usual.
        """
        x, counts = self._blocks(seqs)
        h = rms_norm(x, self.output_norm, self.config.rms_norm_eps).float()
        return list(torch.split(h, counts))

    def _batch_layout(self, seqs) -> "_BatchLayout":
        """Where a batch's tokens sit: ids, positions, pool slots, rope angles, per-sequence views."""
        bs = self.block_size
        ids = torch.cat([s[0] for s in seqs])
        counts = [int(s[0].numel()) for s in seqs]
        pos = torch.cat([torch.arange(int(s[1]), int(s[1]) + n) for s, n in zip(seqs, counts)])
        blk = torch.cat(
            [
                torch.as_tensor(list(s[2]), dtype=torch.long)[torch.arange(int(s[1]), int(s[1]) + n) // bs]
                for s, n in zip(seqs, counts)
            ]
        )
        off = pos % bs
        cos, sin = self._cos[pos], self._sin[pos]
        views = []  # per sequence: (row range, end, block ids, causal mask)
        a = 0
        for (_, start, table), n in zip(seqs, counts):
            end = int(start) + n
            used = torch.as_tensor(list(table[: -(-end // bs)]), dtype=torch.long)
            mask = None
            if n > 1:
                # Query i sits at start + i and sees positions 0..start + i.
                seen = torch.arange(end)[None, :] <= (int(start) + torch.arange(n))[:, None]
                mask = torch.zeros(n, end, dtype=torch.float32).masked_fill_(~seen, float("-inf"))
            views.append((a, a + n, end, used, mask))
            a += n
        return _BatchLayout(ids, counts, blk, off, cos, sin, views)

    def _paged_attention(self, li: int, q, k, v, lay: "_BatchLayout", kv_index=None) -> torch.Tensor:
        """Write k, v at the batch's pool slots of layer li, then each sequence's attention over its blocks.

        q [T, nq, d], k and v [T, nk, d] (this model's heads); kv_index (optional)
        picks, per query-head group, which of the cached kv heads it reads.
        The pool's element type rounds k and v as they are written; attention
        reads them back in q's dtype.
        """
        nk, d = k.shape[1], k.shape[2]
        kp, vp = self.k_pool[li], self.v_pool[li]
        kp[lay.blk, :, lay.off] = k.to(kp.dtype)
        vp[lay.blk, :, lay.off] = v.to(vp.dtype)
        parts = []
        for r0, r1, end, used, mask in lay.views:
            kk = kp[used].permute(1, 0, 2, 3).reshape(nk, -1, d)[:, :end].to(q.dtype)
            vv = vp[used].permute(1, 0, 2, 3).reshape(nk, -1, d)[:, :end].to(q.dtype)
            if kv_index is not None:
                kk, vv = kk[kv_index], vv[kv_index]
            parts.append(self._attention(q[r0:r1], kk, vv, mask))
        return torch.cat(parts) if len(parts) > 1 else parts[0]

    def _blocks(self, seqs) -> tuple:
        cfg = self.config
        nq, nk, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        eps = cfg.rms_norm_eps
        lay = self._batch_layout(seqs)
        cos, sin = lay.cos, lay.sin
        T = lay.ids.numel()
        x = self.embed[lay.ids]
        margins = [] if self.route_margins is not None else None
        probs = {} if self.route_probs is not None else None
        choices = self.route_choices or {}
        for li, L in enumerate(self.layers):
            h = rms_norm(x, L.attn_norm, eps)
            q, k, v = F.linear(h, L.w_qkv, L.b_qkv).split([cfg.q_size, cfg.kv_size, cfg.kv_size], -1)
            q, k, v = q.reshape(T, nq, d), k.reshape(T, nk, d), v.reshape(T, nk, d)
            if L.q_norm is not None:
                q = rms_norm(q, L.q_norm, eps)
                k = rms_norm(k, L.k_norm, eps)
            q = apply_rope(q.float(), cos, sin, cfg.rope_style).to(self.dtype)
            k = apply_rope(k.float(), cos, sin, cfg.rope_style).to(self.dtype)
            attn = self._paged_attention(li, q, k, v, lay)
            x = x + F.linear(attn, L.w_o, L.b_o)

            h = rms_norm(x, L.ffn_norm, eps)
            if L.router is not None:
                out = [] if probs is not None else None
                topk, norm = cfg.num_experts_per_tok, cfg.norm_topk_prob
                x = x + moe_ffn(h, L.router, L.exp_gate_up, L.exp_down, topk, norm, margins, out, choices.get(li))
                if out is not None:
                    probs[li] = out[0]
                continue
            gate, up = F.linear(h, L.w_gate_up).chunk(2, -1)
            x = x + F.linear(F.silu(gate) * up, L.w_down)
        if margins is not None:
            least = torch.stack(margins).min(0).values if margins else torch.full((T,), math.inf)
            self.route_margins.append(least)
        if probs is not None:
            self.route_probs.append(probs)
        return x, lay.counts

    def _attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor]
    ) -> torch.Tensor:
        """softmax(q k^T / sqrt(d) + mask) v, GQA: kv head j serves query heads j*g..j*g+g-1.

        q [n, nq, d], k and v [nk, T, d], mask [n, T] or None -> [n, nq * d].
        """
        n, nq, d = q.shape
        nk, T = k.shape[0], k.shape[1]
        g = nq // nk
        qg = q.reshape(n, nk, g, d).permute(1, 2, 0, 3).reshape(nk, g * n, d)
        scores = (qg @ k.transpose(1, 2)).float() * (1.0 / math.sqrt(d))
        if mask is not None:
            scores = (scores.reshape(nk, g, n, T) + mask).reshape(nk, g * n, T)
        probs = torch.softmax(scores, dim=-1).to(v.dtype)
        out = probs @ v  # [nk, g * n, d]
        return out.reshape(nk, g, n, d).permute(2, 0, 1, 3).reshape(n, nq * d)
