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

static __global__ void penalty_update_kernel(const int32_t* __restrict__ tokens, int n, int32_t* __restrict__ present,
                                             int32_t* __restrict__ counts, int vocab) {
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
