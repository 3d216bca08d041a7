"""The host sampler against hand computations and a plain-Python reading of params.py."""

import math
import random

import pytest
import torch

from helexa_native.params import SamplerState, SamplingParams, uniform
from helexa_native.sampling import sample_from_logits


def ref_sample(logits, p: SamplingParams, st: SamplerState):
    """params.py's order, written out in plain Python floats."""
    x = list(map(float, logits))
    if p.repetition_penalty != 1.0:
        for t in set(st.prompt_tokens) | set(st.generated_tokens):
            x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
    for t in set(st.generated_tokens):
        c = st.generated_tokens.count(t)
        x[t] -= p.presence_penalty + p.frequency_penalty * c
    if p.temperature == 0:
        m = max(x)
        return min(i for i, v in enumerate(x) if v == m)
    x = [v / p.temperature for v in x]
    order = sorted(range(len(x)), key=lambda i: (-x[i], i))
    if p.top_k:
        order = order[: p.top_k]
    mx = max(x[i] for i in order)
    e = {i: math.exp(x[i] - mx) for i in order}
    z = sum(e.values())
    pr = {i: e[i] / z for i in order}
    kept, mass = [], 0.0
    for i in order:
        if kept and mass >= p.top_p:
            break
        kept.append(i)
        mass += pr[i]
    pmax = pr[order[0]]
    kept = [i for j, i in enumerate(kept) if j == 0 or pr[i] >= p.min_p * pmax]
    z = sum(pr[i] for i in kept)
    u = uniform(p.seed, st.step)
    c = 0.0
    for i in kept:
        c += pr[i] / z
        if c > u:
            return i
    return kept[-1]


def logits_of(vals):
    return torch.tensor(vals, dtype=torch.float32)


def test_greedy_argmax_lowest_id_on_ties():
    p = SamplingParams(temperature=0.0)
    assert sample_from_logits(logits_of([0.1, 3.0, -1.0, 3.0]), p, SamplerState()).token == 1
    assert sample_from_logits(logits_of([5.0, 5.0, 5.0]), p, SamplerState()).token == 0


def test_repetition_penalty_divides_positive_multiplies_negative():
    p = SamplingParams(temperature=0.0, repetition_penalty=2.0)
    # Token 0 (3.0 -> 1.5) was in the prompt, token 2 (2.0) was not: 2 wins.
    st = SamplerState(prompt_tokens=[0])
    assert sample_from_logits(logits_of([3.0, -5.0, 2.0]), p, st).token == 2
    # Negative logits get multiplied: -1 -> -2 is worse than -1.5.
    st = SamplerState(prompt_tokens=[0], generated_tokens=[])
    assert sample_from_logits(logits_of([-1.0, -1.5]), p, st).token == 1
    # Repeated occurrences in the context count once: 3.0 -> 1.5, not 0.375.
    st = SamplerState(prompt_tokens=[0, 0, 0])
    assert sample_from_logits(logits_of([3.0, 1.4]), p, st).token == 0


def test_presence_and_frequency_only_over_generated_tokens():
    p = SamplingParams(temperature=0.0, presence_penalty=0.5, frequency_penalty=0.4)
    # Token 0 generated twice: 3.0 - 0.5 - 0.8 = 1.7 < 1.8.
    st = SamplerState(prompt_tokens=[1], generated_tokens=[0, 0])
    assert sample_from_logits(logits_of([3.0, 1.8]), p, st).token == 1
    st = SamplerState(prompt_tokens=[1], generated_tokens=[0, 0])
    assert sample_from_logits(logits_of([3.0, 1.6]), p, st).token == 0
    # Prompt tokens are not penalized by presence/frequency.
    st = SamplerState(prompt_tokens=[0, 0, 0], generated_tokens=[])
    assert sample_from_logits(logits_of([3.0, 2.9]), p, st).token == 0
    # Negative penalties encourage repetition.
    p2 = SamplingParams(temperature=0.0, presence_penalty=-1.0)
    st = SamplerState(generated_tokens=[1])
    assert sample_from_logits(logits_of([3.0, 2.5]), p2, st).token == 1


def _inverse_cdf_token(probs_desc_ids, probs, u):
    c = 0.0
    for i in probs_desc_ids:
        c += probs[i]
        if c > u:
            return i
    return probs_desc_ids[-1]


def test_temperature_and_inverse_cdf_by_hand():
    logits = [math.log(0.5), math.log(0.3), math.log(0.2)]
    for seed in range(20):
        p = SamplingParams(temperature=1.0, seed=seed)
        u = uniform(seed, 0)
        want = 0 if u < 0.5 else (1 if u < 0.8 else 2)
        assert sample_from_logits(logits_of(logits), p, SamplerState()).token == want
    # temperature 0.5 squares the probabilities: 25/38, 9/38, 4/38.
    for seed in range(20):
        p = SamplingParams(temperature=0.5, seed=seed)
        u = uniform(seed, 3)
        want = 0 if u < 25 / 38 else (1 if u < 34 / 38 else 2)
        assert sample_from_logits(logits_of(logits), p, SamplerState(step=3)).token == want


def test_top_k_keeps_k_best():
    logits = logits_of([1.0, 4.0, 3.0, 2.0])
    for seed in range(50):
        t = sample_from_logits(logits, SamplingParams(top_k=2, seed=seed), SamplerState()).token
        assert t in (1, 2)
        u = uniform(seed, 0)
        want = 1 if u < math.e / (math.e + 1) else 2
        assert t == want
    # top_k=1 is greedy whatever the seed.
    assert all(
        sample_from_logits(logits, SamplingParams(top_k=1, seed=s), SamplerState()).token == 1 for s in range(20)
    )


def test_top_k_ties_at_the_boundary_prefer_lower_ids():
    logits = logits_of([0.0, 1.0, 1.0, 1.0])
    seen = {sample_from_logits(logits, SamplingParams(top_k=2, seed=s), SamplerState()).token for s in range(60)}
    assert seen == {1, 2}


def test_top_p_smallest_prefix_reaching_mass():
    probs = [0.5, 0.3, 0.15, 0.05]
    logits = logits_of([math.log(v) for v in probs])
    # {0, 1} is the smallest prefix reaching 0.79 -> renormalized 0.625 / 0.375
    # (0.79 rather than 0.8 keeps the test off a float32 rounding edge).
    for seed in range(60):
        t = sample_from_logits(logits, SamplingParams(top_p=0.79, seed=seed), SamplerState()).token
        u = uniform(seed, 0)
        assert t == (0 if u < 0.625 else 1)
    # A top_p below the best token's mass still keeps that one token.
    assert {sample_from_logits(logits, SamplingParams(top_p=0.1, seed=s), SamplerState()).token for s in range(30)} == {
        0
    }


def test_top_p_reached_exactly_stops_there():
    logits = logits_of([2.0, 1.0, 0.5])
    p0 = float(torch.softmax(logits, 0)[0])
    # {0} already holds mass p0 == top_p: it is the smallest prefix, alone.
    assert {sample_from_logits(logits, SamplingParams(top_p=p0, seed=s), SamplerState()).token for s in range(40)} == {
        0
    }


def test_min_p_relative_to_max():
    probs = [0.5, 0.3, 0.15, 0.05]
    logits = logits_of([math.log(v) for v in probs])
    # min_p 0.35: threshold 0.175 keeps tokens 0 and 1.
    for seed in range(60):
        t = sample_from_logits(logits, SamplingParams(min_p=0.35, seed=seed), SamplerState()).token
        assert t == (0 if uniform(seed, 0) < 0.625 else 1)


def test_against_plain_python_reference_random():
    rng = random.Random(1234)
    for trial in range(150):
        vocab = rng.choice([2, 5, 17, 64])
        vals = [round(rng.uniform(-4, 4), 1) for _ in range(vocab)]  # rounding makes ties
        p = SamplingParams(
            temperature=rng.choice([0.0, 0.3, 0.7, 1.0, 1.6]),
            top_k=rng.choice([0, 0, 1, 3, 10]),
            top_p=rng.choice([1.0, 0.9, 0.5, 0.2]),
            min_p=rng.choice([0.0, 0.0, 0.05, 0.3]),
            repetition_penalty=rng.choice([1.0, 1.3, 0.8]),
            presence_penalty=rng.choice([0.0, 0.5, -0.5]),
            frequency_penalty=rng.choice([0.0, 0.3]),
            seed=rng.randrange(1 << 63),
        )
        st = SamplerState(
            prompt_tokens=[rng.randrange(vocab) for _ in range(rng.randrange(4))],
            generated_tokens=[rng.randrange(vocab) for _ in range(rng.randrange(6))],
            step=rng.randrange(100),
        )
        got = sample_from_logits(logits_of(vals), p, st).token
        assert got == ref_sample(vals, p, st), (trial, vals, p, st)


def test_sampling_distribution_matches_probabilities():
    probs = torch.tensor([0.6, 0.25, 0.1, 0.05])
    logits = probs.log()
    n = 4000
    counts = torch.zeros(4)
    st = SamplerState()
    p = SamplingParams(seed=7)
    for step in range(n):
        st.step = step
        counts[sample_from_logits(logits, p, st).token] += 1
    freq = counts / n
    assert torch.allclose(freq, probs, atol=0.03), freq


def test_seed_reproducible_and_seed_dependent():
    logits = torch.randn(1000)

    def run(seed):
        st = SamplerState()
        out = []
        for step in range(30):
            st.step = step
            out.append(sample_from_logits(logits, SamplingParams(seed=seed), st).token)
        return out

    assert run(42) == run(42)
    assert run(42) != run(43)


def test_logprobs_are_raw_log_softmax_with_top_n():
    raw = logits_of([1.0, 3.0, 2.0, 3.0])
    p = SamplingParams(temperature=0.0, repetition_penalty=5.0, logprobs=True, top_logprobs=3)
    st = SamplerState(prompt_tokens=[1, 3])
    r = sample_from_logits(raw, p, st)
    assert r.token == 2  # penalties change the choice ...
    z = math.log(sum(math.exp(v) for v in [1.0, 3.0, 2.0, 3.0]))
    assert r.logprob == pytest.approx(2.0 - z, abs=1e-6)  # ... not the logprobs
    assert [t for t, _ in r.top_logprobs] == [1, 3, 2]  # ties: lower id first
    assert [lp for _, lp in r.top_logprobs] == pytest.approx([3.0 - z, 3.0 - z, 2.0 - z], abs=1e-6)
    r0 = sample_from_logits(raw, SamplingParams(temperature=0.0), SamplerState())
    assert r0.logprob is None and r0.top_logprobs is None


def test_masked_and_nan_logits_are_never_picked():
    logits = logits_of([float("-inf"), 1.0, float("nan"), 0.5, float("-inf")])
    for seed in range(40):
        t = sample_from_logits(logits, SamplingParams(seed=seed), SamplerState()).token
        assert t in (1, 3)
    assert sample_from_logits(logits, SamplingParams(temperature=0.0), SamplerState()).token == 1


# ---------------------------------------------------------------- masks and logit_bias (steps 1a-1b)


def _bitmask(allowed, vocab):
    words = torch.zeros((vocab + 31) // 32, dtype=torch.int64)
    for t in allowed:
        words[t // 32] |= 1 << (t % 32)
    return ((words + 2**31) % 2**32 - 2**31).to(torch.int32)


@pytest.mark.parametrize("temperature", [0.0, 0.8, 1.5])
def test_mask_limits_every_pick(temperature):
    vocab = 100
    allowed = [3, 40, 77, 99]
    g = torch.Generator().manual_seed(5)
    for step in range(40):
        logits = torch.randn(vocab, generator=g) * 3
        p = SamplingParams(temperature=temperature, seed=11)
        res = sample_from_logits(logits, p, SamplerState(step=step), allowed=_bitmask(allowed, vocab))
        assert res.token in allowed
        masked = logits.clone()
        keep = torch.zeros(vocab, dtype=torch.bool)
        keep[allowed] = True
        masked[~keep] = float("-inf")
        assert res.token == sample_from_logits(masked, p, SamplerState(step=step)).token


def test_logit_bias_before_penalties_and_logprobs_stay_raw():
    from helexa_native.sampling import make_logit_bias

    logits = logits_of([2.0, 1.0, 0.5, -1.0])
    bias = make_logit_bias({2: 5.0}, 4)
    p = SamplingParams(temperature=0.0, repetition_penalty=2.0, logprobs=True)
    # Bias first (0.5 + 5 = 5.5), then the penalty halves it (2.75), still above 2.0.
    res = sample_from_logits(logits, p, SamplerState(prompt_tokens=[2]), logit_bias=bias)
    assert res.token == 2
    assert res.logprob == pytest.approx(float(torch.log_softmax(logits, 0)[2]))
    # The same bias on a token the penalty hits harder loses: (0.5 - 3) * 2 = -5 < 2.
    res = sample_from_logits(logits, p, SamplerState(prompt_tokens=[2]), logit_bias=make_logit_bias({2: -3.0}, 4))
    assert res.token == 0


def test_make_logit_bias_checks_ids():
    from helexa_native.sampling import make_logit_bias

    assert make_logit_bias({}, 10) is None
    ids, vals = make_logit_bias({1: 2, 7: -1.5}, 10)
    assert ids.tolist() == [1, 7] and vals.tolist() == [2.0, -1.5]
    with pytest.raises(ValueError):
        make_logit_bias({10: 1}, 10)
    with pytest.raises(ValueError):
        make_logit_bias({1: float("nan")}, 10)
