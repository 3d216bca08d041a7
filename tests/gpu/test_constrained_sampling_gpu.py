"""Structured-output masks and logit_bias on CUDA logits, sampled by the device sampler, against the CPU path.

The CPU backend samples with sampling.sample_from_logits(allowed=...,
logit_bias=...); a GPU backend applies the same sampling.constrain_logits
to the device logits and then runs its sampler (torch.ops.helexa.sample).
On the same logits both must pick the same tokens (up to float32 near-ties
at the sampling cut-offs, as in test_kernels.py), and never a masked one.
"""

from __future__ import annotations

import math

import pytest
import torch

from helexa_native.constraints import unpack_mask
from helexa_native.params import SamplerState, SamplingParams
from helexa_native.sampling import constrain_logits, make_logit_bias, sample_from_logits

pytestmark = pytest.mark.gpu

DEV = "cuda"


@pytest.fixture(scope="module")
def ops():
    import helexa_native._C  # noqa: F401  (registers torch.ops.helexa)

    return torch.ops.helexa


def _device_params(ops, p: SamplingParams):
    signed = p.seed - (1 << 64) if p.seed >= (1 << 63) else p.seed
    return ops.sampling_params_device(
        p.temperature,
        p.top_k,
        p.top_p,
        p.min_p,
        p.repetition_penalty,
        p.presence_penalty,
        p.frequency_penalty,
        signed,
        torch.device(DEV),
    )


def _random_mask(vocab, density, gen):
    allowed = torch.rand(vocab, generator=gen) < density
    allowed[int(torch.randint(0, vocab, (1,), generator=gen))] = True
    padded = torch.zeros(((vocab + 31) // 32) * 32, dtype=torch.bool)
    padded[:vocab] = allowed
    bits = padded.reshape(-1, 32).to(torch.int64) << torch.arange(32, dtype=torch.int64)
    words = bits.sum(dim=1)
    return ((words + 2**31) % 2**32 - 2**31).to(torch.int32), allowed


@pytest.mark.parametrize("vocab", [1000, 49152, 151936])
@pytest.mark.parametrize("density", [0.001, 0.05, 0.9])
@pytest.mark.parametrize("cfg", [(0.0, 0, 1.0, 0.0), (1.0, 0, 1.0, 0.0), (0.7, 40, 0.95, 0.0), (1.2, 0, 0.9, 0.05)])
def test_masked_device_sampling_matches_cpu(ops, vocab, density, cfg):
    temperature, top_k, top_p, min_p = cfg
    gen = torch.Generator().manual_seed(vocab * 7 + int(density * 1000))
    logits = torch.randn(vocab, generator=gen) * 3
    mask, allowed = _random_mask(vocab, density, gen)
    assert torch.equal(unpack_mask(mask, vocab), allowed)
    ids = torch.randint(0, vocab, (8,), generator=gen).unique()
    bias = make_logit_bias({int(t): float(v) for t, v in zip(ids, torch.linspace(-50, 50, ids.numel()))}, vocab)
    p = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, seed=1234 + vocab)
    step_t = torch.zeros(1, dtype=torch.int32, device=DEV)
    out = torch.full((1,), -7, dtype=torch.int32, device=DEV)
    device_logits = constrain_logits(logits.to(DEV), mask, bias)
    assert torch.equal(torch.isfinite(device_logits).cpu(), allowed)
    params = _device_params(ops, p)
    differ = 0
    steps = 16
    for step in range(steps):
        step_t.fill_(step)
        ops.sample(device_logits, params, step_t, out)
        got = int(out)
        assert allowed[got], f"step {step}: the device picked masked token {got}"
        want = sample_from_logits(logits, p, SamplerState(step=step), allowed=mask, logit_bias=bias).token
        differ += got != want
    if temperature == 0.0:
        assert differ == 0
    else:
        assert differ <= steps // 4, f"{differ} of {steps} picks differed from the CPU sampler"


def test_bias_alone_on_device_equals_cpu_greedy(ops):
    vocab = 32000
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(vocab, generator=gen)
    top = int(torch.argmax(logits))
    bias = make_logit_bias({top: -100.0, 17: 100.0}, vocab)
    p = SamplingParams(temperature=0.0)
    out = torch.full((1,), -7, dtype=torch.int32, device=DEV)
    ops.sample(
        constrain_logits(logits.to(DEV), None, bias),
        _device_params(ops, p),
        torch.zeros(1, dtype=torch.int32, device=DEV),
        out,
    )
    assert int(out) == 17 == sample_from_logits(logits, p, SamplerState(), logit_bias=bias).token
    assert not math.isnan(float(logits[17]))
