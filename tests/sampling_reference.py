"""params.py's sampling steps 4-9 read in float64: the reference of the device sampler tests.

A correct float32 sampler may differ from it near a boundary of the
cumulative distribution, so the tests accept any pick between the
reference's picks at u - eps and u + eps (and at nudged top_p / min_p).
"""

from __future__ import annotations

import math

import torch


def clean(x: torch.Tensor) -> torch.Tensor:
    """NaN -> -inf, infinities kept (torch.nan_to_num alone maps them to the largest finite floats)."""
    return torch.nan_to_num(x, nan=-math.inf, posinf=math.inf, neginf=-math.inf)


def ref_window(x, temperature, top_k, top_p, min_p, u_lo, u_hi, dp=0.0, dm=0.0) -> list[int]:
    """The reference's picks for every u in [u_lo, u_hi]: the kept candidates from one pick to the other.

    x: logits after penalties; dp / dm nudge top_p and min_p.
    """
    x = clean(x)
    if temperature == 0:
        return [int(torch.argmax(x))]
    s = x / temperature
    vocab = s.numel()
    order = torch.sort(s, descending=True, stable=True).indices
    k = top_k if 0 < top_k < vocab else vocab
    cand = order[:k]
    vals = s[cand].double()
    if not math.isfinite(float(vals[0])):
        return [int(cand[0])]
    probs = torch.softmax(vals, dim=0)
    keep = torch.ones(k, dtype=torch.bool)
    if top_p < 1.0:
        keep &= (torch.cumsum(probs, 0) - probs) < top_p + dp
    if min_p > 0.0:
        keep &= probs >= min_p * (1.0 + dm) * probs[0]
    keep[0] = True
    p = probs[keep]
    p = p / p.sum()
    cum = torch.cumsum(p, 0)
    last = int(torch.nonzero(p > 0).flatten()[-1])  # u above the rounded total: the last nonzero one
    lo, hi = (
        min(int(torch.searchsorted(cum, torch.tensor([v], dtype=torch.float64), right=True)), last)
        for v in (u_lo, u_hi)
    )
    return [int(t) for t in cand[keep][lo : hi + 1]]


def ref_sample(x, temperature, top_k, top_p, min_p, u, du=0.0, dp=0.0, dm=0.0) -> int:
    """The reference's pick at u + du."""
    return ref_window(x, temperature, top_k, top_p, min_p, u + du, u + du, dp, dm)[0]


def ref_allowed(x, temperature, top_k, top_p, min_p, u, eps) -> set[int]:
    """Every pick of the reference for u within eps, top_p and min_p nudged by eps where they cut."""
    dps = (-eps, 0.0, eps) if top_p < 1.0 else (0.0,)
    dms = (-eps, 0.0, eps) if min_p > 0.0 else (0.0,)
    out: set[int] = set()
    for dp in dps:
        for dm in dms:
            out.update(ref_window(x, temperature, top_k, top_p, min_p, u - eps, u + eps, dp, dm))
    return out
