// The weight prefetch kernel of l2_prefetch.cuh: thread i of every CTA asks
// for the CTA's slice of range i, then the kernel triggers its successor and
// waits for its predecessor. One arch path; the requests are sm_90+.
#include "kernels/l2_prefetch.cuh"

#include <stdexcept>
#include <string>

#include "common/check.h"
#include "common/launch.cuh"

namespace hx {
namespace {

__global__ void l2_prefetch_kernel(const L2Ranges r) {
  if ((int)threadIdx.x < r.count) {
    size_t off, bytes;
    l2_prefetch_slice(r.bytes[threadIdx.x] / 16 * 16, gridDim.x, blockIdx.x, &off, &bytes);
    if (bytes > 0) l2_prefetch(static_cast<const char*>(r.ptr[threadIdx.x]) + off, bytes);
  }
  pdl_pass_through();
}

}  // namespace

void l2_prefetch_launch(const L2Ranges& r, int ctas, cudaStream_t stream) {
  if (r.count < 0 || r.count > kL2PrefetchMaxRanges)
    throw std::invalid_argument("l2_prefetch: count must be 0.." + std::to_string(kL2PrefetchMaxRanges));
  if (ctas < 1 || ctas > 1024) throw std::invalid_argument("l2_prefetch: ctas must be 1..1024");
  for (int i = 0; i < r.count; ++i)
    if (r.ptr[i] == nullptr || reinterpret_cast<uintptr_t>(r.ptr[i]) % 16 != 0)
      throw std::invalid_argument("l2_prefetch: ranges must start 16-byte aligned");
  if (r.count == 0) return;
  launch_overlapped(l2_prefetch_kernel, dim3(ctas), dim3(32), 0, stream, r);
  HX_CUDA_CHECK(cudaGetLastError());
}

}  // namespace hx
