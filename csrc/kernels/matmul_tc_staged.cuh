// The staged tensor-core product: the default implementation of the
// small-batch product (same Args as matmul_tc_impl.cuh's hx::tc::run, same
// results to rounding; HELEXA_TC_KERNEL=v1 selects that one instead).
// Instantiated per storage type by the generated matvec_<type>.cu files.
//
//
//   y[t, i] = (accumulate ? y[t, i] : 0) + bias[i] + sum_j W[i, j] x[t, j]
//
// for 1..kTcMaxTokens tokens: the decode step of a batch of sequences, where
// the matvec (one token's fp32 activations per FMA) runs out of issue slots
// and dequantize + cuBLAS writes and rereads a bf16 copy of every weight.
// Each weight block is read once per launch, whatever the token count.
//
// A CTA owns kRows = 64 consecutive rows (four warps of 16), or 128 (eight
// warps) for many tokens (Args::wide: one activation stage then serves twice
// the rows, and twice the warps fit an SM), and a range of 256-element passes
// of k (split-K when the row tiles alone do not cover the GPU twice). The
// passes stream through a ring of S shared-memory stages with cp.async: while
// the warps compute pass p, the copies of passes p + 1 .. p + S - 1 are in
// flight. A stage holds
//   - the raw bytes of the CTA's rows' pass (the 16-byte aligned chunks that
//     cover it, address mod 16 preserved, so the block decoders read fields
//     at the alignment the format guarantees), rows an odd number of chunks
//     apart so the lanes' quant words fall in different banks;
//   - the pass's 256 activations of every token, bf16 (tokens past n_tok and
//     columns past k are zero-filled by the copy).
// Model weights never change, so a CTA starts copying them before it waits
// for the previous kernel (launch.cuh); the activations come after the wait.
//
// Compute: warp w multiplies rows 16w .. 16w + 15 with mma.sync m16n8k16
// (bf16 in, fp32 accumulate). The dot product's order over k is free, so each
// lane decodes its A fragment straight into registers: lane (g = lane / 4,
// q = lane % 4) decodes units 8q .. 8q + 7 (quant_blocks.cuh: 8 elements as
// two runs of 4) of rows g and g + 8, and k-step s of the pass takes one run
// of one unit: A's columns {2q, 2q + 1, 2q + 8, 2q + 9} are that run's four
// elements, and B's fragment is the same four activations of token g, one
// 8-byte shared load. Every lane with the same q takes the same run at the
// same k-step, which is all the MMA needs. Lane q visits its units rotated by
// q, so the 8-byte activation loads of a half-warp hit 32 different banks.
// Values are the block decoders' unit() fields times the quants (an FMA where
// the format has an offset), rounded once to bf16: the arithmetic of
// dequantize-to-bf16 + a bf16 GEMM with fp32 accumulation (the large-batch
// path), so both paths agree to rounding.
//
// Integer weights (Q4_K and Q6_K, up to Args::int_tokens tokens): with few
// tokens the per-element decode above, not the MMA, is the cost. There each
// MMA takes the 16 elements of one scale group (a Q6_K group of 16, half a
// Q4_K sub-block of 32), lane q holding elements 4q .. 4q + 3 of it, and the
// A fragment is the quants themselves as exact bf16 integers: one PRMT puts
// two quant bytes under the exponent of 128, giving 128 + q. Q6_K subtracts
// 160 with one bf16x2 FMA (exact: q - 32); its group's MMA result, times
// d * scale, goes to the accumulators. Q4_K keeps the 128: with a = d * sc
// and c = 128 a + dmin * m per sub-block,
//   sum w x = a * sum (128 + q) x - c * sum x,
// and an MMA of ones with the same activations gives sum x per token. Each
// warp decodes its 16 rows' scales once per pass into a small shared table.
// Weights are exact here (no bf16 rounding of a * q + b), so results differ
// from the dequantize + GEMM path by that rounding only.
//
// Output: without split-K the CTA writes y itself (bias, accumulate); with
// it, each split writes its partial sums to a workspace and a second kernel
// adds the splits in a fixed order, so results never depend on scheduling.
// sm_80+ (mma.sync bf16 and cp.async exist from Ampere on).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <stdexcept>

#include "common/arch.cuh"
#include "common/check.h"
#include "common/ggml_types.h"
#include "common/launch.cuh"
#include "kernels/matmul_tc_impl.cuh"
#include "kernels/quant_blocks.cuh"

namespace hx {
namespace tcs {

using tc::Args;
using tc::kPass;
using tc::kRows;
using tc::kWarps;
constexpr int kThreads = 32 * kWarps;
constexpr int kXLd = kPass + 16;             // bf16 per token row of a stage: 544 bytes, 32 mod 128
constexpr int kMaxStages = 4;

// Shared-memory ring of type T with NTILE tiles of 8 tokens, for CTAs of NW warps.
template <GgmlType T, int NTILE, int NW = kWarps>
struct Ring {
  static constexpr int PB = quant::pass_bytes<T>();
  static constexpr int NSEG = ((PB + 15) / 16 + 1) | 1;  // chunks per row: any alignment, odd
  static constexpr int RS = 16 * NSEG;                    // row stride of the weight stage
  static constexpr size_t W_BYTES = (size_t)16 * NW * RS;
  static constexpr size_t X_BYTES = (size_t)8 * NTILE * kXLd * sizeof(__nv_bfloat16);
  static constexpr size_t STAGE = W_BYTES + X_BYTES;
  // Stages of a ring of at most `target` shared bytes: 2 .. kMaxStages.
  static int stages(size_t target) { return (int)std::max<size_t>(2, std::min<size_t>(kMaxStages, target / STAGE)); }
};

// 16 bytes global -> shared; only the first `bytes` (0 or 16, or the tail of
// the tensor) are read, the rest of the 16 are zero-filled.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, int bytes) {
#if HX_HAS_CP_ASYNC
  const uint32_t s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(s), "l"(gmem), "r"(bytes) : "memory");
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if HX_HAS_CP_ASYNC
  asm volatile("cp.async.commit_group;" ::: "memory");
#endif
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if HX_HAS_CP_ASYNC
  asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
#endif
}

// c = A B without an input accumulator (the integer path's per-group products).
__device__ __forceinline__ void mma_bf16_zero(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                              uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%10, %10, %10, %10};"
      : "=f"(c[0]), "=f"(c[1]), "=f"(c[2]), "=f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1), "f"(0.f));
}

using quant::int_pair;
using quant::kIntHi;
using quant::kIntLo;
constexpr uint32_t kBf16Ones = 0x3f803f80u;  // (1.0, 1.0)

// (128 + q) - 160 = q - 32 for a pair of Q6_K quants, exact.
__device__ __forceinline__ uint32_t minus_160(uint32_t v) {
  uint32_t r;
  asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(r) : "r"(v), "r"(kBf16Ones), "r"(0xc320c320u));
  return r;
}

// Types with an integer-weight path, and the most token tiles it serves.
template <GgmlType T>
constexpr bool has_int_path() {
  return T == GgmlType::Q4_K || T == GgmlType::Q6_K;
}
constexpr int kIntMaxTiles = 4;
constexpr int kIntMaxGroupTiles = 2;  // the expert-groups kernel at 4 tiles spills on sm_80 / sm_89
constexpr size_t kIntTableBytes = (size_t)kWarps * 16 * 16 * sizeof(float);  // per warp 16 rows x 16 floats

// Copies pass p of the CTA's rows into the weight stage `ws`.
template <GgmlType T, int NTILE, int NW>
__device__ __forceinline__ void copy_weights(const Args& a, int row0, int p, uint8_t* ws) {
  using R = Ring<T, NTILE, NW>;
  const uint8_t* wend = a.w + (size_t)a.n_out * a.row_bytes;
  for (int c = threadIdx.x; c < 16 * NW * R::NSEG; c += 32 * NW) {
    const int r = c / R::NSEG, j = c - r * R::NSEG;
    const int row = row0 + r;
    const uint8_t* src = a.w;
    int bytes = 0;
    if (row < a.n_out) {
      const uint8_t* start = a.w + (size_t)row * a.row_bytes + (size_t)p * R::PB;
      const uint8_t* chunk =
          reinterpret_cast<const uint8_t*>(reinterpret_cast<uintptr_t>(start) & ~(uintptr_t)15) + 16 * j;
      if (chunk < start + R::PB && chunk < wend) {
        src = chunk;
        const ptrdiff_t left = wend - chunk;
        bytes = left < 16 ? (int)left : 16;
      }
    }
    cp_async16(ws + r * R::RS + 16 * j, src, bytes);
  }
}

// Copies pass p's activations of all 8 * NTILE token rows into `xs`.
template <int NTILE, int NW>
__device__ __forceinline__ void copy_x(const Args& a, int p, __nv_bfloat16* xs) {
  const int ebase = p * kPass;
  for (int c = threadIdx.x; c < 8 * NTILE * (kPass / 8); c += 32 * NW) {
    const int t = c / (kPass / 8), col = (c % (kPass / 8)) * 8;
    const bool ok = t < a.ntok && ebase + col < a.k;
    cp_async16(xs + t * kXLd + col, ok ? a.x + (size_t)t * a.k + ebase + col : a.x, ok ? 16 : 0);
  }
}

// A decoded quant unit's eight values as A-fragment words (see decode_unit).
template <GgmlType T>
__device__ __forceinline__ void unit_fragment(const quant::QUnit& q, uint32_t (&w)[4]) {
  using B = quant::Block<T>;
  float v[8];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float q0 = quant::byte_value<B::Z>(q.u0, i), q1 = quant::byte_value<B::Z>(q.u1, i);
    v[i] = B::HAS_B ? fmaf(q.a0, q0, q.b0) : q.a0 * q0;
    v[i + 4] = B::HAS_B ? fmaf(q.a1, q1, q.b1) : q.a1 * q1;
  }
  w[0] = pack_bf16(v[0], v[1]);
  w[1] = pack_bf16(v[2], v[3]);
  w[2] = pack_bf16(v[4], v[5]);
  w[3] = pack_bf16(v[6], v[7]);
}

// A-fragment words of one unit of one row: run 0 as (w[0], w[1]) and run 1 as
// (w[2], w[3]), each word two bf16 (elements 0,1 and 2,3 of the run). Units
// past k are zeros (quant rows end on whole blocks, float runs on 8 elements).
template <GgmlType T>
__device__ __forceinline__ void decode_unit(const uint8_t* pass, int u, int ebase, int k, uint32_t (&w)[4]) {
  using B = quant::Block<T>;
  const int e0 = B::elem0(u), e1 = B::elem1(u);
  if constexpr (T == GgmlType::BF16) {
    const uint2 r0 = ebase + e0 < k ? *reinterpret_cast<const uint2*>(pass + 2 * e0) : make_uint2(0, 0);
    const uint2 r1 = ebase + e1 < k ? *reinterpret_cast<const uint2*>(pass + 2 * e1) : make_uint2(0, 0);
    w[0] = r0.x;
    w[1] = r0.y;
    w[2] = r1.x;
    w[3] = r1.y;
  } else if constexpr (is_float_type(T)) {
    float v[4] = {0.f, 0.f, 0.f, 0.f};
    if (ebase + e0 < k) B::run4(pass, e0, v);
    w[0] = pack_bf16(v[0], v[1]);
    w[1] = pack_bf16(v[2], v[3]);
    v[0] = v[1] = v[2] = v[3] = 0.f;
    if (ebase + e1 < k) B::run4(pass, e1, v);
    w[2] = pack_bf16(v[0], v[1]);
    w[3] = pack_bf16(v[2], v[3]);
  } else {
    // A 256-element block fills the pass; smaller blocks may end inside it.
    if (B::QK < kPass && ebase + e0 >= k) {
      w[0] = w[1] = w[2] = w[3] = 0u;
      return;
    }
    unit_fragment<T>(B::unit(pass, u), w);
  }
}

// One CTA's share of a product: rows row0 .. row0 + 16 NW - 1 of a.w times
// a.ntok (<= 8 * NTILE) token rows of a.x, over split `split`'s passes, into
// y or the split's partials. Every thread of the CTA calls it.
template <GgmlType T, int NTILE, bool INTW, int NW = kWarps>
__device__ __forceinline__ void product_tile(const Args& a, int row0, int split, unsigned char* smem_raw) {
  using R = Ring<T, NTILE, NW>;
  using B = quant::Block<T>;
  static_assert(!INTW || NW == kWarps, "the integer path's scale table is sized for kWarps warps");

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, tq = lane & 3;
  const int p_begin = split * a.pass_per_split;
  const int np = min(a.npass, p_begin + a.pass_per_split) - p_begin;
  const int S = a.stages;
  // Units decoded per loop trip: two, but one for 8 token tiles, whose 32
  // accumulators leave no registers for a second unit in flight.
  constexpr int kUnroll = NTILE >= 8 ? 1 : 2;
  auto wstage = [&](int s) { return smem_raw + (size_t)s * R::STAGE; };
  auto xstage = [&](int s) { return reinterpret_cast<__nv_bfloat16*>(smem_raw + (size_t)s * R::STAGE + R::W_BYTES); };

  // Prologue: weights of the first S - 1 passes before the wait, activations after.
  for (int s = 0; s < S - 1; ++s)
    if (s < np) copy_weights<T, NTILE, NW>(a, row0, p_begin + s, wstage(s));
  pdl_begin();
  for (int s = 0; s < S - 1; ++s) {
    if (s < np) copy_x<NTILE, NW>(a, p_begin + s, xstage(s));
    cp_async_commit();
  }

  float acc[NTILE][4];
#pragma unroll
  for (int n = 0; n < NTILE; ++n)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[n][i] = 0.f;

  // This lane's rows inside the CTA and their pass offsets mod 16.
  const int ra = 16 * warp + g, rb = ra + 8;
  const uintptr_t wa_addr = reinterpret_cast<uintptr_t>(a.w) + (size_t)min(row0 + ra, a.n_out - 1) * a.row_bytes;
  const uintptr_t wb_addr = reinterpret_cast<uintptr_t>(a.w) + (size_t)min(row0 + rb, a.n_out - 1) * a.row_bytes;
  // The integer path: lane l decodes the scales of its warp's row l / 2
  // (half l % 2 of them) into the warp's table after the ring.
  const int rt = 16 * warp + (lane >> 1);
  const uintptr_t wt_addr = reinterpret_cast<uintptr_t>(a.w) + (size_t)min(row0 + rt, a.n_out - 1) * a.row_bytes;
  float* const tab = reinterpret_cast<float*>(smem_raw + (size_t)S * R::STAGE) + warp * 256;

  for (int it = 0; it < np; ++it) {
    // Wait for pass `it`: at most S - 2 later groups may still be in flight.
    if (S == 2)
      cp_async_wait<0>();
    else if (S == 3)
      cp_async_wait<1>();
    else
      cp_async_wait<2>();
    __syncthreads();  // pass `it` has landed for every thread; pass it - 1's stage is free
    {
      const int nx = it + S - 1;
      if (nx < np) {
        copy_weights<T, NTILE, NW>(a, row0, p_begin + nx, wstage(nx % S));
        copy_x<NTILE, NW>(a, p_begin + nx, xstage(nx % S));
      }
      cp_async_commit();
    }
    const int p = p_begin + it, st = it % S;
    const int ebase = p * kPass;
    const size_t pofs = (size_t)p * R::PB;
    const uint8_t* pa = wstage(st) + ra * R::RS + ((wa_addr + pofs) & 15);
    const uint8_t* pb = wstage(st) + rb * R::RS + ((wb_addr + pofs) & 15);
    const __nv_bfloat16* xg = xstage(st) + g * kXLd;
    // Unit u's two runs of rows ra (fa) and rb (fb) times every token tile.
    auto mma_unit = [&](int u, const uint32_t (&fa)[4], const uint32_t (&fb)[4]) {
#pragma unroll
      for (int run = 0; run < 2; ++run) {
        const int e = run ? B::elem1(u) : B::elem0(u);
        const uint32_t a0 = fa[2 * run], a2 = fa[2 * run + 1];
        const uint32_t a1 = fb[2 * run], a3 = fb[2 * run + 1];
#pragma unroll
        for (int n = 0; n < NTILE; ++n) {
          const uint2 bx = *reinterpret_cast<const uint2*>(xg + n * 8 * kXLd + e);
          mma_bf16(acc[n], a0, a1, a2, a3, bx.x, bx.y);
        }
      }
    };
    if constexpr (INTW && T == GgmlType::Q4_K) {
      {
        // Table row (lane / 2): sub-blocks 4 (lane % 2) .. + 3 as (a, c) pairs.
        const uint8_t* pt = wstage(st) + rt * R::RS + ((wt_addr + pofs) & 15);
        const uint32_t dd = quant::ld_u32(pt);
        const float d = quant::half_float(dd & 0xffff), dmin = quant::half_float(dd >> 16);
        const uint32_t s0 = quant::ld_u32(pt + 4), s1 = quant::ld_u32(pt + 8), s2 = quant::ld_u32(pt + 12);
        float v[8];
#pragma unroll
        for (int cc = 0; cc < 2; ++cc) {
          const uint32_t w = B::scale_min_pair(s0, s1, s2, 2 * (lane & 1) + cc);
#pragma unroll
          for (int i = 0; i < 2; ++i) {
            const float sa = quant::mul_rn(d, quant::byte_value<0>(w, i));
            v[4 * cc + 2 * i] = sa;
            v[4 * cc + 2 * i + 1] = fmaf(128.f, sa, quant::mul_rn(dmin, quant::byte_value<0>(w, 2 + i)));
          }
        }
        float4* dst = reinterpret_cast<float4*>(tab + 16 * (lane >> 1) + 8 * (lane & 1));
        dst[0] = make_float4(v[0], v[1], v[2], v[3]);
        dst[1] = make_float4(v[4], v[5], v[6], v[7]);
        __syncwarp();
      }
      const float2* ta = reinterpret_cast<const float2*>(tab + 16 * g);
      const float2* tb = reinterpret_cast<const float2*>(tab + 16 * (g + 8));
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        // Nibble byte 32c + l: element 64c + l (low, sub-block 2c) and + 32 (high, 2c + 1).
        const uint32_t wa0 = quant::ld_u32(pa + B::int_word(c, 0, tq)), wa1 = quant::ld_u32(pa + B::int_word(c, 1, tq));
        const uint32_t wb0 = quant::ld_u32(pb + B::int_word(c, 0, tq)), wb1 = quant::ld_u32(pb + B::int_word(c, 1, tq));
#pragma unroll
        for (int sub = 0; sub < 2; ++sub) {
          float cv[NTILE][4], sx[NTILE][4];
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const uint32_t qa = B::int_quants(h ? wa1 : wa0, sub);
            const uint32_t qb = B::int_quants(h ? wb1 : wb0, sub);
            const uint32_t a0 = int_pair(qa, kIntLo), a2 = int_pair(qa, kIntHi);
            const uint32_t a1 = int_pair(qb, kIntLo), a3 = int_pair(qb, kIntHi);
            const int e = B::int_elem(c, sub, h, tq);
#pragma unroll
            for (int n = 0; n < NTILE; ++n) {
              const uint2 bx = *reinterpret_cast<const uint2*>(xg + n * 8 * kXLd + e);
              if (h == 0) {
                mma_bf16_zero(cv[n], a0, a1, a2, a3, bx.x, bx.y);
                mma_bf16_zero(sx[n], kBf16Ones, kBf16Ones, kBf16Ones, kBf16Ones, bx.x, bx.y);
              } else {
                mma_bf16(cv[n], a0, a1, a2, a3, bx.x, bx.y);
                mma_bf16(sx[n], kBf16Ones, kBf16Ones, kBf16Ones, kBf16Ones, bx.x, bx.y);
              }
            }
          }
          const float2 sa = ta[2 * c + sub], sb = tb[2 * c + sub];
#pragma unroll
          for (int n = 0; n < NTILE; ++n) {
            // sx rows are all equal (sum x of tokens 2q, 2q + 1).
            acc[n][0] = fmaf(sa.x, cv[n][0], fmaf(-sa.y, sx[n][0], acc[n][0]));
            acc[n][1] = fmaf(sa.x, cv[n][1], fmaf(-sa.y, sx[n][1], acc[n][1]));
            acc[n][2] = fmaf(sb.x, cv[n][2], fmaf(-sb.y, sx[n][0], acc[n][2]));
            acc[n][3] = fmaf(sb.x, cv[n][3], fmaf(-sb.y, sx[n][1], acc[n][3]));
          }
        }
      }
    } else if constexpr (INTW && T == GgmlType::Q6_K) {
      {
        // Table row (lane / 2): groups 8 (lane % 2) .. + 7 as d * scale.
        const uint8_t* pt = wstage(st) + rt * R::RS + ((wt_addr + pofs) & 15);
        const float d = quant::half_float(quant::ld_u16(pt + 208));
        const uint32_t s0 = quant::ld_u32_a2(pt + 192 + 8 * (lane & 1));
        const uint32_t s1 = quant::ld_u32_a2(pt + 196 + 8 * (lane & 1));
        float v[8];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          v[i] = quant::mul_rn(d, (float)(int8_t)(s0 >> (8 * i)));
          v[4 + i] = quant::mul_rn(d, (float)(int8_t)(s1 >> (8 * i)));
        }
        float4* dst = reinterpret_cast<float4*>(tab + 16 * (lane >> 1) + 8 * (lane & 1));
        dst[0] = make_float4(v[0], v[1], v[2], v[3]);
        dst[1] = make_float4(v[4], v[5], v[6], v[7]);
        __syncwarp();
      }
      const float* ta = tab + 16 * g;
      const float* tb = tab + 16 * (g + 8);
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        // Element 128 hh + 32 s + 16 j + 4 q + i: ql byte 64 hh + 32 (s % 2) + 16 j + 4 q + i
        // (high nibble for s >= 2), qh byte 32 hh + 16 j + 4 q + i at bits 2 s; group 8 hh + 2 s + j.
        uint32_t qla[2][2], qlb[2][2], qha[2], qhb[2];
#pragma unroll
        for (int j = 0; j < 2; ++j) {
#pragma unroll
          for (int s1 = 0; s1 < 2; ++s1) {
            qla[j][s1] = quant::ld_u32_a2(pa + B::int_ql(hh, s1, j, tq));
            qlb[j][s1] = quant::ld_u32_a2(pb + B::int_ql(hh, s1, j, tq));
          }
          qha[j] = quant::ld_u32_a2(pa + B::int_qh(hh, j, tq));
          qhb[j] = quant::ld_u32_a2(pb + B::int_qh(hh, j, tq));
        }
#pragma unroll
        for (int s = 0; s < 4; ++s) {
#pragma unroll
          for (int j = 0; j < 2; ++j) {
            const uint32_t ua = B::int_quants(qla[j][s & 1], qha[j], s);
            const uint32_t ub = B::int_quants(qlb[j][s & 1], qhb[j], s);
            const uint32_t a0 = minus_160(int_pair(ua, kIntLo)), a2 = minus_160(int_pair(ua, kIntHi));
            const uint32_t a1 = minus_160(int_pair(ub, kIntLo)), a3 = minus_160(int_pair(ub, kIntHi));
            const int e = B::int_elem(hh, s, j, tq), grp = B::int_group(hh, s, j);
            const float sa = ta[grp], sb = tb[grp];
#pragma unroll
            for (int n = 0; n < NTILE; ++n) {
              const uint2 bx = *reinterpret_cast<const uint2*>(xg + n * 8 * kXLd + e);
              float cv[4];
              mma_bf16_zero(cv, a0, a1, a2, a3, bx.x, bx.y);
              acc[n][0] = fmaf(sa, cv[0], acc[n][0]);
              acc[n][1] = fmaf(sa, cv[1], acc[n][1]);
              acc[n][2] = fmaf(sb, cv[2], acc[n][2]);
              acc[n][3] = fmaf(sb, cv[3], acc[n][3]);
            }
          }
        }
      }
    } else if constexpr (quant::HasK4Header<T>::value && (NTILE < 8 || T == GgmlType::Q4_K)) {
      // (Q5_K at 8 token tiles keeps per-unit scales: with its high-bit words
      // the hoisted ones spill on sm_80 / sm_89.)
      // Q4_K / Q5_K: every unit this lane takes (8q .. 8q + 7) lies in
      // sub-block pair q, so each row's scales and mins are decoded once per
      // pass, not once per unit (the same fields B::unit() computes).
      quant::QUnit qa, qb;
      B::scales(qa, quant::ld_u32(pa), B::scale_min_pair(pa + 4, tq));
      B::scales(qb, quant::ld_u32(pb), B::scale_min_pair(pb + 4, tq));
#pragma unroll(kUnroll)
      for (int i0 = 0; i0 < 8; ++i0) {
        const int u = 8 * tq + ((i0 + tq) & 7);
        uint32_t q0[1], q1[1], fa[4], fb[4];
        B::template quants<1>(pa, u, q0, q1);
        qa.u0 = q0[0];
        qa.u1 = q1[0];
        B::template quants<1>(pb, u, q0, q1);
        qb.u0 = q0[0];
        qb.u1 = q1[0];
        unit_fragment<T>(qa, fa);
        unit_fragment<T>(qb, fb);
        mma_unit(u, fa, fb);
      }
    } else if constexpr (T == GgmlType::Q6_K) {
      // Lane q's units 8q .. 8q + 7 lie in half h = q / 2 of the block, and
      // their runs in 16-element groups g + {0, 1} (run 0) and g + 4 + {0, 1}
      // (run 1), g = 8h + 2 (q % 2): four scales per row, decoded once per pass.
      const int g = 8 * (tq >> 1) + 2 * (tq & 1);
      float sa[4], sb[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        sa[j] = B::group_scale(pa, g + (j & 1) + 4 * (j >> 1));
        sb[j] = B::group_scale(pb, g + (j & 1) + 4 * (j >> 1));
      }
#pragma unroll(kUnroll)
      for (int i0 = 0; i0 < 8; ++i0) {
        const int x = (i0 + tq) & 7, u = 8 * tq + x, hi = x >> 2;
        quant::QUnit qa, qb;
        B::quants(pa, u, qa.u0, qa.u1);
        B::quants(pb, u, qb.u0, qb.u1);
        qa.a0 = hi ? sa[1] : sa[0];
        qa.a1 = hi ? sa[3] : sa[2];
        qb.a0 = hi ? sb[1] : sb[0];
        qb.a1 = hi ? sb[3] : sb[2];
        qa.b0 = qa.b1 = qb.b0 = qb.b1 = 0.f;
        uint32_t fa[4], fb[4];
        unit_fragment<T>(qa, fa);
        unit_fragment<T>(qb, fb);
        mma_unit(u, fa, fb);
      }
    } else {
#pragma unroll(kUnroll)
      for (int i0 = 0; i0 < 8; ++i0) {
        const int u = 8 * tq + ((i0 + tq) & 7);
        uint32_t fa[4], fb[4];
        decode_unit<T>(pa, u, ebase, a.k, fa);
        decode_unit<T>(pb, u, ebase, a.k, fb);
        mma_unit(u, fa, fb);
      }
    }
  }
  cp_async_wait<0>();  // no copy outlives the CTA

  tc::store_tiles<NTILE>(a, acc, row0 + ra, tq, split);
}

template <GgmlType T, int NTILE, bool INTW, int NW = kWarps>
__global__ void __launch_bounds__(32 * NW) matmul_tc_kernel(const Args a) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  product_tile<T, NTILE, INTW, NW>(a, blockIdx.x * 16 * NW, blockIdx.y, smem_raw);
}

// Mixture-of-experts groups: x's rows sorted by expert (moe_align's slots)
// and cut into tiles of at most 8 * NTILE rows of one expert (moe_align's
// tile list). CTA (i, j) multiplies row tile i of tile j's expert matrix
// with tile j's rows (no split along k: the experts fill the GPU). An
// expert's tiles are neighbours in the list, so the CTAs reading the same
// weights run close together and share them in L2.
struct Groups {
  const int4* tiles;        // [*n_tiles]: {expert, first row, rows, 0}
  const int32_t* n_tiles;   // [1]
  size_t stride;            // bytes from one expert's matrix to the next
};

template <GgmlType T, int NTILE, bool INTW>
__global__ void __launch_bounds__(kThreads, 1) matmul_tc_groups_kernel(const Args a, const Groups gr) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  // The routing is the previous kernel's output: wait before reading it (and
  // before any weight, whose address depends on it).
  pdl_begin();
  if ((int)blockIdx.y >= *gr.n_tiles) return;  // the whole CTA: fewer tiles than the grid holds
  const int4 t = __ldg(gr.tiles + blockIdx.y);
  Args b = a;
  b.w = a.w + (size_t)t.x * gr.stride;
  b.x = a.x + (size_t)t.y * a.k;
  b.y = a.y + (size_t)t.y * a.n_out;
  b.ntok = min(8 * NTILE, t.z);
  product_tile<T, NTILE, INTW>(b, blockIdx.x * kRows, 0, smem_raw);
}

// Ring stages of a launch of `Kernel` (ring of T with NTILE tiles for NW
// warps, plus `extra` bytes after it) within the device's shared memory per
// block, at most a.ring_bytes; 0 where two stages do not fit (wide float rows
// on a small-shared-memory part). Shared memory past 48 KiB is opted into
// once per device and kernel, for the largest ring (the model's first,
// uncaptured step does it before any graph is recorded); the kernel is a
// template argument, so each one keeps its own record of that.
template <GgmlType T, int NTILE, int NW, auto Kernel>
int ring_stages(const Args& a, size_t extra) {
  using R = Ring<T, NTILE, NW>;
  constexpr int kDevices = 64;
  static std::atomic<int> optin[kDevices];  // 0: not yet asked
  const int dev = current_device();
  int limit = dev >= 0 && dev < kDevices ? optin[dev].load(std::memory_order_acquire) : 0;
  if (limit == 0) {
    HX_CUDA_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    if (dev >= 0 && dev < kDevices) optin[dev].store(limit, std::memory_order_release);
  }
  if ((size_t)limit <= extra) return 0;
  const int most = (int)std::min<size_t>(kMaxStages, ((size_t)limit - extra) / R::STAGE);
  if (most < 2) return 0;
  static std::atomic<bool> configured[kDevices];
  if (dev < 0 || dev >= kDevices || !configured[dev].load(std::memory_order_acquire)) {
    HX_CUDA_CHECK(
        cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)(most * R::STAGE + extra)));
    if (dev >= 0 && dev < kDevices) configured[dev].store(true, std::memory_order_release);
  }
  return std::min(most, R::stages(a.ring_bytes > extra ? a.ring_bytes - extra : 0));
}

template <GgmlType T, int NTILE, bool INTW, int NW = kWarps>
void launch_tiles(const Args& a, cudaStream_t stream) {
  constexpr size_t extra = INTW ? kIntTableBytes : 0;
  Args b = a;
  b.stages = ring_stages<T, NTILE, NW, matmul_tc_kernel<T, NTILE, INTW, NW>>(a, extra);
  if (b.stages == 0) {
    tc::launch_tiles<T, NTILE>(a, stream);  // the unstaged kernel
    return;
  }
  const dim3 grid((a.n_out + 16 * NW - 1) / (16 * NW), a.splits);
  launch_overlapped(matmul_tc_kernel<T, NTILE, INTW, NW>, grid, dim3(32 * NW),
                    (size_t)b.stages * Ring<T, NTILE, NW>::STAGE + extra, stream, b);
  HX_CUDA_CHECK(cudaGetLastError());
}

template <GgmlType T, int NTILE, bool INTW>
void launch_groups(const Args& a, const Groups& gr, int max_tiles, cudaStream_t stream) {
  constexpr size_t extra = INTW ? kIntTableBytes : 0;
  Args b = a;
  b.stages = ring_stages<T, NTILE, kWarps, matmul_tc_groups_kernel<T, NTILE, INTW>>(a, extra);
  if (b.stages == 0)
    throw std::invalid_argument("tensor-core expert groups: two ring stages of this type exceed the shared memory");
  const dim3 grid((a.n_out + kRows - 1) / kRows, max_tiles);
  launch_overlapped(matmul_tc_groups_kernel<T, NTILE, INTW>, grid, dim3(kThreads),
                    (size_t)b.stages * Ring<T, NTILE>::STAGE + extra, stream, b, gr);
  HX_CUDA_CHECK(cudaGetLastError());
}

// Tokens up to which T takes the integer path by default (Args::int_tokens
// < 0): where an H100 A/B measured it faster (bench/notes.md). At 32 tokens
// Q4_K's extra MMA of ones and per-group scaling outweigh its cheaper
// decode; Q6_K, whose plain decode costs more, still gains.
template <GgmlType T>
constexpr int int_tokens_default() {
  return T == GgmlType::Q6_K ? 32 : 16;
}

// Token tiles from which T's products run in CTAs of 8 warps (128 rows)
// by default (Args::wide < 0): at 8 tiles each 4-warp CTA holds a 35 KB
// activation stage, so only two fit an SM (8 warps, too few to hide the
// decode's latency); 8 warps share one stage, which halves the activation
// copies per weight and doubles the warps per SM. At 4 tiles only Q8_0
// gained, and matrices of fewer than kWideMinRows rows lost (half as many
// CTAs); bench/notes.md.
template <GgmlType T>
constexpr int wide_tiles_default() {
  return T == GgmlType::Q8_0 ? 4 : 8;
}
constexpr int kWideMinRows = 4096;

// Whether NTILE token tiles of a type with an integer path take it for `a`
// (the callers check the type and the tile limits at compile time).
template <GgmlType T, int NTILE>
bool use_int(const Args& a) {
  return 8 * NTILE <= (a.int_tokens < 0 ? int_tokens_default<T>() : a.int_tokens);
}

template <GgmlType T, int NTILE>
void launch_tiles_for(const Args& a, cudaStream_t stream) {
  if constexpr (has_int_path<T>() && NTILE <= kIntMaxTiles)
    if (use_int<T, NTILE>(a)) return launch_tiles<T, NTILE, true>(a, stream);
  if constexpr (NTILE >= 4) {
    const int wide = a.wide < 0 ? (a.n_out >= kWideMinRows ? wide_tiles_default<T>() : 0) : a.wide;
    if (wide > 0 && NTILE >= wide) return launch_tiles<T, NTILE, false, 8>(a, stream);
  }
  launch_tiles<T, NTILE, false>(a, stream);
}

template <GgmlType T, int NTILE>
void launch_groups_for(const Args& a, const Groups& gr, int max_tiles, cudaStream_t stream) {
  if constexpr (has_int_path<T>() && NTILE <= kIntMaxGroupTiles)
    if (use_int<T, NTILE>(a)) return launch_groups<T, NTILE, true>(a, gr, max_tiles, stream);
  launch_groups<T, NTILE, false>(a, gr, max_tiles, stream);
}

// Entry for one type; `a` is validated and split by the caller.
template <GgmlType T>
void run(const Args& a, cudaStream_t stream) {
  if (a.ntok <= 8)
    tcs::launch_tiles_for<T, 1>(a, stream);
  else if (a.ntok <= 16)
    tcs::launch_tiles_for<T, 2>(a, stream);
  else if (a.ntok <= 32)
    tcs::launch_tiles_for<T, 4>(a, stream);
  else
    tcs::launch_tiles_for<T, 8>(a, stream);
}

// Entry of the grouped products for one type; `tiles` (1, 2, 4 or 8) token
// tiles of 8 rows: the tile list's tile_rows / 8.
template <GgmlType T>
void run_groups(const Args& a, const Groups& gr, int max_tiles, int tiles, cudaStream_t stream) {
  if (tiles <= 1)
    tcs::launch_groups_for<T, 1>(a, gr, max_tiles, stream);
  else if (tiles <= 2)
    tcs::launch_groups_for<T, 2>(a, gr, max_tiles, stream);
  else if (tiles <= 4)
    tcs::launch_groups_for<T, 4>(a, gr, max_tiles, stream);
  else
    tcs::launch_groups_for<T, 8>(a, gr, max_tiles, stream);
}

#ifndef HX_MATVEC_NO_EXTERN
#define HX_TC_DECLARE(T)                                            \
  extern template void run<GgmlType::T>(const Args&, cudaStream_t); \
  extern template void run_groups<GgmlType::T>(const Args&, const Groups&, int, int, cudaStream_t);
HX_FOR_EACH_GGML_TYPE(HX_TC_DECLARE)
#undef HX_TC_DECLARE
#endif

}  // namespace tcs
}  // namespace hx
