// The int8 activation stage of the integer-dot matvec (matvec_dp4a.cuh), and
// the per-group quantization that fills it.
//
// For n = ntok * k activations and U terms (1, or 2 in the precise mode) the
// stage is, in order: U int8 arrays of n quants, U float arrays of n / 32
// block scales, U int arrays of n / 16 sums of 16 quants. k is a multiple of
// 32, so a 32-block never straddles two tokens and the stage of [ntok, k] is
// the stage of the flat [1, n]: any kernel that holds whole 32-blocks of x
// can write their part of it.
//
// Group g is elements 4g .. 4g + 3 of the flat x. The 8 lanes holding one
// 32-block (g % 8 == lane % 8, neighbouring lanes) quantize it together:
// d = max|x| / 127 over the block, q = rint(x * (1 / d)) in IEEE float32,
// and with U == 2 the residual fma(-q, d, x) is quantized the same way. The
// matvec's own quantization (quantize_x) and the producers that write the
// stage directly (the RMS norm, the SwiGLU, the decode attention) share this
// code, so the stage has the same bits whoever writes it.
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstddef>
#include <cstdint>

#ifndef HXQ_INLINE
#define HXQ_INLINE __host__ __device__ __forceinline__
#endif

namespace hx {
namespace matvec {
namespace dp4a {

constexpr int kMaxTerms = 2;

// Bytes of the stage of ntok tokens of k elements, `terms` int8 terms per element.
inline size_t smem_bytes(int ntok, int k, int terms = 1) {
  return (size_t)terms * (size_t)ntok * ((size_t)k + (size_t)k / 32 * sizeof(float) + (size_t)k / 16 * sizeof(int));
}

// Where each term's quants, scales and sums start in a stage of n elements
// (terms past U alias term 0, so loops over kMaxTerms index valid memory).
struct StageParts {
  int8_t* xq[kMaxTerms];
  float* xd[kMaxTerms];
  int* xs[kMaxTerms];
};

template <int U>
HXQ_INLINE StageParts stage_parts(uint8_t* base, size_t n) {
  StageParts p;
  float* xd0 = reinterpret_cast<float*>(base + U * n);
  int* xs0 = reinterpret_cast<int*>(xd0 + U * (n / 32));
#pragma unroll
  for (int u = 0; u < kMaxTerms; ++u) {
    const int uu = u < U ? u : 0;
    p.xq[u] = reinterpret_cast<int8_t*>(base) + uu * n;
    p.xd[u] = xd0 + uu * (n / 32);
    p.xs[u] = xs0 + uu * (n / 16);
  }
  return p;
}

HXQ_INLINE int round_int(float v) {
#if defined(__CUDA_ARCH__)
  return __float2int_rn(v);
#else
  return (int)std::nearbyint(v);
#endif
}

// One term of 4 values v of a 32-block spread over 8 lanes: returns the
// scale, writes the quants to q and the 16-element sum (valid in lanes 4m) to s.
#pragma nv_exec_check_disable
template <class Ctx>
HXQ_INLINE float quant_term(const Ctx& ctx, const float (&v)[4], int (&q)[4], int& s) {
  float m = fmaxf(fmaxf(fabsf(v[0]), fabsf(v[1])), fmaxf(fabsf(v[2]), fabsf(v[3])));
  m = fmaxf(m, ctx.shfl_xor(m, 1));
  m = fmaxf(m, ctx.shfl_xor(m, 2));
  m = fmaxf(m, ctx.shfl_xor(m, 4));
  const float d = m / 127.0f;
  const float id = d > 0.f ? 1.0f / d : 0.f;
#pragma unroll
  for (int i = 0; i < 4; ++i) q[i] = round_int(v[i] * id);
  float fs = (float)(q[0] + q[1] + q[2] + q[3]);  // exact: |s| <= 2032 after the reduction
  fs += ctx.shfl_xor(fs, 1);
  fs += ctx.shfl_xor(fs, 2);
  s = (int)fs;
  return d;
}

HXQ_INLINE uint32_t pack4(const int (&q)[4]) {
  return (uint32_t)(q[0] & 0xff) | ((uint32_t)(q[1] & 0xff) << 8) | ((uint32_t)(q[2] & 0xff) << 16) |
         ((uint32_t)(q[3] & 0xff) << 24);
}

// Group g (values r, consumed) into the stage: all 8 lanes of its 32-block
// call it together (they shuffle); lanes with write == false only take part
// in the shuffles, and a whole block of them stores nothing.
#pragma nv_exec_check_disable
template <int U, class Ctx>
HXQ_INLINE void quantize_group(const Ctx& ctx, float (&r)[4], size_t g, bool write, const StageParts& st) {
#pragma unroll
  for (int u = 0; u < U; ++u) {
    int q[4], s;
    const float d = quant_term(ctx, r, q, s);
    if (write) {
      reinterpret_cast<uint32_t*>(st.xq[u])[g] = pack4(q);
      if ((g & 7) == 0) st.xd[u][g / 8] = d;
      if ((g & 3) == 0) st.xs[u][g / 4] = s;
    }
    if (u + 1 < U) {
#pragma unroll
      for (int i = 0; i < 4; ++i) r[i] = fmaf(-(float)q[i], d, r[i]);
    }
  }
}

// A full warp's shuffles, for kernels that write the stage themselves.
struct WarpShuffle {
#if defined(__CUDACC__)
  __device__ __forceinline__ float shfl_xor(float v, int m) const { return __shfl_xor_sync(0xffffffffu, v, m); }
#endif
};

// Terms of the stage that producers write (the model's matvecs run the precise mode).
constexpr int kStageTerms = 2;

}  // namespace dp4a

// Quantizes x [ntok, k] into `out` in the stage layout of `terms` terms with
// one small grid: the same values each dp4a CTA would compute for itself.
void quantize_x_launch(const float* x, int ntok, int k, int terms, uint8_t* out, cudaStream_t stream);
}  // namespace matvec
}  // namespace hx
