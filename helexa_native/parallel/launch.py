"""The one place an Engine picks its tensor-parallel backend.

device cpu, one process        -> ShardedCPUBackend (ranks are threads)
device cpu, under torchrun     -> rank 0: DistributedLeaderBackend;
                                  other ranks: follow() until the leader
                                  shuts down, then SystemExit(0)
device cuda, one process       -> ShardedCUDABackend (one device worker per
                                  GPU: cuda:index .. or `devices`)
device cuda, under torchrun    -> one GPU per process (cuda:LOCAL_RANK);
                                  rank 0: CUDALeaderBackend; other ranks:
                                  follow_cuda() until the leader shuts
                                  down, then SystemExit(0)
"""

from __future__ import annotations

from typing import Optional, Sequence

from .. import defaults
from ..config import ModelSource
from ..errors import LaunchError


def check_tensor_parallel(tensor_parallel) -> int:
    """tensor_parallel as a positive int (None means 1), or ValueError."""
    if tensor_parallel is None:
        return 1
    if isinstance(tensor_parallel, bool) or not isinstance(tensor_parallel, int) or tensor_parallel < 1:
        raise ValueError(f"tensor_parallel must be a positive integer, got {tensor_parallel!r}")
    return tensor_parallel


def check_step_timeout(step_timeout) -> float:
    """step_timeout as a positive float, or ValueError."""
    if isinstance(step_timeout, bool) or not isinstance(step_timeout, (int, float)) or not step_timeout > 0:
        raise ValueError(f"step_timeout must be a positive number of seconds, got {step_timeout!r}")
    return float(step_timeout)


def tensor_parallel_backend(
    source: ModelSource,
    device: str,
    device_index: Optional[int],
    n_ctx: int,
    tensor_parallel: int,
    *,
    progress: Optional[bool] = None,
    max_num_seqs: int = defaults.DEFAULT_MAX_NUM_SEQS,
    kv_cache_memory: Optional[int] = None,
    prefix_cache: bool = True,
    step_timeout: float = defaults.DEFAULT_STEP_TIMEOUT,
    devices: Optional[Sequence[int]] = None,
    int8_activations: Optional[bool] = None,
):
    """The backend of `source` split over `tensor_parallel` ranks; a follower process never returns.

    devices (CUDA, one process): the GPUs, rank r on devices[r]; default
    cuda:device_index .. cuda:device_index + tensor_parallel - 1.
    """
    if device == "cuda":
        return _cuda_backend(
            source,
            device_index or 0,
            n_ctx,
            tensor_parallel,
            devices=devices,
            progress=progress,
            max_num_seqs=max_num_seqs,
            kv_cache_memory=kv_cache_memory,
            prefix_cache=prefix_cache,
            step_timeout=step_timeout,
            int8_activations=int8_activations,
        )
    from .distributed import DistributedLeaderBackend, check_launch, follow, launch_from_env

    launch = launch_from_env()
    if launch is None:
        from .backend import ShardedCPUBackend

        return ShardedCPUBackend(
            source,
            n_ctx,
            tensor_parallel=tensor_parallel,
            progress=progress,
            max_num_seqs=max_num_seqs,
            kv_cache_memory=kv_cache_memory,
            prefix_cache=prefix_cache,
            step_timeout=step_timeout,
        )
    check_launch(tensor_parallel, launch)
    if launch.rank == 0:
        return DistributedLeaderBackend(
            source,
            n_ctx,
            tensor_parallel,
            launch=launch,
            progress=progress,
            max_num_seqs=max_num_seqs,
            kv_cache_memory=kv_cache_memory,
            prefix_cache=prefix_cache,
            step_timeout=step_timeout,
        )
    follow(source, tensor_parallel, launch=launch, progress=progress)
    raise SystemExit(0)


def _cuda_backend(
    source: ModelSource,
    device_index: int,
    n_ctx: int,
    tensor_parallel: int,
    *,
    devices: Optional[Sequence[int]],
    progress: Optional[bool],
    max_num_seqs: int,
    kv_cache_memory: Optional[int],
    prefix_cache: bool,
    step_timeout: float,
    int8_activations: Optional[bool],
):
    from .distributed import check_launch, launch_from_env

    launch = launch_from_env()
    if launch is None:
        from .cuda_backend import ShardedCUDABackend

        if devices is None:
            devices = list(range(device_index, device_index + tensor_parallel))
        elif len(devices) != tensor_parallel:
            raise ValueError(f"devices {list(devices)} name {len(devices)} GPUs, tensor_parallel is {tensor_parallel}")
        return ShardedCUDABackend(
            source,
            devices,
            n_ctx,
            int8_activations=int8_activations,
            max_num_seqs=max_num_seqs,
            kv_cache_memory=kv_cache_memory,
            prefix_cache=prefix_cache,
            step_timeout=step_timeout,
        )
    if devices is not None:
        raise LaunchError(
            "devices= names the GPUs of one process; under torchrun each rank's process drives cuda:LOCAL_RANK"
        )
    check_launch(tensor_parallel, launch, device="cuda")
    from .cuda_distributed import CUDALeaderBackend, follow_cuda

    if launch.rank == 0:
        return CUDALeaderBackend(
            source,
            n_ctx,
            tensor_parallel,
            launch=launch,
            int8_activations=int8_activations,
            max_num_seqs=max_num_seqs,
            kv_cache_memory=kv_cache_memory,
            prefix_cache=prefix_cache,
            step_timeout=step_timeout,
        )
    follow_cuda(source, tensor_parallel, launch=launch)
    raise SystemExit(0)


def run_follower(model, device: str, tensor_parallel: int, progress: Optional[bool] = None) -> int:
    """A follower process's whole life: load `model`, serve the leader's steps; the exit status."""
    from ..engine import default_model_path, resolve_device
    from ..loaders import load_source
    from .distributed import follow

    kind, _ = resolve_device(device)
    source = load_source(model if model is not None else default_model_path(), progress=progress)
    try:
        if kind == "cuda":
            from .cuda_distributed import follow_cuda

            follow_cuda(source, tensor_parallel)
        else:
            follow(source, tensor_parallel, progress=progress)
    finally:
        source.close()
    return 0
