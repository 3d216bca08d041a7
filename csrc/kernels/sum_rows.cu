// Column sums: dst[j] (+)= sum_i src[i, j].
//
// One thread per column (consecutive threads read consecutive columns of a
// row, so every row is read coalesced), rows walked in order; the sum is
// float32 like the host's. Blocks of 256 threads over the columns. One arch
// path (sm_80+).
#include "kernels/sum_rows.cuh"

#include "common/check.h"

namespace hx {

static __global__ void sum_rows_kernel(const float* __restrict__ src, int n, int h, float* __restrict__ dst,
                                       bool accumulate) {
  const int j = blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= h) return;
  float s = accumulate ? dst[j] : 0.f;
#pragma unroll 8
  for (int i = 0; i < n; ++i) s += src[(size_t)i * h + j];
  dst[j] = s;
}

void sum_rows_launch(const float* src, int n, int h, float* dst, bool accumulate, cudaStream_t stream) {
  if (h <= 0 || (n <= 0 && accumulate)) return;
  const int threads = 256;
  sum_rows_kernel<<<(h + threads - 1) / threads, threads, 0, stream>>>(src, n < 0 ? 0 : n, h, dst, accumulate);
  HX_CUDA_CHECK(cudaGetLastError());
}

}  // namespace hx
