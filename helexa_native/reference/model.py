"""The CPU reference forward: a plain torch decoder for every supported architecture.

This is the numerical oracle the GPU path is checked against, so it favours
the obvious formula over the clever one. It is still quick enough to chat
with a small model: weights are dequantized once at load, q/k/v and
gate/up projections are fused into one matmul each, attention runs all
heads at once, and the KV cache is preallocated.

One decoder covers llama, qwen2 and qwen3; they differ only in flags the
loader already put in the config (q/k/v bias, per-head q/k RMSNorm, rope
pairing and scaling, tied embeddings).
"""
from __future__ import annotations

import math
import numbers
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from ..config import SUPPORTED_ARCHS, ModelConfig, ModelSource
from ..errors import ContextLengthError, ModelLoadError, UnsupportedModelError
from ..progress import Progress
from ..rope import apply_rope, inv_freq, rope_cos_sin

# Long prompts run through the layers this many tokens at a time, which
# bounds the attention score matrix without changing the result.
PREFILL_CHUNK = 512


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) * weight over the last dim, accumulated in float32 (as HF does)."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * y.to(x.dtype)


class _Layer:
    """One decoder block's weights in compute layout."""

    __slots__ = ("attn_norm", "w_qkv", "b_qkv", "w_o", "b_o", "q_norm", "k_norm",
                 "ffn_norm", "w_gate_up", "w_down")


class ReferenceModel:
    """A llama-family decoder in plain torch with a KV cache of `max_context` positions."""

    def __init__(self, source: ModelSource, max_context: int, dtype: torch.dtype = torch.float32,
                 progress: Optional[bool] = None):
        cfg = source.config
        if cfg.arch not in SUPPORTED_ARCHS:
            raise UnsupportedModelError(f"architecture {cfg.arch!r} is not supported "
                                        f"(supported: {', '.join(SUPPORTED_ARCHS)})")
        if isinstance(max_context, bool) or not isinstance(max_context, numbers.Integral) \
                or max_context < 1:
            raise ValueError(f"max_context must be a positive integer, got {max_context!r}")
        if cfg.num_heads % cfg.num_kv_heads:
            raise UnsupportedModelError(f"num_heads {cfg.num_heads} is not a multiple of "
                                        f"num_kv_heads {cfg.num_kv_heads}")
        self.config: ModelConfig = cfg
        self.dtype = dtype
        self.max_context = int(max_context)
        self._tensors = source.tensors
        self.n_filled = 0

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

        cache_shape = (cfg.num_layers, cfg.num_kv_heads, max_context, cfg.head_dim)
        self.k_cache = torch.zeros(cache_shape, dtype=dtype)
        self.v_cache = torch.zeros(cache_shape, dtype=dtype)

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
        h, d, f = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
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
            L.attn_norm = self._get(p + "attn_norm.weight", (h,))
            L.w_qkv = torch.cat([self._get(p + "attn_q.weight", (q, h)),
                                 self._get(p + "attn_k.weight", (kv, h)),
                                 self._get(p + "attn_v.weight", (kv, h))])
            biases = [self._get(p + f"attn_{x}.bias", (n,), required=cfg.attention_bias)
                      for x, n in (("q", q), ("k", kv), ("v", kv))]
            if any(b is not None for b in biases):
                sizes = (q, kv, kv)
                biases = [b if b is not None else torch.zeros(n, dtype=self.dtype)
                          for b, n in zip(biases, sizes)]
                L.b_qkv = torch.cat(biases)
            else:
                L.b_qkv = None
            L.w_o = self._get(p + "attn_output.weight", (h, q))
            L.b_o = self._get(p + "attn_output.bias", (h,), required=False)
            L.q_norm = self._get(p + "attn_q_norm.weight", (d,), required=cfg.qk_norm)
            L.k_norm = self._get(p + "attn_k_norm.weight", (d,), required=cfg.qk_norm)
            L.ffn_norm = self._get(p + "ffn_norm.weight", (h,))
            L.w_gate_up = torch.cat([self._get(p + "ffn_gate.weight", (f, h)),
                                     self._get(p + "ffn_up.weight", (f, h))])
            L.w_down = self._get(p + "ffn_down.weight", (h, f))
            self.layers.append(L)

    # ---------------------------------------------------------------- forward

    def reset(self) -> None:
        """Forget the cached positions (the cache memory stays allocated)."""
        self.n_filled = 0

    def _check(self, tokens, start_pos: int) -> torch.Tensor:
        if isinstance(tokens, torch.Tensor):
            tokens = tokens.detach().cpu()
        try:
            ids = torch.as_tensor(tokens, dtype=torch.long).reshape(-1)
        except (TypeError, ValueError, RuntimeError) as e:
            raise ValueError(f"tokens must be a sequence of integer ids ({e})") from e
        if ids.numel() == 0:
            raise ValueError("tokens must not be empty")
        if isinstance(start_pos, bool) or not isinstance(start_pos, numbers.Integral) or start_pos < 0:
            raise ValueError(f"start_pos must be a non-negative integer, got {start_pos!r}")
        if start_pos > self.n_filled:
            raise ValueError(f"start_pos {start_pos} leaves a gap: only {self.n_filled} "
                             "positions are cached")
        end = start_pos + ids.numel()
        if end > self.max_context:
            raise ContextLengthError(f"positions up to {end} exceed the context of "
                                     f"{self.max_context} tokens")
        bad = (ids < 0) | (ids >= self.config.vocab_size)
        if bool(bad.any()):
            raise ValueError(f"token id {int(ids[bad][0])} is outside the vocabulary "
                             f"(size {self.config.vocab_size})")
        return ids

    @torch.inference_mode()
    def forward(self, tokens: Sequence[int], start_pos: int, all_logits: bool = True) -> torch.Tensor:
        """Run tokens at positions start_pos.., fill the KV cache, return float32 logits.

        Returns [n, vocab], or [1, vocab] for the last position only when
        all_logits is False (which skips the LM head for the others).
        """
        ids = self._check(tokens, start_pos)
        start_pos = int(start_pos)
        hidden = []
        for a in range(0, ids.numel(), PREFILL_CHUNK):
            chunk = ids[a:a + PREFILL_CHUNK]
            x = self._blocks(chunk, start_pos + a)
            self.n_filled = start_pos + a + chunk.numel()
            hidden.append(x)
        x = torch.cat(hidden) if all_logits else hidden[-1][-1:]
        x = rms_norm(x, self.output_norm, self.config.rms_norm_eps)
        return F.linear(x, self.lm_head).float()

    def _blocks(self, ids: torch.Tensor, pos0: int) -> torch.Tensor:
        cfg = self.config
        n, end = ids.numel(), pos0 + ids.numel()
        nq, nk, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        eps = cfg.rms_norm_eps
        cos, sin = self._cos[pos0:end], self._sin[pos0:end]
        mask = None
        if n > 1:
            # Query i sits at pos0 + i and sees cache positions 0..pos0 + i.
            seen = torch.arange(end)[None, :] <= (pos0 + torch.arange(n))[:, None]
            mask = torch.zeros(n, end, dtype=torch.float32).masked_fill_(~seen, float("-inf"))

        x = self.embed[ids]
        for li, L in enumerate(self.layers):
            h = rms_norm(x, L.attn_norm, eps)
            q, k, v = F.linear(h, L.w_qkv, L.b_qkv).split([cfg.q_size, cfg.kv_size, cfg.kv_size], -1)
            q, k, v = q.reshape(n, nq, d), k.reshape(n, nk, d), v.reshape(n, nk, d)
            if L.q_norm is not None:
                q = rms_norm(q, L.q_norm, eps)
                k = rms_norm(k, L.k_norm, eps)
            q = apply_rope(q.float(), cos, sin, cfg.rope_style).to(self.dtype)
            k = apply_rope(k.float(), cos, sin, cfg.rope_style).to(self.dtype)
            self.k_cache[li, :, pos0:end] = k.transpose(0, 1)
            self.v_cache[li, :, pos0:end] = v.transpose(0, 1)
            attn = self._attention(q, self.k_cache[li, :, :end], self.v_cache[li, :, :end], mask)
            x = x + F.linear(attn, L.w_o, L.b_o)

            h = rms_norm(x, L.ffn_norm, eps)
            gate, up = F.linear(h, L.w_gate_up).chunk(2, -1)
            x = x + F.linear(F.silu(gate) * up, L.w_down)
        return x

    def _attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   mask: Optional[torch.Tensor]) -> torch.Tensor:
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
        out = probs @ v                                   # [nk, g * n, d]
        return out.reshape(nk, g, n, d).permute(2, 0, 1, 3).reshape(n, nq * d)
