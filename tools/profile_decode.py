"""Where a decode step's time goes: wall time per step, and the GPU kernels behind it.

    python3 tools/profile_decode.py --model llama3-8b:Q4_K_M --steps 32

Writes a synthetic model, runs greedy decode steps through the CUDA backend,
prints the median wall time per step, the backend's graph counters, and the
kernels a torch profiler (CUPTI sees every thread of the process) recorded
over the timed steps, by total time. Not a test: it prints numbers.
"""

from __future__ import annotations

import argparse
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
    a = ap.parse_args()

    from torch.profiler import ProfilerActivity, profile

    from helexa_native.backends.cuda import CUDABackend
    from helexa_native.bench import write_synthetic
    from helexa_native.loaders import load_source
    from helexa_native.params import SamplerState, SamplingParams

    d = Path(tempfile.mkdtemp(prefix="hx-prof-"))
    path = write_synthetic(a.model, d, progress=False)
    src = load_source(path, progress=False)
    be = CUDABackend(src, 0, n_ctx=a.depth + a.steps + 16)
    params = SamplingParams(temperature=0.0)
    prompt = list(range(1, a.depth + 1))
    state = SamplerState(prompt_tokens=prompt)
    tok = be.step(prompt, 0, params, state).token
    pos = a.depth
    for _ in range(4):
        tok = be.step([tok], pos, params, state).token
        pos += 1
    walls = []
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(a.steps):
            t0 = time.perf_counter()
            tok = be.step([tok], pos, params, state).token
            walls.append(time.perf_counter() - t0)
            pos += 1
    info = be.memory_info()
    print(f"{a.model}: wall per step median {1e3 * statistics.median(walls):.3f} ms, min {1e3 * min(walls):.3f} ms")
    print("graph counters:", {k: v for k, v in info.items() if "graph" in k})
    gpu_total = 0.0
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
    be.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
