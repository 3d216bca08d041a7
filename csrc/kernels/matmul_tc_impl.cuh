// Small-batch products on tensor cores, instantiated once per storage type by
// the generated files matvec_<type>.cu next to the matvec (tools/gen_kernels.py).
//
//   y[t, i] = (accumulate ? y[t, i] : 0) + bias[i] + sum_j W[i, j] x[t, j]
//
// for 2..kTcMaxTokens tokens: the decode step of a batch of sequences, where
// the matvec (one token's fp32 activations per FMA) runs out of issue slots
// and dequantize + cuBLAS writes and rereads a bf16 copy of every weight.
// Each weight block is read once per launch, whatever the token count.
//
// A CTA owns kRows = 64 consecutive rows (four warps of 16) and a range of
// 256-element passes of k (split-K when the row tiles alone do not cover the
// GPU twice). Per pass:
//   1. x's 256 columns for all tokens, bf16, into shared memory (16-byte loads;
//      tokens past n_tok and columns past k are zeros);
//   2. the 64 rows' 256 weights decoded with the block decoders of
//      quant_blocks.cuh (the same unit() / unit_value() the dequantizer uses,
//      so values are exactly the reference dequantization, rounded to bf16)
//      into shared memory, each warp decoding one row's 32 units at a time;
//   3. each warp multiplies its 16 rows by the token tiles with
//      mma.sync m16n8k16 (bf16 in, fp32 accumulate): 16 k-steps, one MMA per
//      8 tokens per k-step. Rows are padded by 16 bytes in shared memory, so
//      the fragment loads (rows g and g + 8, columns 2 * (lane % 4)) hit 32
//      different banks.
// Several CTAs per SM overlap one CTA's weight loads with another's MMAs.
//
// Output: without split-K the CTA writes y itself (bias, accumulate); with
// it, each split writes its partial sums to a workspace and a second kernel
// adds the splits in a fixed order, so results never depend on scheduling.
// The arithmetic is that of dequantize-to-bf16 + a bf16 GEMM with fp32
// accumulation (the large-batch path), so both paths agree to rounding.
// sm_80+ (mma.sync bf16 exists from Ampere on).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <cstdint>

#include "common/arch.cuh"
#include "common/check.h"
#include "common/ggml_types.h"
#include "common/launch.cuh"
#include "kernels/mma_sync.cuh"
#include "kernels/quant_blocks.cuh"

namespace hx {
namespace tc {

constexpr int kWarps = 4;
constexpr int kRows = 16 * kWarps;  // rows per CTA
constexpr int kPass = 256;          // k elements per pass
constexpr int kLd = kPass + 8;      // shared row stride in bf16 (16 bytes of padding)
constexpr int kMaxSplits = 16;

struct Args {
  const uint8_t* w;         // [n_out, row_bytes]
  const __nv_bfloat16* x;   // [ntok, k]
  float* y;                 // [ntok, n_out]
  const float* bias;        // [n_out] or nullptr
  float* part;              // [splits, ntok, n_out] when splits > 1
  size_t row_bytes;
  int n_out, k, ntok, npass;
  int splits, pass_per_split;
  int accumulate;
  // The staged implementation's ring (matmul_tc_staged.cuh): at most
  // ring_bytes of shared memory; stages is set per launch from it.
  size_t ring_bytes;
  int stages;
  // Up to this many tokens, Q4_K and Q6_K run the staged product on integer
  // weights (matmul_tc_staged.cuh); 0: never; < 0: each type's default.
  int int_tokens;
  // Staged CTAs of 8 warps (128 rows) from this many token tiles (4 or 8);
  // 0: always 4 warps; < 0: each type's default.
  int wide;
};

// Shared bytes of a CTA with NTILE tiles of 8 tokens.
template <int NTILE>
constexpr size_t smem_bytes() {
  return (size_t)(kRows + 8 * NTILE) * kLd * sizeof(__nv_bfloat16);
}

// Four values of a run as two bf16 pairs, stored at dst (8-byte aligned).
__device__ __forceinline__ void store_run(__nv_bfloat16* dst, float v0, float v1, float v2, float v3) {
  *reinterpret_cast<uint2*>(dst) = make_uint2(pack_bf16(v0, v1), pack_bf16(v2, v3));
}

// Decodes unit u of one row's pass (256 elements starting at column ebase)
// into the row's shared-memory tile row; parts past k become zeros.
template <GgmlType T>
__device__ __forceinline__ void decode_unit(const uint8_t* pass, int u, int ebase, int k, __nv_bfloat16* srow) {
  using B = quant::Block<T>;
  const int e0 = B::elem0(u), e1 = B::elem1(u);
  if constexpr (is_float_type(T)) {
    float v[4];
    if (ebase + e0 < k) {
      B::run4(pass, e0, v);
      store_run(srow + e0, v[0], v[1], v[2], v[3]);
    } else {
      store_run(srow + e0, 0.f, 0.f, 0.f, 0.f);
    }
    if (ebase + e1 < k) {
      B::run4(pass, e1, v);
      store_run(srow + e1, v[0], v[1], v[2], v[3]);
    } else {
      store_run(srow + e1, 0.f, 0.f, 0.f, 0.f);
    }
  } else {
    // Quant rows end on whole blocks: a unit is wholly inside k or wholly past it.
    if (ebase + e0 < k) {
      const quant::QUnit q = B::unit(pass, u);
      store_run(srow + e0, quant::unit_value<T>(q, 0), quant::unit_value<T>(q, 1), quant::unit_value<T>(q, 2),
                quant::unit_value<T>(q, 3));
      store_run(srow + e1, quant::unit_value<T>(q, 4), quant::unit_value<T>(q, 5), quant::unit_value<T>(q, 6),
                quant::unit_value<T>(q, 7));
    } else {
      store_run(srow + e0, 0.f, 0.f, 0.f, 0.f);
      store_run(srow + e1, 0.f, 0.f, 0.f, 0.f);
    }
  }
}

// A warp's accumulators out: tile n's c0, c1 are row `rbase`, tokens
// 8n + 2 tq and 8n + 2 tq + 1; c2, c3 row rbase + 8, the same tokens. Without
// split-K into y (bias, accumulate), with it into split `split`'s partials.
template <int NTILE>
__device__ __forceinline__ void store_tiles(const Args& a, const float (&acc)[NTILE][4], int rbase, int tq, int split) {
#pragma unroll
  for (int n = 0; n < NTILE; ++n) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int row = rbase + (i >= 2 ? 8 : 0);
      const int t = 8 * n + 2 * tq + (i & 1);
      if (row >= a.n_out || t >= a.ntok) continue;
      if (a.splits > 1) {
        a.part[((size_t)split * a.ntok + t) * a.n_out + row] = acc[n][i];
      } else {
        float v = acc[n][i];
        float* out = a.y + (size_t)t * a.n_out + row;
        if (a.bias) v += a.bias[row];
        if (a.accumulate) v += *out;
        *out = v;
      }
    }
  }
}

template <GgmlType T, int NTILE>
__global__ void __launch_bounds__(kWarps * 32) matmul_tc_kernel(const Args a) {
  pdl_begin();
  constexpr int NT = 8 * NTILE;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  __nv_bfloat16* ws = reinterpret_cast<__nv_bfloat16*>(smem_raw);  // [kRows][kLd]
  __nv_bfloat16* xs = ws + kRows * kLd;                              // [NT][kLd]

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, tq = lane & 3;
  const int row0 = blockIdx.x * kRows;
  const int split = blockIdx.y;
  const int p_begin = split * a.pass_per_split;
  const int p_end = min(a.npass, p_begin + a.pass_per_split);
  constexpr int PB = quant::pass_bytes<T>();

  float acc[NTILE][4];
#pragma unroll
  for (int n = 0; n < NTILE; ++n)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[n][i] = 0.f;

  for (int p = p_begin; p < p_end; ++p) {
    const int ebase = p * kPass;
    // 1. Activations: NT tokens x 32 chunks of 8 columns.
    for (int c = tid; c < NT * (kPass / 8); c += kWarps * 32) {
      const int t = c / (kPass / 8), col = (c % (kPass / 8)) * 8;
      uint4 v = make_uint4(0, 0, 0, 0);
      if (t < a.ntok && ebase + col < a.k)
        v = __ldg(reinterpret_cast<const uint4*>(a.x + (size_t)t * a.k + ebase + col));
      *reinterpret_cast<uint4*>(xs + t * kLd + col) = v;
    }
    // 2. Weights: warp w decodes rows w, w + 4, ...; lane = unit.
    for (int r = warp; r < kRows; r += kWarps) {
      const int row = min(row0 + r, a.n_out - 1);  // rows past n_out re-read the last row, never written
      const uint8_t* pass = a.w + (size_t)row * a.row_bytes + (size_t)p * PB;
      decode_unit<T>(pass, lane, ebase, a.k, ws + r * kLd);
    }
    __syncthreads();
    // 3. MMA: warp rows 16 * warp .. + 15.
    const __nv_bfloat16* wa = ws + (16 * warp + g) * kLd + 2 * tq;
    const __nv_bfloat16* xb = xs + g * kLd + 2 * tq;
#pragma unroll 2
    for (int kk = 0; kk < kPass; kk += 16) {
      const uint32_t a0 = *reinterpret_cast<const uint32_t*>(wa + kk);
      const uint32_t a1 = *reinterpret_cast<const uint32_t*>(wa + 8 * kLd + kk);
      const uint32_t a2 = *reinterpret_cast<const uint32_t*>(wa + kk + 8);
      const uint32_t a3 = *reinterpret_cast<const uint32_t*>(wa + 8 * kLd + kk + 8);
#pragma unroll
      for (int n = 0; n < NTILE; ++n) {
        const uint32_t b0 = *reinterpret_cast<const uint32_t*>(xb + n * 8 * kLd + kk);
        const uint32_t b1 = *reinterpret_cast<const uint32_t*>(xb + n * 8 * kLd + kk + 8);
        mma_bf16(acc[n], a0, a1, a2, a3, b0, b1);
      }
    }
    __syncthreads();  // the next pass overwrites both tiles
  }

  store_tiles<NTILE>(a, acc, row0 + 16 * warp + g, tq, split);
}

template <GgmlType T, int NTILE>
void launch_tiles(const Args& a, cudaStream_t stream) {
  constexpr size_t smem = smem_bytes<NTILE>();
  // Shared memory past 48 KiB is opted into once per device (the model's
  // first, uncaptured step does it before any graph is recorded).
  constexpr int kDevices = 64;
  static std::atomic<bool> configured[kDevices];
  const int dev = current_device();
  if (dev < 0 || dev >= kDevices || !configured[dev].load(std::memory_order_acquire)) {
    HX_CUDA_CHECK(
        cudaFuncSetAttribute(matmul_tc_kernel<T, NTILE>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    if (dev >= 0 && dev < kDevices) configured[dev].store(true, std::memory_order_release);
  }
  const dim3 grid((a.n_out + kRows - 1) / kRows, a.splits);
  launch_overlapped(matmul_tc_kernel<T, NTILE>, grid, dim3(kWarps * 32), smem, stream, a);
  HX_CUDA_CHECK(cudaGetLastError());
}

// Entry for one type; `a` is validated and split by the caller.
template <GgmlType T>
void run(const Args& a, cudaStream_t stream) {
  if (a.ntok <= 8)
    launch_tiles<T, 1>(a, stream);
  else if (a.ntok <= 16)
    launch_tiles<T, 2>(a, stream);
  else if (a.ntok <= 32)
    launch_tiles<T, 4>(a, stream);
  else
    launch_tiles<T, 8>(a, stream);
}

#ifndef HX_MATVEC_NO_EXTERN
#define HX_TC_DECLARE(T) extern template void run<GgmlType::T>(const Args&, cudaStream_t);
HX_FOR_EACH_GGML_TYPE(HX_TC_DECLARE)
#undef HX_TC_DECLARE
#endif

}  // namespace tc
}  // namespace hx
