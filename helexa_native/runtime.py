"""Device workers from Python: one per CUDA device per process, shared by every model on it.

A worker is a C++ thread that owns its device (context, streams, cuBLAS and
NCCL handles, all device memory); these wrappers submit jobs to it and wait
with the GIL released. The C++ registry (csrc/runtime/registry.cpp) is the
one record of which worker serves a device: this module keeps none of its
own, and wrappers of one worker compare equal. Failures arrive as `DeviceError` naming the device; a
worker hit by a sticky CUDA error is poisoned and fails every later job fast.
CUDA documents such errors (illegal address, launch failure, ...) as ruining
CUDA for the whole process, so every CUDA worker of the process is poisoned
with it; the process keeps running (the CPU path, the server's error replies),
and a new process gets every device back.
"""

from __future__ import annotations

import atexit
from typing import Optional, Sequence

from . import _C
from .errors import BuildMismatchError, DeviceError


def _arch_tag_cc(tag: str) -> tuple[int, int, bool]:
    """'89' -> (8, 9, False), '100a' -> (10, 0, True)."""
    specific = tag.endswith("a")
    digits = tag.rstrip("af")
    return int(digits[:-1]), int(digits[-1]), specific


def build_supports(archs: Sequence[str], major: int, minor: int) -> bool:
    """True when machine code built for one of `archs` runs on a device of compute capability major.minor.

    SASS for sm_XY runs on sm_XZ with Z >= Y (same major); arch-specific
    ('a') targets run only on their exact architecture.
    """
    for tag in archs:
        try:
            a_major, a_minor, specific = _arch_tag_cc(tag)
        except ValueError:
            continue
        if a_major != major:
            continue
        if a_minor == minor or (not specific and a_minor < minor):
            return True
    return False


def _mismatch_message(device_index: int, major: int, minor: int, archs: Sequence[str]) -> str:
    held = ", ".join("sm_" + a for a in archs) if archs else "no GPU code"
    tag = f"{major}{minor}"
    return (
        f"cuda:{device_index} is sm_{tag}, but this build holds {held}; install helexa_native "
        f"built for sm_{tag} (local version +sm{tag}, see build_arch.sh)"
    )


def _as_buffer(data):
    """A C-contiguous buffer over `data` (bytes-like, numpy array or CPU torch tensor)."""
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        torch = None
    if torch is not None and isinstance(data, torch.Tensor):
        if data.device.type != "cpu":
            raise ValueError(f"upload takes host data; got a tensor on {data.device}")
        return data.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
    return data


class PendingJob:
    """A submitted job whose result is collected later."""

    def __init__(self, native):
        self._p = native

    def wait(self) -> int:
        """Block (GIL released) until the job ends; return its result or raise its error."""
        return self._p.wait()

    def done(self) -> bool:
        """True once the job has ended."""
        return self._p.done()


class Worker:
    """The thread owning one CUDA device (or a host-only worker, device -1)."""

    def __init__(self, native):
        self._w = native

    @property
    def native(self):
        """The `_C.DeviceWorker`, for C++ bindings that submit model jobs."""
        return self._w

    @property
    def device_index(self) -> int:
        return self._w.device_index

    @property
    def name(self) -> str:
        """'cuda:0', or 'host' for a host-only worker."""
        return self._w.name

    @property
    def host_only(self) -> bool:
        return self._w.host_only

    @property
    def compute_capability(self) -> tuple[int, int]:
        return tuple(self._w.compute_capability)

    def vram(self) -> tuple[int, int]:
        """(free, total) bytes of device memory."""
        return tuple(self._w.vram())

    def upload(self, data) -> tuple[int, int]:
        """Copy host data to new device memory; returns (handle, nbytes)."""
        return tuple(self._w.upload(_as_buffer(data)))

    def download(self, handle: int, nbytes: int = -1) -> bytes:
        """Copy a device buffer back to the host (all of it by default)."""
        return self._w.download(handle, nbytes)

    def free(self, handle: int) -> None:
        """Free a device buffer or resource by handle."""
        self._w.free(handle)

    def synchronize(self) -> None:
        """Wait for all device work queued so far."""
        self._w.synchronize()

    def is_poisoned(self) -> bool:
        return self._w.is_poisoned()

    def poison_reason(self) -> str:
        return self._w.poison_reason()

    def is_shut_down(self) -> bool:
        return self._w.is_shut_down()

    def nccl_allreduce_test_async(self, handle: int, count: int, dtype: str) -> PendingJob:
        """Queue an in-place sum all-reduce of `count` 'f32' or 'bf16' elements over a device buffer.

        Every rank must queue its part before any is waited on.
        """
        return PendingJob(self._w.nccl_allreduce_test_async(handle, count, dtype))

    def shutdown(self) -> None:
        """Fail queued jobs, free everything the worker holds and join its thread."""
        self._w.shutdown()

    def __eq__(self, other) -> bool:
        return isinstance(other, Worker) and self._w == other._w

    def __hash__(self) -> int:
        return hash(self._w)

    def __repr__(self) -> str:
        state = "poisoned" if self.is_poisoned() else ("shut down" if self.is_shut_down() else "running")
        return f"<Worker {self.name} {state}>"


def _check_arch(w) -> None:
    if w.host_only:
        return
    major, minor = w.compute_capability
    archs = list(_C.compiled_archs())
    if not build_supports(archs, major, minor):
        raise BuildMismatchError(_mismatch_message(w.device_index, major, minor, archs))


def get_worker(device_index: int) -> Worker:
    """The worker for CUDA device `device_index` (started on first use; -1: a new host-only worker).

    Raises BuildMismatchError when this build holds no machine code for the
    device's architecture, DeviceError when the device cannot be opened.
    """
    native = _C.DeviceWorker(device_index)
    try:
        _check_arch(native)
    except BuildMismatchError:
        native.shutdown()
        raise
    return Worker(native)


def nccl_unique_id() -> bytes:
    """A fresh NCCL unique id; rank 0 makes it and every rank receives the same bytes."""
    return _C.nccl_unique_id()


def init_nccl_group(
    workers: Sequence[Worker], unique_id: Optional[bytes] = None, first_rank: int = 0, nranks: Optional[int] = None
) -> bytes:
    """Give each worker its NCCL communicator: workers[i] becomes rank first_rank + i of nranks.

    Ranks of one process are its workers; for ranks spread over processes
    (torchrun) pass the same `unique_id` everywhere (from the rendezvous
    store) with each process's `first_rank` and the total `nranks`. All inits
    are submitted before any is waited on, since each blocks until every rank
    has joined. Returns the unique id used.
    """
    if not workers:
        raise ValueError("init_nccl_group needs at least one worker")
    devices = [w.device_index for w in workers]
    if len(set(devices)) != len(devices):
        raise ValueError(f"init_nccl_group needs distinct devices, got {devices}")
    for w in workers:
        if w.host_only:
            raise ValueError(f"{w.name} is host-only and cannot join an NCCL group")
        if w.is_poisoned():
            raise DeviceError(f"{w.name} is unusable after an earlier device error: {w.poison_reason()}")
    total = len(workers) if nranks is None else nranks
    uid = unique_id if unique_id is not None else nccl_unique_id()
    pending = [w.native.nccl_init_async(uid, total, first_rank + i) for i, w in enumerate(workers)]
    errors = []
    for p in pending:
        try:
            p.wait()
        except Exception as e:  # every rank is waited on before reporting
            errors.append(e)
    if errors:
        raise errors[0]
    return uid


def shutdown_all() -> None:
    """Shut down every device worker of this process (also runs at interpreter exit)."""
    _C.shutdown_all()


atexit.register(shutdown_all)
