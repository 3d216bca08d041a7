"""The collectives a tensor-parallel shard calls, and the in-process group whose ranks are threads.

A shard (shard_model.py) needs two operations from its group:
  - `all_reduce(x)`: the sum of every rank's x, the same tensor on every rank
    (after attn_output and after ffn_down);
  - `gather_columns(x, widths)`: every rank's x concatenated along the last
    dim on rank 0, None elsewhere (the vocabulary slices of the logits).
`InProcessGroup` implements them for ranks that are threads of one process
(the sharded CPU reference); distributed.py implements them over
torch.distributed (gloo) for ranks that are processes. On GPUs the same two
operations are NCCL calls on each device worker's own communicator.

Every collective counts the collectives its rank has entered (`entered`),
so a group that stalls can name the rank that never arrived.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from typing import List, Optional, Sequence

import torch


class CollectiveError(RuntimeError):
    """A collective did not complete; `laggards` names the ranks that never reached it (when known)."""

    def __init__(self, message: str, laggards: Sequence[int] = (), timed_out: bool = False):
        super().__init__(message)
        self.laggards = list(laggards)
        self.timed_out = timed_out


class Collective(ABC):
    """One rank's handle on its tensor-parallel group."""

    rank: int
    world_size: int

    @property
    @abstractmethod
    def entered(self) -> int:
        """Collectives this rank has entered since the group's last reset."""

    @abstractmethod
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of x over every rank (summed in rank order, so every rank gets identical values)."""

    @abstractmethod
    def gather_columns(self, x: torch.Tensor, widths: Sequence[int]) -> Optional[torch.Tensor]:
        """On rank 0, every rank's x ([..., widths[r]]) concatenated along the last dim; None elsewhere."""


class InProcessGroup:
    """A group whose ranks are threads of this process: they meet at a barrier and combine in shared memory.

    A rank that does not reach a collective within `timeout` seconds breaks
    the barrier: every waiting rank raises CollectiveError naming it. `abort`
    breaks it at once (a rank failed for another reason); `reset` makes the
    group usable again between steps.
    """

    def __init__(self, world_size: int, timeout: float):
        if world_size < 1:
            raise ValueError(f"world_size must be positive, got {world_size}")
        self.world_size = int(world_size)
        self.timeout = float(timeout)
        self._barrier = threading.Barrier(self.world_size)
        # Two buffers used alternately: a rank that races ahead into the next
        # collective writes the other buffer while slower ranks still read this one.
        self._bufs: List[list] = [[None] * self.world_size, [None] * self.world_size]
        self.entered = [0] * self.world_size
        self._aborted = False

    def rank(self, r: int) -> "InProcessRank":
        """The Collective handle of rank r."""
        return InProcessRank(self, r)

    def laggards(self) -> List[int]:
        """Ranks that entered the fewest collectives (those holding the others up)."""
        low = min(self.entered)
        return [r for r, n in enumerate(self.entered) if n == low]

    def abort(self) -> None:
        """Break the barrier: every rank waiting in a collective raises CollectiveError."""
        self._aborted = True
        self._barrier.abort()

    def reset(self) -> None:
        """Start a fresh step (no rank may be inside a collective)."""
        self._barrier.reset()
        self.entered = [0] * self.world_size
        self._bufs = [[None] * self.world_size, [None] * self.world_size]
        self._aborted = False

    def exchange(self, rank: int, x: torch.Tensor) -> list:
        """Contribute x and return every rank's contribution, in rank order."""
        k = self.entered[rank]
        self.entered[rank] = k + 1
        buf = self._bufs[k % 2]
        buf[rank] = x
        try:
            self._barrier.wait(self.timeout)
        except threading.BrokenBarrierError:
            if self._aborted:
                raise CollectiveError("the collective was aborted: another rank failed") from None
            late = [r for r in range(self.world_size) if self.entered[r] <= k]
            who = ", ".join(str(r) for r in late) or "?"
            raise CollectiveError(
                f"rank {who} did not reach collective {k + 1} of the step within {self.timeout:g} s",
                late,
                timed_out=True,
            ) from None
        return list(buf)


class InProcessRank(Collective):
    """A thread rank's handle on an InProcessGroup."""

    def __init__(self, group: InProcessGroup, rank: int):
        self.group = group
        self.rank = rank
        self.world_size = group.world_size

    @property
    def entered(self) -> int:
        return self.group.entered[self.rank]

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        parts = self.group.exchange(self.rank, x)
        total = parts[0].clone()
        for p in parts[1:]:
            total += p
        return total

    def gather_columns(self, x: torch.Tensor, widths: Sequence[int]) -> Optional[torch.Tensor]:
        parts = self.group.exchange(self.rank, x)
        return torch.cat(parts, dim=-1) if self.rank == 0 else None
