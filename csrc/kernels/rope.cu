// Rotary position embedding, in place on q [n, nq, d] and k [n, nk, d].
//
// One block per token: its threads first fill a shared table of cos/sin for
// the d/2 angles pos * inv_freq[i] (float64 angle and sincos, rounded to
// float32 once, exactly what the CPU reference feeds its float32 rotation),
// then rotate every pair of every q and k head of that token. The rotation
// uses explicitly rounded float32 products and sums (no FMA contraction) so
// it reproduces the reference's `a * cos - b * sin` bit for bit.
// Styles: 0 pairs (i, i + d/2) (HF rotate_half), 1 pairs (2i, 2i + 1) (GGML).
// One arch path (sm_80+ baseline); the float64 work is d/2 sincos per token.
#include "kernels/rope.cuh"

#include <stdexcept>
#include <string>

#include "common/arch.cuh"
#include "common/check.h"

namespace hx {
namespace {

template <typename FT>
__global__ void rope_kernel(float* __restrict__ q, float* __restrict__ k, const int32_t* __restrict__ pos,
                            const FT* __restrict__ inv_freq, int nq, int nk, int d, int style) {
  extern __shared__ float cs[];  // [half] cos, then [half] sin
  const int t = blockIdx.x;
  const int half = d >> 1;
  const double p = (double)pos[t];
  for (int i = threadIdx.x; i < half; i += blockDim.x) {
    double s, c;
    sincos(p * (double)inv_freq[i], &s, &c);
    cs[i] = (float)c;
    cs[half + i] = (float)s;
  }
  __syncthreads();
  const int total = (nq + nk) * half;
  for (int idx = threadIdx.x; idx < total; idx += blockDim.x) {
    const int head = idx / half;
    const int i = idx - head * half;
    float* x = head < nq ? q + ((size_t)t * nq + head) * d : k + ((size_t)t * nk + (head - nq)) * d;
    const int i0 = style == 0 ? i : 2 * i;
    const int i1 = style == 0 ? i + half : 2 * i + 1;
    const float x0 = x[i0], x1 = x[i1];
    const float c = cs[i], s = cs[half + i];
    x[i0] = __fsub_rn(__fmul_rn(x0, c), __fmul_rn(x1, s));
    x[i1] = __fadd_rn(__fmul_rn(x1, c), __fmul_rn(x0, s));
  }
}

template <typename FT>
void rope_impl(float* q, float* k, const int32_t* pos, const FT* inv_freq, int n, int nq, int nk, int d,
               int style, cudaStream_t stream) {
  if (n < 0 || nq < 0 || nk < 0 || d <= 0 || (d & 1))
    throw std::invalid_argument("rope: bad sizes n=" + std::to_string(n) + " nq=" + std::to_string(nq) +
                                " nk=" + std::to_string(nk) + " d=" + std::to_string(d) + " (d must be even)");
  if (style != 0 && style != 1)
    throw std::invalid_argument("rope: style must be 0 (half) or 1 (pairs), got " + std::to_string(style));
  if (nk > 0 && k == nullptr) throw std::invalid_argument("rope: k is null with nk > 0");
  if (n == 0 || nq + nk == 0) return;
  const int pairs = (nq + nk) * (d / 2);
  int threads = (pairs + 31) / 32 * 32;
  threads = threads > 256 ? 256 : threads;
  rope_kernel<FT><<<n, threads, (size_t)d * sizeof(float), stream>>>(q, k, pos, inv_freq, nq, nk, d, style);
  HX_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

void rope_launch(float* q, float* k, const int32_t* pos, const float* inv_freq, int n, int nq, int nk, int d,
                 int style, cudaStream_t stream) {
  rope_impl(q, k, pos, inv_freq, n, nq, nk, d, style, stream);
}

void rope_launch(float* q, float* k, const int32_t* pos, const double* inv_freq, int n, int nq, int nk, int d,
                 int style, cudaStream_t stream) {
  rope_impl(q, k, pos, inv_freq, n, nq, nk, d, style, stream);
}

}  // namespace hx
