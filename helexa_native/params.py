"""Sampling parameters and the counter-based random stream shared by all backends.

Sampling order, identical on every backend:
  1. logits (float32) of the last position;
     a. logit_bias (token id -> value) is added to them;
     b. a structured-output mask (constraints.py) sets every token the
        grammar does not allow to -inf;
  2. repetition_penalty r over every token of the context (prompt and
     generated): a positive logit is divided by r, a negative one multiplied;
  3. presence / frequency penalties over generated tokens only:
     logit -= presence * (count > 0) + frequency * count;
  4. temperature == 0 means greedy: argmax, lowest id on ties; stop here;
  5. logits /= temperature;
  6. top_k (0 = off) keeps the k largest;
  7. softmax; top_p keeps the smallest prefix (by descending probability)
     whose mass reaches top_p, never fewer than one token;
  8. min_p keeps tokens with p >= min_p * p_max;
  9. renormalize; candidates ordered by descending probability (lower id
     first on ties); the token is the first whose cumulative mass exceeds
     u = uniform(seed, step), step counting sampled tokens from 0.
Logprobs, when asked, are log_softmax of the raw logits (step 1, before
bias and mask): what the model thought of the token, not what the sampler was
allowed to pick.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

# Seeds, steps and the stream's state are unsigned 64-bit integers.
UINT64_MASK = (1 << 64) - 1


def splitmix64(x: int) -> int:
    """SplitMix64 finalizer on a 64-bit integer."""
    x = (x + 0x9E3779B97F4A7C15) & UINT64_MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & UINT64_MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & UINT64_MASK
    return x ^ (x >> 31)


def uniform(seed: int, step: int) -> float:
    """Uniform in [0, 1) for (seed, step); the CUDA sampler computes the same."""
    x = splitmix64((seed & UINT64_MASK) ^ splitmix64(step & UINT64_MASK))
    return (x >> 11) * (1.0 / (1 << 53))


@dataclass
class SamplingParams:
    """Resolved sampling parameters for one request (request_params.resolve_params builds them)."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int = 0
    logprobs: bool = False
    top_logprobs: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass
class SamplerState:
    """Per-request sampling state the backend reads and advances."""

    prompt_tokens: list = field(default_factory=list)
    generated_tokens: list = field(default_factory=list)
    step: int = 0


@dataclass
class SampleResult:
    """One sampled token, with logprobs when they were asked for."""

    token: int
    logprob: Optional[float] = None
    top_logprobs: Optional[list] = None  # [(token_id, logprob), ...] best first
