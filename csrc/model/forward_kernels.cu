// Glue kernels of the model forward (see forward_kernels.cuh).
//   add_bias_rows: y[i, j] += b[j], one thread per element, grid-stride.
//   penalty_update: present[t] = 1 and counts[t] += 1 per listed token;
//     atomics because a token may repeat within one update.
//   gather_rows / gather_penalty_rows: grid (column blocks, rows), the row
//     index read once per block from device memory (graph replayable).
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

static __global__ void gather_rows_kernel(const float* __restrict__ src, const int32_t* __restrict__ rows,
                                          int h, float* __restrict__ dst) {
  const float* s = src + (size_t)rows[blockIdx.y] * h;
  float* d = dst + (size_t)blockIdx.y * h;
  for (int j = blockIdx.x * blockDim.x + threadIdx.x; j < h; j += gridDim.x * blockDim.x) d[j] = s[j];
}

void gather_rows_launch(const float* src, const int32_t* rows, int m, int h, float* dst, cudaStream_t stream) {
  if (m <= 0 || h <= 0) return;
  const int threads = 256;
  const int cols = (h + threads - 1) / threads < 16 ? (h + threads - 1) / threads : 16;
  gather_rows_kernel<<<dim3(cols, m), threads, 0, stream>>>(src, rows, h, dst);
  HX_CUDA_CHECK(cudaGetLastError());
}

static __global__ void gather_penalty_rows_kernel(const int32_t* __restrict__ present,
                                                  const int32_t* __restrict__ counts,
                                                  const int32_t* __restrict__ slots, int vocab, int n_slots,
                                                  int32_t* __restrict__ present_out, int32_t* __restrict__ counts_out) {
  const int slot = slots[blockIdx.y];
  const bool valid = slot >= 0 && slot < n_slots;
  const size_t src = (size_t)(valid ? slot : 0) * vocab;
  const size_t dst = (size_t)blockIdx.y * vocab;
  for (int j = blockIdx.x * blockDim.x + threadIdx.x; j < vocab; j += gridDim.x * blockDim.x) {
    present_out[dst + j] = valid ? present[src + j] : 0;
    counts_out[dst + j] = valid ? counts[src + j] : 0;
  }
}

void gather_penalty_rows_launch(const int32_t* present, const int32_t* counts, const int32_t* slots, int m, int vocab,
                                int n_slots, int32_t* present_out, int32_t* counts_out, cudaStream_t stream) {
  if (m <= 0 || vocab <= 0) return;
  const int threads = 256;
  const int cols = (vocab + threads - 1) / threads < 64 ? (vocab + threads - 1) / threads : 64;
  gather_penalty_rows_kernel<<<dim3(cols, m), threads, 0, stream>>>(present, counts, slots, vocab, n_slots,
                                                                    present_out, counts_out);
  HX_CUDA_CHECK(cudaGetLastError());
}

}  // namespace hx
