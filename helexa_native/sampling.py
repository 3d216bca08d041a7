"""Token sampling on the host, in the exact order params.py fixes.

`sample_from_logits` is the reference sampler: the CPU backend uses it and the
CUDA sampler is checked against it. Requests become `SamplingParams` in
request_params.py.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from .params import SampleResult, SamplerState, SamplingParams, uniform


def _ordered_top(values: torch.Tensor, n: int) -> torch.Tensor:
    """Indices of the n largest values, descending, lower index first on ties."""
    vocab = values.numel()
    n = min(n, vocab)
    if n <= 0:
        return torch.empty(0, dtype=torch.long)
    if n < vocab:
        # topk's order among equal values is unspecified: take everything at
        # or above the n-th value, then order it stably ourselves.
        kth = torch.topk(values, n, sorted=False).values.min()
        cand = torch.nonzero(values >= kth).flatten()
    else:
        cand = torch.arange(vocab)
    order = torch.sort(values[cand], descending=True, stable=True).indices
    return cand[order][:n]


def _apply_penalties(logits: torch.Tensor, params: SamplingParams, state: SamplerState) -> torch.Tensor:
    vocab = logits.numel()
    if params.repetition_penalty != 1.0:
        ctx = [t for t in state.prompt_tokens if 0 <= t < vocab]
        ctx += [t for t in state.generated_tokens if 0 <= t < vocab]
        if ctx:
            ids = torch.unique(torch.tensor(ctx, dtype=torch.long))
            sel = logits[ids]
            r = params.repetition_penalty
            logits[ids] = torch.where(sel > 0, sel / r, sel * r)
    if (params.presence_penalty != 0.0 or params.frequency_penalty != 0.0) and state.generated_tokens:
        gen = [t for t in state.generated_tokens if 0 <= t < vocab]
        if gen:
            counts = torch.bincount(torch.tensor(gen, dtype=torch.long), minlength=vocab).to(torch.float32)
            logits -= params.presence_penalty * (counts > 0).to(torch.float32)
            logits -= params.frequency_penalty * counts
    return logits


def _greedy(logits: torch.Tensor) -> int:
    # torch.argmax returns the first maximal index: the lowest id on ties.
    return int(torch.argmax(logits).item())


def _sample(logits: torch.Tensor, params: SamplingParams, step: int) -> int:
    vocab = logits.numel()
    scaled = logits / params.temperature
    # Candidates in the final order (descending, lower id first on ties);
    # with top_k the candidate set is cut to the k best right away.
    k = params.top_k if 0 < params.top_k < vocab else vocab
    cand = _ordered_top(scaled, k)
    vals = scaled[cand]
    probs = torch.softmax(vals, dim=0)
    if not bool(torch.isfinite(probs).all()):
        # Every logit was -inf (or overflowed): nothing to sample from.
        return int(cand[0].item())
    keep = torch.ones_like(probs, dtype=torch.bool)
    if params.top_p < 1.0:
        # Keep the smallest prefix whose mass reaches top_p: token i stays if
        # the mass strictly before it is still short of top_p.
        cum = torch.cumsum(probs, dim=0)
        before = torch.cat([cum.new_zeros(1), cum[:-1]])
        keep &= before < params.top_p
        keep[0] = True
    if params.min_p > 0.0:
        keep &= probs >= params.min_p * probs[0]
        keep[0] = True
    p = probs[keep].to(torch.float64)
    ids = cand[keep]
    p = p / p.sum()
    u = uniform(params.seed, step)
    cum = torch.cumsum(p, dim=0)
    idx = int(torch.searchsorted(cum, torch.tensor([u], dtype=torch.float64), right=True).item())
    # u can exceed the rounded total; zero-probability tail tokens are never picked.
    nz = torch.nonzero(p > 0).flatten()
    last = int(nz[-1].item()) if nz.numel() else 0
    return int(ids[min(idx, last)].item())


LogitBias = Tuple[torch.Tensor, torch.Tensor]
"""A request's logit_bias: token ids (int64 [k]) and the values added to their logits (float32 [k])."""


def make_logit_bias(bias: Optional[dict], vocab_size: int) -> Optional[LogitBias]:
    """`{token id: value}` as a LogitBias (None when empty); ValueError for ids outside the vocabulary."""
    if not bias:
        return None
    ids, vals = [], []
    for t, v in bias.items():
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size:
            raise ValueError(f"logit_bias: token id {t!r} is outside the vocabulary (size {vocab_size})")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
            raise ValueError(f"logit_bias: the bias of token {t} must be a finite number, got {v!r}")
        ids.append(t)
        vals.append(float(v))
    return torch.tensor(ids, dtype=torch.long), torch.tensor(vals, dtype=torch.float32)


def constrain_logits(
    logits: torch.Tensor, allowed: Optional[torch.Tensor] = None, logit_bias: Optional[LogitBias] = None
) -> torch.Tensor:
    """params.py steps 1a-1b in place: add logit_bias, then set tokens `allowed` rules out to -inf.

    logits: [vocab] floats on any device. allowed: an int32 bitmask
    [ceil(vocab/32)] (constraints.GrammarMatcher.fill_mask) or a bool [vocab].
    Returns `logits`.
    """
    if logit_bias is not None:
        ids, vals = logit_bias
        with torch.inference_mode(logits.is_inference()):
            logits.index_add_(0, ids.to(logits.device), vals.to(device=logits.device, dtype=logits.dtype))
    if allowed is not None:
        from .constraints import apply_mask

        apply_mask(logits, allowed)
    return logits


def sample_from_logits(
    logits: torch.Tensor,
    params: SamplingParams,
    state: SamplerState,
    allowed: Optional[torch.Tensor] = None,
    logit_bias: Optional[LogitBias] = None,
) -> SampleResult:
    """Pick the next token from one position's logits, following params.py's order exactly.

    allowed (a structured-output mask) and logit_bias apply to the raw logits
    before the penalties (constrain_logits); logprobs stay those of the raw logits.
    """
    raw = logits.detach().reshape(-1).to(device="cpu", dtype=torch.float32)
    work = raw.clone()
    work = torch.nan_to_num(work, nan=-math.inf, posinf=math.inf, neginf=-math.inf)
    if allowed is not None or logit_bias is not None:
        constrain_logits(work, allowed, logit_bias)
    work = _apply_penalties(work, params, state)
    if params.greedy:
        token = _greedy(work)
    else:
        token = _sample(work, params, state.step)
    if not params.logprobs:
        return SampleResult(token=token)
    lp = torch.log_softmax(torch.nan_to_num(raw, nan=-math.inf, posinf=math.inf, neginf=-math.inf), dim=0)
    top = []
    if params.top_logprobs > 0:
        ids = _ordered_top(lp, params.top_logprobs)
        top = [(int(i), float(lp[i])) for i in ids.tolist()]
    return SampleResult(token=token, logprob=float(lp[token]), top_logprobs=top)
