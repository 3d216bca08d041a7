"""Batch-1 throughput: prefill of P tokens and decode of D tokens, optionally at a depth.

Decode of one token reads every weight once, so decode speed is reported as
achieved bandwidth (weight bytes x tokens/s) and, on CUDA, as a share of the
device's measured copy bandwidth. A warm-up run comes first; the reported
numbers are medians over the repeats.
"""

from __future__ import annotations

import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .params import SamplerState, SamplingParams

FLOAT_QUANTS = {"bf16": "bf16", "f16": "f16", "fp16": "f16", "f32": "f32", "fp32": "f32"}


def measure_copy_bandwidth(device_index: int = 0, nbytes: int = 1 << 30, iters: int = 10) -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read plus bytes written."""
    dev = torch.device("cuda", device_index)
    with torch.cuda.device(dev):
        src = torch.empty(nbytes, dtype=torch.uint8, device=dev)
        dst = torch.empty_like(src)
        dst.copy_(src)
        torch.cuda.synchronize(dev)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            dst.copy_(src)
        end.record()
        torch.cuda.synchronize(dev)
        seconds = start.elapsed_time(end) / 1e3
        del src, dst
        torch.cuda.empty_cache()
    return 2.0 * nbytes * iters / seconds / 1e9


def measure_upload_bandwidth(device_index: int = 0, nbytes: int = 1 << 30, reps: int = 3) -> dict:
    """Host-to-device GB/s, best of `reps`: the device worker's upload from pageable memory, and torch's pinned copy.

    The worker's upload is how weights reach the GPU at load; torch's copy
    from pinned memory is the link's practical limit.
    """
    from .runtime import get_worker

    w = get_worker(device_index)
    data = np.random.default_rng(0).integers(0, 256, size=nbytes, dtype=np.uint8)
    h, _ = w.upload(data[: min(nbytes, 64 << 20)])  # staging buffers set up outside the timing
    w.free(h)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        h, _ = w.upload(data)
        best = min(best, time.perf_counter() - t0)
        w.free(h)
    dev = torch.device("cuda", device_index)
    src = torch.from_numpy(data).pin_memory()
    dst = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize(dev)
    pinned = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize(dev)
        pinned = min(pinned, time.perf_counter() - t0)
    del src, dst
    torch.cuda.empty_cache()
    return {"worker_pageable_gb_per_s": nbytes / best / 1e9, "torch_pinned_gb_per_s": nbytes / pinned / 1e9}


def _synchronize(backend) -> None:
    # The CUDA backend's step/forward return host values after its worker
    # finished the job; a backend may still offer an explicit barrier.
    sync = getattr(backend, "synchronize", None)
    if callable(sync):
        sync()


def _one_run(backend, prompt_ids, depth_ids, decode_tokens: int, decode_steps: int = 1):
    # Greedy steps, as in real serving: on CUDA the token is picked on the
    # device and only its id comes back; with decode_steps > 1, that many
    # steps per call (Backend.decode_steps), as the scheduler runs them.
    params = SamplingParams(temperature=0.0)
    backend.reset()
    if depth_ids:
        backend.forward(depth_ids, 0)
    _synchronize(backend)
    depth = len(depth_ids)
    state = SamplerState(prompt_tokens=list(depth_ids) + list(prompt_ids))
    t0 = time.perf_counter()
    tok = int(backend.step(prompt_ids, depth, params, state).token)
    _synchronize(backend)
    t1 = time.perf_counter()
    pos = depth + len(prompt_ids)
    left = decode_tokens
    while left > 0:
        state.step += 1
        k = min(decode_steps, left)
        if k > 1:
            tok = int(backend.step_many(tok, pos, k, params, state)[-1].token)
            state.step += k - 1
        else:
            tok = int(backend.step([tok], pos, params, state).token)
        pos += k
        left -= k
    _synchronize(backend)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def bench_engine(
    engine,
    prompt_tokens: int = 512,
    decode_tokens: int = 128,
    depth: int = 0,
    repeats: int = 3,
    warmup: bool = True,
    seed: int = 0,
    copy_bandwidth_gbs: Optional[float] = None,
) -> dict:
    """Time prefill and decode on a loaded Engine; returns the numbers as a dict."""
    for name, v, lo in (
        ("prompt_tokens", prompt_tokens, 1),
        ("decode_tokens", decode_tokens, 0),
        ("depth", depth, 0),
        ("repeats", repeats, 1),
    ):
        if not isinstance(v, int) or isinstance(v, bool) or v < lo:
            raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
    need = depth + prompt_tokens + decode_tokens
    if need > engine.n_ctx:
        from .errors import ContextLengthError

        raise ContextLengthError(
            f"depth {depth} + prompt {prompt_tokens} + decode {decode_tokens} = "
            f"{need} tokens exceed the context of {engine.n_ctx}"
        )
    gen = torch.Generator().manual_seed(seed)
    vocab = engine.config.vocab_size
    ids = torch.randint(0, vocab, (depth + prompt_tokens,), generator=gen).tolist()
    depth_ids, prompt_ids = ids[:depth], ids[depth:]

    backend = engine.backend
    steps = int(getattr(engine, "decode_steps", 1))
    # The private sequence of the backend runs under its step lock: the
    # scheduler's requests (if any) wait, so nothing shares these steps.
    with backend.lock:
        try:
            if warmup:
                _one_run(backend, prompt_ids, depth_ids, min(decode_tokens, 8), steps)
            prefill, decode = [], []
            for _ in range(repeats):
                p, d = _one_run(backend, prompt_ids, depth_ids, decode_tokens, steps)
                prefill.append(p)
                decode.append(d)
        finally:
            backend.reset()

    p_med = statistics.median(prefill)
    d_med = statistics.median(decode)
    decode_tps = decode_tokens / d_med if decode_tokens and d_med > 0 else 0.0
    weight_bytes = engine.weight_bytes
    # Bytes a decode token reads: the whole model, or for a MoE model every
    # tensor but only the routed experts' share of the stacked ones.
    read_bytes = getattr(engine, "active_weight_bytes", weight_bytes)
    achieved = read_bytes * decode_tps / 1e9
    out = {
        "model": str(engine.model_path),
        "device": engine.device,
        "device_name": _device_name(engine.device),
        "n_ctx": engine.n_ctx,
        "load_seconds": engine.load_seconds,
        "prompt_tokens": prompt_tokens,
        "decode_tokens": decode_tokens,
        "depth": depth,
        "repeats": repeats,
        "prefill_seconds": p_med,
        "prefill_tokens_per_s": prompt_tokens / p_med if p_med > 0 else 0.0,
        "decode_seconds": d_med,
        "decode_tokens_per_s": decode_tps,
        "decode_ms_per_token": 1e3 * d_med / decode_tokens if decode_tokens else 0.0,
        "decode_steps_per_call": steps,
        "weight_bytes": weight_bytes,
        "weight_bytes_per_decode_token": read_bytes,
        "achieved_gb_per_s": achieved,
        "prefill_seconds_all": prefill,
        "decode_seconds_all": decode,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if copy_bandwidth_gbs:
        out["copy_bandwidth_gb_per_s"] = copy_bandwidth_gbs
        out["bandwidth_share"] = achieved / copy_bandwidth_gbs
    return out


def _percentile(xs, q: float) -> float:
    if not xs:
        return 0.0
    xs = sorted(xs)
    i = min(len(xs) - 1, max(0, int(round(q / 100.0 * (len(xs) - 1)))))
    return xs[i]


def bench_concurrency(
    engine,
    concurrency=(1, 8, 16, 32, 64),
    prompt_tokens: int = 512,
    decode_tokens: int = 128,
    seed: int = 0,
    warmup: bool = True,
    response_format: Optional[dict] = None,
) -> list:
    """N concurrent streams, each its own random prompt then decode_tokens tokens, for each N.

    Per N: aggregate decode tok/s once every stream has started (tokens
    after the last stream's first token, over the time from then to the
    last token: streams that started early also finish early, so the end of
    that window runs fewer than N), tokens over the whole
    wall time, time per output token p50/p99 over the streams (_tpot),
    inter-token latency p50/p99 over every gap and time to first token
    p50/p99. Greedy, EOS ignored, prefix cache defeated by distinct
    random prompts. warmup: before each N, the same N-stream workload with
    at most 16 tokens on other prompts, so first-use costs (CUDA graphs
    recorded per batch size, a grammar's compilation) stay out of the
    timed run. response_format (e.g. {"type": "json_object"}) constrains
    every stream (its grammar compiled in the warm-up); a stream whose
    output completes the grammar ends there, so generated_tokens may fall
    short of N x decode_tokens.
    """
    vocab = engine.config.vocab_size
    if prompt_tokens + decode_tokens > engine.n_ctx:
        from .errors import ContextLengthError

        raise ContextLengthError(
            f"prompt {prompt_tokens} + decode {decode_tokens} tokens exceed the context of {engine.n_ctx}"
        )
    gen = torch.Generator().manual_seed(seed)
    results = []
    for n in concurrency:
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"concurrency values must be positive integers, got {n!r}")
    for n in concurrency:
        if warmup:
            # The same workload, shorter, on other prompts (no prefix-cache
            # hits for the timed ones): the first steps at each batch size
            # record their CUDA graphs, which the timed run must not pay for.
            warm = [torch.randint(0, vocab, (prompt_tokens,), generator=gen).tolist() for _ in range(n)]
            _run_streams(engine, warm, response_format, max(1, min(decode_tokens, 16)))
        prompts = [torch.randint(0, vocab, (prompt_tokens,), generator=gen).tolist() for _ in range(n)]
        t0 = time.perf_counter()
        stamps = _run_streams(engine, prompts, response_format, decode_tokens)
        t_end = time.perf_counter()
        firsts = [st[0] for st in stamps if st]
        t_all = max(firsts) if firsts else t_end
        steady = sum(1 for st in stamps for x in st if x > t_all)
        itl = [b - a for st in stamps for a, b in zip(st, st[1:])]
        tpot = _tpot(stamps)
        ttft = [f - t0 for f in firsts]
        total = sum(len(st) for st in stamps)
        results.append(
            {
                "concurrency": n,
                "prompt_tokens": prompt_tokens,
                "decode_tokens": decode_tokens,
                "generated_tokens": total,
                "aggregate_decode_tokens_per_s": steady / (t_end - t_all) if t_end > t_all else 0.0,
                "tokens_per_s_wall": total / (t_end - t0),
                "wall_seconds": t_end - t0,
                "itl_ms_p50": 1e3 * _percentile(itl, 50),
                "itl_ms_p99": 1e3 * _percentile(itl, 99),
                "tpot_ms_p50": 1e3 * _percentile(tpot, 50),
                "tpot_ms_p99": 1e3 * _percentile(tpot, 99),
                "ttft_ms_p50": 1e3 * _percentile(ttft, 50),
                "ttft_ms_p99": 1e3 * _percentile(ttft, 99),
            }
        )
    return results


def _run_streams(engine, prompts: list, response_format, max_tokens: int) -> list:
    """Greedy streams of every prompt at once, each read on its own thread; each one's token arrival times."""
    import threading

    stamps = [[] for _ in prompts]
    streams = [
        engine.generate_stream(
            p, response_format=response_format, temperature=0, max_tokens=max_tokens, ignore_eos=True
        )
        for p in prompts
    ]
    threads = [threading.Thread(target=_stamp_stream, args=(s, st)) for s, st in zip(streams, stamps)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return stamps


def _tpot(stamps: list) -> list:
    """Per stream, the time per output token after the first: (last - first) / (tokens - 1).

    Unlike the inter-token gaps, it does not depend on how tokens are
    grouped on their way (several decode steps per device job deliver
    tokens in bursts).
    """
    return [(st[-1] - st[0]) / (len(st) - 1) for st in stamps if len(st) > 1]


def _stamp_stream(stream, stamps: list) -> None:
    """Read a stream to its end, noting when each token arrived."""
    for ch in stream:
        now = time.perf_counter()
        stamps.extend([now] * len(ch.token_ids))


def format_concurrency(rows: list) -> str:
    """A table of bench_concurrency's rows."""
    head = (
        f"{'N':>4} {'agg tok/s':>10} {'wall tok/s':>10} {'TPOT p50':>9} {'TPOT p99':>9} {'ITL p50':>8} "
        f"{'ITL p99':>8} {'TTFT p50':>9} {'TTFT p99':>9}"
    )
    lines = [head]
    for r in rows:
        lines.append(
            f"{r['concurrency']:>4} {r['aggregate_decode_tokens_per_s']:>10.1f} "
            f"{r['tokens_per_s_wall']:>10.1f} {r['tpot_ms_p50']:>7.2f}ms {r['tpot_ms_p99']:>7.2f}ms "
            f"{r['itl_ms_p50']:>6.2f}ms {r['itl_ms_p99']:>6.2f}ms "
            f"{r['ttft_ms_p50']:>7.1f}ms {r['ttft_ms_p99']:>7.1f}ms"
        )
    return "\n".join(lines)


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        idx = int(device.split(":")[1]) if ":" in device else 0
        return torch.cuda.get_device_name(idx)
    return platform.processor() or platform.machine()


def parse_synthetic(spec: str) -> tuple:
    """'llama3-8b:Q4_K_M' -> ('llama3-8b', 'Q4_K_M')."""
    if not isinstance(spec, str) or spec.count(":") != 1:
        raise ValueError(f"--synthetic must look like PRESET:QUANT (e.g. llama3-8b:Q4_K_M), got {spec!r}")
    preset, quant = (s.strip() for s in spec.split(":"))
    if not preset or not quant:
        raise ValueError(f"--synthetic must look like PRESET:QUANT, got {spec!r}")
    return preset, quant


def write_synthetic(spec: str, directory: Path, seed: int = 0, progress: Optional[bool] = None, **overrides) -> Path:
    """Write the synthetic model `spec` under `directory`; returns its path.

    Float types (bf16, f16, f32) give a safetensors folder, everything else a
    GGUF file. overrides (e.g. n_layers=2) reach the synthetic writer.
    """
    preset, quant = parse_synthetic(spec)
    from . import synthetic

    if preset not in synthetic.PRESETS:
        raise ValueError(f"unknown synthetic preset {preset!r} (known: {', '.join(synthetic.PRESETS)})")
    dense = FLOAT_QUANTS.get(quant.lower())
    if dense is not None:
        out = directory / f"{preset}-{dense}"
        synthetic.write_synthetic_safetensors(out, preset, dense, seed=seed, progress=progress, **overrides)
        return out
    out = directory / f"{preset}-{quant}.gguf"
    synthetic.write_synthetic_gguf(out, preset, quant, seed=seed, progress=progress, **overrides)
    return out


def run_bench(
    model=None,
    device: str = "auto",
    n_ctx: Optional[int] = None,
    prompt_tokens: int = 512,
    decode_tokens: int = 128,
    depth: int = 0,
    repeats: int = 3,
    warmup: bool = True,
    synthetic: Optional[str] = None,
    synthetic_overrides: Optional[dict] = None,
    progress: Optional[bool] = None,
    measure_copy: bool = True,
    concurrency=None,
    engine_options: Optional[dict] = None,
) -> dict:
    """Load a model (or write a synthetic one), benchmark it, return the numbers."""
    from .engine import Engine, _cuda_build, _cuda_visible, _parse_device

    kind, index = _parse_device(device)
    on_cuda = kind == "cuda" or (kind == "auto" and _cuda_visible() and _cuda_build())
    copy_bw = None
    if on_cuda and measure_copy:
        # Measured before the model loads, so the probe buffers never compete
        # with weights for memory.
        copy_bw = measure_copy_bandwidth(index or 0)
    need = depth + prompt_tokens + decode_tokens
    ctx = n_ctx if n_ctx is not None else None
    with tempfile.TemporaryDirectory(prefix="helexa-bench-") as tmp:
        if synthetic:
            if model is not None:
                raise ValueError("give either --model or --synthetic, not both")
            t0 = time.perf_counter()
            model = write_synthetic(synthetic, Path(tmp), progress=progress, **(synthetic_overrides or {}))
            write_seconds = time.perf_counter() - t0
        if ctx is None:
            from . import defaults

            ctx = max(defaults.DEFAULT_MAX_CONTEXT, need)
        opts = dict(engine_options or {})
        if concurrency:
            opts.setdefault("max_num_seqs", max(max(concurrency), 1))
        with Engine(model, device=device, n_ctx=ctx, progress=progress, **opts) as eng:
            if concurrency:
                out = {
                    "model": str(eng.model_path),
                    "device": eng.device,
                    "device_name": _device_name(eng.device),
                    "weight_bytes": eng.weight_bytes,
                    "concurrency": bench_concurrency(eng, concurrency, prompt_tokens, decode_tokens, warmup=warmup),
                }
            else:
                # A tensor-parallel model streams each rank's shard from its own GPU: N devices' ceiling.
                tp = int(getattr(eng.backend, "tensor_parallel", 1))
                out = bench_engine(
                    eng,
                    prompt_tokens,
                    decode_tokens,
                    depth,
                    repeats,
                    warmup,
                    copy_bandwidth_gbs=copy_bw * tp if copy_bw else copy_bw,
                )
                out["tensor_parallel"] = tp
        if synthetic:
            out["synthetic"] = synthetic
            out["synthetic_write_seconds"] = write_seconds
    return out


def format_report(r: dict) -> str:
    """Human-readable lines for a bench result."""
    if "concurrency" in r:
        return "\n".join(
            [
                f"model      {r.get('synthetic') or r['model']}",
                f"device     {r['device']} ({r['device_name']})",
                format_concurrency(r["concurrency"]),
            ]
        )
    read = r.get("weight_bytes_per_decode_token", r["weight_bytes"])
    gib = read / (1 << 30)
    lines = [
        f"model      {r.get('synthetic') or r['model']}",
        f"device     {r['device']} ({r['device_name']})",
        f"load       {r['load_seconds']:.2f} s",
        f"weights    {read:,} bytes ({gib:.3f} GiB) read per decode token"
        + (f" (of {r['weight_bytes']:,} stored)" if read != r["weight_bytes"] else ""),
        f"prefill    {r['prompt_tokens']} tokens at depth {r['depth']}: "
        f"{r['prefill_tokens_per_s']:.1f} tok/s ({1e3 * r['prefill_seconds']:.1f} ms)",
        f"decode     {r['decode_tokens']} tokens: {r['decode_tokens_per_s']:.2f} tok/s "
        f"({r['decode_ms_per_token']:.2f} ms/token)",
        f"bandwidth  {r['achieved_gb_per_s']:.1f} GB/s of weights",
    ]
    if "copy_bandwidth_gb_per_s" in r:
        lines.append(
            f"           {100 * r['bandwidth_share']:.1f}% of measured device copy "
            f"bandwidth {r['copy_bandwidth_gb_per_s']:.0f} GB/s"
        )
    lines.append(f"(medians of {r['repeats']} runs)")
    return "\n".join(lines)
