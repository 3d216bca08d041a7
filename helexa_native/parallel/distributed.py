"""Tensor-parallel ranks as processes: torchrun starts them, rank 0 leads, the others follow.

    torchrun --nproc-per-node N [--nnodes M ...] -m helexa_native serve --tensor-parallel N*M ...

Every process reads its place from torchrun's environment (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT). On the CPU each process is one rank,
so WORLD_SIZE must equal tensor_parallel, else LaunchError ("mismatched
launch") on every rank before any of them waits for another. The ranks meet
through torch.distributed's store (env:// rendezvous) and open one gloo group.

Start-up: rank 0 broadcasts its settings (tensor_parallel, context, KV pool
size, block size, step limit, model fingerprint); every rank loads its shard;
the ranks exchange their status, and a rank that failed or holds another
model fails the launch on every rank with one message naming it.

Steps: rank 0 is the leader, a Backend the scheduler drives. Each step it
sends the step to the followers as plain integers (per sequence its tokens,
start position and block table; no sampling state, since only the leader
samples), runs its own shard, and the ranks add their partial sums and
gather the logits' vocabulary slices onto the leader through a Collective
(gloo here; on GPUs the device workers' NCCL communicators). Followers run
`Follower.run()`: receive a step, run the shard, repeat, until the leader's
shutdown message.

The watchdog uses two mechanisms:
  - torch.distributed's timeout where it works: each leader operation waits
    (Work.wait(timeout)) for what is left of the step's limit and each
    follower collective for the whole limit; a dead peer makes gloo raise at
    once ("Connection closed by peer"). A follower waits for the next step
    with no limit (an idle server sends none), on a group whose timeout is
    effectively unbounded; a leader that dies ends that wait at once.
  - a thread where it does not: the leader's StepWatchdog notices a step
    outliving its limit in the leader's own computation, and between steps
    watches the followers' heartbeats (each follower's thread writes its
    progress, the step and the collectives entered, to the store ten times
    per limit) and, for followers on this host, whether their process runs.
When either fires the leader names the rank: a follower whose process is
gone or whose heartbeat stopped for the limit, else the one furthest behind
in the step. The backend fails with that DeviceError, is_healthy() turns
False, and it drops its weights and its group; the followers' collectives
fail within the limit and they exit with a nonzero status, which lets
torchrun (--max-restarts) start the group again. A process joins one group
in its life: a failed group is recovered by restarting the launch.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from .. import defaults
from ..backends.base import check_positive_ints
from ..backends.cpu import DEFAULT_CPU_POOL_CONTEXTS, pool_blocks
from ..config import ModelSource
from ..errors import DeviceError, EngineClosedError, LaunchError
from ..kv_blocks import DEFAULT_BLOCK_SIZE, KVBlockManager
from .backend import ShardedBackend, kv_bytes_per_position
from .collective import Collective, CollectiveError
from .launch import check_step_timeout
from .shard_model import ShardModel
from .sharding import model_fingerprint, shard_plan
from .watchdog import StepWatchdog

log = logging.getLogger(__name__)

# Message kinds on the step channel.
STEP, SHUTDOWN = 1, 2

# The group's own timeout: a follower waits this long for the next step.
CONTROL_TIMEOUT = timedelta(days=365)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

_joined = False
_join_lock = threading.Lock()


# ---------------------------------------------------------------------------- the launch


@dataclass(frozen=True)
class Launch:
    """This process's place in a torchrun launch."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int


def launch_from_env(environ=None) -> Optional[Launch]:
    """The launch torchrun's environment describes, or None when WORLD_SIZE is not set."""
    env = os.environ if environ is None else environ
    if not env.get("WORLD_SIZE"):
        return None

    def num(key: str, default: Optional[int] = None) -> int:
        v = env.get(key)
        if v is None or v == "":
            if default is None:
                raise LaunchError(f"WORLD_SIZE is set but {key} is not: start the ranks with torchrun")
            return default
        try:
            return int(v)
        except ValueError:
            raise LaunchError(f"environment variable {key} must be an integer, got {v!r}") from None

    world, rank = num("WORLD_SIZE"), num("RANK")
    if world < 1 or not 0 <= rank < world:
        raise LaunchError(f"RANK {rank} does not fit WORLD_SIZE {world}")
    return Launch(
        rank=rank,
        world_size=world,
        local_rank=num("LOCAL_RANK", rank),
        master_addr=env.get("MASTER_ADDR") or "127.0.0.1",
        master_port=num("MASTER_PORT", 0),
    )


def check_launch(tensor_parallel: int, launch: Launch, device: str = "cpu") -> None:
    """LaunchError unless the launch started exactly one process per rank."""
    if launch.world_size != tensor_parallel:
        each = "each CPU rank is one process" if device == "cpu" else "each GPU rank is one process driving one GPU"
        raise LaunchError(
            f"mismatched launch: {launch.world_size} processes were started (WORLD_SIZE={launch.world_size}) "
            f"but tensor_parallel is {tensor_parallel}; {each}, so start "
            f"torchrun with --nproc-per-node (times --nnodes) equal to {tensor_parallel}, or pass "
            f"--tensor-parallel {launch.world_size}"
        )


def is_follower(tensor_parallel: Optional[int], environ=None) -> bool:
    """Whether this process is a follower rank of a tensor-parallel launch."""
    if tensor_parallel is None or tensor_parallel <= 1:
        return False
    launch = launch_from_env(environ)
    return launch is not None and launch.rank != 0


class _Member:
    """This process's membership of the group: the store and the gloo group."""

    def __init__(self, launch: Launch, connect_timeout: float):
        global _joined
        with _join_lock:
            if _joined:
                raise LaunchError(
                    "this process already joined a tensor-parallel group; a group is not "
                    "rebuilt in place: restart the launch (torchrun --max-restarts)"
                )
            if dist.is_initialized():
                raise LaunchError(
                    "torch.distributed is already initialized in this process; the "
                    "tensor-parallel group sets it up itself"
                )
            _joined = True
        timeout = timedelta(seconds=connect_timeout)
        store, rank, world = next(dist.rendezvous("env://", timeout=timeout))
        if (rank, world) != (launch.rank, launch.world_size):
            raise LaunchError(
                f"the rendezvous placed this process at rank {rank} of {world}, "
                f"the environment says {launch.rank} of {launch.world_size}"
            )
        dist.init_process_group(
            "gloo", store=dist.PrefixStore("hx_tp/pg", store), rank=rank, world_size=world, timeout=timeout
        )
        self.launch = launch
        self.rank, self.world_size = rank, world
        self.group = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
        self.store = dist.PrefixStore("hx_tp/", store)
        self._store_lock = threading.Lock()
        self.closed = False

    def store_set(self, key: str, value: str) -> None:
        with self._store_lock:
            self.store.set(key, value)

    def store_get(self, key: str) -> Optional[str]:
        with self._store_lock:
            if not self.store.check([key]):
                return None
            return self.store.get(key).decode()

    def broadcast_obj(self, obj):
        """Rank 0's obj on every rank (start-up only: no limit)."""
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def all_gather_obj(self, obj) -> list:
        """Every rank's obj, in rank order (start-up only: no limit)."""
        out = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def close(self) -> None:
        """Leave the group (its sockets close; peers still in it see the connection end)."""
        if self.closed:
            return
        self.closed = True
        try:
            dist.destroy_process_group()
        except Exception as e:  # a broken group is torn down as far as it goes
            log.debug("destroying the tensor-parallel group: %s", e)


def _short(text: str) -> str:
    """A gloo error's first sentence, without the source location it starts with."""
    text = re.sub(r"^\[[^\]]*\.(cc|cpp|h):\d+\]\s*", "", text.strip().splitlines()[0] if text.strip() else "")
    return text.split(". ")[0].rstrip(".")


def _wait(work, seconds: float, what: str) -> None:
    try:
        work.wait(timeout=timedelta(seconds=max(seconds, 1e-3)))
    except RuntimeError as e:
        text = str(e)
        raise CollectiveError(f"{what} failed: {_short(text)}", timed_out="timed out" in text.lower()) from e


# ---------------------------------------------------------------------------- the collective


class GlooCollective(Collective):
    """A process rank's collectives over a gloo group; each wait bounded by `timeout()` seconds."""

    def __init__(self, group, rank: int, world_size: int, timeout: Callable[[], float]):
        self.group = group
        self.rank = rank
        self.world_size = world_size
        self._timeout = timeout
        self._entered = 0

    @property
    def entered(self) -> int:
        return self._entered

    def reset(self) -> None:
        """A new step: collectives are counted from zero."""
        self._entered = 0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        self._entered += 1
        x = x.contiguous()
        _wait(
            dist.all_reduce(x, group=self.group, async_op=True),
            self._timeout(),
            f"all-reduce {self._entered} of the step",
        )
        return x

    def gather_columns(self, x: torch.Tensor, widths: Sequence[int]) -> Optional[torch.Tensor]:
        self._entered += 1
        width = max(widths)
        pad = torch.zeros(*x.shape[:-1], width, dtype=x.dtype)
        pad[..., : x.shape[-1]] = x
        parts = [torch.empty_like(pad) for _ in range(self.world_size)] if self.rank == 0 else None
        _wait(dist.gather(pad, parts, dst=0, group=self.group, async_op=True), self._timeout(), "gathering the logits")
        if self.rank != 0:
            return None
        return torch.cat([p[..., :w] for p, w in zip(parts, widths)], dim=-1)


# ---------------------------------------------------------------------------- step messages


def encode_step(batch: Sequence[tuple], all_logits: bool) -> torch.Tensor:
    """A step as one int64 tensor: [all_logits, n, (tokens, start, blocks) x n, tokens..., block ids...]."""
    head, tokens, tables = [int(bool(all_logits)), len(batch)], [], []
    for ids, start, table in batch:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        head += [len(ids), int(start), len(table)]
        tokens += ids
        tables += [int(b) for b in table]
    return torch.tensor(head + tokens + tables, dtype=torch.long)


def decode_step(payload: torch.Tensor) -> Tuple[list, bool]:
    """The (ids, start_pos, block_table) list and all_logits flag of an encoded step."""
    v = payload.tolist()
    all_logits, n = bool(v[0]), int(v[1])
    meta = [v[2 + 3 * i : 5 + 3 * i] for i in range(n)]
    at = 2 + 3 * n
    batch = []
    for n_tok, _, _ in meta:
        batch.append([torch.tensor(v[at : at + n_tok], dtype=torch.long)])
        at += n_tok
    for item, (_, start, n_blk) in zip(batch, meta):
        item += [start, v[at : at + n_blk]]
        at += n_blk
    return [tuple(b) for b in batch], all_logits


def _send(group, kind: int, payload: Optional[torch.Tensor], seconds: float) -> None:
    head = torch.tensor([kind, 0 if payload is None else payload.numel()], dtype=torch.long)
    _wait(dist.broadcast(head, 0, group=group, async_op=True), seconds, "sending the step")
    if payload is not None:
        _wait(dist.broadcast(payload, 0, group=group, async_op=True), seconds, "sending the step")


def _receive(group) -> Tuple[int, Optional[torch.Tensor]]:
    head = torch.zeros(2, dtype=torch.long)
    dist.broadcast(head, 0, group=group)
    kind, n = int(head[0]), int(head[1])
    if n == 0:
        return kind, None
    payload = torch.empty(n, dtype=torch.long)
    dist.broadcast(payload, 0, group=group)
    return kind, payload


# ---------------------------------------------------------------------------- heartbeats and liveness


def _beat_key(rank: int) -> str:
    return f"beat/{rank}"


def _process_identity() -> dict:
    try:
        ns = os.readlink("/proc/self/ns/pid")
    except OSError:
        ns = ""
    return {"host": socket.gethostname(), "pid": os.getpid(), "pid_ns": ns}


def _process_gone(pid: int) -> bool:
    """Whether process `pid` (of this machine and pid namespace) has exited."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
        return state in ("Z", "X")
    except FileNotFoundError:
        return True
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except OSError:
            return False
        return False


def heartbeat_interval(limit: float) -> float:
    """Seconds between heartbeats for a step limit: ten per limit, at most one a second."""
    return max(0.05, min(1.0, limit / 10))


class _Heartbeat:
    """A follower's thread that writes (count, step, collectives entered) to the store."""

    def __init__(self, member: _Member, progress: Callable[[], Tuple[int, int]], interval: float):
        self._member, self._progress, self._interval = member, progress, interval
        self._stop = threading.Event()
        self._count = 0
        self.beat()
        self._thread = threading.Thread(target=self._loop, name="hx-tp-heartbeat", daemon=True)
        self._thread.start()

    def beat(self) -> None:
        self._count += 1
        step, entered = self._progress()
        self._member.store_set(_beat_key(self._member.rank), f"{self._count} {step} {entered}")

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.beat()
            except Exception:  # the store went away with the leader: the step channel will tell
                return

    def stop(self) -> None:
        self._stop.set()


class _FollowerWatch:
    """The leader's view of its followers: last heartbeat, when it last changed, whether they live."""

    def __init__(self, member: _Member, statuses: List[dict], limit: float):
        self._member = member
        self._limit = limit
        me = _process_identity()
        self.followers = list(range(1, member.world_size))
        self._local = {
            r: statuses[r]["pid"]
            for r in self.followers
            if statuses[r]["host"] == me["host"] and statuses[r]["pid_ns"] == me["pid_ns"]
        }
        now = time.monotonic()
        self._beat: Dict[int, Tuple[int, int, int]] = {r: (0, 0, 0) for r in self.followers}
        self._changed = {r: now for r in self.followers}

    def poll(self) -> None:
        for r in self.followers:
            raw = self._member.store_get(_beat_key(r))
            if raw is None:
                continue
            beat = tuple(int(x) for x in raw.split())
            if beat != self._beat[r]:
                self._beat[r], self._changed[r] = beat, time.monotonic()

    def count(self, r: int) -> int:
        return self._beat[r][0]

    def progress(self, r: int) -> Tuple[int, int]:
        """(step, collectives entered) at rank r's last heartbeat."""
        return self._beat[r][1], self._beat[r][2]

    def dead(self) -> Dict[int, str]:
        """Followers known gone: rank -> why."""
        out = {}
        now = time.monotonic()
        for r in self.followers:
            pid = self._local.get(r)
            if pid is not None and _process_gone(pid):
                out[r] = f"has exited (pid {pid})"
            elif now - self._changed[r] > self._limit:
                out[r] = f"sent no heartbeat for {now - self._changed[r]:.1f} s (its process is gone or frozen)"
        return out

    def after_failure(self, seconds: float) -> Dict[int, str]:
        """The followers to name once a step failed: rank -> why.

        Waits up to `seconds` for every follower either to beat again (its
        progress is then current) or to be known dead; one that did neither
        is named as silent.
        """
        self.poll()
        marks = {r: self.count(r) for r in self.followers}
        until = time.monotonic() + seconds
        while True:
            self.poll()
            dead = self.dead()
            fresh = [r for r in self.followers if self.count(r) != marks[r]]
            if all(r in dead or r in fresh for r in self.followers) or time.monotonic() >= until:
                break
            time.sleep(heartbeat_interval(self._limit))
        for r in self.followers:
            if r not in fresh and r not in dead:
                dead[r] = "sent no heartbeat since the failure (its process is gone or frozen)"
        return dead


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}".splitlines()[0]


def _check_statuses(statuses: List[dict], rank: int, own_error: Optional[BaseException]) -> None:
    """After the start-up exchange: raise on every rank if any rank failed to join."""
    bad = [(r, s["error"]) for r, s in enumerate(statuses) if s.get("error")]
    if not bad:
        return
    if own_error is not None:
        raise own_error
    raise LaunchError("tensor-parallel start-up failed on " + "; ".join(f"rank {r}: {msg}" for r, msg in bad))


def _exchange(member: _Member, status: dict, own: Optional[BaseException]) -> List[dict]:
    """Every rank's status after a start-up stage, in rank order; raises on every rank if any rank failed it."""
    statuses = member.all_gather_obj(status)
    _check_statuses(statuses, member.rank, own)
    return statuses


def _rank_launch(
    launch: Optional[Launch], tensor_parallel: int, device: str, leads: bool, wrong_rank: str, alone: str = ""
) -> Launch:
    """This process's launch (torchrun's environment's when `launch` is None), checked for its role.

    leads: whether the caller is rank 0's class. wrong_rank: the LaunchError
    message for a process of the other role ("{rank}" is its rank). alone:
    the class that runs the ranks in one process, named when there is no launch.
    """
    launch = launch if launch is not None else launch_from_env()
    if launch is None:
        msg = "no torchrun launch found (WORLD_SIZE is not set)"
        raise LaunchError(f"{msg}; in one process use {alone}" if alone else msg)
    if (launch.rank == 0) != leads:
        raise LaunchError(wrong_rank.format(rank=launch.rank))
    check_launch(tensor_parallel, launch, device=device)
    return launch


def _check_hello(hello: dict, source: ModelSource, rank: int, world_size: int) -> None:
    """LaunchError unless this follower's tensor_parallel and model are rank 0's."""
    mine = model_fingerprint(source.config, source.tensors)
    if hello["tensor_parallel"] != world_size:
        raise LaunchError(
            f"rank 0 runs tensor_parallel {hello['tensor_parallel']}, rank {rank} was started with {world_size}"
        )
    if hello["fingerprint"] != mine:
        raise LaunchError(
            f"rank {rank} loaded a different model than rank 0 (fingerprint {mine}, rank 0 has {hello['fingerprint']})"
        )


# ---------------------------------------------------------------------------- the two roles, on either device

# How every failure message of a multi-process leader ends.
_FAILED = "; the model is failed (restart the launch)"


def _ranks_why(why: Dict[int, str]) -> str:
    return "; ".join(f"rank {r} {text}" for r, text in sorted(why.items()))


class _LeaderRole:
    """Rank 0's side of the protocol, shared by the CPU and the GPU leader.

    It owns the step limit, the failure (set once, under a lock), the
    StepWatchdog whose thread checks the followers' heartbeats and processes
    between steps, and `close()` with its shutdown message. A subclass calls
    `_init_leader` before it joins the group, sets `member`, calls
    `_watch_followers` once the start-up exchange is done, and gives
    `_diagnose(step, headline)` (the failure's message, naming the rank),
    `_holds_shard()` and `_release()` (drop rank 0's shard, leave the group)
    and, where rank 0's own work must be stopped before a failure's message
    is built, `_abort()`.
    """

    member: _Member

    def _init_leader(self, step_timeout: float) -> None:
        self.step_timeout = step_timeout
        self._failure: Optional[DeviceError] = None
        self._fail_lock = threading.Lock()
        self._closed = False
        self._steps = 0

    def _watch_followers(self, statuses: List[dict], name: str) -> None:
        self._watch = _FollowerWatch(self.member, statuses, self.step_timeout)
        self._watchdog = StepWatchdog(
            self.step_timeout,
            self._overrun,
            interval=heartbeat_interval(self.step_timeout),
            on_tick=self._tick,
            name=name,
        )

    def _log(self) -> logging.Logger:
        return logging.getLogger(type(self).__module__)

    def _tick(self) -> None:
        if self._failure is not None or self._closed:
            return
        self._watch.poll()
        dead = self._watch.dead()
        if dead:
            self._fail(lambda: "tensor-parallel " + _ranks_why(dead) + _FAILED)

    def _overrun(self, step: int, seconds: float) -> None:
        self._fail(
            lambda: self._diagnose(step, f"tensor-parallel step {step} did not finish within {self.step_timeout:g} s")
        )

    def _diagnose(self, step: int, headline: str) -> str:
        """headline, plus which rank failed step `step` (the watchdog's thread or the step's own)."""
        raise NotImplementedError

    def _name_dead(self, headline: str, seconds: float) -> Optional[str]:
        """headline naming the followers dead or silent after a failure (waiting up to `seconds`), else None."""
        dead = self._watch.after_failure(seconds)
        return headline + ": " + _ranks_why(dead) + _FAILED if dead else None

    def _abort(self) -> None:
        """Stop rank 0's own work in flight; called once, before the failure's message is built."""

    def _fail(self, message: Callable[[], str]) -> DeviceError:
        """Fail once: `_abort()`, then `message` (which may wait to name the rank); later calls get that failure."""
        with self._fail_lock:
            if self._failure is None:
                self._abort()
                self._failure = DeviceError(message())
                self._log().error("%s", self._failure)
            return self._failure

    def _holds_shard(self) -> bool:
        """Whether rank 0 still holds its shard."""
        raise NotImplementedError

    def _release(self) -> None:
        """Drop rank 0's shard and leave the group."""
        raise NotImplementedError

    def close(self) -> None:
        """Tell the followers to stop (unless the group failed), then drop rank 0's shard and leave the group."""
        if self._closed:
            return
        self._closed = True
        self._watchdog.close()
        if self._failure is None and self._holds_shard():
            group = self.member.group
            try:
                _send(group, SHUTDOWN, None, self.step_timeout)
                _wait(dist.barrier(group=group, async_op=True), self.step_timeout, "shutting down")
            except CollectiveError as e:
                self._log().warning("tensor-parallel shutdown: %s", e)
        self._release()


class _FollowerRole:
    """A follower's side of the protocol, shared by the CPU and the GPU follower.

    A subclass calls `_init_follower` first, sets `member`, calls `_hello`
    for rank 0's settings and `_start_heartbeat` once its shard is ready, and
    gives `_serve_step(payload)`: one encoded step, run on this rank.
    """

    def _init_follower(self, launch: Launch) -> None:
        self.rank = launch.rank
        self.steps = 0
        self.step_timeout = defaults.DEFAULT_STEP_TIMEOUT
        self._heartbeat: Optional[_Heartbeat] = None

    def _hello(self) -> dict:
        """Rank 0's settings (its start-up broadcast); the step limit is taken from them."""
        hello = self.member.broadcast_obj(None)
        self.step_timeout = float(hello["step_timeout"])
        return hello

    def _start_heartbeat(self, progress: Callable[[], Tuple[int, int]]) -> None:
        self._heartbeat = _Heartbeat(self.member, progress, heartbeat_interval(self.step_timeout))

    def _stop_heartbeat(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.stop()

    def _serve_step(self, payload: torch.Tensor) -> None:
        raise NotImplementedError

    def run(self) -> None:
        """Serve steps until the leader's shutdown message."""
        group = self.member.group
        while True:
            kind, payload = _receive(group)
            if kind == SHUTDOWN:
                _wait(dist.barrier(group=group, async_op=True), self.step_timeout, "shutting down")
                return
            if kind != STEP or payload is None:
                raise LaunchError(f"rank {self.rank} got an unknown message kind {kind} from rank 0")
            self._serve_step(payload)


# ---------------------------------------------------------------------------- the leader


class DistributedLeaderBackend(_LeaderRole, ShardedBackend):
    """Rank 0 of a multi-process tensor-parallel group: the Backend the scheduler drives (see the module docstring)."""

    device = "cpu"

    def __init__(
        self,
        source: ModelSource,
        n_ctx: int,
        tensor_parallel: int,
        launch: Optional[Launch] = None,
        dtype: torch.dtype = torch.float32,
        progress: Optional[bool] = None,
        max_num_seqs: int = defaults.DEFAULT_MAX_NUM_SEQS,
        kv_cache_memory: Optional[int] = None,
        block_size: int = DEFAULT_BLOCK_SIZE,
        prefix_cache: bool = True,
        step_timeout: float = defaults.DEFAULT_STEP_TIMEOUT,
        connect_timeout: float = defaults.DEFAULT_TP_CONNECT_TIMEOUT,
    ):
        cfg = source.config
        check_positive_ints(max_num_seqs=max_num_seqs, block_size=block_size, max_context=n_ctx)
        if dtype not in _DTYPES.values():
            raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype}")
        self._init_leader(check_step_timeout(step_timeout))
        launch = _rank_launch(
            launch,
            tensor_parallel,
            "cpu",
            True,
            "rank {rank} is a follower: it runs Follower, not the leader's backend",
            alone="ShardedCPUBackend",
        )
        plan = shard_plan(cfg, tensor_parallel)
        plan.check(source.tensors)
        self.plan = plan
        self.tensor_parallel = plan.world_size
        blocks = pool_blocks(
            n_ctx, block_size, kv_bytes_per_position(plan, dtype), kv_cache_memory, DEFAULT_CPU_POOL_CONTEXTS * n_ctx
        )
        self._deadline = 0.0
        self.model: Optional[ShardModel] = None
        self.member = _Member(launch, connect_timeout)
        try:
            hello = {
                "tensor_parallel": plan.world_size,
                "n_ctx": n_ctx,
                "num_blocks": blocks,
                "block_size": block_size,
                "step_timeout": self.step_timeout,
                "dtype": next(k for k, v in _DTYPES.items() if v == dtype),
                "fingerprint": model_fingerprint(cfg, source.tensors),
            }
            self.member.broadcast_obj(hello)
            status, own = dict(_process_identity(), error=None), None
            try:
                self.collective = GlooCollective(
                    self.member.group, 0, plan.world_size, lambda: self._deadline - time.monotonic()
                )
                self.model = ShardModel(
                    source,
                    plan,
                    0,
                    self.collective,
                    n_ctx,
                    dtype=dtype,
                    progress=progress,
                    num_blocks=blocks,
                    block_size=block_size,
                )
            except Exception as e:
                status["error"], own = _one_line(e), e
            statuses = _exchange(self.member, status, own)
        except BaseException:
            self.model = None
            self.member.close()
            raise
        self.config = cfg
        self.n_ctx = self.model.max_context
        self.max_num_seqs = max_num_seqs
        self.blocks = KVBlockManager(blocks, block_size, prefix_cache=prefix_cache)
        self._watch_followers(statuses, "hx-tp-leader-watchdog")

    # ------------------------------------------------------------------ steps

    def _run(self, batch: list, all_logits: bool) -> list:
        model = self._live()
        self._steps += 1
        step = self._steps
        self.collective.reset()
        self._deadline = time.monotonic() + self.step_timeout
        self._watchdog.begin(step)
        try:
            _send(self.member.group, STEP, encode_step(batch, all_logits), self._deadline - time.monotonic())
            out = model.forward_batch(batch, all_logits=all_logits)
        except Exception as e:
            # Past the send every rank is inside the step: any failure leaves the group out of step.
            # The message is built now: `e` is unbound once this except clause ends.
            msg = f"tensor-parallel step {step} failed ({e})"
            err = self._fail(lambda: self._diagnose(step, msg))
            self._release()
            raise err from e
        finally:
            self._watchdog.end()
        if self._failure is not None:
            self._release()
            raise self._failure
        return out

    # ------------------------------------------------------------------ failure

    def _diagnose(self, step: int, headline: str) -> str:
        """headline, plus which rank failed: a dead one, else the one furthest behind."""
        named = self._name_dead(headline, self.step_timeout)
        if named is not None:
            return named
        watch = self._watch
        progress = {0: (step, self.collective.entered)}
        progress.update({r: watch.progress(r) for r in watch.followers})
        low = min(progress.values())
        late = [r for r, p in progress.items() if p == low]
        if len(late) == len(progress):
            return (
                headline
                + f": every rank reached collective {low[1]} of step {low[0]}, which did not complete"
                + _FAILED
            )
        ranks = ", ".join(str(r) for r in late)
        return (
            headline + f": rank {ranks} did not answer (it is at collective {low[1]} of step {low[0]}; "
            f"rank 0 is at collective {self.collective.entered} of step {step})" + _FAILED
        )

    def _holds_shard(self) -> bool:
        return self.model is not None

    def _release(self) -> None:
        self.model = None
        self.member.close()

    # ------------------------------------------------------------------ facts

    def is_healthy(self) -> bool:
        """False once a rank failed, missed the step limit or stopped answering."""
        return self._failure is None and self.model is not None

    def memory_info(self) -> dict:
        """Bytes of rank 0's weights and KV pool, and the pool's blocks."""
        m = self.model
        if m is None:
            return {}
        out = {
            "device": "cpu",
            "tensor_parallel": self.tensor_parallel,
            "rank": 0,
            "weights_bytes": m.weight_bytes(),
            "kv_cache_bytes": 2 * m.k_pool.numel() * m.k_pool.element_size(),
        }
        out.update(self.blocks.stats())
        return out

    def _live(self) -> ShardModel:
        if self._failure is not None:
            raise self._failure
        m = self.model
        if m is None:
            raise EngineClosedError("the tensor-parallel backend was closed")
        return m


# ---------------------------------------------------------------------------- the followers


class Follower(_FollowerRole):
    """A follower rank: joins the group, loads its shard, then `run()` serves the leader's steps.

    A failed collective makes `run()` raise CollectiveError.
    """

    def __init__(
        self,
        source: ModelSource,
        tensor_parallel: int,
        launch: Optional[Launch] = None,
        progress: Optional[bool] = None,
        connect_timeout: float = defaults.DEFAULT_TP_CONNECT_TIMEOUT,
    ):
        launch = _rank_launch(
            launch, tensor_parallel, "cpu", False, "rank 0 leads: it runs DistributedLeaderBackend, not Follower"
        )
        plan = shard_plan(source.config, tensor_parallel)
        plan.check(source.tensors)
        self._init_follower(launch)
        self.member = _Member(launch, connect_timeout)
        try:
            hello = self._hello()
            status, own = dict(_process_identity(), error=None), None
            try:
                _check_hello(hello, source, self.rank, plan.world_size)
                self.collective = GlooCollective(
                    self.member.group, self.rank, plan.world_size, lambda: self.step_timeout
                )
                self.model = ShardModel(
                    source,
                    plan,
                    self.rank,
                    self.collective,
                    hello["n_ctx"],
                    dtype=_DTYPES[hello["dtype"]],
                    progress=progress,
                    num_blocks=hello["num_blocks"],
                    block_size=hello["block_size"],
                )
            except Exception as e:
                status["error"], own = _one_line(e), e
            _exchange(self.member, status, own)
            self._start_heartbeat(lambda: (self.steps, self.collective.entered))
        except BaseException:
            self.member.close()
            raise

    def _serve_step(self, payload: torch.Tensor) -> None:
        batch, all_logits = decode_step(payload)
        self.steps += 1
        self.collective.reset()
        self.model.forward_batch(batch, all_logits=all_logits)

    def close(self) -> None:
        """Stop the heartbeat, leave the group and drop the shard."""
        self._stop_heartbeat()
        self.model = None
        self.member.close()


def follow(
    source: ModelSource, tensor_parallel: int, launch: Optional[Launch] = None, progress: Optional[bool] = None
) -> None:
    """Run this process as a follower rank until the leader shuts the group down."""
    f = Follower(source, tensor_parallel, launch=launch, progress=progress)
    try:
        f.run()
    finally:
        f.close()
