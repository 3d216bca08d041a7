// A kernel that faults on purpose: one thread stores to an address far from
// any allocation, so the context takes a sticky cudaErrorIllegalAddress. Used
// only by the runtime's poisoning tests.
#include "runtime/fault.h"

#include <cstdint>

#include "common/check.h"

namespace hx {

namespace {
// The address arrives as a kernel argument so the compiler cannot prove the
// store invalid and drop it.
__global__ void fault_kernel(int* p) { *p = 0x4858; }
}  // namespace

void fault_launch(cudaStream_t stream) {
  int* bad = reinterpret_cast<int*>(uintptr_t(0x10));
  fault_kernel<<<1, 1, 0, stream>>>(bad);
  HX_CUDA_CHECK(cudaGetLastError());
}

}  // namespace hx
