// Bulk L2 prefetches of weights ahead of the products that read them.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "common/arch.cuh"

namespace hx {

// Slice s of `slices` of a range of `size` bytes (a multiple of 16):
// [off, off + bytes), 16-byte aligned; bytes 0 past the end. The slices
// cover the range once, in order.
__host__ __device__ inline void l2_prefetch_slice(size_t size, int slices, int s, size_t* off, size_t* bytes) {
  const size_t per = ((size + slices - 1) / slices + 15) / 16 * 16;
  *off = per * s;
  *bytes = *off < size ? (per < size - *off ? per : size - *off) : 0;
}

#ifdef __CUDACC__
// Bytes of one bulk prefetch request.
constexpr size_t kL2PrefetchChunk = 64 << 10;

// [p, p + bytes) into L2 (p 16-byte aligned, bytes a multiple of 16), in
// requests of at most kL2PrefetchChunk; sm_90+ bulk prefetches, nothing before.
__device__ __forceinline__ void l2_prefetch(const void* p, size_t bytes) {
#if HX_HOPPER
  for (size_t c = 0; c < bytes; c += kL2PrefetchChunk) {
    const uint32_t n = (uint32_t)(bytes - c < kL2PrefetchChunk ? bytes - c : kL2PrefetchChunk);
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(static_cast<const char*>(p) + c), "r"(n)
                 : "memory");
  }
#else
  (void)p;
  (void)bytes;
#endif
}
#endif

constexpr int kL2PrefetchMaxRanges = 4;

struct L2Ranges {
  const void* ptr[kL2PrefetchMaxRanges] = {};
  size_t bytes[kL2PrefetchMaxRanges] = {};
  int count = 0;
};

// Asks for r's byte ranges (16-byte aligned starts; a range's last bytes
// past a multiple of 16 are left out) to come into L2, from `ctas` CTAs that
// each ask for one slice of every range (sm_90+; elsewhere the launch only
// keeps the stream's order). The ranges must be weights no kernel writes:
// they are asked for before the previous kernel of the stream has finished.
// The kernel lets its successor launch at once and ends after its
// predecessor has, so it must come before a kernel that waits for its
// predecessor before it reads anything (launch.cuh's pdl_begin first).
void l2_prefetch_launch(const L2Ranges& r, int ctas, cudaStream_t stream);

}  // namespace hx
