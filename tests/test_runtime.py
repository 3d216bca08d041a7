"""Device-worker mechanics on a host-only worker: queue order, futures, errors,
GIL release, poisoning, shutdown and thread hygiene. Runs in every build
(device_index -1 is host-only even in a CUDA build)."""

import os
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
import torch

import helexa_native._C as C
from helexa_native import runtime
from helexa_native.errors import BuildMismatchError, DeviceError


def hx_threads():
    """Names of this process's threads whose name starts with hx-dev-."""
    names = []
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                name = f.read().strip()
        except OSError:  # thread exited while listing
            continue
        if name.startswith("hx-dev-"):
            names.append(name)
    return names


@pytest.fixture()
def worker():
    w = C.DeviceWorker(-1)
    yield w
    w.shutdown()


def test_jobs_run_on_the_named_worker_thread(worker):
    assert worker.name == "host"
    assert worker.host_only
    assert worker.device_index == -1
    assert worker.thread_name_job() == "hx-dev-host"
    assert threading.current_thread().name != "hx-dev-host"


def test_jobs_run_in_submission_order(worker):
    blocker = worker.sleep_job_async(50)  # let the queue fill behind it
    pending = [worker.sequence_job_async() for _ in range(200)]
    blocker.wait()
    seq = [p.wait() for p in pending]
    assert seq == list(range(seq[0], seq[0] + 200))


def test_results_and_exceptions_cross_threads(worker):
    assert worker.echo_job(-(2**40)) == -(2**40)
    with pytest.raises(DeviceError, match=r"^host: boom 42$") as ei:
        worker.raise_job("boom 42")
    assert ei.value.device == "host"
    assert ei.value.poisoned is False
    with pytest.raises(ValueError, match="bad size"):
        worker.bad_input_job("bad size")
    # Ordinary failures leave the worker usable.
    assert worker.echo_job(7) == 7
    assert not worker.is_poisoned()


def test_many_python_threads_submit_at_once(worker):
    n_threads, per_thread = 8, 150
    results = [None] * n_threads
    errors = []

    def run(i):
        try:
            results[i] = [worker.echo_job(i * 1000 + k) for k in range(per_thread)]
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    for i in range(n_threads):
        assert results[i] == [i * 1000 + k for k in range(per_thread)]


def test_gil_is_released_while_waiting(worker):
    done = threading.Event()

    def sleeper():
        worker.sleep_job(600)
        done.set()

    t = threading.Thread(target=sleeper)
    t.start()
    time.sleep(0.05)
    iterations, max_gap = 0, 0.0
    start = last = time.perf_counter()
    while time.perf_counter() - start < 0.3:
        now = time.perf_counter()
        max_gap = max(max_gap, now - last)
        last = now
        iterations += 1
    progressed_while_sleeping = not done.is_set()
    t.join(10)
    assert progressed_while_sleeping, "the sleep job ended before the main thread measured"
    assert iterations > 10_000
    assert max_gap < 0.2


def test_sticky_error_poisons_only_that_worker(worker):
    other = C.DeviceWorker(-1)
    try:
        handle, _ = worker.upload(np.arange(1000, dtype=np.int32))
        with pytest.raises(DeviceError, match=r"^host: simulate_sticky_error\(\) failed: simulated sticky") as ei:
            worker.simulate_sticky_error()
        assert ei.value.poisoned is True
        assert worker.is_poisoned()
        assert "simulate_sticky_error()" in worker.poison_reason()
        assert "runtime_bind.cpp:" in worker.poison_reason()

        t0 = time.perf_counter()
        for _ in range(20):
            with pytest.raises(
                DeviceError,
                match=r"host is unusable after an earlier device error: "
                r"simulate_sticky_error\(\)",
            ) as ei:
                worker.echo_job(1)
            assert ei.value.poisoned is True
        assert time.perf_counter() - t0 < 2.0
        with pytest.raises(DeviceError, match="unusable"):
            worker.upload(b"abc")
        # Freeing on a dead device succeeds: the memory went with it.
        worker.free(handle)

        assert not other.is_poisoned()
        assert other.echo_job(5) == 5
    finally:
        other.shutdown()


def test_shutdown_answers_queued_jobs(worker):
    assert worker.echo_job(0) == 0
    running = worker.sleep_job_async(300)
    time.sleep(0.05)
    queued = [worker.echo_job_async(i) for i in range(10)]
    t0 = time.perf_counter()
    worker.shutdown()
    took = time.perf_counter() - t0
    for p in queued:
        assert p.done()
        with pytest.raises(DeviceError, match=r"^worker for host shut down$"):
            p.wait()
    try:
        assert running.wait() == 0
        assert took >= 0.1  # shutdown waited for the running job
    except DeviceError as e:  # the worker had not picked it up yet
        assert "shut down" in str(e)
    with pytest.raises(DeviceError, match="shut down"):
        worker.echo_job(1)
    worker.shutdown()  # idempotent
    worker.free(12345)  # nothing left to free after shutdown


def test_idle_worker_polls_briefly_then_sleeps(worker):
    # After a job the worker polls its queue for a moment (so a decode loop's
    # next job starts without a wake-up), then sleeps: a second of idleness
    # costs the process almost no CPU time.
    workers = [worker] + [C.DeviceWorker(-1) for _ in range(2)]
    try:
        for w in workers:
            w.echo_job(1)
        time.sleep(0.05)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        time.sleep(1.0)
        cpu = time.process_time() - cpu0
        assert cpu < 0.1 * (time.perf_counter() - wall0), f"{cpu:.3f} s of CPU while idle"
        # Back-to-back jobs still run in order and answer.
        assert [workers[0].echo_job(i) for i in range(200)] == list(range(200))
    finally:
        for w in workers[1:]:
            w.shutdown()


def test_learning_waiter_returns_results_and_errors(worker):
    # Decode steps wait through a JobWaiter that learns the job's duration and
    # polls near its end; results and errors must come through it unchanged,
    # whether the job ends before, around or well after the learned time.
    for ms in (2, 2, 2, 2, 0, 0, 20, 1):
        t0 = time.perf_counter()
        assert worker.sleep_job(ms, True) == 0
        assert time.perf_counter() - t0 >= ms / 1000
    with pytest.raises(DeviceError):
        worker.simulate_sticky_error()
    with pytest.raises(DeviceError, match="unusable after an earlier device error"):
        worker.sleep_job(1, True)


def test_no_threads_left_behind():
    before = sorted(hx_threads())
    workers = [C.DeviceWorker(-1) for _ in range(3)]
    during = hx_threads()
    assert len(during) - len(before) >= 3
    assert during.count("hx-dev-host") - before.count("hx-dev-host") == 3
    # A large upload starts the copy helpers (where the host has cores for them).
    big = np.random.default_rng(0).integers(0, 255, size=24 << 20, dtype=np.uint8)
    h, n = workers[0].upload(big)
    assert n == big.nbytes
    workers[1].sleep_job_async(100)
    with pytest.raises(DeviceError):
        workers[2].simulate_sticky_error()
    for w in workers:
        w.shutdown()
    del workers
    deadline = time.time() + 5
    while sorted(hx_threads()) != before and time.time() < deadline:
        time.sleep(0.01)
    assert sorted(hx_threads()) == before


def test_upload_download_round_trip(worker):
    rng = np.random.default_rng(1)
    for size in (1, 4097, 5 << 20):
        a = rng.integers(0, 256, size=size, dtype=np.uint8)
        h, n = worker.upload(a)
        assert n == size
        assert worker.download(h) == a.tobytes()
        assert worker.download(h, 1) == a.tobytes()[:1]
        worker.free(h)
    with pytest.raises(ValueError, match="no buffer or resource with handle"):
        worker.free(h)
    with pytest.raises(ValueError, match="empty"):
        worker.upload(b"")


def test_upload_inputs():
    w = runtime.Worker(C.DeviceWorker(-1))
    try:
        t = torch.randn(3, 5).to(torch.bfloat16)
        h, n = w.upload(t)
        assert n == t.numel() * 2
        back = torch.frombuffer(bytearray(w.download(h)), dtype=torch.bfloat16).reshape(3, 5)
        assert torch.equal(back, t)
        # Non-contiguous tensors are made contiguous; numpy views must already be.
        h2, _ = w.upload(t.t())
        back2 = torch.frombuffer(bytearray(w.download(h2)), dtype=torch.bfloat16).reshape(5, 3)
        assert torch.equal(back2, t.t())
        with pytest.raises(ValueError, match="C-contiguous"):
            w.upload(np.zeros((4, 4), dtype=np.float32)[:, ::2])
        with pytest.raises(ValueError):
            w.download(h, 1 << 20)
        with pytest.raises(ValueError, match="handle"):
            w.download(999_999)
    finally:
        w.shutdown()


def test_vram_reports_host_memory(worker):
    free, total = worker.vram()
    assert 0 < free <= total


def test_nccl_arguments_are_checked(worker):
    with pytest.raises(ValueError, match="dtype"):
        worker.nccl_allreduce_test(1, 4, "f16")
    with pytest.raises(ValueError, match="bytes"):
        worker.nccl_init(b"short", 2, 0)
    with pytest.raises(ValueError, match="out of range"):
        worker.nccl_init(bytes(128), 2, 2)
    with pytest.raises(DeviceError, match="host-only"):
        worker.nccl_init(bytes(128), 1, 0)
    if not C.nccl:
        with pytest.raises(DeviceError, match="no NCCL"):
            C.nccl_unique_id()


@pytest.mark.skipif(C.cuda, reason="a CUDA build starts real device workers; covered by tests/gpu")
def test_registry_shares_one_worker_per_device():
    a = runtime.get_worker(0)
    b = runtime.get_worker(0)
    assert a == b and a.native == b.native and hash(a) == hash(b)
    assert a.name == "host:0"
    # Constructing the native class for a device gives the registered worker.
    assert C.DeviceWorker(0) == a.native
    with pytest.raises(DeviceError):
        C.DeviceWorker(0).simulate_sticky_error()
    assert a.is_poisoned() and b.is_poisoned()
    runtime.shutdown_all()
    assert a.is_shut_down()
    c = runtime.get_worker(0)
    assert c != a and not c.is_shut_down()
    assert c.native.echo_job(3) == 3
    runtime.shutdown_all()


def test_host_workers_are_not_shared():
    a, b = runtime.get_worker(-1), runtime.get_worker(-1)
    try:
        assert a != b and a.native != b.native
    finally:
        a.shutdown()
        b.shutdown()


@pytest.mark.parametrize(
    "archs,cc,ok",
    [
        (["90"], (9, 0), True),
        (["90"], (8, 9), False),
        (["80"], (8, 6), True),  # sm_80 code runs on later minors of the same major
        (["80"], (8, 9), True),
        (["89"], (8, 0), False),
        (["90a"], (9, 0), True),
        (["100a"], (10, 3), False),  # arch-specific code runs only on its exact arch
        (["100"], (10, 3), True),
        (["80", "89", "90", "100"], (12, 0), False),
        ([], (9, 0), False),
    ],
)
def test_build_supports(archs, cc, ok):
    assert runtime.build_supports(archs, *cc) is ok


def test_mismatch_message_names_the_wheel():
    msg = runtime._mismatch_message(0, 8, 9, ["90"])
    assert "this build holds sm_90" in msg
    assert "install helexa_native built for sm_89 (local version +sm89, see build_arch.sh)" in msg
    assert issubclass(BuildMismatchError, RuntimeError)


def _run_python(code: str, timeout: float = 120):
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=timeout
    )


def test_interpreter_exit_with_live_workers_does_not_hang():
    code = """
        import helexa_native._C as C
        from helexa_native import runtime
        w = C.DeviceWorker(-1)
        w.upload(b"x" * 1000)
        w.sleep_job_async(200)
        pending = [w.echo_job_async(i) for i in range(50)]
        r = runtime.get_worker(-1)
        r.native.sleep_job_async(100)
        poisoned = C.DeviceWorker(-1)
        try:
            poisoned.simulate_sticky_error()
        except Exception:
            pass
        print("ok")
    """
    t0 = time.perf_counter()
    res = _run_python(code)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "ok"
    assert time.perf_counter() - t0 < 60
