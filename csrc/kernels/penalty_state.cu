// Penalty state update: present[t] = 1 and counts[t] += 1 per listed token t.
//
// One thread per listed token, grid-stride, at most 256 blocks of 256
// threads; counts are atomics because a token may repeat within one update.
// Row gather (per sampled row, its slot's present/counts rows): grid
// (column blocks, rows), the slot read once per block from device memory.
// One arch path (sm_80+).
#include "kernels/penalty_state.cuh"

#include "common/check.h"

namespace hx {

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
