"""Micro-benchmark of the weight-reading kernels on Llama-3-8B shapes.

For every GGML type and shape, times matvec (n_tok tokens) and optionally
dequantize-to-bf16 with CUDA events over CUDA-graph replays (so Python's
launch overhead does not count), rotating between enough weight copies that
L2 cannot serve them, and prints the achieved bandwidth against a measured
device-to-device copy (read + write counted).

    python bench/bench_matvec.py                       # all types, n_tok 1
    python bench/bench_matvec.py --types Q4_K,Q6_K --ntok 1,4 --dequant
    python bench/bench_matvec.py --types BF16 --ntok 1,8,16,32 --bf16-frag

Not a test: it asserts nothing, it prints numbers.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from helexa_native.ggml_types import BLOCK_SIZES, GGML_TYPE_IDS

# name -> (ggml type id, weights per block, bytes per block)
TYPES = {name: (GGML_TYPE_IDS[name], *BLOCK_SIZES[name]) for name in BLOCK_SIZES}
# (name, n_out, k): q/o, k/v, gate/up, down, lm head of Llama-3-8B, then Llama-3.2-1B
SHAPES = [
    ("attn_q/o", 4096, 4096),
    ("attn_q|k", 5120, 4096),
    ("attn_k/v", 1024, 4096),
    ("ffn_gate/up", 14336, 4096),
    ("ffn_gate|up", 28672, 4096),
    ("ffn_down", 4096, 14336),
    ("lm_head", 128256, 4096),
    # Llama-3.2-1B
    ("1b_q|k|v", 3072, 2048),
    ("1b_o", 2048, 2048),
    ("1b_gate|up", 16384, 2048),
    ("1b_down", 2048, 8192),
    ("1b_lm_head", 128256, 2048),
]
L2_FLUSH_BYTES = 256 << 20  # copies rotated per case: at least this much memory, so L2 (50 MB) misses


def time_graph(fn, launches: int, batches: int) -> float:
    """Median seconds per launch of fn() (which issues one launch), from graph replays."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(launches):
            fn()
    for _ in range(3):
        g.replay()
    times = []
    for _ in range(batches):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3 / launches)
    return statistics.median(times)


def copy_bandwidth() -> float:
    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    src.fill_(1)
    t = time_graph(lambda: dst.copy_(src), 4, 15)
    return 2 * n / t


def random_weights(n_bytes: int, copies: int) -> list[torch.Tensor]:
    # Random bytes: some scales decode to inf/NaN, which costs the GPU no time.
    return [torch.randint(0, 256, (n_bytes,), dtype=torch.uint8, device="cuda") for _ in range(copies)]


def report(name, label, n_out, k, tag, nbytes, moved, t, copy_bw) -> None:
    """One table row: `moved` bytes in t seconds, against the copy bandwidth."""
    bw = moved / t
    print(
        f"{name:7s} {label:12s} {n_out:6d} {k:6d} {tag:>4s} {nbytes / 1e6:8.1f} {t * 1e6:9.2f} "
        f"{bw / 1e9:7.0f} {100 * bw / copy_bw:6.1f}"
    )


def tc_row(ops, tid, ws, copies, name, label, n_out, k, ntok, nbytes, copy_bw, args) -> None:
    """The tensor-core product (the model's path for batches from HELEXA_TC_MIN tokens) on the same copies."""
    xb = torch.randn(ntok, k, device="cuda").to(torch.bfloat16)
    y = torch.empty(ntok, n_out, device="cuda")
    it = iter(range(1 << 62))

    def tc():
        ops.matmul_tc_out(tid, ws[next(it) % copies], xb, y, n_out, k)

    t = time_graph(tc, args.launches, args.batches)
    report(name, label, n_out, k, f"{ntok}t", nbytes, nbytes + 2 * ntok * k + 4 * ntok * n_out, t, copy_bw)


def bf16_rows(ops, ws, copies, label, n_out, k, ntok, nbytes, copy_bw, args) -> None:
    """The bf16 fragment kernel ('f', 'F') and cuBLAS ('c') on the same rotated weight copies."""
    mats = [w.view(torch.bfloat16).view(n_out, k) for w in ws]
    xf = torch.randn(ntok, k, device="cuda")
    xb = xf.to(torch.bfloat16)
    y = torch.empty(ntok, n_out, device="cuda")
    it = iter(range(1 << 62))

    def frag():
        ops.matvec_bf16_out(mats[next(it) % copies], xb, y)

    def frag32():
        ops.matvec_bf16_out(mats[next(it) % copies], xf, y)

    def cublas():
        torch.mm(xb, mats[next(it) % copies].t(), out_dtype=torch.float32, out=y)

    runs = [("f", frag), ("c", cublas)] + ([("F", frag32)] if ntok <= 4 else [])
    for tag, fn in runs:
        try:
            t = time_graph(fn, args.launches, args.batches)
        except (RuntimeError, TypeError) as e:  # torch without out_dtype, or a size the kernel refuses
            print(f"BF16    {label:12s} {n_out:6d} {k:6d} {ntok:>3d}{tag} skipped: {str(e).splitlines()[0][:60]}")
            continue
        x_bytes = (4 if tag == "F" else 2) * ntok * k
        report("BF16", label, n_out, k, f"{ntok}{tag}", nbytes, nbytes + x_bytes + 4 * ntok * n_out, t, copy_bw)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--types", default=",".join(TYPES), help="comma-separated GGML type names")
    ap.add_argument("--ntok", default="1", help="comma-separated token counts (1..8)")
    ap.add_argument("--shapes", default=",".join(s[0] for s in SHAPES), help="shape names to run")
    ap.add_argument("--dequant", action="store_true", help="also time dequantize to bf16")
    ap.add_argument("--launches", type=int, default=20, help="launches per graph replay")
    ap.add_argument("--batches", type=int, default=15, help="timed replays (median taken)")
    ap.add_argument(
        "--mma",
        action="store_true",
        help="Q4_K: also time the fragment kernel (matvec_mma.cu) beside the float kernel, rows marked 'm'",
    )
    ap.add_argument("--mma-local", action="store_true", help="with --mma: CTAs prepare x in shared memory")
    ap.add_argument("--tc", action="store_true", help="also time the tensor-core product (matmul_tc, bf16 x), rows 't'")
    ap.add_argument(
        "--bf16-frag",
        action="store_true",
        help="BF16: also time the bf16 fragment kernel on bf16 x ('f', up to 32 tokens) and fp32 x ('F', up to 4), "
        "and cuBLAS ('c', bf16 in, fp32 out)",
    )
    args = ap.parse_args()

    import helexa_native._C  # noqa: F401  (registers torch.ops.helexa)

    ops = torch.ops.helexa

    props = torch.cuda.get_device_properties(0)
    copy_bw = copy_bandwidth()
    print(f"device: {props.name}, {props.multi_processor_count} SMs")
    print(f"device-to-device copy: {copy_bw / 1e9:.0f} GB/s (read + write)")
    print()
    hdr = (
        f"{'type':7s} {'shape':12s} {'n_out':>6s} {'k':>6s} {'ntok':>4s} {'MB':>8s} {'us':>9s} {'GB/s':>7s} "
        f"{'%copy':>6s}"
    )
    print(hdr)
    print("-" * len(hdr))
    shapes = [s for s in SHAPES if s[0] in args.shapes.split(",")]
    for name in args.types.split(","):
        tid, qk, bb = TYPES[name]
        for label, n_out, k in shapes:
            nbytes = n_out * (k // qk) * bb
            copies = max(2, -(-L2_FLUSH_BYTES // nbytes))
            try:
                ws = random_weights(nbytes, copies)
            except torch.cuda.OutOfMemoryError:
                print(f"{name:7s} {label:12s} skipped: out of memory")
                continue
            for ntok in [int(v) for v in args.ntok.split(",")]:
                if name == "BF16" and args.bf16_frag:
                    bf16_rows(ops, ws, copies, label, n_out, k, ntok, nbytes, copy_bw, args)
                if args.tc:
                    tc_row(ops, tid, ws, copies, name, label, n_out, k, ntok, nbytes, copy_bw, args)
                if ntok > 8:
                    continue
                x = torch.randn(ntok, k, device="cuda")
                y = torch.empty(ntok, n_out, device="cuda")
                # The fragment kernel's prepared x (the model's scratch layout).
                scratch = torch.empty(1 << 20, dtype=torch.uint8, device="cuda") if name == "Q4_K" else None
                for mma in [0, 8] if args.mma and scratch is not None else [0]:
                    it = iter(range(1 << 62))

                    def one(tid=tid, ws=ws, it=it, copies=copies, x=x, y=y, n_out=n_out, k=k, mma=mma, sc=scratch):
                        ops.matvec_out(tid, ws[next(it) % copies], x, y, n_out, k, None, False, sc, mma, args.mma_local)

                    t = time_graph(one, args.launches, args.batches)
                    tag = f"{ntok}m" if mma else f"{ntok}"
                    report(name, label, n_out, k, tag, nbytes, nbytes + 4 * ntok * (k + n_out), t, copy_bw)
            if args.dequant:
                out = torch.empty(n_out, k, dtype=torch.bfloat16, device="cuda")
                it2 = iter(range(1 << 62))

                def deq(tid=tid, ws=ws, it2=it2, copies=copies, out=out, n_out=n_out, k=k):
                    ops.dequantize_out(tid, ws[next(it2) % copies], out, n_out, k)

                t = time_graph(deq, max(1, args.launches // 4), args.batches)
                report(name, label, n_out, k, "deq", nbytes, nbytes + 2 * n_out * k, t, copy_bw)
                del out
            del ws
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
