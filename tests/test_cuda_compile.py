"""Every CUDA source compiles with the machine's nvcc for every target arch.

No GPU needed: each csrc/kernels, csrc/runtime and csrc/model .cu file is
compiled alone (`nvcc -c`) for sm_80, sm_89, sm_90 and sm_100 in one nvcc
call per file, two files at a time. Files that include cuBLAS or NCCL
headers are skipped when this machine has none (CUDA builds compile them in
setup.py). The weight-reading kernels must also compile without register
spills. Skips cleanly when no nvcc is installed.

Two more tests build host programs from the CUDA headers, which are
written as __host__ __device__ code for this purpose: the block decoders
(csrc/kernels/quant_blocks.cuh) are checked bit-exactly against the gguf
package's dequantizers, plus the matvec's per-lane arithmetic against a
float64 product; and the matvec CTA body (csrc/kernels/matvec_impl.cuh) runs
on the host with one OS thread per simulated GPU thread, checking staging,
indexing, reductions and bounds of every load for every type. A third
checks the k-step / lane mapping of the staged product's integer path
(Q4_K, Q6_K) the same way.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from int8_reference import DP4A_TYPES, quantized_x, stage_fits

ROOT = Path(__file__).resolve().parent.parent
CSRC = ROOT / "csrc"
ARCHS = ["80", "89", "90", "100"]
PARALLEL = 2
# Kernels whose resource use is part of their contract: no spills, no local memory.
NO_SPILL = re.compile(r"^(matvec|dequant)")
NVCC_FLAGS = [
    "-std=c++17",
    "-O3",
    "--expt-relaxed-constexpr",
    "-lineinfo",
    "-DHX_WITH_CUDA=1",
    "-Xptxas=-warn-spills,-warn-lmem-usage",
]
OPTIONAL_LIBS = re.compile(r"#\s*include\s*[<\"](cublas[^>\"]*|cublasLt\.h|nccl\.h)[>\"]")
LOCAL_INCLUDE = re.compile(r"#\s*include\s*\"([^\"]+)\"")


def find_nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    fallback = "/usr/local/cuda/bin/nvcc"
    return fallback if os.path.exists(fallback) else None


NVCC = find_nvcc()
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="no nvcc on this machine")


def cuda_sources() -> list[Path]:
    files = []
    for sub in ("kernels", "runtime", "model"):
        files += sorted((CSRC / sub).glob("*.cu"))
    return files


def unconditional_includes(path: Path) -> tuple[list[str], list[str]]:
    """(#include "..." targets, optional-library headers) outside any #if block."""
    local, libs = [], []
    depth = 0
    for line in path.read_text(errors="replace").splitlines():
        s = line.strip()
        if re.match(r"#\s*(if|ifdef|ifndef)\b", s):
            depth += 1
        elif re.match(r"#\s*endif\b", s):
            depth = max(0, depth - 1)
        elif depth == 0:
            m = OPTIONAL_LIBS.match(s)
            if m:
                libs.append(m.group(1))
            m = LOCAL_INCLUDE.match(s)
            if m:
                local.append(m.group(1))
    return local, libs


def optional_library_headers(path: Path) -> list[str]:
    """cuBLAS / NCCL headers the file pulls in unconditionally, through csrc headers too."""
    seen, todo, libs = set(), [path], []
    while todo:
        p = todo.pop()
        if p in seen or not p.exists():
            continue
        seen.add(p)
        local, found = unconditional_includes(p)
        libs += found
        for inc in local:
            for base in (p.parent, CSRC):
                if (base / inc).exists():
                    todo.append(base / inc)
                    break
    return sorted(set(libs))


def library_headers_present() -> bool:
    if NVCC is None:
        return False
    include = Path(NVCC).resolve().parent.parent / "include"
    return (include / "cublas_v2.h").exists() and (include / "nccl.h").exists()


def compile_one(path: Path) -> tuple[int, str]:
    gencode = []
    for a in ARCHS:
        gencode += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [NVCC, *NVCC_FLAGS, f"-I{CSRC}", *gencode, "-c", str(path), "-o", os.path.join(tmp, "out.o")]
        p = subprocess.run(cmd, capture_output=True, text=True)
    return p.returncode, (p.stdout + p.stderr).strip()


@pytest.fixture(scope="module")
def compiled():
    files = [f for f in cuda_sources() if library_headers_present() or not optional_library_headers(f)]
    with ThreadPoolExecutor(max_workers=PARALLEL) as pool:
        results = dict(zip(files, pool.map(compile_one, files)))
    return results


@needs_nvcc
@pytest.mark.parametrize("path", cuda_sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_cuda_file_compiles_for_all_archs(compiled, path):
    libs = optional_library_headers(path)
    if libs and not library_headers_present():
        pytest.skip(f"includes {', '.join(libs)}, which this machine's CUDA lacks")
    rc, out = compiled[path]
    assert rc == 0, f"nvcc failed on {path.relative_to(ROOT)} for sm_{', sm_'.join(ARCHS)}:\n{out}"
    if NO_SPILL.match(path.name):
        bad = [ln for ln in out.splitlines() if "spill" in ln or "lmem" in ln.lower() or "local memory" in ln]
        assert not bad, f"{path.name} uses local memory or spills registers:\n" + "\n".join(bad)


# Each 16-byte weight load of the matvec kernels sits under its own guard in
# issue_step (a chunk past a row's last byte is skipped). A plain asm load may
# be hoisted out of that guard by the compiler; the read past the tensor then
# faults where the allocation ends on a page (it did: the grouped expert
# kernels' first step, a 2 MiB F16 expert tensor on an H100).
WEIGHT_LOAD = "ld.global.nc.L1::no_allocate"
PTX_GUARD = re.compile(r"^\s*@!?%p\d+\s+bra\b")
PTX_ENTRY = re.compile(r"^\.visible \.entry (\S+)\(")
MATVEC_ENTRY = re.compile(r"matvec(13matvec_kernel|21matvec_experts_kernel)")


def unguarded_weight_loads(ptx: str) -> list[str]:
    """Entries of matvec kernels with a weight load not preceded by a conditional branch since the last one."""
    bad, name, guarded = [], None, False
    for line in ptx.splitlines():
        m = PTX_ENTRY.match(line)
        if m:
            name, guarded = m.group(1), False
        elif name is None or not MATVEC_ENTRY.search(name):
            continue
        elif PTX_GUARD.match(line):
            guarded = True
        elif WEIGHT_LOAD in line:
            if not guarded:
                bad.append(name)
            guarded = False
    return bad


def test_unguarded_weight_loads_are_found():
    hoisted = "\n".join(
        [".visible .entry _ZN2hx6matvec21matvec_experts_kernelIX(", "\t@%p4 bra \t$L__BB0_2;"]
        + [f"\t{WEIGHT_LOAD}.v4.u32 {{%r1, %r2, %r3, %r4}}, [%rd{i}];" for i in range(3)]
    )
    assert len(unguarded_weight_loads(hoisted)) == 2
    guarded = hoisted.replace(f"\t{WEIGHT_LOAD}", f"\t@%p9 bra \t$L__BB0_3;\n\t{WEIGHT_LOAD}")
    assert unguarded_weight_loads(guarded) == []


@needs_nvcc
def test_matvec_weight_loads_stay_under_their_guards(tmp_path):
    def ptx(name):
        out = tmp_path / (name + ".ptx")
        cmd = [
            NVCC,
            *NVCC_FLAGS[:3],
            "-DHX_WITH_CUDA=1",
            f"-I{CSRC}",
            "-arch=sm_90",
            "-ptx",
            str(CSRC / "kernels" / name),
        ]
        p = subprocess.run(cmd + ["-o", str(out)], capture_output=True, text=True)
        assert p.returncode == 0, p.stdout + p.stderr
        return out.read_text()

    files = ["matvec_f16.cu", "matvec_f32.cu", "matvec_q4_k.cu"]
    with ThreadPoolExecutor(max_workers=PARALLEL) as pool:
        texts = dict(zip(files, pool.map(ptx, files)))
    for name, text in texts.items():
        assert WEIGHT_LOAD in text, f"{name}: no weight loads found (the PTX changed form?)"
        bad = unguarded_weight_loads(text)
        assert not bad, f"{name}: weight loads outside their guards in {sorted(set(bad))}"


# ------------------------------------------------------------ host decoders

HARNESS = r"""
// Host check of the block decoders (quant_blocks.cuh) and the matvec lane arithmetic.
// stdin: int32 type, rows, k; rows * row_bytes weight bytes; 2 * k float x (two tokens).
// stdout: rows * k float dequantized; then, for one and two units per lane, 2 * rows float dots.
#include <cstdio>
#include <cstdlib>
#include <vector>
#include "kernels/quant_blocks.cuh"
using namespace hx;
using namespace hx::quant;

template <GgmlType T, int U>
void dots(const uint8_t* w, const float* x, int rows, int k, std::vector<float>& out) {
  using B = Block<T>;
  constexpr int PB = pass_bytes<T>();
  const size_t rb = row_bytes(T, k);
  const int npass = (k + 255) / 256;
  for (int r = 0; r < rows; ++r) {
    float acc[2] = {0.f, 0.f};
    for (int p = 0; p < npass; ++p) {
      const int ebase = p * 256;
      const uint8_t* pp = w + r * rb + (size_t)p * PB;
      for (int ub = 0; ub < 32; ub += U) {
        if (ebase + B::elem0(ub) >= k) continue;
        float xv[2][U][8];
        for (int t = 0; t < 2; ++t)
          for (int i = 0; i < U; ++i)
            for (int j = 0; j < 4; ++j) {
              xv[t][i][j] = x[t * k + ebase + B::elem0(ub + i) + j];
              xv[t][i][j + 4] = x[t * k + ebase + B::elem1(ub + i) + j];
            }
        float sx0[2], sx1[2];
        run_sums<T, 2, U>(xv, sx0, sx1);
        lane_dot<T, 2, U>(pp, ub, xv, sx0, sx1, acc);
      }
    }
    out[r] = acc[0];
    out[rows + r] = acc[1];
  }
}

template <GgmlType T>
int run(const uint8_t* w, const float* x, int rows, int k) {
  using B = Block<T>;
  constexpr int PB = pass_bytes<T>();
  const size_t rb = row_bytes(T, k);
  const int npass = (k + 255) / 256;
  // Units 2v and 2v+1 continue each other's runs (the dequantizer stores 8 at a time).
  for (int v = 0; v < 16; ++v)
    if (B::elem0(2 * v + 1) != B::elem0(2 * v) + 4 || B::elem1(2 * v + 1) != B::elem1(2 * v) + 4) {
      fprintf(stderr, "units %d, %d are not contiguous\n", 2 * v, 2 * v + 1);
      return 3;
    }
  std::vector<float> deq((size_t)rows * k, 0.f);
  std::vector<int> seen((size_t)rows * k, 0);
  for (int r = 0; r < rows; ++r)
    for (int p = 0; p < npass; ++p)
      for (int u = 0; u < 32; ++u) {
        const int ebase = p * 256;
        if (ebase + B::elem0(u) >= k) continue;
        const QUnit q = B::unit(w + r * rb + (size_t)p * PB, u);
        for (int j = 0; j < 4; ++j) {
          const size_t i0 = (size_t)r * k + ebase + B::elem0(u) + j;
          const size_t i1 = (size_t)r * k + ebase + B::elem1(u) + j;
          deq[i0] = unit_value<T>(q, j);
          deq[i1] = unit_value<T>(q, j + 4);
          seen[i0]++;
          seen[i1]++;
        }
      }
  for (size_t i = 0; i < seen.size(); ++i)
    if (seen[i] != 1) {
      fprintf(stderr, "element %zu decoded %d times\n", i, seen[i]);
      return 3;
    }
  fwrite(deq.data(), 4, deq.size(), stdout);
  std::vector<float> d1(2 * rows), d2(2 * rows);
  dots<T, 1>(w, x, rows, k, d1);
  dots<T, 2>(w, x, rows, k, d2);
  fwrite(d1.data(), 4, d1.size(), stdout);
  fwrite(d2.data(), 4, d2.size(), stdout);
  return 0;
}

int main() {
  int hdr[3];
  if (fread(hdr, 4, 3, stdin) != 3) return 2;
  const GgmlType t = (GgmlType)hdr[0];
  const int rows = hdr[1], k = hdr[2];
  const size_t nb = row_bytes(t, k) * rows;
  std::vector<uint8_t> w(nb + 16);
  std::vector<float> x(2 * (size_t)k);
  if (fread(w.data(), 1, nb, stdin) != nb) return 2;
  if (fread(x.data(), 4, x.size(), stdin) != x.size()) return 2;
  switch (t) {
#define HX_RUN(T) case GgmlType::T: return run<GgmlType::T>(w.data(), x.data(), rows, k);
    HX_RUN(Q4_0) HX_RUN(Q4_1) HX_RUN(Q5_0) HX_RUN(Q5_1) HX_RUN(Q8_0) HX_RUN(Q2_K) HX_RUN(Q3_K)
    HX_RUN(Q4_K) HX_RUN(Q5_K) HX_RUN(Q6_K) HX_RUN(IQ4_NL) HX_RUN(IQ4_XS)
    default: return 4;
  }
}
"""

# byte offsets of the fp16 fields inside one block
F16_FIELDS = {
    "Q4_0": [0],
    "Q4_1": [0, 2],
    "Q5_0": [0],
    "Q5_1": [0, 2],
    "Q8_0": [0],
    "Q2_K": [80, 82],
    "Q3_K": [108],
    "Q4_K": [0, 2],
    "Q5_K": [0, 2],
    "Q6_K": [208],
    "IQ4_NL": [0],
    "IQ4_XS": [0],
}


def host_program(tmp_path_factory, name: str, source: str, what: str) -> Path:
    """`source` built by nvcc into a host executable (the headers' __host__ __device__ code)."""
    d = tmp_path_factory.mktemp(name)
    src, exe = d / f"{name}.cu", d / name
    src.write_text(source)
    p = subprocess.run(
        [NVCC, "-std=c++17", "-O1", "--expt-relaxed-constexpr", f"-I{CSRC}", str(src), "-o", str(exe)],
        capture_output=True,
        text=True,
    )
    assert p.returncode == 0, f"host build of {what} failed:\n{p.stdout}{p.stderr}"
    return exe


DECODE_FEED = r"""
#include <cstdio>
#include <vector>
#include "kernels/decode_feed.cuh"
// rows stride shift steps, then per row: token pos step and `stride` block ids;
// then for every step and row the sampled token. Prints, after each step, every
// row's recorded token, input token, position, pool position, length and step;
// then the penalty state the tokens joined (row r in slot rows - 1 - r).
int main() {
  int rows, stride, shift, steps;
  if (scanf("%d %d %d %d", &rows, &stride, &shift, &steps) != 4) return 1;
  const int vocab = 1000;
  std::vector<int32_t> tok(rows), pos(rows), slot(rows, -7), lens(rows), st(rows), tables(rows * stride), rec(rows);
  std::vector<int32_t> slots(rows), present(rows * vocab, 0), counts(rows * vocab, 0);
  for (int r = 0; r < rows; ++r) slots[r] = rows - 1 - r;
  for (int r = 0; r < rows; ++r) {
    scanf("%d %d %d", &tok[r], &pos[r], &st[r]);
    lens[r] = pos[r] + 1;
    for (int j = 0; j < stride; ++j) scanf("%d", &tables[r * stride + j]);
  }
  hx::DecodeFeed f;
  f.tokens = tok.data(); f.pos = pos.data(); f.slot_pos = slot.data(); f.seq_lens = lens.data();
  f.steps = st.data(); f.tables = tables.data(); f.stride = stride; f.block_shift = shift;
  f.slots = slots.data(); f.present = present.data(); f.counts = counts.data(); f.vocab = vocab;
  for (int s = 0; s < steps; ++s)
    for (int r = 0; r < rows; ++r) {
      int sampled;
      scanf("%d", &sampled);
      hx::decode_feed_row(f, r, sampled, rec.data(), s + 1 < steps);
      printf("%d %d %d %d %d %d\n", rec[r], tok[r], pos[r], slot[r], lens[r], st[r]);
    }
  // Then the penalty state: every (slot, token) with a mark or a count.
  for (int s = 0; s < rows; ++s)
    for (int t = 0; t < vocab; ++t)
      if (present[s * vocab + t] || counts[s * vocab + t])
        printf("p %d %d %d %d\n", s, t, present[s * vocab + t], counts[s * vocab + t]);
  return 0;
}
"""


@needs_nvcc
def test_decode_feed_moves_each_row_one_position_on(tmp_path_factory):
    # Between the steps of a decode_steps job every row's sampled token becomes
    # its input one position on, written to the pool through its own block table.
    exe = host_program(tmp_path_factory, "decode_feed", DECODE_FEED, "decode_feed.cuh")
    rng = np.random.default_rng(5)
    rows, stride, shift, steps = 3, 6, 4, 9
    bs = 1 << shift
    start = [0, 13, 30]  # row 1 crosses into its second block, row 2 into its third
    tables = [rng.permutation(50)[:stride].tolist() for _ in range(rows)]
    sampled = rng.integers(0, 12, size=(steps, rows)).tolist()  # repeats: counts above 1
    inp = f"{rows} {stride} {shift} {steps}\n"
    for r in range(rows):
        inp += f"{7 + r} {start[r]} {100 * r} " + " ".join(map(str, tables[r])) + "\n"
    inp += "\n".join(" ".join(map(str, row)) for row in sampled) + "\n"
    out = subprocess.run([str(exe)], input=inp, capture_output=True, text=True, check=True).stdout.split("\n")
    got = [tuple(map(int, line.split())) for line in out if line.strip() and not line.startswith("p ")]
    pen = [tuple(map(int, line.split()[1:])) for line in out if line.startswith("p ")]
    assert len(got) == steps * rows
    # Row r's tokens (every step's, the last included) are counted in slot rows - 1 - r.
    want = {}
    for s_ in range(steps):
        for r in range(rows):
            key = (rows - 1 - r, sampled[s_][r])
            want[key] = want.get(key, 0) + 1
    assert {(s_, t): c for s_, t, p, c in pen} == want and all(p == 1 for _, _, p, _ in pen)
    for s in range(steps):
        for r in range(rows):
            rec, tok, pos, slot, length, step = got[s * rows + r]
            assert rec == sampled[s][r]
            if s + 1 == steps:  # the last step only records
                assert (tok, pos) == (sampled[s - 1][r], start[r] + s)
                continue
            p = start[r] + s + 1
            assert (tok, pos, length, step) == (sampled[s][r], p, p + 1, 100 * r + s + 1)
            assert slot == tables[r][p // bs] * bs + p % bs


def random_blocks(name: str, rows: int, k: int, rng, f16_scale: float = 0.05) -> np.ndarray:
    """rows x k elements of type `name` as random bytes, its fp16 fields small finite values."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    bs, bb = GGML_QUANT_SIZES[GGMLQuantizationType[name]]
    nb = rows * k // bs
    raw = rng.integers(0, 256, size=(nb, bb), dtype=np.uint8)
    for off in F16_FIELDS[name]:
        raw[:, off : off + 2] = (rng.standard_normal(nb) * f16_scale).astype(np.float16).view(np.uint8).reshape(nb, 2)
    return raw.reshape(rows, -1)


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    return host_program(tmp_path_factory, "quant_host", HARNESS, "quant_blocks.cuh")


@needs_nvcc
@pytest.mark.parametrize("name", list(F16_FIELDS))
def test_block_decoders_match_gguf_on_host(harness, name):
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import dequantize

    qt = GGMLQuantizationType[name]
    bs, bb = GGML_QUANT_SIZES[qt]
    seed = int(np.random.SeedSequence().entropy % (2**32))
    rng = np.random.default_rng(seed)
    shapes = [(3, bs), (2, 3 * 256), (4, 4096 + 256)] + ([(3, 9 * 32), (1, 4096 + 96)] if bs == 32 else [])
    for rows, k in shapes:
        raw = random_blocks(name, rows, k, rng)
        x = rng.standard_normal((2, k)).astype(np.float32)
        inp = np.array([int(qt), rows, k], np.int32).tobytes() + raw.tobytes() + x.tobytes()
        p = subprocess.run([str(harness)], input=inp, capture_output=True)
        tag = f"{name} rows={rows} k={k} seed={seed}"
        assert p.returncode == 0, f"{tag}: harness exit {p.returncode}: {p.stderr.decode()}"
        out = np.frombuffer(p.stdout, np.float32)
        assert out.size == rows * k + 4 * rows, f"{tag}: short output"
        got = out[: rows * k].reshape(rows, k)
        ref = dequantize(raw, qt).reshape(rows, k)
        assert np.array_equal(got, ref), f"{tag}: decoded values differ (max {np.max(np.abs(got - ref)):.3g})"
        want = x.astype(np.float64) @ ref.astype(np.float64).T
        scale = np.abs(x.astype(np.float64)) @ np.abs(ref.astype(np.float64)).T
        for label, dots in (
            ("one unit", out[rows * k : rows * k + 2 * rows]),
            ("unit pair", out[rows * k + 2 * rows :]),
        ):
            err = np.max(np.abs(dots.reshape(2, rows) - want) / scale)
            assert err < 1e-5, f"{tag}: matvec lane arithmetic ({label}) relative error {err:.2e}"


# ------------------------------------------- integer path of the staged product

INT_HARNESS = r"""
// The staged product's integer path (Q4_K, Q6_K): every element of a pass
// reached exactly once through the k-step / lane mapping of quant_blocks.cuh,
// valued from its quant byte and group scale as the reference dequantizer does;
// and int_pair's bf16 integers.
#include <cstdio>
#include <cstring>
#include <vector>
#include "kernels/quant_blocks.cuh"

using namespace hx;
using namespace hx::quant;

static float bf16_value(uint32_t half) {
  const uint32_t bits = half << 16;
  float f;
  memcpy(&f, &bits, 4);
  return f;
}

static int check_pairs() {
  for (uint32_t b = 0; b < 128; ++b) {
    const uint32_t w = b | ((b ^ 0x55u) & 0x7fu) << 8 | ((127u - b) << 16) | ((b * 7u) & 0x7fu) << 24;
    const uint32_t lo = int_pair(w, kIntLo), hi = int_pair(w, kIntHi);
    const uint32_t want[4] = {w & 0xffu, (w >> 8) & 0xffu, (w >> 16) & 0xffu, w >> 24};
    const float got[4] = {bf16_value(lo & 0xffffu), bf16_value(lo >> 16), bf16_value(hi & 0xffffu), bf16_value(hi >> 16)};
    for (int i = 0; i < 4; ++i)
      if (got[i] != 128.f + (float)want[i]) {
        fprintf(stderr, "int_pair byte %d of %08x: %g, want %u\n", i, w, got[i], 128u + want[i]);
        return 3;
      }
  }
  return 0;
}

// Element values of one pass (256) into out, seen counts into seen.
static void pass_q4k(const uint8_t* sb, float* out, int* seen) {
  using B = Block<GgmlType::Q4_K>;
  for (int c = 0; c < 4; ++c) {
    QUnit sc;
    B::scales(sc, ld_u32(sb), B::scale_min_pair(sb + 4, c));
    for (int sub = 0; sub < 2; ++sub)
      for (int h = 0; h < 2; ++h)
        for (int q = 0; q < 4; ++q) {
          const uint32_t u = B::int_quants(ld_u32(sb + B::int_word(c, h, q)), sub);
          const int e = B::int_elem(c, sub, h, q);
          const float a = sub ? sc.a1 : sc.a0, b = sub ? sc.b1 : sc.b0;
          for (int i = 0; i < 4; ++i) {
            out[e + i] = add_rn(mul_rn(a, (float)((u >> (8 * i)) & 0xffu)), b);
            seen[e + i]++;
          }
        }
  }
}

static void pass_q6k(const uint8_t* sb, float* out, int* seen) {
  using B = Block<GgmlType::Q6_K>;
  for (int hh = 0; hh < 2; ++hh)
    for (int s = 0; s < 4; ++s)
      for (int j = 0; j < 2; ++j)
        for (int q = 0; q < 4; ++q) {
          const uint32_t u = B::int_quants(ld_u32_a2(sb + B::int_ql(hh, s & 1, j, q)), ld_u32_a2(sb + B::int_qh(hh, j, q)), s);
          const int e = B::int_elem(hh, s, j, q);
          const float scale = B::group_scale(sb, B::int_group(hh, s, j));
          for (int i = 0; i < 4; ++i) {
            const uint32_t b = (u >> (8 * i)) & 0xffu;
            if (b >= 64) { fprintf(stderr, "6-bit quant %u\n", b); exit(3); }
            out[e + i] = mul_rn(scale, (float)((int)b - 32));
            seen[e + i]++;
          }
        }
}

int main() {
  int hdr[3];  // type, rows, k
  if (fread(hdr, 4, 3, stdin) != 3) return 2;
  if (int rc = check_pairs()) return rc;
  const GgmlType t = (GgmlType)hdr[0];
  const int rows = hdr[1], k = hdr[2];
  const size_t rb = row_bytes(t, k), nb = rb * rows;
  std::vector<uint8_t> w(nb + 16);
  if (fread(w.data(), 1, nb, stdin) != nb) return 2;
  std::vector<float> out((size_t)rows * k);
  std::vector<int> seen((size_t)rows * k, 0);
  for (int r = 0; r < rows; ++r)
    for (int p = 0; p < k / 256; ++p) {
      const size_t o = (size_t)r * k + 256 * p;
      if (t == GgmlType::Q4_K)
        pass_q4k(w.data() + r * rb + (size_t)p * pass_bytes<GgmlType::Q4_K>(), out.data() + o, seen.data() + o);
      else if (t == GgmlType::Q6_K)
        pass_q6k(w.data() + r * rb + (size_t)p * pass_bytes<GgmlType::Q6_K>(), out.data() + o, seen.data() + o);
      else
        return 4;
    }
  for (size_t i = 0; i < seen.size(); ++i)
    if (seen[i] != 1) {
      fprintf(stderr, "element %zu reached %d times\n", i, seen[i]);
      return 3;
    }
  fwrite(out.data(), 4, out.size(), stdout);
  return 0;
}
"""


@pytest.fixture(scope="module")
def int_harness(tmp_path_factory):
    return host_program(tmp_path_factory, "int_host", INT_HARNESS, "the integer-path mapping")


@needs_nvcc
@pytest.mark.parametrize("name", ["Q4_K", "Q6_K"])
def test_integer_path_mapping_matches_gguf_on_host(int_harness, name):
    # Rows of 3 and 17 super-blocks: Q6_K's 210-byte blocks then start at
    # every 2-byte offset mod 16, as the staged product's stage keeps them.
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    qt = GGMLQuantizationType[name]
    seed = int(np.random.SeedSequence().entropy % (2**32))
    rng = np.random.default_rng(seed)
    for rows, k in [(2, 3 * 256), (3, 17 * 256)]:
        raw = random_blocks(name, rows, k, rng)
        inp = np.array([int(qt), rows, k], np.int32).tobytes() + raw.tobytes()
        p = subprocess.run([str(int_harness)], input=inp, capture_output=True)
        tag = f"{name} rows={rows} k={k} seed={seed}"
        assert p.returncode == 0, f"{tag}: harness exit {p.returncode}: {p.stderr.decode()}"
        got = np.frombuffer(p.stdout, np.float32).reshape(rows, k)
        ref = dequantize(raw, qt).reshape(rows, k)
        assert np.array_equal(got, ref), f"{tag}: values differ (max {np.max(np.abs(got - ref)):.3g})"


# ------------------------------------------------------- matvec CTA emulation

EMULATOR = r"""
// Runs the matvec CTA code (matvec_impl.cuh) on the host: one OS thread per
// simulated GPU thread, barriers for __syncwarp / __syncthreads, a shared
// array for shuffles; every weight and activation load is bounds-checked.
// stdin: int32 type, n_out, k, ntok, accumulate, sms, warps; weight bytes; x; bias; y.
// stdout: y (float32 [ntok, n_out]); exit 5 if a load strayed.
#define HX_MATVEC_NO_EXTERN 1
#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <mutex>
#include <cstdio>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>
#include "kernels/matvec_impl.cuh"
using namespace hx;

// Reusable thread barrier (std::barrier is C++20).
class Barrier {
 public:
  explicit Barrier(int n) : n_(n) {}
  void arrive_and_wait() {
    std::unique_lock<std::mutex> lk(m_);
    const long gen = gen_;
    if (++count_ == n_) {
      count_ = 0;
      ++gen_;
      cv_.notify_all();
    } else {
      cv_.wait(lk, [&] { return gen_ != gen; });
    }
  }

 private:
  std::mutex m_;
  std::condition_variable cv_;
  int n_, count_ = 0;
  long gen_ = 0;
};

struct HostCta {
  std::vector<uint4> smem;
  std::unique_ptr<Barrier> cta_bar;
  std::vector<std::unique_ptr<Barrier>> warp_bars;
  std::vector<float> shfl;
  int block = 0, nwarps = 1, nblocks = 1;
  const uint8_t *w_lo, *w_hi;
  const float *x_lo, *x_hi;
  std::atomic<int> errors{0};
};

struct HostCtx {
  uint4* smem;
  HostCta* c;
  int lane_, warp_;
  mutable bool waited_ = false;  // wait_prior() seen: x may be read from here on
  void wait_prior() const { waited_ = true; }
  int lane() const { return lane_; }
  int warp() const { return warp_; }
  int nwarps() const { return c->nwarps; }
  int block() const { return c->block; }
  void syncwarp() const { c->warp_bars[warp_]->arrive_and_wait(); }
  void syncthreads() const { c->cta_bar->arrive_and_wait(); }
  float shfl_xor(float v, int m) const {
    float* s = c->shfl.data() + 32 * warp_;
    syncwarp();
    s[lane_] = v;
    syncwarp();
    const float r = s[lane_ ^ m];
    syncwarp();
    return r;
  }
  uint4 ld_stream(const void* p) const {
    const uint8_t* b = static_cast<const uint8_t*>(p);
    if (reinterpret_cast<uintptr_t>(b) % 16 || b >= c->w_hi || b + 16 <= c->w_lo) {
      fprintf(stderr, "bad weight load at offset %ld\n", (long)(b - c->w_lo));
      c->errors++;
      return uint4{0, 0, 0, 0};
    }
    uint4 r;
    memcpy(&r, b, 16);
    return r;
  }
  int nblocks() const { return c->nblocks; }
  // Weight words of the dp4a kernels: aligned, starting inside the tensor (a
  // word may end past its last byte, as allocations are whole words).
  const uint8_t* wcheck(const void* p, int align) const {
    const uint8_t* b = static_cast<const uint8_t*>(p);
    if (reinterpret_cast<uintptr_t>(b) % align || b < c->w_lo || b >= c->w_hi) {
      fprintf(stderr, "bad %d-byte weight load at offset %ld\n", align, (long)(b - c->w_lo));
      c->errors++;
      return nullptr;
    }
    return b;
  }
  uint4 ld_w128(const void* p) const {
    uint4 r{0, 0, 0, 0};
    const uint8_t* b = wcheck(p, 16);
    if (b && b + 16 > c->w_hi) { fprintf(stderr, "16-byte load past the end\n"); c->errors++; b = nullptr; }
    if (b) memcpy(&r, b, 16);
    return r;
  }
  uint32_t ld_w32(const void* p) const {
    uint32_t r = 0;
    if (const uint8_t* b = wcheck(p, 4)) memcpy(&r, b, 4);
    return r;
  }
  uint32_t ld_w16(const void* p) const {
    uint16_t r = 0;
    if (const uint8_t* b = wcheck(p, 2)) memcpy(&r, b, 2);
    return r;
  }
  float4 ld_x(const float* p) const {
    if (!waited_) {
      fprintf(stderr, "x read before wait_prior()\n");
      c->errors++;
    }
    if (reinterpret_cast<uintptr_t>(p) % 16 || p < c->x_lo || p + 4 > c->x_hi) {
      fprintf(stderr, "bad x load at %ld\n", (long)(p - c->x_lo));
      c->errors++;
      return make_float4(0, 0, 0, 0);
    }
    float4 r;
    memcpy(&r, p, 16);
    return r;
  }
};

// Runs body(ctx) on every thread of CTA `block` (nwarps warps, smem_bytes of
// shared memory filled with a marker) of an nblocks grid; returns its
// out-of-bounds load count.
template <class Body>
int run_cta(const matvec::Args& a, int nwarps, int block, int nblocks, size_t smem_bytes, Body body,
            const uint8_t* w_hi = nullptr, const float* x_hi = nullptr) {
  HostCta cta;
  cta.smem.assign(smem_bytes / 16 + 1, uint4{0xdeadbeef, 0xdeadbeef, 0xdeadbeef, 0xdeadbeef});
  cta.nwarps = nwarps;
  cta.nblocks = nblocks;
  cta.block = block;
  cta.cta_bar = std::make_unique<Barrier>(32 * nwarps);
  for (int w = 0; w < nwarps; ++w) cta.warp_bars.push_back(std::make_unique<Barrier>(32));
  cta.shfl.assign(32 * nwarps, 0.f);
  cta.w_lo = a.w;
  cta.w_hi = w_hi ? w_hi : a.w + a.row_bytes * a.n_out;
  cta.x_lo = a.x;
  cta.x_hi = x_hi ? x_hi : a.x + (size_t)a.ntok * a.k;
  std::vector<std::thread> th;
  for (int w = 0; w < nwarps; ++w)
    for (int l = 0; l < 32; ++l)
      th.emplace_back([&, w, l] {
        HostCtx ctx{cta.smem.data(), &cta, l, w};
        body(ctx);
      });
  for (auto& t : th) t.join();
  return cta.errors;
}

template <GgmlType T, int NT>
int emulate(const matvec::Args& in, int sms, int warps) {
  const matvec::Args a = matvec::stepped<T, NT>(in);
  const int resident[4] = {16, 8, 4, 2};  // CTAs of 1, 2, 4, 8 warps per SM
  matvec::Plan p = matvec::plan<T, NT>(a, sms, resident);
  if (warps > 0) {
    p.warps = warps;
    p.smem_bytes = matvec::smem_bytes<T, NT>(warps);
  }
  int errors = 0;
  for (int b = 0; b < p.blocks; ++b)
    errors += run_cta(a, p.warps, b, p.blocks, p.smem_bytes,
                      [&](const HostCtx& ctx) { matvec::matvec_cta<T, NT>(a, ctx); });
  return errors;
}

// The expert fusions, as launch_experts runs them. kGlu: one token, W holds
// 2 * glu rows (gate | up), y is [glu]. kCombine: W holds num_experts
// matrices `stride` bytes apart, x holds ntok * top_k rows, and each token's
// CTAs add its experts' weighted rows to y.
template <GgmlType T>
int emulate_fused(const matvec::Args& in, int sms, int warps, int fuse) {
  const matvec::Args a = matvec::stepped<T, 1>(in);
  constexpr int R = matvec::Config<T, 1>::R;
  const int resident[4] = {16, 8, 4, 2};
  matvec::Args whole = a;
  if (fuse == 2) {
    whole.n_out = a.n_out * a.ntok;
    whole.nsteps = a.nsteps * a.top_k;
  }
  matvec::Plan p = matvec::plan<T, 1>(whole, sms, resident);
  if (warps > 0) {
    p.warps = warps;
    p.smem_bytes = matvec::smem_bytes<T, 1>(warps);
  }
  int errors = 0;
  if (fuse == 1) {
    const int blocks = (a.glu + R / 2 - 1) / (R / 2);
    for (int b = 0; b < blocks; ++b)
      errors += run_cta(a, p.warps, b, blocks, p.smem_bytes,
                        [&](const HostCtx& ctx) { matvec::matvec_cta<T, 1, matvec::kGlu>(a, ctx); });
    return errors;
  }
  const int blocks = (a.n_out + R - 1) / R;
  const uint8_t* w_hi = a.w + a.stride * a.num_experts;
  const float* x_hi = a.x + (size_t)a.ntok * a.top_k * a.k;
  for (int t = 0; t < a.ntok; ++t) {
    matvec::Args b = a;
    b.ids = a.ids + (size_t)t * a.top_k;
    b.mix = a.mix + (size_t)t * a.top_k;
    b.x = a.x + (size_t)t * a.top_k * a.k;
    b.y = a.y + (size_t)t * a.n_out;
    b.ntok = 1;
    for (int blk = 0; blk < blocks; ++blk)
      errors += run_cta(
          b, p.warps, blk, blocks, p.smem_bytes,
          [&](const HostCtx& ctx) { matvec::matvec_cta<T, 1, matvec::kCombine>(b, ctx); }, w_hi, x_hi);
  }
  return errors;
}

// The dp4a kernels: CTAs of `warps` warps (kWarps if 0), min(row groups, sms) of them, each
// striding over row groups; the stage lives in the CTA's shared array.
// With prequant, one CTA of 4 warps first quantizes x into a separate stage
// (as quantize_x_launch does on the device) and the product CTAs read it.
template <GgmlType T, int NT, int U>
int emulate_dp4a(const matvec::Args& in, int sms, int warps, bool prequant) {
  const int cta_warps = warps > 0 ? warps : matvec::dp4a::kWarps;
  const int rows_per_cta = cta_warps * matvec::dp4a::kRows;
  const int groups = (in.n_out + rows_per_cta - 1) / rows_per_cta;
  const int nblocks = std::max(1, std::min(groups, sms));
  const size_t smem = matvec::dp4a::smem_bytes(in.ntok, in.k, U);
  int errors = 0;
  matvec::Args a = in;
  a.xq = nullptr;
  std::vector<uint4> stage;
  if (prequant) {
    stage.assign(smem / 16 + 1, uint4{0xdeadbeef, 0xdeadbeef, 0xdeadbeef, 0xdeadbeef});
    uint8_t* base = reinterpret_cast<uint8_t*>(stage.data());
    const matvec::dp4a::StageParts st = matvec::dp4a::stage_parts<U>(base, (size_t)a.ntok * a.k);
    errors += run_cta(a, 4, 0, 1, 0, [&](const HostCtx& ctx) {
      ctx.wait_prior();
      matvec::dp4a::quantize_x<U>(ctx, a.x, a.ntok, a.k, st);
    });
    a.xq = base;
  }
  for (int b = 0; b < nblocks; ++b)
    errors += run_cta(a, cta_warps, b, nblocks, smem, [&](const HostCtx& ctx) {
      matvec::dp4a::dp4a_cta<T, NT, U>(a, ctx, reinterpret_cast<uint8_t*>(ctx.smem));
    });
  return errors;
}

// Same choice as launch_nt: the dp4a kernel with 1 or 2 terms when asked and its stage fits.
template <GgmlType T, int NT>
int emulate_any(const matvec::Args& a, int sms, int warps) {
  if constexpr (matvec::dp4a::supported<T>()) {
    const int terms = a.int8_x >= 2 ? 2 : 1;
    if (a.int8_x && matvec::dp4a::smem_bytes(a.ntok, a.k, terms) <= matvec::dp4a::kMaxSmem) {
      // Both ways of quantizing x must give the same bits; y holds the second.
      const size_t ny = (size_t)a.ntok * a.n_out;
      const std::vector<float> y0(a.y, a.y + ny);
      int errors = terms == 2 ? emulate_dp4a<T, NT, 2>(a, sms, warps, false) : emulate_dp4a<T, NT, 1>(a, sms, warps, false);
      const std::vector<float> y1(a.y, a.y + ny);
      std::copy(y0.begin(), y0.end(), a.y);
      errors += terms == 2 ? emulate_dp4a<T, NT, 2>(a, sms, warps, true) : emulate_dp4a<T, NT, 1>(a, sms, warps, true);
      if (memcmp(y1.data(), a.y, ny * sizeof(float)) != 0) {
        fprintf(stderr, "prequantized x gave other results than per-CTA quantization\n");
        errors++;
      }
      return errors;
    }
  }
  return emulate<T, NT>(a, sms, warps);
}

int main() {
  // type, n_out, k, ntok, accumulate, sms, warps (0: as planned), int8_x mode (0, 1, 2),
  // fusion (0 none; 1 kGlu: n_out = 2 glu, y [glu]; 2 kCombine), top_k, num_experts (kCombine)
  int hdr[11];
  if (fread(hdr, 4, 11, stdin) != 11) return 2;
  const GgmlType t = (GgmlType)hdr[0];
  const int n_out = hdr[1], k = hdr[2], ntok = hdr[3], accumulate = hdr[4], sms = hdr[5], warps = hdr[6];
  const int fuse = hdr[8], top_k = fuse == 2 ? hdr[9] : 1, n_exp = fuse == 2 ? hdr[10] : 1;
  // kCombine: experts' matrices 16-byte aligned apart; x rows: one per (token, expert).
  const size_t stride = (row_bytes(t, k) * n_out + 15) / 16 * 16;
  const size_t wb = fuse == 2 ? stride * n_exp : row_bytes(t, k) * n_out;
  const size_t x_rows = (size_t)ntok * top_k;
  const int y_cols = fuse == 1 ? n_out / 2 : n_out;
  std::vector<uint4> wstore(wb / 16 + 2);
  uint8_t* w = reinterpret_cast<uint8_t*>(wstore.data());
  std::vector<float4> xstore((x_rows * k + 3) / 4 + 1);
  float* x = reinterpret_cast<float*>(xstore.data());
  std::vector<float> y((size_t)ntok * y_cols), bias(n_out);
  std::vector<int32_t> ids(x_rows);
  std::vector<float> mix(x_rows);
  if (fread(w, 1, wb, stdin) != wb) return 2;
  if (fread(x, 4, x_rows * k, stdin) != x_rows * k) return 2;
  if (fread(bias.data(), 4, n_out, stdin) != (size_t)n_out) return 2;
  if (fread(y.data(), 4, y.size(), stdin) != y.size()) return 2;
  if (fuse == 2 && (fread(ids.data(), 4, x_rows, stdin) != x_rows || fread(mix.data(), 4, x_rows, stdin) != x_rows))
    return 2;
  matvec::Args a;
  a.w = w; a.x = x; a.y = y.data(); a.bias = bias.data();
  a.row_bytes = row_bytes(t, k); a.n_out = n_out; a.k = k; a.ntok = ntok;
  a.npass = (k + 255) / 256; a.accumulate = accumulate; a.int8_x = hdr[7];
  a.static_w = n_out & 1;  // both orders of the first weight loads and the wait
  a.xq = nullptr;
  a.x_scratch = nullptr;
  int errors = 0;
  if (fuse) {
    a.bias = nullptr;
    a.int8_x = 0;
    a.glu = fuse == 1 ? n_out / 2 : 0;
    a.ids = ids.data();
    a.mix = mix.data();
    a.stride = stride;
    a.top_k = top_k;
    a.num_experts = n_exp;
    a.accumulate = fuse == 2;
    a.static_w = fuse == 2 && (n_out & 1);  // routing read before and after the wait
  }
#define HX_EMU(T)                                                                       \
  case GgmlType::T: {                                                                   \
    if (fuse) errors = emulate_fused<GgmlType::T>(a, sms, warps, fuse);                     \
    else if (ntok == 1) errors = emulate_any<GgmlType::T, 1>(a, sms, warps);                \
    else if (ntok == 2) errors = emulate_any<GgmlType::T, 2>(a, sms, warps);                \
    else if (ntok <= 4) errors = emulate_any<GgmlType::T, 4>(a, sms, warps);                \
    else errors = emulate_any<GgmlType::T, 8>(a, sms, warps);                               \
    break;                                                                              \
  }
  switch (t) {
    HX_FOR_EACH_GGML_TYPE(HX_EMU)
    default: return 4;
  }
  fwrite(y.data(), 4, y.size(), stdout);
  return errors ? 5 : 0;
}
"""


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    return host_program(tmp_path_factory, "matvec_host", EMULATOR, "matvec_impl.cuh")


EMU_TYPES = ["F32", "F16", "BF16", *F16_FIELDS]


# int8_x mode 1: one int8 term, 2: two; 0: the float kernel.
def dp4a_applies(name: str, n_tok: int, k: int, mode: int = 1) -> bool:
    return mode > 0 and stage_fits(name, n_tok, k, 2 if mode >= 2 else 1)


def _emu_weights(name, n_out, k, rng):
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    qt = GGMLQuantizationType[name]
    if name in ("F32", "F16", "BF16"):
        w = rng.standard_normal((n_out, k)).astype(np.float32)
        if name == "F32":
            raw = w.view(np.uint8)
        elif name == "F16":
            raw = w.astype(np.float16).view(np.uint8)
        else:  # bf16: round to nearest even, like torch
            u = w.view(np.uint32).astype(np.uint64)
            raw = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16).view(np.uint8)
        raw = np.ascontiguousarray(raw).reshape(n_out, -1)
    else:
        raw = random_blocks(name, n_out, k, rng, f16_scale=0.02)
    return raw, int(qt), dequantize(raw, qt).reshape(n_out, k).astype(np.float64)


@needs_nvcc
@pytest.mark.parametrize("name", EMU_TYPES)
def test_matvec_cta_runs_on_host(emulator, name):
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    qk = GGML_QUANT_SIZES[GGMLQuantizationType[name]][0]
    seed = int(np.random.SeedSequence().entropy % (2**32))
    rng = np.random.default_rng(seed)
    if qk == 1:
        ks = [4, 12, 4096 + 260, 2048 + 4]
    else:
        ks = [qk, 3 * qk, 4096 + (96 if qk == 32 else 256), 2048 + qk]
    # (n_out, k, n_tok, accumulate, SM count, warps per CTA or 0 for the launcher's choice)
    cases = [
        (1, ks[0], 1, 0, 132, 0),
        (5, ks[1], 3, 1, 132, 0),
        (7, ks[2], 1, 0, 132, 0),
        (9, ks[3], 2, 1, 1, 0),
        (6, ks[2], 8, 0, 4, 0),
        (13, ks[1], 5, 0, 132, 0),
        (5, ks[2], 1, 1, 132, 1),
        (3, ks[2], 2, 0, 132, 2),
        (4, ks[3], 1, 0, 132, 4),
        (2, ks[2], 4, 1, 132, 8),
        (40, ks[1], 2, 1, 1, 0),
        (37, ks[0], 1, 0, 2, 0),
        (40, ks[2], 1, 0, 1, 8),
        (23, ks[3], 3, 1, 1, 2),
    ]
    for i, (n_out, k, ntok, acc, sms, warps) in enumerate(cases):
        raw, tid, ref = _emu_weights(name, n_out, k, rng)
        x = rng.standard_normal((ntok, k)).astype(np.float32)
        # Odd cases ask for int8 activations (the dp4a kernel, where the type has
        # one and its stage fits); even ones run the float kernel for every type.
        mode = i % 2
        tag = (
            f"{name} n_out={n_out} k={k} n_tok={ntok} accumulate={acc} sms={sms} warps={warps} mode={mode} seed={seed}"
        )
        x64 = quantized_x(x) if dp4a_applies(name, ntok, k, mode) else x.astype(np.float64)
        y, want, scale = _run_emulator(emulator, rng, tag, raw, tid, ref, x, acc, sms, warps, mode)
        err = np.max(np.abs(y - want(x64)) / scale(x64))
        assert err < 2e-5, f"{tag}: relative error {err:.2e}"


def _run_emulator(emulator, rng, tag, raw, tid, ref, x, acc, sms, warps, mode):
    """Runs one product; returns (y, want(x64), scale(x64)) where want is the
    float64 product with x as given and scale the matching sum of |terms|."""
    ntok, k = x.shape
    n_out = ref.shape[0]
    bias = rng.standard_normal(n_out).astype(np.float32)
    y0 = rng.standard_normal((ntok, n_out)).astype(np.float32)
    inp = (
        np.array([tid, n_out, k, ntok, acc, sms, warps, mode, 0, 0, 0], np.int32).tobytes()
        + raw.tobytes()
        + x.tobytes()
        + bias.tobytes()
        + y0.tobytes()
    )
    p = subprocess.run([str(emulator)], input=inp, capture_output=True)
    assert p.returncode == 0, f"{tag}: emulator exit {p.returncode}: {p.stderr.decode()[:2000]}"
    y = np.frombuffer(p.stdout, np.float32).reshape(ntok, n_out)

    def want(x64):
        return x64 @ ref.T + bias + (y0 if acc else 0)

    def scale(x64):
        return np.abs(x64) @ np.abs(ref).T + np.abs(bias) + (np.abs(y0) if acc else 0)

    return y, want, scale


def _emulate_fused(emulator, tag, tid, raws, x, fuse, y0, ids=None, mix=None, sms=132, warps=0):
    """Runs one expert fusion (1: SwiGLU pairs, 2: combine) of the emulator; returns y."""
    n_out = raws[0].shape[0]
    k = x.shape[1]
    top_k = 1 if ids is None else ids.shape[1]
    ntok = x.shape[0] // top_k
    if fuse == 2:
        stride = -(-raws[0].size // 16) * 16
        w = np.zeros((len(raws), stride), np.uint8)
        for e, raw in enumerate(raws):
            w[e, : raw.size] = raw.reshape(-1)
    else:
        w = raws[0]
    hdr = [tid, n_out, k, ntok, int(fuse == 2), sms, warps, 0, fuse, top_k, len(raws)]
    inp = np.array(hdr, np.int32).tobytes() + w.tobytes() + x.tobytes() + np.zeros(n_out, np.float32).tobytes()
    inp += y0.tobytes()
    if fuse == 2:
        inp += ids.astype(np.int32).tobytes() + mix.astype(np.float32).tobytes()
    p = subprocess.run([str(emulator)], input=inp, capture_output=True)
    assert p.returncode == 0, f"{tag}: emulator exit {p.returncode}: {p.stderr.decode()[:2000]}"
    return np.frombuffer(p.stdout, np.float32).reshape(y0.shape).astype(np.float64)


@needs_nvcc
@pytest.mark.parametrize("name", EMU_TYPES)
def test_expert_fusions_run_on_host(emulator, name):
    # kGlu: gate row i and up row i in one CTA, silu(gate) * up written;
    # kCombine: each token's experts walked as (expert, step) pairs, weighted
    # and added to y, with every weight load inside the stack of experts.
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    qk = GGML_QUANT_SIZES[GGMLQuantizationType[name]][0]
    seed = int(np.random.SeedSequence().entropy % (2**32))
    rng = np.random.default_rng(seed)
    k = 3 * 256 if qk > 1 else 3 * 256 + 4
    for f, warps in [(5, 0), (1, 2), (8, 8)]:
        raw, tid, ref = _emu_weights(name, 2 * f, k, rng)
        x = rng.standard_normal((1, k)).astype(np.float32)
        y = _emulate_fused(emulator, f"{name} glu f={f}", tid, [raw], x, 1, np.zeros((1, f), np.float32), warps=warps)
        x64 = x[0].astype(np.float64)
        g, u = ref[:f] @ x64, ref[f:] @ x64
        with np.errstate(over="ignore"):  # exp(-g) = inf: silu(g) = -0
            want = g / (1 + np.exp(-g)) * u
        scale = (np.abs(ref[:f]) @ np.abs(x64)) * (np.abs(ref[f:]) @ np.abs(x64)) + 1e-30
        err = np.max(np.abs(y[0] - want) / scale)
        assert err < 1e-4, f"{name} glu f={f} warps={warps}: relative error {err:.2e} seed={seed}"
    E = 5
    for n_out, ntok, top_k, warps in [(7, 2, 3, 0), (4, 1, 5, 8), (9, 3, 2, 1)]:
        experts = [_emu_weights(name, n_out, k, rng) for _ in range(E)]
        ids = np.stack([rng.permutation(E)[:top_k] for _ in range(ntok)])
        mix = rng.random((ntok, top_k)).astype(np.float32)
        x = rng.standard_normal((ntok * top_k, k)).astype(np.float32)
        y0 = rng.standard_normal((ntok, n_out)).astype(np.float32)
        tag = f"{name} combine n_out={n_out} ntok={ntok} top_k={top_k} warps={warps} seed={seed}"
        y = _emulate_fused(emulator, tag, experts[0][1], [e[0] for e in experts], x, 2, y0, ids, mix, warps=warps)
        x64 = x.astype(np.float64)
        for t in range(ntok):
            want, scale = y0[t].astype(np.float64), np.abs(y0[t]).astype(np.float64)
            for j in range(top_k):
                ref = experts[ids[t, j]][2]
                want = want + float(mix[t, j]) * (ref @ x64[t * top_k + j])
                scale = scale + float(mix[t, j]) * (np.abs(ref) @ np.abs(x64[t * top_k + j]))
            err = np.max(np.abs(y[t] - want) / scale)
            assert err < 2e-5, f"{tag} token {t}: relative error {err:.2e}"


@needs_nvcc
@pytest.mark.parametrize("name", sorted(DP4A_TYPES))
def test_matvec_precise_int8_terms_on_host(emulator, name):
    # Two int8 terms per element (mode 2): exact against x split the same way,
    # and within ~1e-5 of the float product, typically 50-100 times closer than
    # one term (asserted: 20 times; the float32 accumulation floor of ~1e-6
    # limits the ratio). Where the two-term stage does not fit 48 KiB (but one term
    # would) the float kernel runs; mode 0 always takes the float kernel.
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    qk = GGML_QUANT_SIZES[GGMLQuantizationType[name]][0]
    seed = int(np.random.SeedSequence().entropy % (2**32))
    rng = np.random.default_rng(seed)
    # (n_out, k, n_tok, accumulate, SM count, warps, mode)
    cases = [
        (5, 4096 + (96 if qk == 32 else 256), 1, 0, 132, 0, 2),
        (9, 2048 + qk, 3, 1, 1, 0, 2),
        (6, 3 * qk, 8, 0, 4, 0, 2),
        (3, 2048, 2, 1, 132, 4, 2),
        (4, 4096, 4, 0, 132, 0, 2),
        (3, 4096, 8, 0, 132, 0, 2),
        (4, 2048, 2, 0, 132, 0, 0),
    ]
    for n_out, k, ntok, acc, sms, warps, mode in cases:
        raw, tid, ref = _emu_weights(name, n_out, k, rng)
        x = rng.standard_normal((ntok, k)).astype(np.float32)
        x[0, :32] = 0.0  # an all-zero block: both scales 0
        x[-1, 32:64] = np.float32(0.75)  # a constant block: a residual of rounding only
        tag = (
            f"{name} n_out={n_out} k={k} n_tok={ntok} accumulate={acc} sms={sms} warps={warps} mode={mode} seed={seed}"
        )
        y, want, scale = _run_emulator(emulator, rng, tag, raw, tid, ref, x, acc, sms, warps, mode)
        xf = x.astype(np.float64)
        err_float = np.max(np.abs(y - want(xf)) / scale(xf))
        if dp4a_applies(name, ntok, k, mode):
            x2 = quantized_x(x, 2)
            err_split = np.max(np.abs(y - want(x2)) / scale(x2))
            assert err_split < 5e-6, f"{tag}: relative error {err_split:.2e} against the two-term x"
            x1 = quantized_x(x, 1)
            err_one = np.max(np.abs(want(x1) - want(xf)) / scale(xf))
            # Per element |x - x2| <= ~max|x| / (2 * 127 * 254) of its block: ~1e-5 of
            # sum |w x| for short rows, a few 1e-6 once k spans many blocks.
            assert err_float < 3e-5, f"{tag}: relative error {err_float:.2e} against float x"
            assert err_float < err_one / 20, f"{tag}: two terms {err_float:.2e}, one term {err_one:.2e}"
        else:
            assert err_float < 2e-5, f"{tag}: float kernel relative error {err_float:.2e}"
