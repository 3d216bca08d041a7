"""Token sampling on the host, in the exact order params.py fixes, and request validation.

`sample_from_logits` is the reference sampler: the CPU backend uses it and the
CUDA sampler is checked against it. `resolve_params` turns a request (a dict
of OpenAI-style fields) plus the model's generation_config into validated
`SamplingParams` and the request's limits.
"""
from __future__ import annotations

import math
import secrets
from typing import Optional

import torch

from . import defaults
from .params import SampleResult, SamplerState, SamplingParams, uniform

_MASK64 = (1 << 64) - 1


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


def sample_from_logits(logits: torch.Tensor, params: SamplingParams, state: SamplerState) -> SampleResult:
    """Pick the next token from one position's logits, following params.py's order exactly."""
    raw = logits.detach().reshape(-1).to(device="cpu", dtype=torch.float32)
    work = raw.clone()
    work = torch.nan_to_num(work, nan=-math.inf, posinf=math.inf, neginf=-math.inf)
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


# ---------------------------------------------------------------------------
# Request resolution and validation

SAMPLING_FIELDS = ("max_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty",
                   "presence_penalty", "frequency_penalty", "seed", "stop", "stop_token_ids",
                   "logprobs", "top_logprobs", "ignore_eos")


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(name: str, v) -> float:
    if not _is_number(v):
        raise ValueError(f"{name} must be a number, got {type(v).__name__}")
    f = float(v)
    if not math.isfinite(f):
        raise ValueError(f"{name} must be finite, got {v!r}")
    return f


def _integer(name: str, v) -> int:
    if not _is_int(v):
        raise ValueError(f"{name} must be an integer, got {type(v).__name__}")
    return int(v)


def _check_temperature(v, name="temperature") -> float:
    f = _number(name, v)
    if f < 0:
        raise ValueError(f"{name} must be >= 0, got {v!r}")
    return f


def _check_top_p(v, name="top_p") -> float:
    f = _number(name, v)
    if not 0.0 < f <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {v!r}")
    return f


def _check_top_k(v, name="top_k") -> int:
    i = _integer(name, v)
    if i < 0:
        raise ValueError(f"{name} must be >= 0 (0 disables it), got {v!r}")
    return i


def _check_min_p(v, name="min_p") -> float:
    f = _number(name, v)
    if not 0.0 <= f <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {v!r}")
    return f


def _check_repetition(v, name="repetition_penalty") -> float:
    f = _number(name, v)
    if f <= 0:
        raise ValueError(f"{name} must be > 0, got {v!r}")
    return f


def _check_penalty(v, name) -> float:
    f = _number(name, v)
    if not -2.0 <= f <= 2.0:
        raise ValueError(f"{name} must be in [-2, 2], got {v!r}")
    return f


def _check_max_tokens(v, name="max_tokens") -> int:
    i = _integer(name, v)
    if i < 0:
        raise ValueError(f"{name} must be >= 0, got {v!r}")
    return i


def _token_id_list(name: str, v) -> list:
    if _is_int(v):
        v = [v]
    if not isinstance(v, (list, tuple)):
        raise ValueError(f"{name} must be a list of token ids, got {type(v).__name__}")
    out = []
    for t in v:
        if not _is_int(t) or t < 0:
            raise ValueError(f"{name} must hold non-negative integers, got {t!r}")
        out.append(int(t))
    return out


def _stop_strings(v) -> list:
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, (list, tuple)):
        raise ValueError(f"stop must be a string or a list of strings, got {type(v).__name__}")
    out = []
    for s in v:
        if not isinstance(s, str):
            raise ValueError(f"stop must hold strings, got {type(s).__name__}")
        # An empty stop string would end every generation before it starts.
        if s and s not in out:
            out.append(s)
    return out


_GENCONFIG_CHECKS = {
    "temperature": _check_temperature,
    "top_k": _check_top_k,
    "top_p": _check_top_p,
    "min_p": _check_min_p,
    "repetition_penalty": _check_repetition,
}


def _from_generation_config(gc: dict) -> dict:
    """The model's own defaults; a value the model ships malformed is skipped, not fatal."""
    out = {}
    for key, check in _GENCONFIG_CHECKS.items():
        if gc.get(key) is None:
            continue
        try:
            out[key] = check(gc[key])
        except ValueError:
            pass
    mnt = gc.get("max_new_tokens")
    if _is_int(mnt) and mnt > 0:
        out["max_tokens"] = int(mnt)
    eos = gc.get("eos_token_id", gc.get("eos"))
    if eos is not None:
        try:
            out["eos"] = _token_id_list("eos_token_id", eos)
        except ValueError:
            pass
    return out


def new_seed() -> int:
    """A fresh random seed for a request that named none."""
    return secrets.randbits(63)


def resolve_params(request: dict, generation_config: Optional[dict] = None):
    """Validate a request: returns (SamplingParams, max_tokens, stop_strings, stop_token_ids).

    Precedence: request > the model's generation_config > defaults.py. A key
    whose value is None counts as absent. stop_token_ids holds the request's
    ids plus the model's EOS ids (unless ignore_eos).
    """
    req = {k: v for k, v in (request or {}).items() if v is not None}
    gc = _from_generation_config(generation_config or {})

    def pick(key, check, default):
        if key in req:
            return check(req[key])
        return gc.get(key, default)

    temperature = pick("temperature", _check_temperature, defaults.DEFAULT_TEMPERATURE)
    top_k = pick("top_k", _check_top_k, defaults.DEFAULT_TOP_K)
    top_p = pick("top_p", _check_top_p, defaults.DEFAULT_TOP_P)
    min_p = pick("min_p", _check_min_p, defaults.DEFAULT_MIN_P)
    rep = pick("repetition_penalty", _check_repetition, defaults.DEFAULT_REPETITION_PENALTY)
    presence = (_check_penalty(req["presence_penalty"], "presence_penalty")
                if "presence_penalty" in req else defaults.DEFAULT_PRESENCE_PENALTY)
    frequency = (_check_penalty(req["frequency_penalty"], "frequency_penalty")
                 if "frequency_penalty" in req else defaults.DEFAULT_FREQUENCY_PENALTY)

    if "max_tokens" in req:
        max_tokens = _check_max_tokens(req["max_tokens"])
    elif "max_completion_tokens" in req:
        max_tokens = _check_max_tokens(req["max_completion_tokens"], "max_completion_tokens")
    else:
        max_tokens = gc.get("max_tokens", defaults.DEFAULT_MAX_TOKENS)

    if "seed" in req:
        seed = _integer("seed", req["seed"]) & _MASK64
    else:
        seed = new_seed()

    # logprobs: a bool (chat API) or an int n meaning "with n alternatives"
    # (legacy completions API).
    logprobs = False
    top_logprobs = 0
    if "logprobs" in req:
        v = req["logprobs"]
        if isinstance(v, bool):
            logprobs = v
        elif _is_int(v):
            if not 0 <= v <= defaults.MAX_TOP_LOGPROBS:
                raise ValueError(f"logprobs must be in [0, {defaults.MAX_TOP_LOGPROBS}], got {v!r}")
            logprobs, top_logprobs = True, int(v)
        else:
            raise ValueError(f"logprobs must be a boolean or an integer, got {type(v).__name__}")
    if "top_logprobs" in req:
        n = _integer("top_logprobs", req["top_logprobs"])
        if not 0 <= n <= defaults.MAX_TOP_LOGPROBS:
            raise ValueError(f"top_logprobs must be in [0, {defaults.MAX_TOP_LOGPROBS}], got {n!r}")
        top_logprobs = n
        if n > 0:
            logprobs = True

    stop = _stop_strings(req["stop"]) if "stop" in req else []
    stop_ids = _token_id_list("stop_token_ids", req["stop_token_ids"]) if "stop_token_ids" in req else []
    ignore_eos = req.get("ignore_eos", False)
    if not isinstance(ignore_eos, bool):
        raise ValueError(f"ignore_eos must be a boolean, got {type(ignore_eos).__name__}")
    if not ignore_eos:
        for t in gc.get("eos", []):
            if t not in stop_ids:
                stop_ids.append(t)

    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                            repetition_penalty=rep, presence_penalty=presence,
                            frequency_penalty=frequency, seed=seed, logprobs=logprobs,
                            top_logprobs=top_logprobs)
    return params, max_tokens, stop, stop_ids
