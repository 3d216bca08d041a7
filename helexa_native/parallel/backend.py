"""The sharded CPU reference: N tensor-parallel ranks as threads of one process, behind the Backend contract.

Each rank is a ShardModel holding its slice of the weights; the ranks run
every step together, rank 0 on the caller's thread and the others on one
thread each (as GPU ranks on one host are the device workers' threads), and
meet in an InProcessGroup to add their partial sums and gather the logits.
Sampling runs once, on rank 0's full logits, with the same host sampler as
the CPU backend, so a sharded model samples from the same distribution as
the unsplit one.

Watchdog: a rank that does not reach a collective within `step_timeout`
seconds breaks the group's barrier; a step that outlives it (rank 0 itself
stuck) is caught by a StepWatchdog thread. Either way the backend is failed
for good with a DeviceError naming the late rank, is_healthy() turns
False, the weights are dropped, and every later call raises that error: a
new backend (an Engine reload) starts clean.
"""

from __future__ import annotations

from abc import abstractmethod
from concurrent.futures import ThreadPoolExecutor, wait
from typing import List, Optional

import torch

from .. import defaults
from ..backends.base import HostSampledBackend, check_positive_ints
from ..backends.cpu import DEFAULT_CPU_POOL_CONTEXTS, pool_blocks
from ..config import ModelSource
from ..errors import DeviceError, EngineClosedError
from ..kv_blocks import DEFAULT_BLOCK_SIZE, KVBlockManager
from .collective import CollectiveError, InProcessGroup
from .launch import check_step_timeout
from .shard_model import ShardModel
from .sharding import shard_plan
from .watchdog import StepWatchdog


def kv_bytes_per_position(plan, dtype: torch.dtype) -> int:
    """KV bytes one position takes on the rank holding the most kv heads."""
    cfg = plan.config
    heads = max(b - a for a, b in plan.kv_heads)
    return 2 * cfg.num_layers * heads * cfg.head_dim * torch.finfo(dtype).bits // 8


class ShardedBackend(HostSampledBackend):
    """step_batch and forward_paged over `_run`, one step on every rank; sampling on rank 0's full logits."""

    @abstractmethod
    def _run(self, batch: list, all_logits: bool) -> list:
        """One step of (ids, start_pos, block_table) sequences on every rank: rank 0's logits per sequence."""

    @abstractmethod
    def _live(self) -> ShardModel:
        """This process's rank-0 shard (for checking inputs); raises once closed or failed."""


class ShardedCPUBackend(ShardedBackend):
    """The reference forward split over `tensor_parallel` thread ranks (see the module docstring).

    kv_cache_memory is each rank's budget for its own kv heads. The weights
    are copied out of `source` at construction.
    """

    device = "cpu"

    def __init__(
        self,
        source: ModelSource,
        n_ctx: int,
        tensor_parallel: int = 2,
        dtype: torch.dtype = torch.float32,
        progress: Optional[bool] = None,
        max_num_seqs: int = defaults.DEFAULT_MAX_NUM_SEQS,
        kv_cache_memory: Optional[int] = None,
        block_size: int = DEFAULT_BLOCK_SIZE,
        prefix_cache: bool = True,
        step_timeout: float = defaults.DEFAULT_STEP_TIMEOUT,
    ):
        cfg = source.config
        check_positive_ints(max_num_seqs=max_num_seqs, block_size=block_size, max_context=n_ctx)
        self.step_timeout = check_step_timeout(step_timeout)
        self.plan = shard_plan(cfg, tensor_parallel)
        self.plan.check(source.tensors)
        self.tensor_parallel = self.plan.world_size
        blocks = pool_blocks(
            n_ctx,
            block_size,
            kv_bytes_per_position(self.plan, dtype),
            kv_cache_memory,
            DEFAULT_CPU_POOL_CONTEXTS * n_ctx,
        )
        self.group = InProcessGroup(self.tensor_parallel, self.step_timeout)
        self.shards: Optional[List[ShardModel]] = [
            ShardModel(
                source,
                self.plan,
                r,
                self.group.rank(r),
                n_ctx,
                dtype=dtype,
                progress=progress,
                num_blocks=blocks,
                block_size=block_size,
            )
            for r in range(self.tensor_parallel)
        ]
        self.config = cfg
        self.n_ctx = self.shards[0].max_context
        self.max_num_seqs = max_num_seqs
        self.blocks = KVBlockManager(blocks, block_size, prefix_cache=prefix_cache)
        self._failure: Optional[DeviceError] = None
        self._steps = 0
        self._ranks = ThreadPoolExecutor(max(1, self.tensor_parallel - 1), thread_name_prefix="hx-tp-rank")
        self._watchdog = StepWatchdog(self.step_timeout, self._overrun, name="hx-tp-watchdog")

    # ------------------------------------------------------------------ steps

    def _run(self, batch: list, all_logits: bool) -> list:
        """One step on every rank; rank 0's logits per sequence."""
        shards = self._live_shards()
        self.group.reset()
        self._steps += 1
        self._watchdog.begin(self._steps)
        try:
            others = [
                self._ranks.submit(self._rank_forward, shards[r], batch, all_logits) for r in range(1, len(shards))
            ]
            try:
                out = self._rank_forward(shards[0], batch, all_logits)
            except CollectiveError as e:
                raise self._collective_failed(e, others) from e
            wait(others)
            for f in others:
                f.result()
            return out
        finally:
            self._watchdog.end()
            if self._failure is not None:
                self._drop()

    def _rank_forward(self, shard: ShardModel, batch: list, all_logits: bool):
        try:
            return shard.forward_batch(batch, all_logits=all_logits)
        except CollectiveError:
            raise
        except BaseException:
            # The others would wait for this rank until the timeout: release them now.
            self.group.abort()
            raise

    def _collective_failed(self, e: CollectiveError, others: list) -> BaseException:
        if self._failure is not None:
            return self._failure
        if e.timed_out:
            return self._fail(f"{e}; the tensor-parallel model is failed (reload it)")
        # Another rank raised: its own error is the one to report.
        wait(others, timeout=self.step_timeout)
        for f in others:
            if f.done() and f.exception() is not None and not isinstance(f.exception(), CollectiveError):
                return f.exception()
        return e

    def _overrun(self, step: int, seconds: float) -> None:
        late = ", ".join(str(r) for r in self.group.laggards())
        self._fail(
            f"tensor-parallel step {step} did not finish within {self.step_timeout:g} s: rank {late} "
            "is behind; the model is failed (reload it)"
        )

    def _fail(self, message: str) -> DeviceError:
        if self._failure is None:
            self._failure = DeviceError(message)
            self.group.abort()
        return self._failure

    def _drop(self) -> None:
        # Threads stuck in a hung rank keep their own references; the rest goes now.
        self.shards = None

    # ------------------------------------------------------------------ facts

    def is_healthy(self) -> bool:
        """False once a rank missed the step limit (or the backend was closed)."""
        return self._failure is None and self.shards is not None

    def memory_info(self) -> dict:
        """Bytes of weights and KV pool summed over the ranks, and the pool's blocks."""
        shards = self.shards
        if shards is None:
            return {}
        weights = sum(s.weight_bytes() for s in shards)
        kv = sum(2 * s.k_pool.numel() * s.k_pool.element_size() for s in shards)
        out = {"device": "cpu", "tensor_parallel": self.tensor_parallel, "weights_bytes": weights, "kv_cache_bytes": kv}
        out.update(self.blocks.stats())
        return out

    def close(self) -> None:
        """Drop every rank's weights and cache and stop the rank threads."""
        self.shards = None
        self._watchdog.close()
        self._ranks.shutdown(wait=False, cancel_futures=True)

    def _live(self) -> ShardModel:
        return self._live_shards()[0]

    def _live_shards(self) -> List[ShardModel]:
        if self._failure is not None:
            raise self._failure
        shards = self.shards
        if shards is None:
            raise EngineClosedError("the sharded CPU backend was closed")
        return shards
