// Glue kernels of the model forward (see forward_kernels.cuh).
//   add_bias_rows: y[i, j] += b[j], one thread per element, grid-stride.
//   penalty_update: present[t] = 1 and counts[t] += 1 per listed token;
//     atomics because a token may repeat within one update.
#include "model/forward_kernels.cuh"

#include "common/check.h"

namespace hx {

static __global__ void add_bias_rows_kernel(float* __restrict__ y, const float* __restrict__ bias,
                                            int64_t total, int m) {
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total;
       i += (int64_t)gridDim.x * blockDim.x) {
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

static __global__ void penalty_update_kernel(const int32_t* __restrict__ tokens, int n,
                                             int32_t* __restrict__ present, int32_t* __restrict__ counts,
                                             int vocab) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    const int32_t t = tokens[i];
    if (t < 0 || t >= vocab) continue;
    present[t] = 1;
    if (counts != nullptr) atomicAdd(&counts[t], 1);
  }
}

void penalty_update_launch(const int32_t* tokens, int n, int32_t* present, int32_t* counts, int vocab,
                           cudaStream_t stream) {
  if (n <= 0) return;
  const int threads = 256;
  const int blocks = (n + threads - 1) / threads < 256 ? (n + threads - 1) / threads : 256;
  penalty_update_kernel<<<blocks, threads, 0, stream>>>(tokens, n, present, counts, vocab);
  HX_CUDA_CHECK(cudaGetLastError());
}

}  // namespace hx
