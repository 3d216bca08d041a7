// Penalty slot pool updates (see penalty_slots.cuh).
//   update: one thread per (token, slot) entry, grid-stride; present is a
//     plain store of 1, counts an atomicAdd since an entry may repeat.
//   reset: grid (chunks, n), int4 stores over each listed slot's row when
//     the row is 16-byte aligned, scalar stores otherwise.
// One arch path (sm_80+ baseline).
#include "kernels/penalty_slots.cuh"

#include <stdexcept>
#include <string>

#include "common/check.h"

namespace hx {
namespace {

__global__ void penalty_update_batch_kernel(const int32_t* __restrict__ tokens, const int32_t* __restrict__ slots,
                                            int n, int32_t* __restrict__ present, int32_t* __restrict__ counts,
                                            int max_slots, int vocab) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    const int32_t t = tokens[i], s = slots[i];
    if (t < 0 || t >= vocab || s < 0 || s >= max_slots) continue;
    const size_t at = (size_t)s * vocab + t;
    present[at] = 1;
    if (counts != nullptr) atomicAdd(&counts[at], 1);
  }
}

__global__ void penalty_reset_batch_kernel(const int32_t* __restrict__ slots, int32_t* __restrict__ present,
                                           int32_t* __restrict__ counts, int max_slots, int vocab) {
  const int32_t s = slots[blockIdx.y];
  if (s < 0 || s >= max_slots) return;
  int32_t* rows[2] = {present + (size_t)s * vocab, counts != nullptr ? counts + (size_t)s * vocab : nullptr};
  const int stride = gridDim.x * blockDim.x;
  for (int r = 0; r < 2; ++r) {
    int32_t* row = rows[r];
    if (row == nullptr) continue;
    int tail = 0;
    if ((reinterpret_cast<uintptr_t>(row) & 15) == 0) {
      const int n4 = vocab >> 2;
      int4* r4 = reinterpret_cast<int4*>(row);
      for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n4; i += stride) r4[i] = make_int4(0, 0, 0, 0);
      tail = n4 << 2;
    }
    for (int t = tail + blockIdx.x * blockDim.x + threadIdx.x; t < vocab; t += stride) row[t] = 0;
  }
}

void check_sizes(const char* what, int n, int max_slots, int vocab) {
  if (n < 0 || max_slots < 0 || vocab <= 0)
    throw std::invalid_argument(std::string(what) + ": need n >= 0, max_slots >= 0 and vocab > 0, got n = " +
                                std::to_string(n) + ", max_slots = " + std::to_string(max_slots) +
                                ", vocab = " + std::to_string(vocab));
}

}  // namespace

void penalty_update_batch_launch(const int32_t* tokens, const int32_t* slots, int n, int32_t* present,
                                 int32_t* counts, int max_slots, int vocab, cudaStream_t stream) {
  check_sizes("penalty_update_batch", n, max_slots, vocab);
  if (n == 0 || max_slots == 0) return;
  const int threads = 256;
  int blocks = (n + threads - 1) / threads;
  blocks = blocks > 256 ? 256 : blocks;
  penalty_update_batch_kernel<<<blocks, threads, 0, stream>>>(tokens, slots, n, present, counts, max_slots, vocab);
  HX_CUDA_CHECK(cudaGetLastError());
}

void penalty_reset_batch_launch(const int32_t* slots, int n, int32_t* present, int32_t* counts, int max_slots,
                                int vocab, cudaStream_t stream) {
  check_sizes("penalty_reset_batch", n, max_slots, vocab);
  if (n == 0 || max_slots == 0) return;
  if (n > 65535) throw std::invalid_argument("penalty_reset_batch: at most 65535 slots per call, got " + std::to_string(n));
  const int threads = 256;
  int blocks = (vocab / 4 + threads - 1) / threads;
  blocks = blocks < 1 ? 1 : (blocks > 64 ? 64 : blocks);
  penalty_reset_batch_kernel<<<dim3(blocks, n), threads, 0, stream>>>(slots, present, counts, max_slots, vocab);
  HX_CUDA_CHECK(cudaGetLastError());
}

}  // namespace hx
