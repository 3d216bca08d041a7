// Bias rows: y[i, j] += b[j] over a row-major [n, m] matrix.
//
// One thread per element, grid-stride, at most 4096 blocks of 256 threads.
// One arch path (sm_80+).
#include "kernels/bias.cuh"

#include <cstdint>

#include "common/check.h"

namespace hx {

static __global__ void add_bias_rows_kernel(float* __restrict__ y, const float* __restrict__ bias, int64_t total,
                                            int m) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total; i += (int64_t)gridDim.x * blockDim.x) {
    y[i] += bias[i % m];
  }
}

void add_bias_rows_launch(float* y, const float* bias, int n, int m, cudaStream_t stream) {
  const int64_t total = (int64_t)n * m;
  if (total == 0) return;
  const int threads = 256;
  const int64_t want = (total + threads - 1) / threads;
  const int blocks = (int)(want < 4096 ? want : 4096);
  add_bias_rows_kernel<<<blocks, threads, 0, stream>>>(y, bias, total, m);
  HX_CUDA_CHECK(cudaGetLastError());
}

}  // namespace hx
