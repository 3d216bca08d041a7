"""The interface every compute backend implements; the Engine uses only this."""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Sequence

import torch

from ..config import ModelConfig
from ..params import SampleResult, SamplerState, SamplingParams


class Backend(ABC):
    """A loaded model on one device with a KV cache of `n_ctx` positions."""

    config: ModelConfig
    n_ctx: int
    device: str

    @abstractmethod
    def reset(self) -> None:
        """Forget the KV cache contents (the allocation stays)."""

    @abstractmethod
    def forward(self, tokens: Sequence[int], start_pos: int, all_logits: bool = False) -> torch.Tensor:
        """Run tokens at positions start_pos.., append to the KV cache, return float32 CPU logits.

        Returns [vocab] for the last position, or [len(tokens), vocab] with all_logits.
        """

    def step(self, tokens: Sequence[int], start_pos: int, params: SamplingParams,
             state: SamplerState) -> SampleResult:
        """Forward `tokens` and sample the next token (state.step advances by the caller)."""
        from ..sampling import sample_from_logits
        logits = self.forward(tokens, start_pos)
        return sample_from_logits(logits, params, state)

    def is_healthy(self) -> bool:
        """False once the device behind it is poisoned."""
        return True

    def memory_info(self) -> dict:
        """Device memory facts for `info` and metrics (may be empty)."""
        return {}

    @abstractmethod
    def close(self) -> None:
        """Free the model and its cache."""
