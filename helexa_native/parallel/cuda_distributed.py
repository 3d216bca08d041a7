"""Tensor-parallel GPU ranks as processes: torchrun starts one per GPU, rank 0 leads, the others follow.

    torchrun --nproc-per-node N [--nnodes M ...] -m helexa_native serve --device cuda --tensor-parallel N*M ...

Each process drives one GPU, cuda:LOCAL_RANK, through its device worker.
The ranks meet as the CPU path's do (distributed.py: env:// rendezvous, one
gloo group for control messages, the store for heartbeats); the store also
carries rank 0's NCCL unique id, from which every process's worker creates
its communicator (NCCL_NVLS_ENABLE=0), so each step's all-reduces run on
NCCL between the workers' own communicators (the peer-memory kernel needs
the ranks in one process).

Start-up, every rank in the same order: rank 0 broadcasts its settings
(context, block size, KV budget, step limit, graphs, int8 mode, model
fingerprint); every rank starts its worker and the ranks exchange their
status; every worker joins the communicator; every rank loads its shard
(gpu_shard.py) and reports its free memory; rank 0 picks the KV pool size
and every rank allocates it. A rank that fails at any stage fails the
launch on every rank with one message naming it.

Steps: the leader is a CUDABackend whose model is `_LeaderRank`: it sends
each step to the followers as plain integers (per sequence its tokens, start
position, block table, slot and whether it samples: the same pass structure,
so the same collectives), then queues its own. Followers run
`CUDAFollower.run()` until the leader's shutdown message.

Watchdog: as on the CPU path the leader's StepWatchdog watches its step,
and between steps its followers' heartbeats and processes; when it fires
the leader aborts its own communicator (its NCCL kernels return), names the
rank (a dead one, one that never started the step, else every rank still
inside it) and fails the backend. Each follower bounds every step by the
same limit; past it, or on any error, it aborts its communicator and exits
with a nonzero status (torchrun --max-restarts restarts the group). A leader
that dies ends a follower's wait for the next step at once.
"""

from __future__ import annotations

import logging
import time
from typing import List, Optional, Sequence, Tuple

import torch

from .. import defaults
from ..backends.base import check_positive_ints
from ..backends.cuda import (
    DEFAULT_PREFILL_CHUNK,
    KV_FREE_FRACTION,
    CUDABackend,
    _native,
    budget_blocks,
    check_block_size,
    check_gpu_arch,
    pass_rows,
)
from ..config import ModelSource
from ..errors import DeviceError, EngineClosedError, ModelLoadError
from ..kv_blocks import DEFAULT_BLOCK_SIZE, KVBlockManager
from .collective import CollectiveError
from .distributed import (
    _FAILED,
    STEP,
    Launch,
    _check_hello,
    _exchange,
    _FollowerRole,
    _LeaderRole,
    _Member,
    _one_line,
    _process_identity,
    _rank_launch,
    _send,
    heartbeat_interval,
)
from .gpu_shard import (
    check_visible,
    follower_inputs,
    gpu_plan,
    kv_bytes_per_block,
    load_rank,
    rank_embeddings_refusal,
    rank_spec,
    wait_ranks,
)
from .launch import check_step_timeout
from .sharding import model_fingerprint

log = logging.getLogger(__name__)

# What a step message asks of a follower.
MODE_STEP, MODE_LAST_LOGITS, MODE_ALL_LOGITS = 0, 1, 2

_NCCL_ID_KEY = "nccl_unique_id"


# ---------------------------------------------------------------------------- step messages


def encode_gpu_step(mode: int, seqs: Sequence[tuple]) -> torch.Tensor:
    """A step as one int64 tensor: [mode, n, (tokens, start, blocks, slot, sample) x n, tokens..., block ids...].

    seqs: (token ids, start_pos, block_table, slot, sample) per sequence.
    """
    head, tokens, tables = [int(mode), len(seqs)], [], []
    for ids, start, table, slot, sample in seqs:
        ids = list(ids)
        head += [len(ids), int(start), len(table), int(slot), int(bool(sample))]
        tokens += ids
        tables += [int(b) for b in table]
    return torch.tensor(head + tokens + tables, dtype=torch.long)


def decode_gpu_step(payload: torch.Tensor) -> Tuple[int, List[tuple]]:
    """The mode and the (ids, start_pos, block_table, slot, sample) sequences of an encoded step."""
    v = payload.tolist()
    mode, n = int(v[0]), int(v[1])
    meta = [v[2 + 5 * i : 7 + 5 * i] for i in range(n)]
    at = 2 + 5 * n
    ids = []
    for n_tok, *_ in meta:
        ids.append(v[at : at + n_tok])
        at += n_tok
    out = []
    for toks, (_, start, n_blk, slot, sample) in zip(ids, meta):
        out.append((toks, int(start), v[at : at + n_blk], int(slot), bool(sample)))
        at += n_blk
    return mode, out


# ---------------------------------------------------------------------------- start-up shared by every rank


def _start_worker(C, device_index: int):
    check_visible([device_index])
    from ..runtime import get_worker

    return get_worker(device_index)


def _join_communicator(member: _Member, worker) -> None:
    """Every rank's worker joins one NCCL communicator; the unique id travels through the store."""
    from ..runtime import init_nccl_group, nccl_unique_id

    if member.rank == 0:
        uid = nccl_unique_id()
        member.store_set(_NCCL_ID_KEY, uid.hex())
    else:
        uid = bytes.fromhex(member.store.get(_NCCL_ID_KEY).decode())  # waits until rank 0 set it
    init_nccl_group([worker], unique_id=uid, first_rank=member.rank, nranks=member.world_size)


def _destroy_communicator(worker) -> None:
    try:
        worker.native.nccl_destroy_async().wait()
    except Exception as e:  # a shut-down worker has no communicator left
        log.debug("destroying the communicator: %s", e)


def _load_shard(C, source, plan, rank: int, device_index: int, hello: dict):
    spec = rank_spec(
        C,
        source,
        plan,
        rank,
        hello["n_ctx"],
        use_graphs=hello["use_graphs"],
        prefill_chunk=hello["prefill_chunk"],
        int8_activations=hello["int8_activations"],
        block_size=hello["block_size"],
        max_num_seqs=hello["max_num_seqs"],
        num_blocks=hello["num_blocks"],
        peer_max_bytes=0,
    )
    return load_rank(C, source, plan, rank, device_index, spec)


def _free_bytes(handle) -> int:
    return int(handle.memory()["device_free_bytes"])


def _allocate(handle, num_blocks: int) -> Optional[BaseException]:
    try:
        handle.allocate_kv(num_blocks)
    except Exception as e:
        return ModelLoadError(f"allocating a KV cache of {num_blocks} blocks failed: {e}")
    return None


# ---------------------------------------------------------------------------- the leader


class _LeaderRank(_LeaderRole):
    """Rank 0's GpuModelHandle plus the step channel: the one-model face CUDABackend drives."""

    def __init__(self, handle, worker, member: _Member, statuses: List[dict], step_timeout: float):
        self._init_leader(step_timeout)
        self.handle = handle
        self.worker = worker
        self.member = member
        self.load_seconds = float(handle.load_seconds)
        self.bytes = int(handle.bytes)
        self._watch_followers(statuses, "hx-tp-gpu-leader-watchdog")

    # ------------------------------------------------------------------ the model face

    @property
    def failure(self) -> Optional[DeviceError]:
        """The DeviceError that failed the group, or None."""
        return self._failure

    @property
    def closed(self) -> bool:
        return self._closed or self._failure is not None

    @property
    def poisoned(self) -> bool:
        return self.handle is not None and self.handle.poisoned

    @property
    def shut_down(self) -> bool:
        return self.handle is None or self.handle.shut_down

    def step_batch(self, inputs: list) -> list:
        seqs = [(s.tokens, s.start_pos, s.block_table, s.slot, s.sample) for s in inputs]
        return self._run(encode_gpu_step(MODE_STEP, seqs), lambda h: h.step_batch_async(inputs))

    def forward_logits(self, ids, start_pos, block_table, all_logits):
        mode = MODE_ALL_LOGITS if all_logits else MODE_LAST_LOGITS
        msg = encode_gpu_step(mode, [(ids, start_pos, block_table, 0, False)])
        return self._run(
            msg, lambda h: h.forward_logits_async(list(ids), int(start_pos), list(block_table), all_logits)
        )

    def set_graphs(self, enabled: bool) -> None:
        self._live().set_graphs(enabled)

    def memory(self) -> dict:
        return self._live().memory()

    # ------------------------------------------------------------------ steps

    def _live(self):
        if self._failure is not None:
            raise self._failure
        if self._closed or self.handle is None:
            raise EngineClosedError("the tensor-parallel CUDA backend was closed")
        return self.handle

    def _run(self, msg: torch.Tensor, submit):
        h = self._live()
        self._steps += 1
        step = self._steps
        deadline = time.monotonic() + self.step_timeout
        self._watchdog.begin(step)
        pending = []
        try:
            try:
                _send(self.member.group, STEP, msg, deadline - time.monotonic())
            except CollectiveError as e:
                # The message is built now: `e` is unbound once this except clause ends.
                headline = f"tensor-parallel step {step}: {e}"
                self._fail(lambda: self._diagnose(step, headline))
            else:
                pending = [submit(h)]
                results, errors = wait_ranks(
                    pending, deadline + defaults.TP_ABORT_GRACE, stop=lambda: self._failure is not None
                )
                if self._failure is None and 0 in results:
                    return results[0]
                if self._failure is None and isinstance(errors.get(0), ValueError):
                    # Bad input: every rank refused it alike before any device work.
                    raise errors[0]
                err = errors.get(0)
                self._fail(lambda: self._diagnose(step, f"tensor-parallel step {step} failed", err))
        finally:
            self._watchdog.end()
        if pending and not pending[0].done():
            wait_ranks(pending, time.monotonic() + defaults.TP_ABORT_GRACE, learn=False)
        self._release(stuck=bool(pending) and not pending[0].done())
        raise self._failure

    # ------------------------------------------------------------------ failure

    def _diagnose(self, step: int, headline: str, own: Optional[BaseException] = None) -> str:
        """headline, plus which rank failed: rank 0's own error, a dead follower, one behind, else every rank."""
        if own is not None:
            return headline + f": rank 0 failed: {_one_line(own)}" + _FAILED
        named = self._name_dead(headline, min(self.step_timeout, 2.0 * heartbeat_interval(self.step_timeout) + 1.0))
        if named is not None:
            return named
        watch = self._watch
        behind = {r: watch.progress(r) for r in watch.followers if watch.progress(r)[0] < step}
        if behind:
            ranks = ", ".join(str(r) for r in sorted(behind))
            at = ", ".join(f"rank {r} at step {p[0]}" for r, p in sorted(behind.items()))
            return headline + f": rank {ranks} never started step {step} ({at})" + _FAILED
        inside = [r for r in watch.followers if watch.progress(r) == (step, 0)]
        if inside:
            return (
                headline + f": rank 0 and rank {', '.join(str(r) for r in inside)} are inside step {step} "
                "(a collective or a kernel is stuck)" + _FAILED
            )
        return headline + f": every follower finished step {step}, rank 0 did not" + _FAILED

    def _abort(self) -> None:
        """Set rank 0's abort word and abort its communicator (its kernels return) before the rank is named."""
        h = self.handle
        if h is not None:
            h.abort(True)

    def _holds_shard(self) -> bool:
        return self.handle is not None

    def _release(self, stuck: bool = False) -> None:
        self._closed = True
        self._watchdog.close()
        h, self.handle = self.handle, None
        if h is not None and not stuck:
            try:
                h.close()
            except Exception as e:
                log.debug("closing rank 0's shard: %s", e)
        if not stuck:
            _destroy_communicator(self.worker)
        self.member.close()


class CUDALeaderBackend(CUDABackend):
    """Rank 0 of a multi-process GPU tensor-parallel group: the Backend the scheduler drives (module docstring)."""

    # Every rank embeds each step's token: decode_steps loops step_batch.
    device_decode_steps = False

    def __init__(
        self,
        source: ModelSource,
        n_ctx: int,
        tensor_parallel: int,
        launch: Optional[Launch] = None,
        use_graphs: bool = True,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        int8_activations: Optional[bool] = None,
        max_num_seqs: int = defaults.DEFAULT_MAX_NUM_SEQS,
        kv_cache_memory: Optional[int] = None,
        block_size: int = DEFAULT_BLOCK_SIZE,
        prefix_cache: bool = True,
        step_timeout: float = defaults.DEFAULT_STEP_TIMEOUT,
        connect_timeout: float = defaults.DEFAULT_TP_CONNECT_TIMEOUT,
    ):
        check_positive_ints(n_ctx=n_ctx, prefill_chunk=prefill_chunk, max_num_seqs=max_num_seqs)
        check_block_size(block_size)
        if kv_cache_memory is not None and (
            not isinstance(kv_cache_memory, int) or isinstance(kv_cache_memory, bool) or kv_cache_memory < 1
        ):
            raise ValueError(f"kv_cache_memory must be a positive number of bytes or None, got {kv_cache_memory!r}")
        step_timeout = check_step_timeout(step_timeout)
        launch = _rank_launch(
            launch,
            tensor_parallel,
            "cuda",
            True,
            "rank {rank} is a follower: it runs CUDAFollower, not the leader's backend",
            alone="ShardedCUDABackend",
        )
        cfg = source.config
        check_gpu_arch(cfg)
        plan = gpu_plan(source, tensor_parallel)
        C = _native()

        self.config = cfg
        self.plan = plan
        self.tensor_parallel = plan.world_size
        self.n_ctx = n_ctx
        self.max_num_seqs = max_num_seqs
        self.prefill_chunk = pass_rows(prefill_chunk, n_ctx, max_num_seqs)
        self.device_index = launch.local_rank
        self.device = f"cuda:{launch.local_rank}"
        self.step_timeout = step_timeout
        self._model = None
        self._init_sampling_state(C)

        per_block = kv_bytes_per_block(plan, block_size)
        num_blocks = budget_blocks(kv_cache_memory, per_block, n_ctx, block_size, " per rank")
        need_blocks = -(-n_ctx // block_size)
        most_blocks = (2**31 - 1) // block_size

        member = _Member(launch, connect_timeout)
        worker = handle = None
        joined = False
        try:
            hello = {
                "tensor_parallel": plan.world_size,
                "n_ctx": n_ctx,
                "num_blocks": num_blocks,
                "block_size": block_size,
                "max_num_seqs": max_num_seqs,
                "prefill_chunk": prefill_chunk,
                "use_graphs": bool(use_graphs),
                "int8_activations": int8_activations,
                "step_timeout": step_timeout,
                "fingerprint": model_fingerprint(cfg, source.tensors),
            }
            member.broadcast_obj(hello)
            status, own = dict(_process_identity(), error=None), None
            try:
                worker = _start_worker(C, launch.local_rank)
            except Exception as e:
                status["error"], own = _one_line(e), e
            _exchange(member, status, own)

            _join_communicator(member, worker)
            joined = True
            status, own = {"error": None, "free": 0}, None
            try:
                handle = _load_shard(C, source, plan, 0, launch.local_rank, hello)
                status["free"] = _free_bytes(handle)
            except Exception as e:
                status["error"], own = _one_line(e), e
            statuses = _exchange(member, status, own)

            if num_blocks == 0:
                free = min(s["free"] for s in statuses)
                want = min(int(free * KV_FREE_FRACTION), per_block * need_blocks * max_num_seqs)
                num_blocks = min(want // per_block, most_blocks)
            member.broadcast_obj(num_blocks)
            status, own = dict(_process_identity(), error=None), None
            if num_blocks < need_blocks:
                own = ModelLoadError(
                    f"the KV cache for one sequence of n_ctx={n_ctx} positions needs {need_blocks * per_block} "
                    f"bytes per rank; the least free rank has less after loading its shard "
                    f"(the cache may take {KV_FREE_FRACTION:.0%} of it): use a smaller n_ctx or more GPUs"
                )
                status["error"] = _one_line(own)
            elif hello["num_blocks"] == 0:
                own = _allocate(handle, num_blocks)
                status["error"] = _one_line(own) if own is not None else None
            statuses = _exchange(member, status, own)
        except BaseException:
            if handle is not None:
                handle.close()
            if joined:
                _destroy_communicator(worker)
            member.close()
            raise
        self._model = _LeaderRank(handle, worker, member, statuses, step_timeout)
        self.blocks = KVBlockManager(num_blocks, block_size, prefix_cache=bool(prefix_cache))
        self.load_seconds = self._model.load_seconds
        self.device_bytes = int(self._call(self._model.memory)["total_bytes"])

    def memory_info(self) -> dict:
        """Rank 0's device facts, and the group's size."""
        info = super().memory_info()
        if info:
            info.update(tensor_parallel=self.tensor_parallel, rank=0)
        return info

    def _live(self):
        m = self._model
        if m is not None and m.failure is not None:
            raise m.failure
        return super()._live()

    def hidden_states(self, seqs, pooling=None):
        """Not over ranks: their pass ends in logits (Backend.hidden_states' clear refusal)."""
        raise NotImplementedError(rank_embeddings_refusal(self))


# ---------------------------------------------------------------------------- the followers


class CUDAFollower(_FollowerRole):
    """A follower rank: joins the group, loads its shard on cuda:LOCAL_RANK, then `run()` serves the leader's steps.

    A step that fails or overruns makes `run()` raise DeviceError.
    """

    def __init__(
        self,
        source: ModelSource,
        tensor_parallel: int,
        launch: Optional[Launch] = None,
        connect_timeout: float = defaults.DEFAULT_TP_CONNECT_TIMEOUT,
    ):
        launch = _rank_launch(
            launch, tensor_parallel, "cuda", False, "rank 0 leads: it runs CUDALeaderBackend, not CUDAFollower"
        )
        check_gpu_arch(source.config)
        plan = gpu_plan(source, tensor_parallel)
        C = _native()
        self._C = C
        self._init_follower(launch)
        self.finished = 0
        self.handle = self.worker = None
        self._stuck = False  # a step's job never returned: its worker cannot take the cleanup jobs
        self._idle = C.StepSampling()
        self._no_penalties = C.PenaltyUpdate()
        self._no_penalties.active = False
        self.member = _Member(launch, connect_timeout)
        joined = False
        try:
            hello = self._hello()
            status, own = dict(_process_identity(), error=None), None
            try:
                _check_hello(hello, source, self.rank, plan.world_size)
                self.worker = _start_worker(C, launch.local_rank)
            except Exception as e:
                status["error"], own = _one_line(e), e
            statuses = _exchange(self.member, status, own)

            _join_communicator(self.member, self.worker)
            joined = True
            status, own = {"error": None, "free": 0}, None
            try:
                self.handle = _load_shard(C, source, plan, self.rank, launch.local_rank, hello)
                status["free"] = _free_bytes(self.handle)
            except Exception as e:
                status["error"], own = _one_line(e), e
            _exchange(self.member, status, own)

            num_blocks = self.member.broadcast_obj(None)
            status, own = dict(statuses[self.rank], error=None), None
            if hello["num_blocks"] == 0 and num_blocks > 0:
                own = _allocate(self.handle, num_blocks)
                status["error"] = _one_line(own) if own is not None else None
            _exchange(self.member, status, own)
            self._start_heartbeat(lambda: (self.steps, int(self.finished == self.steps)))
        except BaseException:
            if self.handle is not None:
                self.handle.close()
            if joined:
                _destroy_communicator(self.worker)
            self.member.close()
            raise

    def _serve_step(self, payload: torch.Tensor) -> None:
        mode, seqs = decode_gpu_step(payload)
        self.steps += 1
        self._step(mode, seqs)
        self.finished = self.steps

    def _step(self, mode: int, seqs: list) -> None:
        if mode == MODE_STEP:
            pending = [self.handle.step_batch_async(follower_inputs(self._C, seqs, self._idle, self._no_penalties))]
        else:
            ids, start, table, _, _ = seqs[0]
            pending = [self.handle.forward_logits_async(ids, start, table, mode == MODE_ALL_LOGITS)]
        results, errors = wait_ranks(pending, time.monotonic() + self.step_timeout, learn=False)
        if 0 in results:
            return
        if isinstance(errors.get(0), ValueError):
            return  # bad input: the leader refused it alike, before any device work
        self.handle.abort(True)
        if not pending[0].done():
            wait_ranks(pending, time.monotonic() + defaults.TP_ABORT_GRACE, learn=False)
        self._stuck = not pending[0].done()
        if 0 in errors:
            raise DeviceError(f"rank {self.rank}: tensor-parallel step {self.steps} failed: {errors[0]}")
        raise DeviceError(
            f"rank {self.rank}: tensor-parallel step {self.steps} did not finish within {self.step_timeout:g} s "
            "(its communicator was aborted)"
        )

    def close(self) -> None:
        """Stop the heartbeat, drop the shard, leave the communicator and the group."""
        self._stop_heartbeat()
        h, self.handle = self.handle, None
        if not self._stuck:
            if h is not None:
                try:
                    h.close()
                except Exception as e:
                    log.debug("closing the shard: %s", e)
            if self.worker is not None:
                _destroy_communicator(self.worker)
        self.member.close()


def follow_cuda(source: ModelSource, tensor_parallel: int, launch: Optional[Launch] = None) -> None:
    """Run this process as a GPU follower rank until the leader shuts the group down."""
    f = CUDAFollower(source, tensor_parallel, launch=launch)
    try:
        f.run()
    finally:
        f.close()
