"""Tensor parallelism over the GPUs of one process: one device worker per GPU, each running its rank's GpuModel.

    Engine(model, device="cuda", tensor_parallel=N)   # cuda:0 .. cuda:N-1
    Engine(model, devices=[2, 3])                     # these GPUs, ranks in this order

Each rank is a device worker (its own thread, context, streams and NCCL
communicator, all created on that thread); the workers' communicators form
one NCCL group (never NVLink multicast: NCCL_NVLS_ENABLE=0 is set before the
first communicator). `ShardedCUDABackend` is a CUDABackend whose model is
the group (`_RankGroup`): every step is queued on every rank's worker, under
one process-wide lock so that workers shared by two backends see their jobs
in one order, before any is waited on; rank 0 samples and its tokens are the
step's (gpu_shard.py). The scheduler and the KV block manager are the
single-GPU ones: one block table per sequence, each rank's pool holding its
own kv heads in the same blocks.

All-reduces of at most `peer_max_bytes` (decode steps) go through the
one-shot peer-memory kernel when every pair of the group's GPUs can map the
other's memory; larger ones, and all of them without peer access, through
NCCL. tensor_parallel=1 runs the same sharded path over a group of one.

Watchdog: a StepWatchdog thread watches each step. When one outlives
step_timeout it sets every rank's abort word (the peer kernel's waits and
the test hook's hang give up) and aborts every rank's communicator
(ncclCommAbort from the watchdog's thread, since the workers are stuck in the
step), and names the late rank: one that raised, one whose job never
started, one that entered fewer peer all-reduces than the others, else the
ranks that had not finished. A rank that raises during a step fails the
backend at once the same way. Either way the backend is failed for good:
is_healthy() turns False, every rank whose job returned frees its model (a
rank stuck in a kernel that ignores the abort keeps its worker), and every
later call raises the DeviceError; an Engine reload builds a new group. Bad
input fails every rank alike before any device work and leaves the model
usable.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Sequence, Tuple

from .. import defaults
from ..backends.base import check_positive_ints
from ..backends.cuda import (
    DEFAULT_PREFILL_CHUNK,
    CUDABackend,
    _native,
    budget_blocks,
    check_block_size,
    check_gpu_arch,
    pass_rows,
)
from ..config import ModelSource
from ..errors import DeviceError, EngineClosedError
from ..kv_blocks import DEFAULT_BLOCK_SIZE, KVBlockManager
from .gpu_shard import (
    check_devices,
    check_visible,
    gpu_plan,
    kv_bytes_per_block,
    load_rank,
    rank_embeddings_refusal,
    rank_spec,
    wait_ranks,
)
from .launch import check_step_timeout
from .watchdog import StepWatchdog

log = logging.getLogger(__name__)

# Every rank's job of one step is queued under this lock (see the module docstring).
_SUBMIT = threading.Lock()

_GROUPS_LOCK = threading.Lock()
_groups: Dict[Tuple[int, ...], "DeviceGroup"] = {}


# ---------------------------------------------------------------------------- the communicators


class DeviceGroup:
    """NCCL communicators over this process's workers of `devices` (rank i on devices[i]), shared by backends."""

    def __init__(self, devices: Tuple[int, ...], workers: list):
        self.devices = devices
        self.workers = workers
        self.refs = 0


def acquire_group(devices: Sequence[int]) -> DeviceGroup:
    """The group of `devices`: a live one for the same devices in the same order, else a new one."""
    key = tuple(devices)
    with _GROUPS_LOCK:
        g = _groups.get(key)
        if g is None:
            for other in _groups.values():
                shared = sorted(set(other.devices) & set(key))
                if shared:
                    raise DeviceError(
                        f"cuda:{shared[0]} already belongs to the tensor-parallel group of devices "
                        f"{list(other.devices)} (another loaded model): a worker holds one NCCL communicator; "
                        "close that model or use the same devices in the same order"
                    )
            g = DeviceGroup(key, _start_group(key))
            _groups[key] = g
        g.refs += 1
        return g


def _start_group(devices: Tuple[int, ...]) -> list:
    from ..runtime import get_worker, init_nccl_group

    workers = [get_worker(d) for d in devices]
    try:
        init_nccl_group(workers)
    except BaseException:
        _destroy_communicators(workers)
        raise
    return workers


def _destroy_communicators(workers: list) -> None:
    # Every rank's destroy is queued before any is waited on.
    pending = []
    for w in workers:
        try:
            pending.append(w.native.nccl_destroy_async())
        except Exception as e:  # a shut-down worker has no communicator left
            log.debug("destroying the communicator of %s: %s", w.name, e)
    for p in pending:
        try:
            p.wait()
        except Exception as e:
            log.debug("destroying a communicator: %s", e)


def release_group(g: DeviceGroup, broken: bool = False) -> None:
    """One backend is done with `g`; the last one destroys its communicators. broken: aborted, drop it now."""
    with _GROUPS_LOCK:
        if _groups.get(g.devices) is not g:
            return  # already dropped as broken
        if broken:
            del _groups[g.devices]
            return
        g.refs -= 1
        if g.refs > 0:
            return
        del _groups[g.devices]
    _destroy_communicators(g.workers)


# ---------------------------------------------------------------------------- the ranks as one model


class _RankGroup:
    """Every rank's GpuModelHandle behind the one-model face CUDABackend drives (step_batch, forward_logits, ...)."""

    def __init__(self, C, handles: list, devices: List[int], group: DeviceGroup, step_timeout: float):
        self._C = C
        self.handles = handles
        self.devices = devices
        self.group = group
        self.limit = step_timeout
        self.failure: Optional[DeviceError] = None
        self._fail_lock = threading.Lock()
        self._steps = 0
        self._inflight = None  # (step, pending, arrived at its start) while a step runs
        self._closed = False
        self.load_seconds = max(float(h.load_seconds) for h in handles)
        self.bytes = sum(int(h.bytes) for h in handles)
        self._watchdog = StepWatchdog(step_timeout, self._overrun, name="hx-tp-gpu-watchdog")

    # ------------------------------------------------------------------ the model face

    @property
    def closed(self) -> bool:
        return self._closed or self.failure is not None

    @property
    def poisoned(self) -> bool:
        return any(h.poisoned for h in self.handles)

    @property
    def shut_down(self) -> bool:
        return any(h.shut_down for h in self.handles)

    def step_batch(self, inputs: list) -> list:
        return self._run(lambda hs: self._C.step_batch_async_all(hs, inputs))

    def forward_logits(self, ids, start_pos, block_table, all_logits):
        return self._run(
            lambda hs: self._C.forward_logits_async_all(hs, list(ids), int(start_pos), list(block_table), all_logits)
        )

    def set_graphs(self, enabled: bool) -> None:
        for h in self._live():
            h.set_graphs(enabled)

    def allocate_kv(self, num_blocks: int) -> None:
        for h in self._live():
            h.allocate_kv(num_blocks)

    def memory(self) -> dict:
        per_rank = [h.memory() for h in self._live()]
        out = dict(per_rank[0])
        for key in ("weights_bytes", "kv_cache_bytes", "scratch_bytes", "total_bytes"):
            out[key] = sum(int(m.get(key, 0)) for m in per_rank)
        # What every rank can still take: the least free device.
        out["device_free_bytes"] = min(int(m["device_free_bytes"]) for m in per_rank)
        out["device_total_bytes"] = sum(int(m["device_total_bytes"]) for m in per_rank)
        out["rank_total_bytes"] = [int(m["total_bytes"]) for m in per_rank]
        return out

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._watchdog.close()
        handles, self.handles = self.handles, []
        for h in handles:
            try:
                h.close()
            except Exception as e:  # a poisoned or shut-down worker already gave the memory up
                log.debug("closing a tensor-parallel rank: %s", e)
        release_group(self.group, broken=self.failure is not None)

    # ------------------------------------------------------------------ steps

    def _live(self) -> list:
        if self.failure is not None:
            raise self.failure
        if self._closed:
            raise EngineClosedError("the tensor-parallel CUDA backend was closed")
        return self.handles

    def _run(self, submit):
        handles = self._live()
        # Peer all-reduces entered so far, read before the step can move them.
        arrived = [h.arrived for h in handles]
        with _SUBMIT:
            pending = submit(handles)
        self._steps += 1
        step = self._steps
        t0 = time.monotonic()
        self._inflight = (step, pending, arrived)
        self._watchdog.begin(step)
        try:
            results, errors = wait_ranks(
                pending, t0 + self.limit + defaults.TP_ABORT_GRACE, stop=lambda: self.failure is not None
            )
        finally:
            self._watchdog.end()
        done = len(results) + len(errors) == len(pending)
        if self.failure is None and done and errors and all(isinstance(e, ValueError) for e in errors.values()):
            if len(errors) == len(pending):
                self._inflight = None
                raise errors[0]  # bad input, refused by every rank before any device work
        if self.failure is None and done and not errors:
            self._inflight = None
            return results[0]
        # A rank failed, or the watchdog fired: fail, let the others drain, free what returned.
        if self.failure is None:
            self._fail(self._diagnose(step, pending, errors, f"tensor-parallel step {step} failed"))
        if not done:
            more, more_errors = wait_ranks(pending, time.monotonic() + defaults.TP_ABORT_GRACE, learn=False)
            results.update(more)
            errors.update(more_errors)
        self._inflight = None
        self._drop({r for r in range(len(pending)) if r not in results and r not in errors})
        raise self.failure

    # ------------------------------------------------------------------ failure

    def _overrun(self, step: int, seconds: float) -> None:
        inflight = self._inflight
        if inflight is None or inflight[0] != step or self.failure is not None:
            return
        _, pending, _ = inflight
        errors = {}
        for r, p in enumerate(pending):
            if p.done():
                try:
                    p.result()
                except BaseException as e:  # the rank's own error names it
                    errors[r] = e
        self._fail(
            self._diagnose(step, pending, errors, f"tensor-parallel step {step} did not finish within {self.limit:g} s")
        )

    def _diagnose(self, step: int, pending: list, errors: dict, headline: str) -> str:
        """headline, plus which rank failed: one that raised, never started, fell behind, or did not finish."""
        tail = "; the model is failed (reload it)"
        bad = {r: e for r, e in errors.items() if not isinstance(e, ValueError)} or errors
        if bad:
            return (
                headline + ": " + "; ".join(f"rank {r} failed: {_one_line(e)}" for r, e in sorted(bad.items())) + tail
            )
        idle = [r for r, p in enumerate(pending) if not p.started()]
        if idle:
            ranks = ", ".join(str(r) for r in idle)
            return (
                headline + f": rank {ranks} never started the step (its device worker is busy with earlier work)" + tail
            )
        start = self._inflight[2] if self._inflight is not None and self._inflight[0] == step else None
        if start is not None and all(a >= 0 for a in start):
            entered = [(int(h.arrived) - a) & 0xFFFFFFFF for h, a in zip(self.handles, start)]
            low, high = min(entered), max(entered)
            if low != high:
                late = ", ".join(str(r) for r, n in enumerate(entered) if n == low)
                return (
                    headline + f": rank {late} is behind (it entered {low} of the step's peer all-reduces, "
                    f"the others up to {high})" + tail
                )
        running = [r for r, p in enumerate(pending) if not p.done()]
        if running and len(running) < len(pending):
            ranks = ", ".join(str(r) for r in running)
            return headline + f": rank {ranks} did not finish (the others did)" + tail
        if len(pending) == 1:
            return headline + ": rank 0 did not finish" + tail
        return headline + ": no rank finished (a collective or a kernel on every rank is stuck)" + tail

    def _fail(self, message: str) -> DeviceError:
        """Fail the group once: every rank's abort word first, then every communicator."""
        with self._fail_lock:
            if self.failure is not None:
                return self.failure
            self.failure = DeviceError(message)
        log.error("%s", message)
        handles = list(self.handles)
        for h in handles:
            h.abort(False)
        for h in handles:
            h.abort(True)
        return self.failure

    def _drop(self, stuck: set) -> None:
        """Free every rank whose job returned; a stuck rank's handle is let go (its worker frees it later, if ever)."""
        self._closed = True
        self._watchdog.close()
        handles, self.handles = self.handles, []
        for r, h in enumerate(handles):
            if r in stuck:
                continue
            try:
                h.close()
            except Exception as e:
                log.debug("closing a failed tensor-parallel rank: %s", e)
        release_group(self.group, broken=True)


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".splitlines()[0]


# ---------------------------------------------------------------------------- the backend


class ShardedCUDABackend(CUDABackend):
    """A model split over the GPUs `devices` of this process, one rank per GPU (see the module docstring)."""

    # Every rank embeds each step's token: decode_steps loops step_batch.
    device_decode_steps = False

    def __init__(
        self,
        source: ModelSource,
        devices: Sequence[int] = (0, 1),
        n_ctx: int = 4096,
        use_graphs: bool = True,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        int8_activations: Optional[bool] = None,
        max_num_seqs: int = defaults.DEFAULT_MAX_NUM_SEQS,
        kv_cache_memory: Optional[int] = None,
        block_size: int = DEFAULT_BLOCK_SIZE,
        prefix_cache: bool = True,
        step_timeout: float = defaults.DEFAULT_STEP_TIMEOUT,
        peer_max_bytes: int = defaults.DEFAULT_TP_PEER_MAX_BYTES,
    ):
        """devices: the GPUs, rank r on devices[r] (tensor_parallel = len(devices)).
        kv_cache_memory: each rank's bytes for its own kv heads (None: sized
        from the least free device after loading). peer_max_bytes: the
        largest all-reduce the peer-memory kernel takes (0: NCCL only). The
        rest as CUDABackend's; step_timeout as the sharded CPU backend's."""
        devices = check_devices(devices)
        check_positive_ints(n_ctx=n_ctx, prefill_chunk=prefill_chunk, max_num_seqs=max_num_seqs)
        check_block_size(block_size)
        if kv_cache_memory is not None and (
            not isinstance(kv_cache_memory, int) or isinstance(kv_cache_memory, bool) or kv_cache_memory < 1
        ):
            raise ValueError(f"kv_cache_memory must be a positive number of bytes or None, got {kv_cache_memory!r}")
        if not isinstance(peer_max_bytes, int) or isinstance(peer_max_bytes, bool) or peer_max_bytes < 0:
            raise ValueError(f"peer_max_bytes must be a non-negative integer, got {peer_max_bytes!r}")
        step_timeout = check_step_timeout(step_timeout)
        cfg = source.config
        check_gpu_arch(cfg)
        plan = gpu_plan(source, len(devices))
        check_visible(devices)
        C = _native()

        self.config = cfg
        self.plan = plan
        self.tensor_parallel = plan.world_size
        self.devices = devices
        self.n_ctx = n_ctx
        self.max_num_seqs = max_num_seqs
        self.prefill_chunk = pass_rows(prefill_chunk, n_ctx, max_num_seqs)
        self.device = f"cuda:{devices[0]}"
        self.device_index = devices[0]
        self.step_timeout = step_timeout
        self._model = None
        self._init_sampling_state(C)

        per_block = kv_bytes_per_block(plan, block_size)
        num_blocks = budget_blocks(kv_cache_memory, per_block, n_ctx, block_size, " per rank")
        need_blocks = -(-n_ctx // block_size)
        most_blocks = (2**31 - 1) // block_size

        group = acquire_group(devices)
        try:
            handles = self._load(
                C,
                source,
                plan,
                devices,
                n_ctx,
                num_blocks,
                peer_max_bytes,
                use_graphs,
                prefill_chunk,
                int8_activations,
                block_size,
                max_num_seqs,
            )
        except BaseException:
            release_group(group)
            raise
        self._model = _RankGroup(C, handles, devices, group, step_timeout)
        try:
            self.peer_all_reduce = peer_max_bytes > 0 and self._link(handles, devices)
            if num_blocks == 0:
                num_blocks = self._size_pool(per_block, need_blocks, most_blocks)
        except BaseException:
            self.close()
            raise
        self.blocks = KVBlockManager(num_blocks, block_size, prefix_cache=bool(prefix_cache))
        self.load_seconds = self._model.load_seconds
        self.device_bytes = int(self._call(self._model.memory)["total_bytes"])

    @staticmethod
    def _load(
        C,
        source,
        plan,
        devices,
        n_ctx,
        num_blocks,
        peer_max_bytes,
        use_graphs,
        prefill_chunk,
        int8_activations,
        block_size,
        max_num_seqs,
    ) -> list:
        """Every rank's GpuModelHandle, loaded in parallel (each load job runs on its own worker)."""

        def one(rank: int):
            spec = rank_spec(
                C,
                source,
                plan,
                rank,
                n_ctx,
                use_graphs=use_graphs,
                prefill_chunk=prefill_chunk,
                int8_activations=int8_activations,
                block_size=block_size,
                max_num_seqs=max_num_seqs,
                num_blocks=num_blocks,
                peer_max_bytes=peer_max_bytes,
            )
            return load_rank(C, source, plan, rank, devices[rank], spec)

        with ThreadPoolExecutor(len(devices), thread_name_prefix="hx-tp-load") as pool:
            futures = [pool.submit(one, r) for r in range(len(devices))]
            handles, error = [], None
            for f in futures:
                try:
                    handles.append(f.result())
                except BaseException as e:
                    error = error or e
        if error is not None:
            for h in handles:
                try:
                    h.close()
                except Exception as e:
                    log.debug("closing a loaded rank after another failed: %s", e)
            raise error
        return handles

    @staticmethod
    def _link(handles: list, devices: List[int]) -> bool:
        """Turn the peer-memory all-reduce on when every GPU of the group maps every other's memory."""
        if not all(h.peer_access(devices) for h in handles):
            log.info("tensor parallelism over %s: no peer access between every pair, all-reduces use NCCL", devices)
            return False
        group = [tuple(h.peer_endpoint()) for h in handles]
        for h in handles:
            h.link_peers(group)
        return True

    def _pool_terms(self) -> tuple:
        """Every rank's pool is sized from the least free rank's memory (the group's `memory` reports it)."""
        return (
            f"devices {self.devices}",
            " per rank",
            "its shard on the least free rank",
            "a smaller n_ctx or more GPUs",
        )

    # ------------------------------------------------------------------ facts

    def memory_info(self) -> dict:
        """CUDABackend's facts summed over the ranks (free memory: the least free rank), and the devices."""
        info = super().memory_info()
        if info:
            info.update(tensor_parallel=self.tensor_parallel, devices=list(self.devices))
        return info

    def _live(self):
        m = self._model
        if m is not None and m.failure is not None:
            raise m.failure
        return super()._live()

    def hidden_states(self, seqs, pooling=None):
        """Not over ranks: their pass ends in logits (Backend.hidden_states' clear refusal)."""
        raise NotImplementedError(rank_embeddings_refusal(self))
