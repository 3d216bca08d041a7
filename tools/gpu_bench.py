"""Benchmark synthetic models on the GPU: each model is written once, loaded once, then timed at several depths.

    python3 tools/gpu_bench.py --models llama3-8b:Q4_K_M,smollm2-135m:bf16 --json bench.json
    python3 tools/gpu_bench.py --models llama3-8b:Q4_K_M --depths 0 --structured 1,32 --json so.json
    python3 tools/gpu_bench.py --tensor-parallel 1,2 --models llama3-8b:bf16 --json bench-tp.json

Timing is helexa_native.bench.bench_engine's (warm-up, medians of repeats,
greedy decode through Backend.step). Bandwidth counts the bytes a decode
token reads: the whole model for a dense one; for a mixture of experts
(e.g. qwen3-30b-a3b:Q4_K_M) every tensor but only the routed experts' share
of the stacked expert tensors. This driver only saves the repeated
writes and loads that separate `helexa-native bench` calls would make, and
collects every result in one JSON file (rewritten after each result, so a
run cut short keeps what it measured). --tensor-parallel 1,2 times each
model on one GPU and split over cuda:0 .. cuda:1 (one process, one device
worker per GPU); a split run's bandwidth share is against N devices' copy
bandwidth.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

DEFAULT_MODELS = (
    "llama3-8b:Q4_K_M,llama3-8b:Q4_0,llama3-8b:Q8_0,llama3-8b:bf16,"
    "llama3.2-1b:bf16,llama3.2-1b:Q4_0,smollm2-135m:Q4_0,smollm2-135m:bf16"
)


def _args(argv):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=DEFAULT_MODELS, help="comma-separated PRESET:QUANT list")
    p.add_argument("--depths", default="0,4096", help="comma-separated KV depths for decode/prefill runs")
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--decode-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda")
    p.add_argument(
        "--tensor-parallel",
        default="1",
        metavar="N[,N...]",
        help="split each model over N GPUs of this process, for each N of this comma-separated list "
        "(each model is written once; default 1: one GPU, the plain path)",
    )
    p.add_argument(
        "--int8-modes",
        action="store_true",
        help="also time each block-quantized model at depth 0 with int8 activations on "
        "every type that has them and with float math everywhere (the default "
        "uses int8 where it is faster)",
    )
    p.add_argument(
        "--concurrency",
        default="",
        help="also run N concurrent streams for each N of this comma-separated list "
        "(bench --concurrency: aggregate decode tok/s, ITL, TTFT); empty: skip",
    )
    p.add_argument(
        "--structured",
        default="",
        help="also time N concurrent greedy streams under a JSON schema (an object with one long "
        "string, so every stream decodes all its tokens constrained) against the same streams "
        "unconstrained, for each N of this comma-separated list (the structured-output overhead: "
        "1 - constrained / plain aggregate decode tok/s); empty: skip",
    )
    p.add_argument(
        "--tc-kernel",
        default="",
        metavar="NAME[,NAME...]",
        help="the tensor-core product's implementation (HELEXA_TC_KERNEL: v1 or staged), like "
        "--tc-min: the first is timed, the --concurrency runs are repeated for every other "
        "(kernel, tc-min) pair; empty: the engine's default",
    )
    p.add_argument(
        "--ab",
        default="",
        metavar="VAR=V[,VAR=V...][;...]",
        help="environment settings to compare, ';' between settings (e.g. 'HELEXA_TC_BF16=0;"
        "HELEXA_TC_BF16=1'): like --tc-min, the first is timed at every depth, and every other "
        "combination, on a fresh load, at the first depth (batch 1) and the --concurrency levels",
    )
    p.add_argument(
        "--tc-min",
        default="",
        metavar="N[,N...]",
        help="the fewest tokens a step sends through the tensor-core product (HELEXA_TC_MIN): the "
        "model is timed with the first value, and the --concurrency runs are repeated on a fresh "
        "load for each further value (an A/B of the small-batch paths); empty: the engine's default",
    )
    p.add_argument(
        "--layers",
        type=int,
        default=0,
        help="write every synthetic model with this many layers instead of its preset's (shapes too large for "
        "the disk or the GPU, e.g. Qwen3-30B-A3B in bf16: report per layer and scale); 0: the preset's",
    )
    p.add_argument("--workdir", default=None, help="where synthetic models are written (default: a temp dir)")
    p.add_argument("--json", dest="json_file", required=True, help="output JSON file")
    return p.parse_args(argv)


# A JSON schema whose shortest completion is longer than any decode run: every
# constrained stream decodes all its tokens under the grammar (a JSON object
# such as {} would end most streams after two tokens and time nothing).
LONG_JSON = {
    "type": "json_schema",
    "json_schema": {
        "name": "long_text",
        "schema": {
            "type": "object",
            "properties": {"text": {"type": "string", "minLength": 8192}},
            "required": ["text"],
        },
    },
}


def _structured_overhead(eng, n: int, prompt_tokens: int, decode_tokens: int) -> dict:
    """N greedy streams unconstrained, then the same under a JSON schema (bench_concurrency)."""
    from helexa_native.bench import bench_concurrency

    plain = bench_concurrency(eng, [n], prompt_tokens, decode_tokens, warmup=True)[0]
    constrained = bench_concurrency(eng, [n], prompt_tokens, decode_tokens, warmup=True, response_format=LONG_JSON)[0]
    p, c = plain["aggregate_decode_tokens_per_s"], constrained["aggregate_decode_tokens_per_s"]
    return {
        "concurrency": n,
        "plain": plain,
        "constrained": constrained,
        "plain_tokens_per_s": p,
        "constrained_tokens_per_s": c,
        "overhead": 1.0 - c / p if p > 0 else 0.0,
    }


def _positive_ints(text: str, flag: str) -> list:
    try:
        sizes = [int(x) for x in str(text).split(",") if x.strip()]
    except ValueError:
        sizes = []
    if not sizes or any(n < 1 for n in sizes):
        raise SystemExit(f"{flag}: expected comma-separated positive integers, got {text!r}")
    return sizes


def main(argv=None) -> int:
    a = _args(argv)
    if a.layers < 0:
        raise SystemExit(f"--layers: expected a non-negative integer, got {a.layers}")
    dev = a.device.split(":")
    if dev[0] != "cuda" or len(dev) > 2 or (len(dev) == 2 and not dev[1].isdigit()):
        raise SystemExit(f"--device: expected cuda or cuda:N (a GPU benchmark), got {a.device!r}")
    from helexa_native.bench import (
        bench_concurrency,
        bench_engine,
        measure_copy_bandwidth,
        measure_upload_bandwidth,
        write_synthetic,
    )
    from helexa_native.engine import Engine

    depths = [int(d) for d in a.depths.split(",") if d.strip()]
    models = [m.strip() for m in a.models.split(",") if m.strip()]
    tp_sizes = _positive_ints(a.tensor_parallel, "--tensor-parallel")
    n_ctx = max(depths) + a.prompt_tokens + a.decode_tokens
    out = {
        "device": a.device,
        "tensor_parallel": tp_sizes,
        "prompt_tokens": a.prompt_tokens,
        "decode_tokens": a.decode_tokens,
        "depths": depths,
        "n_ctx": n_ctx,
        "results": [],
    }
    index = int(dev[1]) if len(dev) == 2 else 0
    out["copy_bandwidth_gb_per_s"] = copy_bw = measure_copy_bandwidth(index)
    print(f"device copy bandwidth {copy_bw:.0f} GB/s", flush=True)
    try:
        out["upload"] = up = measure_upload_bandwidth(index)
        print(
            f"host-to-device: worker upload from pageable memory {up['worker_pageable_gb_per_s']:.1f} GB/s, "
            f"torch pinned copy {up['torch_pinned_gb_per_s']:.1f} GB/s",
            flush=True,
        )
    except Exception as e:  # a side figure: report it and go on to the models
        print(f"host-to-device measurement failed: {type(e).__name__}: {e}", flush=True)

    def save():
        Path(a.json_file).write_text(json.dumps(out, indent=1, default=str))

    def concurrency_rows(eng, name: str, levels: list) -> list:
        rows = []
        for n in levels:
            row = bench_concurrency(eng, [n], a.prompt_tokens, a.decode_tokens, warmup=True)[0]
            rows.append(row)
            print(
                f"{name}: N={n}: aggregate decode {row['aggregate_decode_tokens_per_s']:.0f} tok/s, "
                f"TPOT p50 {row['tpot_ms_p50']:.2f} ms p99 {row['tpot_ms_p99']:.2f} ms, "
                f"ITL p50 {row['itl_ms_p50']:.2f} ms p99 {row['itl_ms_p99']:.2f} ms, "
                f"TTFT p50 {row['ttft_ms_p50']:.0f} ms",
                flush=True,
            )
            save()
        return rows

    tc_mins = _positive_ints(a.tc_min, "--tc-min") if a.tc_min else []
    tc_kernels = [k.strip() for k in a.tc_kernel.split(",") if k.strip()]
    for k in tc_kernels:
        if k not in ("v1", "staged"):
            raise SystemExit(f"--tc-kernel: unknown kernel {k!r} (v1 or staged)")
    ab_sets = []
    # An empty setting is the baseline (nothing set): ';HELEXA_X=1' times both.
    for part in a.ab.split(";") if a.ab.strip() else []:
        env = {}
        for kv in part.split(","):
            if kv.strip():
                var, eq, val = kv.strip().partition("=")
                if not eq or not var:
                    raise SystemExit(f"--ab: expected VAR=VALUE, got {kv!r}")
                env[var] = val
        ab_sets.append(env)
    # The variants: every (kernel, tc_min, setting) combination; the first is the model's.
    variants = [(k, m, e) for k in (tc_kernels or [None]) for m in (tc_mins or [None]) for e in (ab_sets or [{}])]
    out["tc_min"] = tc_mins
    out["tc_kernel"] = tc_kernels
    out["ab"] = ab_sets

    # Each variant starts from the environment the tool was started with: a
    # variable one variant sets does not leak into the next.
    touched = {var for _, _, env in variants for var in env} | {"HELEXA_TC_KERNEL", "HELEXA_TC_MIN"}
    start_env = {var: os.environ.get(var) for var in touched}

    def use_variant(v) -> str:
        # A variable the options leave unset keeps whatever the environment says.
        kernel, tc_min, env = v
        for var, val in start_env.items():
            if val is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = val
        for var, val in (("HELEXA_TC_KERNEL", kernel), ("HELEXA_TC_MIN", tc_min), *env.items()):
            if val is not None:
                os.environ[var] = str(val)
        parts = [kernel or "", f"tc>={tc_min}" if tc_min else ""] + [f"{k}={v}" for k, v in env.items()]
        return " ".join(x for x in parts if x) or "baseline"

    use_variant(variants[0])

    def bench_model(path, spec: str, tp: int, entry: dict) -> None:
        # Each rank streams its shard from its own memory: the ceiling is tp devices'.
        ceiling = copy_bw * tp
        engine_kw = {"tensor_parallel": tp} if tp > 1 else {}
        name = spec if tp == 1 else f"{spec} TP={tp}"
        with Engine(path, device=a.device, n_ctx=n_ctx, progress=False, **engine_kw) as eng:
            entry["load_seconds"] = eng.load_seconds
            entry["weight_bytes"] = eng.weight_bytes
            entry["weight_bytes_per_decode_token"] = eng.active_weight_bytes
            mem = eng.backend.memory_info()
            entry["device_bytes"] = mem.get("total_bytes")
            print(f"{name}: loaded in {eng.load_seconds:.2f} s", flush=True)
            entry["runs"] = []
            for depth in depths:
                r = bench_engine(eng, a.prompt_tokens, a.decode_tokens, depth, a.repeats, copy_bandwidth_gbs=ceiling)
                entry["runs"].append(r)
                print(
                    f"{name}: depth {depth}: prefill {r['prefill_tokens_per_s']:.0f} tok/s, decode "
                    f"{r['decode_tokens_per_s']:.1f} tok/s ({r['weight_bytes_per_decode_token'] / 1e9:.2f} GB "
                    f"read per token, {r['achieved_gb_per_s']:.0f} GB/s, "
                    f"{100 * r.get('bandwidth_share', 0.0):.0f}% of copy bandwidth)",
                    flush=True,
                )
                save()
            entry["graphs"] = {k: v for k, v in eng.backend.memory_info().items() if k.startswith("graph")}
            levels = [int(x) for x in a.concurrency.split(",") if x.strip()]
            if levels:
                entry["concurrency"] = concurrency_rows(eng, name, levels)
            levels = [int(x) for x in a.structured.split(",") if x.strip()]
            if levels:
                entry["structured"] = []
                for n in levels:
                    row = _structured_overhead(eng, n, a.prompt_tokens, a.decode_tokens)
                    entry["structured"].append(row)
                    print(
                        f"{name}: N={n}: json_schema decode {row['constrained_tokens_per_s']:.0f} tok/s "
                        f"vs {row['plain_tokens_per_s']:.0f} tok/s plain: overhead "
                        f"{100 * row['overhead']:.1f}% (ITL p50 {row['constrained']['itl_ms_p50']:.2f} "
                        f"vs {row['plain']['itl_ms_p50']:.2f} ms; {row['constrained']['generated_tokens']} "
                        f"of {n * a.decode_tokens} tokens generated constrained)",
                        flush=True,
                    )
                    save()
        levels = [int(x) for x in a.concurrency.split(",") if x.strip()]
        if len(variants) > 1:
            # Every other variant: batch 1 at the first depth, then the concurrency levels.
            first = use_variant(variants[0])
            entry["concurrency_by_variant"] = {first: entry.get("concurrency")}
            entry["batch1_by_variant"] = {first: entry["runs"][0] if entry["runs"] else None}
            for v in variants[1:]:
                label = use_variant(v)
                with Engine(path, device=a.device, n_ctx=n_ctx, progress=False, **engine_kw) as eng:
                    if depths:
                        r = bench_engine(
                            eng, a.prompt_tokens, a.decode_tokens, depths[0], a.repeats, copy_bandwidth_gbs=ceiling
                        )
                        entry["batch1_by_variant"][label] = r
                        print(
                            f"{name} {label}: depth {depths[0]}: prefill {r['prefill_tokens_per_s']:.0f} tok/s, "
                            f"decode {r['decode_tokens_per_s']:.1f} tok/s ({r['achieved_gb_per_s']:.0f} GB/s)",
                            flush=True,
                        )
                        save()
                    if levels:
                        entry["concurrency_by_variant"][label] = concurrency_rows(eng, f"{name} {label}", levels)
            use_variant(variants[0])
        if a.int8_modes and spec.split(":")[1].upper() in ("Q4_K_M", "Q4_0", "Q8_0", "Q4_K", "Q6_K"):
            for mode, label in ((True, "int8_all"), (False, "float")):
                with Engine(
                    path, device=a.device, n_ctx=n_ctx, progress=False, int8_activations=mode, **engine_kw
                ) as eng:
                    r = bench_engine(eng, a.prompt_tokens, a.decode_tokens, 0, a.repeats, copy_bandwidth_gbs=ceiling)
                    entry[f"{label}_depth0"] = r
                    print(
                        f"{name}: {label} activations, depth 0: decode {r['decode_tokens_per_s']:.1f} tok/s "
                        f"({r['achieved_gb_per_s']:.0f} GB/s)",
                        flush=True,
                    )
                    save()

    root = Path(a.workdir) if a.workdir else Path(tempfile.mkdtemp(prefix="hx-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    failed = 0
    for spec in models:
        d = root / spec.replace(":", "-")
        d.mkdir(parents=True, exist_ok=True)
        try:
            t0 = time.perf_counter()
            try:
                overrides = {"num_layers": a.layers} if a.layers > 0 else {}
                path = write_synthetic(spec, d, progress=False, **overrides)
            except Exception as e:
                failed += 1
                out["results"].append(
                    {"model": spec, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
                )
                print(f"{spec}: FAILED {type(e).__name__}: {e}", flush=True)
                continue
            written = time.perf_counter() - t0
            shape = f" ({a.layers} layers)" if a.layers > 0 else ""
            print(f"{spec}: written in {written:.1f} s{shape}", flush=True)
            for tp in tp_sizes:
                entry = {"model": spec, "tensor_parallel": tp, "write_seconds": written}
                if a.layers > 0:
                    entry["layers"] = a.layers
                out["results"].append(entry)
                try:
                    bench_model(path, spec, tp, entry)
                except Exception as e:
                    failed += 1
                    entry["error"] = f"{type(e).__name__}: {e}"
                    entry["traceback"] = traceback.format_exc()
                    print(f"{spec} TP={tp}: FAILED {entry['error']}", flush=True)
                finally:
                    save()
        finally:
            shutil.rmtree(d, ignore_errors=True)
            save()
    if not a.workdir:
        shutil.rmtree(root, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
