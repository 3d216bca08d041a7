"""Device workers on real GPUs: memory accounting, large uploads, fault
poisoning, NCCL groups. Faults run in subprocesses: a sticky error ruins the
CUDA context of the process that hits it."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.gpu

VRAM_MARGIN = 256 << 20  # torch and the worker share the context; other processes may move a little
CYCLE_MARGIN = 8 << 20


def _C():
    import helexa_native._C as C

    return C


def _runtime():
    from helexa_native import runtime

    return runtime


def run_python(code: str, timeout: float = 300):
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=timeout
    )


def test_worker_thread_and_build_arch():
    rt = _runtime()
    w = rt.get_worker(0)
    assert w.name == "cuda:0"
    assert not w.host_only
    assert w.native.thread_name_job() == "hx-dev-0"
    assert w.compute_capability == torch.cuda.get_device_capability(0)
    assert rt.build_supports(_C().compiled_archs(), *w.compute_capability)
    assert rt.get_worker(0) == w


def test_vram_agrees_with_torch():
    w = _runtime().get_worker(0)
    free, total = w.vram()
    t_free, t_total = torch.cuda.mem_get_info(0)
    assert total == t_total
    assert abs(free - t_free) <= VRAM_MARGIN, (free, t_free)


def test_upload_free_cycles_return_vram():
    w = _runtime().get_worker(0)
    data = np.random.default_rng(0).integers(0, 256, size=64 << 20, dtype=np.uint8)
    h, _ = w.upload(data)  # first upload sets up staging; not part of the baseline
    w.free(h)
    base, _ = w.vram()
    for i in range(100):
        h, n = w.upload(data)
        assert n == data.nbytes
        if i == 0:
            used, _ = w.vram()
            assert base - used >= data.nbytes
            assert w.download(h) == data.tobytes()
        w.free(h)
    after, _ = w.vram()
    assert abs(after - base) <= CYCLE_MARGIN, (base, after)


@pytest.mark.slow
def test_large_upload_arrives_intact():
    """A 4 GiB upload from pageable memory, staged in many pinned chunks over
    several copy threads, comes back byte for byte (its speed is a benchmark
    figure: tools/gpu_bench.py prints it beside torch's pinned copy)."""
    w = _runtime().get_worker(0)
    nbytes = 4 << 30
    block = np.random.default_rng(1).integers(0, 256, size=64 << 20, dtype=np.uint8)
    data = np.tile(block, nbytes // block.nbytes)
    data[::4093] = 7  # not periodic, so a misplaced chunk cannot compare equal
    h, n = w.upload(data)
    assert n == nbytes
    back = np.frombuffer(w.download(h), dtype=np.uint8)
    assert np.array_equal(back, data)
    w.free(h)


def test_fault_poisons_the_worker_and_the_process_survives():
    code = """
        import time
        from helexa_native import runtime
        from helexa_native.errors import DeviceError
        w = runtime.get_worker(0)
        h, _ = w.upload(b"x" * 4096)
        try:
            w.native.inject_fault()
        except DeviceError as e:
            msg = str(e)
            assert msg.startswith("cuda:0: "), msg
            assert "cudaErrorIllegalAddress" in msg or "cudaErrorLaunchFailure" in msg, msg
            assert ".cpp:" in msg or ".cu:" in msg, msg
            assert e.poisoned
        else:
            raise SystemExit("the fault was not reported")
        assert w.is_poisoned()
        t0 = time.perf_counter()
        for call in (w.vram, w.synchronize, lambda: w.upload(b"y" * 10), lambda: w.native.echo_job(1)):
            try:
                call()
            except DeviceError as e:
                assert str(e).startswith("cuda:0 is unusable after an earlier device error: "), str(e)
            else:
                raise SystemExit("a poisoned worker ran a job")
        assert time.perf_counter() - t0 < 1.0
        w.free(h)   # memory went with the context; freeing still answers
        assert runtime.get_worker(0) == w
        runtime.shutdown_all()
        print("survived")
    """
    res = run_python(code)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.strip().endswith("survived")


HX_THREADS_SRC = """
import os
def hx_threads():
    names = []
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                name = f.read().strip()
        except OSError:
            continue
        if name.startswith("hx-dev-"):
            names.append(name)
    return names
"""


def test_shutdown_leaves_no_threads():
    # In a subprocess: shutting every worker down here would pull devices
    # from under models other test modules keep loaded.
    code = (
        HX_THREADS_SRC
        + """
import numpy as np
from helexa_native import runtime
assert hx_threads() == []
w = runtime.get_worker(0)
h, _ = w.upload(np.ones(256 << 20, dtype=np.uint8))   # starts the copy helpers
assert "hx-dev-0" in hx_threads()
runtime.shutdown_all()
assert w.is_shut_down()
assert hx_threads() == [], hx_threads()
w2 = runtime.get_worker(0)
assert w2 != w and w2.native.echo_job(9) == 9
runtime.shutdown_all()
assert hx_threads() == []
print("clean")
"""
    )
    res = run_python(code)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.strip().endswith("clean")


# ---------------------------------------------------------------- two GPUs


@pytest.mark.gpu2
def test_nccl_allreduce_two_workers():
    if not _C().nccl:
        pytest.skip("this build has no NCCL")
    # In a subprocess: communicators belong to fresh workers, and the final
    # shutdown must not take devices from other test modules.
    code = (
        HX_THREADS_SRC
        + """
import numpy as np
import torch
from helexa_native import runtime

def inputs(rank, n):
    # Small integers: every partial sum is exact in bf16 (8 significant bits).
    return ((np.arange(n) * (rank + 3)) % 17 - 8).astype(np.float32)

workers = [runtime.get_worker(0), runtime.get_worker(1)]
runtime.init_nccl_group(workers)
assert [w.native.nccl_rank for w in workers] == [0, 1]
n = 3 * 1024 + 7
xs = [inputs(r, n) for r in range(2)]
expect = torch.from_numpy(xs[0] + xs[1])
for dtype, tdt in (("f32", torch.float32), ("bf16", torch.bfloat16)):
    handles = [w.upload(torch.from_numpy(x).to(tdt))[0] for w, x in zip(workers, xs)]
    pending = [w.nccl_allreduce_test_async(h, n, dtype) for w, h in zip(workers, handles)]
    for p in pending:
        p.wait()
    for w, h in zip(workers, handles):
        got = torch.frombuffer(bytearray(w.download(h)), dtype=tdt).float()
        assert torch.equal(got, expect), dtype
        w.free(h)
runtime.shutdown_all()   # communicators destroyed on their own threads
assert all(w.is_shut_down() for w in workers)
assert hx_threads() == [], hx_threads()
again = [runtime.get_worker(0), runtime.get_worker(1)]
runtime.init_nccl_group(again)
h = [w.upload(np.full(8, r + 1, dtype=np.float32))[0] for r, w in enumerate(again)]
for p in [w.nccl_allreduce_test_async(x, 8, "f32") for w, x in zip(again, h)]:
    p.wait()
assert np.array_equal(np.frombuffer(again[1].download(h[1]), dtype=np.float32), np.full(8, 3.0, np.float32))
runtime.shutdown_all()
print("allreduce exact")
"""
    )
    res = run_python(code)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.strip().endswith("allreduce exact")


@pytest.mark.gpu2
def test_fault_on_device0_poisons_the_process_cleanly_and_a_new_process_gets_both_devices():
    # CUDA documents illegal-address / launch-failure errors as ruining CUDA
    # for the whole process ("the process must be terminated and relaunched"),
    # and on a two-GPU host cuda:1's own cudaMalloc did fail with cuda:0's
    # fault. The guarantee is therefore: the process survives, every worker
    # answers fast with an error naming the device that failed, cleanup still
    # succeeds, and a fresh process uses both devices.
    code = """
        import time
        import numpy as np
        from helexa_native import runtime
        from helexa_native.errors import DeviceError
        w0, w1 = runtime.get_worker(0), runtime.get_worker(1)
        data = np.arange(1 << 20, dtype=np.float32)
        h1, _ = w1.upload(data)
        assert np.array_equal(np.frombuffer(w1.download(h1), dtype=np.float32), data)
        try:
            w0.native.inject_fault()
        except DeviceError as e:
            assert str(e).startswith("cuda:0: "), str(e)
            assert e.poisoned
        else:
            raise SystemExit("the fault was not reported")
        assert w0.is_poisoned()
        t0 = time.perf_counter()
        for call in (w1.vram, lambda: w1.upload(data), w1.synchronize, lambda: w1.download(h1)):
            try:
                call()
            except DeviceError as e:
                assert str(e).startswith("cuda:1 is unusable after an earlier device error: "), str(e)
                assert "cuda:0: " in str(e), str(e)
                assert e.poisoned
            else:
                raise SystemExit("cuda:1 ran CUDA work after the process lost CUDA")
        assert time.perf_counter() - t0 < 1.0
        assert w1.is_poisoned()
        w1.free(h1)
        runtime.shutdown_all()
        print("contained")
    """
    res = run_python(code)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.strip().endswith("contained")

    fresh = """
        import numpy as np
        from helexa_native import runtime
        for dev in (1, 0):
            w = runtime.get_worker(dev)
            data = np.random.default_rng(dev).standard_normal(3 << 18).astype(np.float32)
            h, _ = w.upload(data)
            assert np.array_equal(np.frombuffer(w.download(h), dtype=np.float32), data)
            w.free(h)
            assert not w.is_poisoned()
        runtime.shutdown_all()
        print("both devices fine")
    """
    res = run_python(fresh)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.strip().endswith("both devices fine")
