// Weighted sum of a token's expert outputs into the residual:
//   x[t] += sum_j w[t, j] * y[slot(t, j)]   (j ascending, fp32)
// Grid (token rows, column blocks): each thread owns one column (a float4
// of columns when h % 4 == 0 and the pointers are 16-byte aligned) and reads
// its k expert outputs with independent loads, so a single token row still
// spreads over several CTAs. The row's weights and slots are read by every
// thread from global memory (L1). One arch path (sm_80+).
#include "kernels/moe_combine.cuh"

#include <stdexcept>
#include <string>

#include "common/check.h"
#include "common/launch.cuh"

namespace hx {
namespace {

constexpr int kThreads = 128;

template <bool Vec>
__global__ void __launch_bounds__(kThreads) moe_combine_kernel(float* __restrict__ x, const float* __restrict__ y,
                                                            const float* __restrict__ weights,
                                                            const int32_t* __restrict__ pair_slot, int top_k, int h) {
  pdl_begin();
  const int t = blockIdx.x;
  const int c = blockIdx.y * kThreads + threadIdx.x;
  const float* w = weights + (size_t)t * top_k;
  float* xr = x + (size_t)t * h;
  if constexpr (Vec) {
    if (c >= h / 4) return;
    float4 s = make_float4(0.f, 0.f, 0.f, 0.f);
    for (int j = 0; j < top_k; ++j) {
      const int p = t * top_k + j;
      const size_t row = (size_t)(pair_slot ? pair_slot[p] : p);
      const float4 v = reinterpret_cast<const float4*>(y + row * h)[c];
      const float wj = w[j];
      s.x = fmaf(wj, v.x, s.x);
      s.y = fmaf(wj, v.y, s.y);
      s.z = fmaf(wj, v.z, s.z);
      s.w = fmaf(wj, v.w, s.w);
    }
    float4 r = reinterpret_cast<float4*>(xr)[c];
    r.x += s.x;
    r.y += s.y;
    r.z += s.z;
    r.w += s.w;
    reinterpret_cast<float4*>(xr)[c] = r;
  } else {
    if (c >= h) return;
    float s = 0.f;
    for (int j = 0; j < top_k; ++j) {
      const int p = t * top_k + j;
      const size_t row = (size_t)(pair_slot ? pair_slot[p] : p);
      s = fmaf(w[j], y[row * h + c], s);
    }
    xr[c] += s;
  }
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }

}  // namespace

void moe_combine_launch(float* x, const float* y, const float* weights, const int32_t* pair_slot, int n, int top_k,
                        int h, cudaStream_t stream) {
  if (n < 0 || top_k < 1 || h < 1)
    throw std::invalid_argument("moe_combine: bad sizes n=" + std::to_string(n) + " top_k=" + std::to_string(top_k) +
                                " h=" + std::to_string(h));
  if (n == 0) return;
  if (!x || !y || !weights) throw std::invalid_argument("moe_combine: null pointer");
  if (h % 4 == 0 && aligned16(x) && aligned16(y))
    launch_overlapped(moe_combine_kernel<true>, dim3(n, (h / 4 + kThreads - 1) / kThreads), dim3(kThreads), 0, stream,
                      x, y, weights, pair_slot, top_k, h);
  else
    launch_overlapped(moe_combine_kernel<false>, dim3(n, (h + kThreads - 1) / kThreads), dim3(kThreads), 0, stream, x,
                      y, weights, pair_slot, top_k, h);
  HX_CUDA_CHECK(cudaGetLastError());
}

}  // namespace hx
