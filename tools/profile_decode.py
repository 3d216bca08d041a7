"""Where a decode step's time goes: wall time per step, and the GPU kernels behind it.

    python3 tools/profile_decode.py --model llama3-8b:Q4_K_M --steps 32 [--batch 1,8,32]

Writes a synthetic model, runs greedy decode steps through the CUDA backend,
prints the median wall time per step, the backend's graph counters, and the
kernels a torch profiler (CUPTI sees every thread of the process) recorded
over the timed steps, by total time. Not a test: it prints numbers.

On sm_90+ decode kernels are launched overlapped (programmatic dependent
launch): each one starts while its predecessor drains and waits for it, so
its recorded time includes that wait and the sum exceeds the step. --no-pdl
(HELEXA_PDL=0) runs them one after another: each kernel's own time, in a
slower step.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m:Q4_0")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--depth", type=int, default=64)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument(
        "--batch", default="1", help="sequences decoded together per step (step_batch); a list profiles each in turn"
    )
    ap.add_argument("--no-pdl", action="store_true", help="launch kernels one after another (HELEXA_PDL=0)")
    ap.add_argument(
        "--prefill",
        type=int,
        default=0,
        help="profile prompts of this many tokens instead (each step: one new sequence's whole prompt)",
    )
    a = ap.parse_args()
    if a.no_pdl:
        os.environ["HELEXA_PDL"] = "0"  # read once, at the first launch
    batches = [int(b) for b in str(a.batch).split(",") if b.strip()]
    if not batches or min(batches) < 1:
        ap.error(f"--batch takes positive integers, got {a.batch!r}")

    from helexa_native.bench import write_synthetic
    from helexa_native.loaders import load_source

    d = Path(tempfile.mkdtemp(prefix="hx-prof-"))
    path = write_synthetic(a.model, d, progress=False)
    src = load_source(path, progress=False)
    if a.prefill > 0:
        _profile_prefill(a, src)
        return 0
    for nb in batches:
        _profile(a, src, nb)
    return 0


def _profile_prefill(a, src) -> None:
    """Profile --steps prompts of --prefill tokens, each a fresh sequence's one step."""

    from helexa_native.backends.base import SeqStep
    from helexa_native.backends.cuda import CUDABackend
    from helexa_native.kv_blocks import SeqBlocks
    from helexa_native.params import SamplerState, SamplingParams

    n = a.prefill
    be = CUDABackend(src, 0, n_ctx=n + 16, max_num_seqs=1, prefill_chunk=n)
    params = SamplingParams(temperature=0.0)

    def step(i: int) -> None:
        prompt = [(7 * i + 3 * j) % src.config.vocab_size + 1 for j in range(n)]
        blocks = SeqBlocks()
        be.blocks.ensure(blocks, n)
        seq = SeqStep(
            slot=0,
            tokens=prompt,
            start_pos=0,
            block_table=list(blocks.table),
            sample=True,
            params=params,
            state=SamplerState(prompt_tokens=prompt),
        )
        be.step_batch([seq])
        be.blocks.release(blocks)

    for i in range(3):
        step(i)
    walls, prof = _timed(a.steps, lambda i: step(100 + i))
    med = statistics.median(walls)
    print(f"{a.model} prefill {n}: wall per prompt median {1e3 * med:.3f} ms ({n / med:.0f} tok/s)")
    _print_kernels(prof, a)
    be.close()


def _profile(a, src, nb: int) -> None:
    """Profile `nb` sequences decoding together on a fresh backend."""

    from helexa_native.backends.base import SeqStep
    from helexa_native.backends.cuda import CUDABackend
    from helexa_native.kv_blocks import SeqBlocks
    from helexa_native.params import SamplerState, SamplingParams

    be = CUDABackend(src, 0, n_ctx=a.depth + a.steps + 16, max_num_seqs=max(nb, 1))
    params = SamplingParams(temperature=0.0)
    # Each sequence: its own depth-token prompt in its own slot and blocks.
    seqs = []
    for i in range(nb):
        prompt = [(7 * i + j) % src.config.vocab_size + 1 for j in range(a.depth)]
        seqs.append(dict(blocks=SeqBlocks(), state=SamplerState(prompt_tokens=prompt), tokens=prompt, pos=0))

    def step(which) -> None:
        batch = []
        for i in which:
            q = seqs[i]
            be.blocks.ensure(q["blocks"], q["pos"] + len(q["tokens"]))
            batch.append(
                SeqStep(
                    slot=i,
                    tokens=q["tokens"],
                    start_pos=q["pos"],
                    block_table=list(q["blocks"].table),
                    sample=True,
                    params=params,
                    state=q["state"],
                )
            )
        for i, out in zip(which, be.step_batch(batch)):
            q = seqs[i]
            q["pos"] += len(q["tokens"])
            q["tokens"] = [out.result.token]
            q["state"].generated_tokens.append(out.result.token)
            q["state"].step += 1

    everyone = list(range(nb))
    for i in everyone:  # each prompt alone, then warm-up steps (graph capture)
        step([i])
    for _ in range(4):
        step(everyone)
    walls, prof = _timed(a.steps, lambda i: step(everyone))
    info = be.memory_info()
    med, low = 1e3 * statistics.median(walls), 1e3 * min(walls)
    print(f"{a.model} batch {nb}: wall per step median {med:.3f} ms, min {low:.3f} ms")
    print("graph counters:", {k: v for k, v in info.items() if "graph" in k})
    _print_kernels(prof, a)
    be.close()


def _timed(n: int, run) -> tuple:
    """run(i) for i < n under the profiler: (wall seconds of each, the profiler)."""
    from torch.profiler import ProfilerActivity, profile

    walls = []
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for i in range(n):
            t0 = time.perf_counter()
            run(i)
            walls.append(time.perf_counter() - t0)
    return walls, prof


def _print_kernels(prof, a) -> None:
    """The profiler's GPU rows by total time, per step."""
    rows = []
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0)
        if t and ev.count:
            rows.append((t, ev.count, ev.key))
    rows.sort(reverse=True)
    kernel_rows = [r for r in rows if not r[2].startswith(("cuda", "Memcpy", "Memset"))]
    gpu_total = sum(r[0] for r in kernel_rows)
    print(f"GPU kernel time per step: {gpu_total / a.steps / 1e3:.3f} ms")
    for t, n, k in rows[: a.top]:
        print(f"  {t / a.steps:9.1f} us/step  {n / a.steps:6.1f} calls/step  {k[:90]}")


if __name__ == "__main__":
    raise SystemExit(main())
